"""Plain-torch mirror of benchmarks/rho_speedup.py (uniform vs RHO-LOSS on noisy mnist1d: same data module, splits,
noise, MLP, n_B / n_b, IL model and target definition) without Lightning, so that one factor at a time (optimiser, lr,
budget, evaluation cadence, data size, noisy IL labels) can be varied cheaply to see what moves the step speed-up.
Prints one JSON line: per seed the steps uniform needs to reach its best test accuracy, the steps RHO-LOSS needs to
reach it, and their ratio. The findings are in benchmarks/results/rho_speedup.json ("investigation_3x").

    python benchmarks/rho_speedup_factors.py --seeds 1 --sgd --lr 0.1
"""
import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datamatters.data.mnist1d import MNIST1DDataModule

ap = argparse.ArgumentParser()
ap.add_argument("--seeds", type=int, default=3)
ap.add_argument("--seed-start", type=int, default=0)
ap.add_argument("--noise", type=float, default=0.1)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--epochs", type=int, default=60)
ap.add_argument("--nB", type=int, default=320)
ap.add_argument("--nb", type=int, default=32)
ap.add_argument("--width", type=int, default=256)
ap.add_argument("--il-epochs", type=int, default=40)
ap.add_argument("--il-batch", type=int, default=64)
ap.add_argument("--il-noisy", action="store_true", help="IL model trained on holdout with the same label noise")
ap.add_argument("--eval-every", type=int, default=0, help="steps between test evals (0 = every epoch)")
ap.add_argument("--target", default="best", choices=["best", "final"])
ap.add_argument("--num-samples", type=int, default=10000)
ap.add_argument("--sgd", action="store_true", help="SGD (momentum 0.9) for the target models; the IL model keeps AdamW")
ap.add_argument("--tag", default="")
ap.add_argument("--data-dir", default="data")
a = ap.parse_args()
torch.set_num_threads(1)
kw = dict(data_dir=a.data_dir, batch_size=320, seed=0, eval_batch_size=4096,
          label_noise={"kind": "uniform" if a.noise > 0 else "none", "pc_corrupted": a.noise, "seed": 0})
dm = MNIST1DDataModule(num_samples=a.num_samples, **kw)
dm.setup()


def arrays(split):
    xs, ys = [], []
    for _, x, y in dm.loader(split, batch_size=100000):
        xs.append(x), ys.append(y)
    return torch.cat(xs), torch.cat(ys)


Xtr, Ytr = arrays("train")
Xho, Yho = arrays("holdout")
Xva, Yva = arrays("val")
Xte, Yte = arrays("test")
if a.il_noisy and a.noise > 0:
    g = np.random.default_rng(123)
    Yho = Yho.clone()
    ch = g.permutation(len(Yho))[: int(round(a.noise * len(Yho)))]
    Yho[ch] = torch.as_tensor(g.integers(0, 10, len(ch)))


def mlp(w):
    return nn.Sequential(nn.Linear(40, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))


def acc(m, X, Y):
    with torch.no_grad():
        return float((m(X).argmax(1) == Y).float().mean())


def opt_of(p, lr):
    return torch.optim.SGD(p, lr=lr, momentum=0.9) if a.sgd else torch.optim.AdamW(p, lr=lr)


def train_il(seed):
    torch.manual_seed(seed)
    m = mlp(256)
    o = torch.optim.AdamW(m.parameters(), lr=1e-3)
    best, state = 1e9, None
    for ep in range(a.il_epochs):
        perm = torch.randperm(len(Yho))
        for i in range(0, len(Yho), a.il_batch):
            b = perm[i:i + a.il_batch]
            o.zero_grad()
            F.cross_entropy(m(Xho[b]), Yho[b]).backward()
            o.step()
        with torch.no_grad():
            v = float(F.cross_entropy(m(Xva), Yva))
        if v < best:
            best, state = v, copy.deepcopy(m.state_dict())
    m.load_state_dict(state)
    with torch.no_grad():
        il = F.cross_entropy(m(Xtr), Ytr, reduction="none")
    return il, acc(m, Xva, Yva)


def run(method, seed, il):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    m = mlp(a.width)
    o = opt_of(m.parameters(), a.lr)
    curve, step = [], 0
    for ep in range(a.epochs):
        perm = torch.randperm(len(Ytr), generator=g)
        for i in range(0, len(Ytr), a.nB):
            b = perm[i:i + a.nB]
            k = max(1, int(a.nb / a.nB * len(b)))
            if method == "uniform":
                sel = b[torch.randperm(len(b), generator=g)[:k]]
            else:
                with torch.no_grad():
                    l = F.cross_entropy(m(Xtr[b]), Ytr[b], reduction="none")
                sel = b[torch.topk(l - il[b], k).indices]
            o.zero_grad()
            F.cross_entropy(m(Xtr[sel]), Ytr[sel]).backward()
            o.step()
            step += 1
            if a.eval_every and step % a.eval_every == 0:
                curve.append((step, acc(m, Xte, Yte)))
        if not a.eval_every:
            curve.append((step, acc(m, Xte, Yte)))
    return curve


def steps_to(curve, target):
    return next((s for s, v in curve if v >= target - 1e-9), None)


t0 = time.time()
sps, rows = [], []
for seed in range(a.seed_start, a.seed_start + a.seeds):
    il, il_acc = train_il(seed)
    cu, cr = run("uniform", seed, il), run("rho", seed, il)
    target = max(v for _, v in cu) if a.target == "best" else cu[-1][1]
    su, sr = steps_to(cu, target), steps_to(cr, target)
    sp = su / sr if sr else None  # None: RHO-LOSS never reached the target
    sps.append(sp)
    rows.append(dict(seed=seed, il_val_acc=il_acc, target=target, su=su, sr=sr, sp=sp, u_final=cu[-1][1],
                     r_final=cr[-1][1], r_best=max(v for _, v in cr)))
print(json.dumps({"tag": a.tag, "args": {k: v for k, v in vars(a).items() if k not in ("tag",)},
                  "mean_sp": float(np.mean([s for s in sps if s])) if any(sps) else None,
                  "sps": [round(s, 2) if s else None for s in sps],
                  "rows": rows, "secs": time.time() - t0}), flush=True)

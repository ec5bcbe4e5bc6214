"""RHO-LOSS step throughput: CIFAR ResNet-18 on synthetic 32x32x3 data (data=synthetic_images), n_B = 320, 10%
selected. Per variant: seconds per step and examples (of the big batch) per second.

Variants: ``uniform`` (n_b random points, no scoring pass: the baseline step), and RHO-LOSS with the scoring pass in
train mode fp32 (the reference), in inference (eval) mode, in bf16 autocast, and with channels_last. Each variant
runs the framework's own pieces (``score_batch``, ``reducible_loss``, an ILTable lookup, AdamW step on the selected
points), warms up, then times ``--steps`` steps ``--reps`` times (CUDA synchronised); the median rep is reported.
Goal on one GPU: a RHO-LOSS step at most 1.5x a uniform step of n_b.

    python benchmarks/rho_throughput.py --tiny                       # CPU smoke size (width 16, n_B 64)
    python benchmarks/rho_throughput.py --device cuda                # full size -> benchmarks/results/gpu/
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from datamatters.data.synthetic import SyntheticImagesDataModule
from datamatters.models import build_model
from datamatters.selection.il_store import ILTable
from datamatters.selection.rules import n_select, reducible_loss, uniform
from datamatters.selection.scoring import score_batch
from datamatters.training.classifier import per_example_loss

VARIANTS = {
    "uniform": dict(score=False),
    "rho_train_fp32": dict(score=True, train_mode=True, precision=None, channels_last=False),
    "rho_inference_fp32": dict(score=True, train_mode=False, precision=None, channels_last=False),
    "rho_train_bf16": dict(score=True, train_mode=True, precision="bf16", channels_last=False),
    "rho_train_bf16_channels_last": dict(score=True, train_mode=True, precision="bf16", channels_last=True),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, opt, il: ILTable, k: int, v: dict, device, gen):
    def step(idx, x, y):
        if v.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        if v["score"]:
            stats = score_batch(model, x, y, train_mode=v["train_mode"], keep_bn=True, precision=v["precision"])
            sel = reducible_loss(k, loss=stats["loss"], il=il(idx).to(device)).idx
        else:
            sel = uniform(k, n=len(y), generator=gen).idx.to(device)
        losses = per_example_loss(model(x[sel]), y[sel])
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        opt.step()
    return step


def bench(variant: str, args, device, batches, il) -> dict:
    v = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10, width=args.width).to(device)
    if v.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    k = n_select(args.n_big, args.percent_train)
    step = make_step(model, opt, il, k, v, device, torch.Generator().manual_seed(0))
    it = iter(batches)
    for _ in range(args.warmup):
        step(*next(it))
    times = []
    for _ in range(args.reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(*next(it))
        sync(device)
        times.append((time.perf_counter() - t0) / args.steps)
    t = statistics.median(times)
    consumed = args.n_big if v["score"] else k
    return {"variant": variant, "step_s": t, "step_s_reps": times, "big_batch_examples_per_s": consumed / t,
            "trained_examples_per_s": k / t, "n_B": args.n_big if v["score"] else None, "n_b": k}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke size: width 16, n_B 64, 2 timed steps x 3 reps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--n-big", type=int, default=320)
    ap.add_argument("--percent-train", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.width, args.n_big, args.warmup, args.steps, args.reps = 16, 64, 1, 2, 3
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n_batches = args.warmup + args.steps * args.reps
    dm = SyntheticImagesDataModule(n_train=args.n_big * n_batches, n_holdout=0, n_val=1, n_test=1,
                                   batch_size=args.n_big)
    batches = [(i, x.to(device), y.to(device)) for i, x, y in dm.loader("train", shuffle=True)][:n_batches]
    train_idx = dm.split_indices("train")
    il = ILTable(train_idx, np.random.default_rng(0).uniform(0, 2, len(train_idx)).astype(np.float32))
    results = [bench(v, args, device, batches, il) for v in args.variants]
    base = next((r["step_s"] for r in results if r["variant"] == "uniform"), None)
    for r in results:
        r["step_vs_uniform"] = r["step_s"] / base if base else None
        print(f"{r['variant']:32s} step {r['step_s'] * 1e3:8.1f} ms  x uniform {r['step_vs_uniform'] or 0:5.2f}  "
              f"big-batch examples/s {r['big_batch_examples_per_s']:9.1f}", flush=True)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    out = {
        "benchmark": "rho_throughput", "model": f"CIFAR ResNet-18 (width {args.width})",
        "data": "synthetic_images 3x32x32, 10 classes", "n_B": args.n_big, "percent_train": args.percent_train,
        "device": f"{device.type} ({dev_name})", "machine": platform.node(), "threads": args.threads,
        "cpu_count": os.cpu_count(), "warmup_steps": args.warmup, "timed_steps": args.steps, "reps": args.reps,
        "tiny": args.tiny, "torch": torch.__version__,
        "protocol": "per variant: fresh model (seed 0), warm-up steps, then reps x timed steps on the same batches; "
                    "median rep; CUDA synchronised before reading the clock. uniform = n_b random points, no scoring; "
                    "rho_* = score n_B (BatchNorm stats preserved), IL table lookup, top-k reducible loss, AdamW on n_b.",
        "note": "CPU timings on a shared, loaded 2-core machine are for smoke only" if device.type == "cpu" else "",
        "goal": "rho step <= 1.5x uniform step of n_b on one GPU",
        "results": results,
    }
    default = (Path("benchmarks/results/gpu/rho_throughput.json") if device.type == "cuda"
               else Path(f"benchmarks/results/rho_throughput{'_tiny' if args.tiny else ''}_cpu.json"))
    path = Path(args.out) if args.out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

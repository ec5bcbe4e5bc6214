"""Batched ensemble training: many small models, each on its own subset mask, trained at once.

All M models share one architecture; their parameters are stacked (M, ...) and every step runs one vectorised
forward/backward through ``torch.func.vmap(grad(functional_call(...)))`` plus a vectorised optimiser update.
Each model is exactly what plain sequential training would give (checked in tests/test_ensemble.py):

* its initial parameters come from a generator seeded by ``(seed, model_id)`` (``init_params``);
* an epoch is one pass over *its own* subset in an order keyed by ``(seed, model_id, epoch)`` (``epoch_order``),
  cut into minibatches of ``batch_size`` with a smaller last batch, like a shuffled ``DataLoader``;
* models with fewer minibatches in an epoch simply sit out the extra steps (no update, optimiser state untouched);
* Adam / SGD follow ``torch.optim.Adam`` / ``torch.optim.SGD`` (L2 ``weight_decay`` added to the gradient).

Since nothing depends on which other models share a chunk, ``chunk`` (models trained at once) only trades memory
for speed, and a datamodels job for models 500..549 trains the same networks as one job for 0..9999.
"""
from __future__ import annotations

import copy
import math
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from datamatters.errors import UserError

OPTIMIZERS = ("adam", "sgd")
_INIT_SALT, _ORDER_SALT = 0x1A17, 0x0D3E
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


# ---- reproducible randomness keyed by (seed, model id) ---------------------------------------------------------
def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a cheap, well-mixed hash of uint64 counters (vectorised, no generator state)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def _model_key(seed: int, model_ids: np.ndarray, salt: int) -> np.ndarray:
    s = np.random.SeedSequence([salt, int(seed)]).generate_state(1, np.uint64)[0]
    with np.errstate(over="ignore"):
        return _splitmix(np.asarray(model_ids, dtype=np.uint64) + s)


def init_seed(seed: int, model_id: int) -> int:
    """The torch seed that initialises model ``model_id`` (63 bits, as ``torch.manual_seed`` wants)."""
    return int(_model_key(seed, np.array([model_id]), _INIT_SALT)[0] >> np.uint64(1))


def init_params(model: nn.Module, seed: int, model_ids: Sequence[int]) -> dict[str, Tensor]:
    """Fresh parameters (stacked, (M, ...)) for each model id: ``reset_parameters`` of every submodule under
    ``torch.manual_seed(init_seed(seed, id))``, so each init is the architecture's own default init."""
    m = copy.deepcopy(model).cpu()
    resettable = [mod for mod in m.modules() if hasattr(mod, "reset_parameters")]
    if not resettable and any(True for _ in m.parameters()):
        raise UserError(f"{type(model).__name__} has no submodule with reset_parameters(); cannot draw fresh inits")
    rows: dict[str, list[Tensor]] = {k: [] for k, _ in m.named_parameters()}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for mid in model_ids:
            torch.manual_seed(init_seed(seed, int(mid)))
            for mod in resettable:
                mod.reset_parameters()
            for k, p in m.named_parameters():
                rows[k].append(p.detach().clone())
    return {k: torch.stack(v) for k, v in rows.items()}


def epoch_order(masks: Tensor, seed: int, model_ids: Sequence[int], epoch: int) -> tuple[Tensor, Tensor]:
    """Per-model visiting order for one epoch: ``order`` (M, n) lists each model's subset indices in a random
    order keyed by (seed, model id, epoch), padded with -1; ``counts`` (M,) subset sizes."""
    mk = np.asarray(masks.cpu(), dtype=bool)
    n = mk.shape[1]
    base = _model_key(seed, np.asarray(model_ids), _ORDER_SALT)
    with np.errstate(over="ignore"):
        col = _splitmix(np.arange(n, dtype=np.uint64) + np.uint64(epoch) * np.uint64(0x9E3779B97F4A7C15))
        keys = _splitmix(base[:, None] ^ col[None, :]) >> np.uint64(1)  # 63 bits: fits int64
    keys = np.where(mk, keys, np.iinfo(np.int64).max).astype(np.int64)
    order = np.argsort(keys, axis=1, kind="stable")
    counts = mk.sum(1)
    order = np.where(np.arange(n)[None, :] < counts[:, None], order, -1)
    return torch.from_numpy(order), torch.from_numpy(counts)


# ---- functional model pieces -----------------------------------------------------------------------------------
def _check_model(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            raise UserError(
                f"batched ensemble training does not support {type(mod).__name__} (running statistics are shared "
                "state); use a model without batch norm, or train one model per worker through Lightning")


def _loss(model: nn.Module):
    def per_model(p: dict[str, Tensor], xb: Tensor, yb: Tensor, wb: Tensor) -> Tensor:
        logits = functional_call(model, p, (xb,))
        # cross-entropy as logsumexp - logit[y]: same value, but 2-4x faster than F.cross_entropy for few
        # classes on CPU (its log_softmax kernel reduces over the short last dimension)
        losses = torch.logsumexp(logits, -1) - logits.gather(-1, yb[:, None]).squeeze(-1)
        return (losses * wb).sum() / wb.sum().clamp(min=1.0)

    return per_model


class _Optimizer:
    """Vectorised Adam/SGD over stacked parameters; ``active`` (M,) masks out models without a batch this step."""

    def __init__(self, params: dict[str, Tensor], kind: str, lr: float, weight_decay: float, momentum: float,
                 betas: tuple[float, float], eps: float):
        self.kind, self.lr, self.wd, self.mom, self.betas, self.eps = kind, lr, weight_decay, momentum, betas, eps
        M = next(iter(params.values())).shape[0] if params else 0
        dev = next(iter(params.values())).device if params else "cpu"
        self.t = torch.zeros(M, device=dev, dtype=torch.float64)
        zeros = lambda: {k: torch.zeros_like(v) for k, v in params.items()}  # noqa: E731
        self.m = zeros() if kind == "adam" or momentum else {}
        self.v = zeros() if kind == "adam" else {}

    def _per_model(self, vec: Tensor, like: Tensor) -> Tensor:
        return vec.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], active: Tensor) -> None:
        """In-place update; an inactive model has a zero gradient (zero batch weights), and its decay factors
        are set to 1 and its step to 0, so neither its parameters nor its moments move."""
        act = active.to(torch.float64)
        self.t += act
        b1, b2 = self.betas
        t = self.t.clamp(min=1)
        if self.kind == "adam":
            keep1, keep2 = 1 - act * (1 - b1), 1 - act * (1 - b2)
            step = -act * self.lr / (1 - b1 ** t)
            inv_bc2 = 1 / (1 - b2 ** t).sqrt()
        else:
            keep1, step = 1 - act * (1 - self.mom), -act * self.lr
        for k, p in params.items():
            g = grads[k]
            if self.wd:
                g.addcmul_(p, self._per_model(act * self.wd, p))
            if self.kind == "adam":
                m, v = self.m[k], self.v[k]
                m.mul_(self._per_model(keep1, p)).add_(g, alpha=1 - b1)
                v.mul_(self._per_model(keep2, p)).addcmul_(g, g, value=1 - b2)
                denom = v.sqrt().mul_(self._per_model(inv_bc2, p)).add_(self.eps)
                p.addcdiv_(m * self._per_model(step, p), denom)
            elif self.mom:
                buf = self.m[k].mul_(self._per_model(keep1, p)).add_(g)
                p.addcmul_(buf, self._per_model(step, p))
            else:
                p.addcmul_(g, self._per_model(step, p))


# ---- public API ------------------------------------------------------------------------------------------------
def _as_tensors(X, y, masks, device) -> tuple[Tensor, Tensor, Tensor]:
    X = torch.as_tensor(X)
    y = torch.as_tensor(y)
    masks = torch.as_tensor(np.asarray(masks.cpu() if isinstance(masks, Tensor) else masks)).bool()
    if masks.dim() != 2:
        raise UserError(f"masks must be (num_models, n_train), got shape {tuple(masks.shape)}")
    if X.shape[0] != y.shape[0] or masks.shape[1] != X.shape[0]:
        raise UserError(f"X has {X.shape[0]} rows, y {y.shape[0]}, masks {masks.shape[1]} columns: they must agree")
    if masks.shape[0] and int(masks.sum(1).min()) == 0:
        raise UserError("a mask selects no training point; use a larger alpha or drop that model")
    if X.is_floating_point() and not bool(torch.isfinite(X).all()):
        bad = torch.nonzero(~torch.isfinite(X).reshape(X.shape[0], -1).all(1)).flatten()
        raise UserError(f"X has non-finite values (NaN or inf) in {len(bad)} rows (first: {bad[:5].tolist()}); "
                        "clean or impute them before training")
    return X.to(device), y.to(device), masks


def check_labels(y, num_classes: int, what: str = "y") -> Tensor:
    """Integer class labels in [0, num_classes), as a long tensor; anything else is a UserError (instead of an
    index error deep inside a vmapped loss)."""
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex():
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise UserError(f"{what} must hold integer class labels; it has non-integer or non-finite values")
    y = y.long()
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()
        raise UserError(f"{what} has {len(idx)} labels outside [0, {num_classes}) for a model with {num_classes} "
                        f"outputs (e.g. {y[idx[0]].item()} at position {idx[0].item()}); labels must be 0..C-1")
    return y


def num_outputs(model: nn.Module, X: Tensor) -> int:
    """Classes C of a classifier: the last dimension of its output on one input."""
    with torch.no_grad():
        out = copy.deepcopy(model).to(X.device).eval()(X[:1])
    return int(out.shape[-1])


def auto_chunk(M: int, batch_size: int, X: Tensor) -> int:
    """Models per vectorised step that keep a step's inputs and activations near 256 MB (rough)."""
    per_model = batch_size * X[:1].numel() * X.element_size() * 8  # inputs + activations, rough
    return max(1, min(M, int(2**28 // max(per_model, 1))))


def train_ensemble(model: nn.Module, X: Tensor, y: Tensor, masks: Tensor, *, epochs: int, batch_size: int,
                   lr: float, weight_decay: float = 0.0, optimizer: Literal["sgd", "adam"] = "adam", seed: int = 0,
                   device=None, chunk: int | None = None, model_ids: Sequence[int] | None = None,
                   momentum: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   progress: bool = False) -> dict[str, Tensor]:
    """Train M = len(masks) independent copies of ``model`` (a template; its own weights are not used), model m on
    the rows where ``masks[m]`` is true. Returns stacked parameters {name: (M, ...)} on ``device``.

    ``model_ids`` (default 0..M-1) are the global ids that key each model's init and batch order.
    """
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if int(epochs) < 1 or int(batch_size) < 1 or not lr > 0:
        raise UserError(f"need epochs >= 1, batch_size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    _check_model(model)
    device = torch.device(device) if device is not None else X.device if isinstance(X, Tensor) else "cpu"
    X, y, masks = _as_tensors(X, y, masks, device)
    y = check_labels(y, num_outputs(model, X)).to(device)
    M = masks.shape[0]
    if M == 0:
        raise UserError("train_ensemble needs at least one mask")
    ids = np.arange(M) if model_ids is None else np.asarray(model_ids, dtype=np.int64)
    if len(ids) != M:
        raise UserError(f"model_ids has {len(ids)} entries for {M} masks")
    chunk = int(chunk) if chunk else auto_chunk(M, batch_size, X)
    base = copy.deepcopy(model).to(device).train()
    step_grad = vmap(grad(_loss(base)), randomness="different")
    out: list[dict[str, Tensor]] = []
    starts = range(0, M, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="ensemble chunks")
    for s in starts:
        sl = slice(s, min(s + chunk, M))
        params = {k: v.to(device) for k, v in init_params(model, seed, ids[sl]).items()}
        opt = _Optimizer(params, optimizer, float(lr), float(weight_decay), float(momentum), betas, float(eps))
        for ep in range(int(epochs)):
            order, counts = epoch_order(masks[sl], seed, ids[sl], ep)
            order = order.to(device)
            for b in range(math.ceil(int(counts.max()) / batch_size)):
                idx = order[:, b * batch_size:(b + 1) * batch_size]
                valid = idx >= 0
                safe = idx.clamp(min=0)
                grads = step_grad(params, X[safe], y[safe], valid.to(X.dtype if X.is_floating_point() else torch.float32))
                opt.step(params, grads, valid.any(1))
        out.append(params)
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def predict_ensemble(model: nn.Module, params: dict[str, Tensor], X: Tensor, chunk: int | None = None) -> Tensor:
    """Logits (M, N, C) of every stacked model on ``X``, in eval mode under inference mode."""
    _check_model(model)
    dev = next(iter(params.values())).device
    base = copy.deepcopy(model).to(dev).eval()
    X = torch.as_tensor(X).to(dev)
    M = next(iter(params.values())).shape[0]
    chunk = int(chunk) if chunk else max(1, min(M, int(2**27 // max(X.numel() * X.element_size(), 1)) or 1))
    fwd = vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))
    with torch.inference_mode():
        return torch.cat([fwd({k: v[s:s + chunk] for k, v in params.items()}, X) for s in range(0, M, chunk)])


def margins(logits: Tensor, y: Tensor) -> Tensor:
    """Correct-class logit minus the largest other logit, (M, N) from logits (M, N, C) and labels (N,)."""
    y = check_labels(y, logits.shape[-1]).to(logits.device)
    idx = y.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    correct = logits.gather(-1, idx).squeeze(-1)
    others = logits.scatter(-1, idx, float("-inf"))
    return correct - others.max(-1).values


def losses(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy loss (M, N) of every model on every point."""
    y = check_labels(y, logits.shape[-1]).to(logits.device)
    M, N, C = logits.shape
    return F.cross_entropy(logits.reshape(M * N, C), y.repeat(M), reduction="none").view(M, N)

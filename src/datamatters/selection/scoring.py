"""The scoring pass: per-example statistics of a big batch without an autograd graph or side effects."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from datamatters.training.classifier import per_example_loss

_BN = (nn.modules.batchnorm._BatchNorm,)


def synced_clock(device=None) -> float:
    """``time.perf_counter()`` once the device's queued kernels are done: CUDA runs asynchronously, so an
    unsynchronised clock reads before the scoring or the step has finished and misattributes their time."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def has_active_dropout(model: nn.Module) -> bool:
    """Whether MC dropout can vary this model's outputs (a dropout layer with p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


@contextmanager
def preserved_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run a forward pass without changing BatchNorm running statistics (the reference lets scoring update them)."""
    if not enabled:
        yield
        return
    saved = [(b, b.detach().clone()) for m in model.modules() if isinstance(m, _BN) for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


@contextmanager
def mode(model: nn.Module, train: bool) -> Iterator[None]:
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


def autocast_for(x, precision: str | None):
    if precision in (None, "32", "fp32", "32-true"):
        return nullcontext()
    device = x.device.type if torch.is_tensor(x) else "cpu"
    dtype = torch.bfloat16 if "bf16" in str(precision) else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


def score_batch(model: nn.Module, x, y: torch.Tensor, *, train_mode: bool = True, keep_bn: bool = True,
                precision: str | None = None, mc_samples: int = 0) -> dict[str, torch.Tensor]:
    """``{"loss", "logits"}`` (and ``"mc_logits"`` (S, n, C) when ``mc_samples`` > 0) under inference mode."""
    with torch.inference_mode(), preserved_bn_stats(model, keep_bn), autocast_for(x, precision):
        with mode(model, train_mode):
            logits = model(x).float()
        out = {"logits": logits, "loss": per_example_loss(logits, y)}
        if mc_samples:
            with mode(model, True):  # MC dropout needs dropout active
                out["mc_logits"] = torch.stack([model(x).float() for _ in range(mc_samples)])
    return out

"""Weight statistics of a network, exactly as Hu et al. (2023) define them.

Per weight matrix ``W``: ``l1`` (entrywise), ``l2`` (Frobenius), ``trace`` (sum of the main diagonal, also for
non-square matrices), ``spectral`` (largest singular value), ``code_sparsity = l1 / l2``, ``computational_sparsity =
trace / spectral``, ``mean_singular_value`` and ``var_singular_value`` (unbiased, singular values below 1e-5 set to 0
first; NaN for a matrix with a single singular value). Per convolution kernel tensor ``(out, in, *k)``: the mean over
the ``out * in`` kernels of l1, l2 and l1/l2. Pooled over all tracked weights and over all biases: mean, variance
(unbiased) and median (``torch.median``, i.e. the lower of the two middle values, as the reference).

A checkpoint's feature vector averages each statistic over the tracked matrices/kernels that have it (NaN-aware for
the singular-value variance, as the reference's ``nanmean``), giving the reference's 14 HMM features ``FEATURES``.
Attention weights stored per head ``(heads, d_head, d_model)`` count as one matrix per head; a
``nn.MultiheadAttention`` in-projection is split into Q/K/V and heads the same way.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from datamatters.errors import UserError

MATRIX_STATS = ("l1", "l2", "trace", "spectral", "code_sparsity", "computational_sparsity",
                "mean_singular_value", "var_singular_value")
DISTRIBUTION_STATS = ("mean_w", "median_w", "var_w", "mean_b", "median_b", "var_b")
FEATURES = MATRIX_STATS + DISTRIBUTION_STATS
SINGULAR_VALUE_FLOOR = 1e-5

DEFAULT_EXCLUDE = ("*embed*",)
DEFAULT_EXCLUDE_TYPES = ("Embedding", "Norm")


def matrix_stats(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of a matrix, or of a stack ``(..., m, n)`` of matrices (one value per matrix)."""
    W = W.detach().float()
    l1 = W.abs().sum((-2, -1))
    l2 = W.square().sum((-2, -1)).sqrt()
    trace = W.diagonal(dim1=-2, dim2=-1).sum(-1)
    s = torch.linalg.svdvals(W)
    spectral = s[..., 0]
    s = torch.where(s < SINGULAR_VALUE_FLOOR, torch.zeros_like(s), s)
    var = s.var(-1) if s.shape[-1] > 1 else torch.full_like(spectral, float("nan"))
    return {
        "l1": l1, "l2": l2, "trace": trace, "spectral": spectral,
        "code_sparsity": l1 / l2, "computational_sparsity": trace / spectral,
        "mean_singular_value": s.mean(-1), "var_singular_value": var,
    }


def kernel_stats(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """Convolution weight ``(out, in, *kernel)``: mean over kernels of per-kernel l1, l2 and l1/l2."""
    W = W.detach().float().flatten(2)
    l1, l2 = W.abs().sum(-1), W.square().sum(-1).sqrt()
    return {"l1": l1.mean(), "l2": l2.mean(), "code_sparsity": (l1 / l2).mean()}


def distribution_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance, lower median) of all entries."""
    x = x.detach().float().reshape(-1)
    if x.numel() == 0:
        nan = torch.tensor(float("nan"))
        return nan, nan, nan
    return x.mean(), x.var() if x.numel() > 1 else x.new_tensor(float("nan")), x.median()


@dataclass
class Tracked:
    """One tracked tensor: ``kind`` is matrix (2-D), heads (stack of per-head matrices), kernel (conv) or bias.
    ``view`` maps the parameter named ``param`` to the tensor the statistics see (e.g. one of Q/K/V, split by head)."""

    name: str
    kind: str
    param: str
    tensor: torch.Tensor
    view: Callable[[torch.Tensor], torch.Tensor] = staticmethod(lambda w: w)

    def get(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.view(self.tensor if params is None else params[self.param])


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _mha_entries(prefix: str, m: nn.MultiheadAttention) -> list[Tracked]:
    h, E = m.num_heads, m.embed_dim
    out: list[Tracked] = []
    if m.in_proj_weight is not None:
        for i, part in enumerate("qkv"):
            out.append(Tracked(f"{prefix}in_proj_weight.{part}", "heads", f"{prefix}in_proj_weight", m.in_proj_weight,
                               lambda w, i=i: w[i * E:(i + 1) * E].reshape(h, E // h, E)))
    else:
        for part in "qkv":
            w = getattr(m, f"{part}_proj_weight")
            out.append(Tracked(f"{prefix}{part}_proj_weight", "heads", f"{prefix}{part}_proj_weight", w,
                               lambda w: w.reshape(h, E // h, w.shape[-1])))
    if m.in_proj_bias is not None:
        out.append(Tracked(f"{prefix}in_proj_bias", "bias", f"{prefix}in_proj_bias", m.in_proj_bias))
    return out


def tracked_tensors(model: nn.Module, include: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
                    exclude_types: Sequence[str] | None = DEFAULT_EXCLUDE_TYPES) -> list[Tracked]:
    """Which parameters the statistics cover, by name pattern (``fnmatch`` on the full parameter name) and by owning
    module type (a class-name substring, e.g. ``Norm`` covers LayerNorm/BatchNorm/GroupNorm)."""
    include, exclude, exclude_types = list(include or ["*"]), list(exclude or []), list(exclude_types or [])
    found: list[Tracked] = []
    for mod_name, module in model.named_modules():
        if any(t in type(module).__name__ for t in exclude_types):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        handled: set[str] = set()
        if isinstance(module, nn.MultiheadAttention):
            found += _mha_entries(prefix, module)
            handled = {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
        is_conv = isinstance(module, nn.modules.conv._ConvNd)
        for pname, p in module.named_parameters(recurse=False):
            if pname not in handled:
                found.append(Tracked(prefix + pname, _kind(pname, p, is_conv), prefix + pname, p))
    return [t for t in found if t.kind and _matches(t.name, include) and not _matches(t.name, exclude)]


def _kind(pname: str, p: torch.Tensor, is_conv: bool) -> str:
    if "bias" in pname or pname.startswith("b_"):
        return "bias"
    if p.ndim == 1:
        return ""
    if is_conv:
        return "kernel"
    return {2: "matrix", 3: "heads"}.get(p.ndim, "matrix")


class StatsComputer:
    """Computes a checkpoint's statistics for a fixed set of tracked tensors (resolved once, reused every record)."""

    def __init__(self, model: nn.Module, include=None, exclude=DEFAULT_EXCLUDE, exclude_types=DEFAULT_EXCLUDE_TYPES,
                 per_layer: bool = False):
        self.tracked = tracked_tensors(model, include, exclude, exclude_types)
        self.per_layer = per_layer
        if not any(t.kind != "bias" for t in self.tracked):
            raise UserError("weight statistics: no weight matrix matches the include/exclude patterns; "
                            f"model parameters are {[n for n, _ in model.named_parameters()][:20]}")

    @classmethod
    def from_tracked(cls, tracked: list[Tracked], per_layer: bool = False) -> "StatsComputer":
        """For tensors found without a model (a checkpoint's state dict, ``dynamics.checkpoints``)."""
        if not any(t.kind != "bias" for t in tracked):
            raise UserError("weight statistics: no weight matrix matches the include/exclude patterns; tensors are "
                            f"{[t.name for t in tracked][:20]}")
        self = cls.__new__(cls)
        self.tracked, self.per_layer = tracked, per_layer
        return self

    @torch.no_grad()
    def __call__(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Statistics of the model's current weights, or of ``params`` (name -> tensor, e.g. one member of a stacked
        ensemble) laid out like the model."""
        per_stat: dict[str, list[torch.Tensor]] = {k: [] for k in MATRIX_STATS}
        layer: dict[str, torch.Tensor] = {}
        weights, biases = [], []
        for t in self.tracked:
            x = t.get(params)
            if t.kind == "bias":
                biases.append(x.detach().reshape(-1))
                continue
            weights.append(x.detach().reshape(-1))
            st = kernel_stats(x) if t.kind == "kernel" else matrix_stats(x.reshape(x.shape[0], -1) if x.ndim > 3 else x)
            for k, v in st.items():
                per_stat[k].append(v.reshape(-1))
                if self.per_layer:
                    layer[f"{t.name}/{k}"] = v.mean() if k != "var_singular_value" else v.nanmean()
        out: dict[str, torch.Tensor] = {}
        for k, vals in per_stat.items():
            v = torch.cat(vals) if vals else torch.tensor([float("nan")])
            out[k] = v.nanmean() if k == "var_singular_value" else v.mean()
        for tag, xs in (("w", weights), ("b", biases)):
            mean, var, med = distribution_stats(torch.cat(xs) if xs else torch.zeros(0))
            out.update({f"mean_{tag}": mean, f"median_{tag}": med, f"var_{tag}": var})
        out.update(layer)
        keys = list(out)
        values = torch.stack([out[k].reshape(()).double() for k in keys]).cpu().tolist()
        return dict(zip(keys, values))


def weight_statistics(model: nn.Module, include=None, exclude=DEFAULT_EXCLUDE, exclude_types=DEFAULT_EXCLUDE_TYPES,
                      per_layer: bool = False) -> dict[str, float]:
    """One checkpoint's statistics (the 14 ``FEATURES``, plus ``<param>/<stat>`` columns with ``per_layer``)."""
    return StatsComputer(model, include, exclude, exclude_types, per_layer)()


def total_norm(tensors: Iterable[torch.Tensor]) -> float:
    """L2 norm of the concatenation of ``tensors`` (one host sync)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return math.nan
    norms = torch._foreach_norm([t.detach().float() for t in tensors])
    return float(torch.linalg.vector_norm(torch.stack(norms)))

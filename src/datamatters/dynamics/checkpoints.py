"""Weight statistics of saved checkpoints (the reference's step 1: downloaded Pythia / MultiBERTs checkpoints).

A directory holds Lightning ``.ckpt`` files, torch state dicts (``.pt``/``.pth``/``.bin``/``.safetensors``) or
Hugging Face ``save_pretrained`` folders (``config.json`` + weights; Pythia's revisions are named ``step1000`` ...).
Each becomes one row of the callback's table (``weight_stats.parquet``, same columns), its step taken from the
Lightning checkpoint, the name (``step1000``, ``step=1000``, ``checkpoint-1000``) or given.

Without the model's classes, tensors are classified by name and shape, with the callback's rules: biases (``bias``,
``b_*``), matrices (2-D), per-head stacks (3-D), convolution kernels (4-D+, or 3-D under a ``conv`` name);
embeddings (``*embed*``) and normalisation layers (a module named ``*norm*``, ``ln_*``, ``ln1``...) are left out.
Attention projections are split per head: fused QKV as GPT-NeoX stores it (``query_key_value``: rows ordered
head, q/k/v, d_head), as ``nn.MultiheadAttention`` (``in_proj_weight``: q/k/v blocks, then heads) and GPT-2
(``c_attn``, transposed), separate Q/K/V as BERT (``query``/``key``/``value``) or ``q_proj``/``k_proj``/``v_proj``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from datamatters.dynamics.stats import DEFAULT_EXCLUDE, StatsComputer, Tracked, _matches
from datamatters.errors import UserError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_NORM = re.compile(r"(norm|^ln(_.*|\d*)$)", re.IGNORECASE)
_SEPARATE = {"query", "key", "value", "q_proj", "k_proj", "v_proj", "q", "k", "v"}


def parse_step(name: str) -> int | None:
    """``step1000`` / ``step=1000`` / ``step_1000`` / ``checkpoint-1000`` / ``epoch=0-step=12.ckpt`` -> the step."""
    m = re.search(r"(?:step|checkpoint)[=_-]?(\d+)", name, re.IGNORECASE)
    return int(m.group(1)) if m else None


def find_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints directly under ``directory`` (files and HF folders), or ``directory`` itself if it is one."""
    d = Path(directory)
    if _is_hf(d) or (d.is_file() and _is_file_ckpt(d)):
        return [d]
    if not d.is_dir():
        raise UserError(f"dynamics_stats: {d} is not a directory of checkpoints")
    found = [p for p in sorted(d.iterdir()) if _is_hf(p) or (p.is_file() and _is_file_ckpt(p))]
    if not found:
        raise UserError(f"dynamics_stats: no checkpoints under {d} (Lightning .ckpt, torch state dicts "
                        f"{STATE_DICT_SUFFIXES}, or Hugging Face save_pretrained folders with config.json)")
    return found


def _is_hf(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any((p / f).is_file() for f in WEIGHT_FILES)


def _is_file_ckpt(p: Path) -> bool:
    return p.suffix == ".ckpt" or p.suffix in STATE_DICT_SUFFIXES


def load_checkpoint(path: str | Path, trusted: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state dict, info)``; info has ``step``/``epoch`` (Lightning) and ``num_heads`` (HF config) when known.
    Pickled Python objects besides tensors (e.g. Lightning hyper-parameters as a Namespace) are only unpickled with
    ``trusted`` (unpickling runs code)."""
    path = Path(path)
    info: dict = {}
    if path.is_dir():
        cfg = json.loads((path / "config.json").read_text())
        info["num_heads"] = next((int(cfg[k]) for k in HEAD_KEYS if k in cfg), None)
        weights = next(path / f for f in WEIGHT_FILES if (path / f).is_file())
        return _load_file(weights, trusted), info
    obj = _load_file(path, trusted)
    if isinstance(obj, Mapping) and "state_dict" in obj:  # Lightning
        info.update(step=obj.get("global_step"), epoch=obj.get("epoch"))
        hp = obj.get("hyper_parameters") or {}
        hp = hp if isinstance(hp, Mapping) else vars(hp)  # Lightning may store an argparse.Namespace
        info["num_heads"] = next((int(hp[k]) for k in HEAD_KEYS if isinstance(hp.get(k), int)), None)
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not any(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"dynamics_stats: {path} holds no state dict (a mapping of parameter names to tensors)")
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}, info


def _load_file(path: Path, trusted: bool = False):
    import pickle

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        raise UserError(f"dynamics_stats: {path} holds Python objects besides tensors ({str(e).splitlines()[0][:200]})."
                        " If you trust the file (unpickling runs code), set task.trusted=true") from None


def _module_segments(name: str) -> list[str]:
    return name.split(".")[:-1]


def _per_head(w: torch.Tensor, heads: int, name: str) -> torch.Tensor:
    """(rows, hidden) -> (rows / d_head, d_head, hidden) with d_head = hidden / heads (fewer K/V heads allowed)."""
    d_head = w.shape[1] // heads
    if d_head * heads != w.shape[1] or w.shape[0] % d_head:
        raise UserError(f"dynamics_stats: {name} of shape {tuple(w.shape)} does not split into {heads} heads")
    return w.reshape(w.shape[0] // d_head, d_head, w.shape[1])


def state_dict_tracked(sd: Mapping[str, torch.Tensor], num_heads: int | None = None,
                       include: Sequence[str] | None = None,
                       exclude: Sequence[str] | None = DEFAULT_EXCLUDE) -> list[Tracked]:
    """The tensors the statistics cover, as the callback would track them on the model."""
    include, exclude = list(include or ["*"]), list(exclude or [])
    out: list[Tracked] = []

    def heads_needed(name):
        if not num_heads:
            raise UserError(f"dynamics_stats: {name} is an attention projection; give the number of heads "
                            "(dynamics_stats.num_heads=...), it is not in the checkpoint")
        return int(num_heads)

    for name, t in sd.items():
        if not t.is_floating_point() or any(_NORM.search(s) for s in _module_segments(name)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        mod = _module_segments(name)[-1] if _module_segments(name) else ""
        if "bias" in leaf or leaf.startswith("b_"):
            if t.ndim == 1:
                out.append(Tracked(name, "bias", name, t))
            continue
        if t.ndim < 2 or leaf in ("inv_freq", "position_ids"):
            continue
        view: Callable | None = None
        parts: list[tuple[str, Callable]] = []
        if t.ndim == 2 and (mod == "query_key_value" or leaf == "query_key_value"):  # GPT-NeoX: (h, 3, d_head, H)
            h = heads_needed(name)
            parts = [(p, lambda w, i=i, h=h: w.reshape(h, 3, w.shape[0] // (3 * h), w.shape[1])[:, i])
                     for i, p in enumerate("qkv")]
        elif t.ndim == 2 and leaf == "in_proj_weight":  # nn.MultiheadAttention: q/k/v blocks, then heads
            h = heads_needed(name)
            parts = [(p, lambda w, i=i, h=h: w.reshape(3, h, w.shape[0] // (3 * h), w.shape[1])[i])
                     for i, p in enumerate("qkv")]
        elif t.ndim == 2 and mod == "c_attn":  # GPT-2 Conv1D: (H, 3H)
            h = heads_needed(name)
            parts = [(p, lambda w, i=i, h=h: _per_head(w.T.reshape(3, -1, w.shape[0])[i], h, name))
                     for i, p in enumerate("qkv")]
        elif t.ndim == 2 and mod in _SEPARATE:
            h = heads_needed(name)
            view = lambda w, h=h, name=name: _per_head(w, h, name)  # noqa: E731
        if parts:
            out += [Tracked(f"{name}.{p}", "heads", name, t, f) for p, f in parts]
            continue
        kind = "kernel" if t.ndim >= 4 or (t.ndim == 3 and "conv" in name.lower()) else \
            ("heads" if view is not None or t.ndim == 3 else "matrix")
        out.append(Tracked(name, kind, name, t, view or (lambda w: w)))
    return [x for x in out if _matches(x.name, include) and not _matches(x.name, exclude)]


def checkpoint_statistics(sd: Mapping[str, torch.Tensor], num_heads: int | None = None, include=None,
                          exclude=DEFAULT_EXCLUDE, per_layer: bool = False) -> dict[str, float]:
    """The callback's statistics (the 14 ``FEATURES``, ``<param>/<stat>`` with ``per_layer``) of a state dict."""
    return StatsComputer.from_tracked(state_dict_tracked(sd, num_heads, include, exclude), per_layer)()


Evaluation = Callable[[Mapping[str, torch.Tensor], dict], Mapping[str, float]]


def evaluate_columns(evaluations: Mapping[str, Evaluation] | Sequence[Evaluation] | None,
                     sd: Mapping[str, torch.Tensor], info: dict) -> dict[str, float]:
    """Extra per-checkpoint columns (the reference's step 3, e.g. an out-of-distribution loss): each callable gets the
    state dict and ``info`` (path, step, ...) and returns ``{column: value}``, or one number named by its key."""
    if not evaluations:
        return {}
    items = evaluations.items() if isinstance(evaluations, Mapping) else [(None, f) for f in evaluations]
    out: dict[str, float] = {}
    for key, fn in items:
        res = fn(sd, info)
        if not isinstance(res, Mapping):
            if key is None:
                raise UserError(f"dynamics_stats: evaluation {fn!r} returned {res!r}; return a dict "
                                "{column: value} or give it a name (evaluate: {name: target})")
            res = {key: res}
        for col, v in res.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise UserError(f"dynamics_stats: evaluation column {col!r} is {v!r}, not a number") from None
            if v != v or v in (float("inf"), float("-inf")):
                raise UserError(f"dynamics_stats: evaluation column {col!r} is {v} at {info.get('path')}")
            out[str(col)] = v
    return out


def checkpoints_table(directory: str | Path, steps: Sequence[int] | None = None, num_heads: int | None = None,
                      include=None, exclude=DEFAULT_EXCLUDE, per_layer: bool = False,
                      evaluations: Mapping[str, Evaluation] | Sequence[Evaluation] | None = None,
                      tags: Mapping | None = None, trusted: bool = False):
    """One row per checkpoint, in the callback's columns (``step``, ``epoch``, the statistics, the four metric columns
    as NaN, evaluation columns, tags, ``checkpoint``), sorted by step."""
    import math

    import pandas as pd

    from datamatters.dynamics.callback import METRIC_SOURCES

    paths = find_checkpoints(directory)
    if steps is not None and len(steps) != len(paths):
        raise UserError(f"dynamics_stats: {len(steps)} steps given for {len(paths)} checkpoints "
                        f"({[p.name for p in paths][:10]})")
    rows = []
    for i, path in enumerate(paths):
        sd, info = load_checkpoint(path, trusted)
        step = steps[i] if steps is not None else info.get("step")
        step = parse_step(path.name) if step is None else step
        if step is None:
            raise UserError(f"dynamics_stats: no step in {path.name} (name it step1000 / checkpoint-1000, or give "
                            "dynamics_stats.steps in the sorted order of the files)")
        info.update(path=str(path), step=int(step))
        row = {"step": int(step), "epoch": int(info["epoch"]) if info.get("epoch") is not None else -1}
        row.update(checkpoint_statistics(sd, num_heads or info.get("num_heads"), include, exclude, per_layer))
        row.update({c: math.nan for c in METRIC_SOURCES})
        extra = evaluate_columns(evaluations, sd, info)
        clash = set(extra) & set(row)
        if clash:
            raise UserError(f"dynamics_stats: evaluation columns {sorted(clash)} clash with the statistics")
        row.update(extra)
        row.update(dict(tags or {}))
        row["checkpoint"] = str(path)
        rows.append(row)
    df = pd.DataFrame(rows).sort_values("step", kind="stable").reset_index(drop=True)
    if df["step"].duplicated().any():
        dup = sorted(df["step"][df["step"].duplicated()])
        raise UserError(f"dynamics_stats: several checkpoints have the step(s) {dup}; give task.steps")
    return df


def parameter_norm(sd: Mapping[str, torch.Tensor], info: dict) -> float:
    """An evaluation: the L2 norm of all floating-point tensors of the checkpoint (weight-decay studies)."""
    return float(torch.sqrt(sum(t.double().square().sum() for t in sd.values() if t.is_floating_point())))

"""Hugging Face sequence classifiers, offline: from a local ``save_pretrained`` folder, or randomly initialised from a
config dict (a tiny BERT runs on a CPU in tests).

The forward pass takes what ``data.glue`` yields: an integer tensor ``(B, k, L)`` whose rows are ``input_ids``,
``attention_mask`` and optionally ``token_type_ids`` (a dict of those tensors works too) and returns logits
``(B, num_classes)``. Columns that are padding in every row of the batch are dropped first, so a batch of short
sentences costs what its longest sentence costs, not ``max_seq_length``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from datamatters.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def _from_path(path: str, num_classes: int):
    from transformers import AutoModelForSequenceClassification

    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"no Hugging Face model at {p} (config.json missing): save one there with "
                        f"model.save_pretrained({str(p)!r}) on a machine with internet, or set model.path")
    # a checkpoint saved with another head size gets a fresh head of num_classes (the body keeps its weights)
    return AutoModelForSequenceClassification.from_pretrained(str(p), num_labels=int(num_classes),
                                                              local_files_only=True, ignore_mismatched_sizes=True)


def _from_config(config: Mapping, num_classes: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise UserError("model.config needs a model_type (e.g. bert, albert, distilbert, roberta)")
    try:
        hf_cfg = AutoConfig.for_model(model_type, num_labels=int(num_classes), **cfg)
    except ValueError as exc:
        raise UserError(f"model.config: {exc}") from exc
    return AutoModelForSequenceClassification.from_config(hf_cfg)


class HFClassifier(nn.Module):
    """An HF ``AutoModelForSequenceClassification`` that maps a tokenized batch to logits."""

    def __init__(self, num_classes: int, path: str | None = None, config: Mapping | None = None):
        super().__init__()
        if (path is None) == (config is None):
            raise UserError("HF model: give exactly one of model.path (a local pretrained folder) or model.config "
                            "(a config dict with model_type, randomly initialised)")
        self.model = _from_path(path, num_classes) if path is not None else _from_config(config, num_classes)
        self.num_classes = int(num_classes)

    @staticmethod
    def unpack(x) -> dict[str, torch.Tensor]:
        """Model inputs from a ``(B, k, L)`` tensor, a ``(B, L)`` tensor of input ids, or a dict."""
        if isinstance(x, Mapping):
            return {k: v for k, v in x.items() if k in FIELDS}
        if x.ndim == 2:
            return {"input_ids": x.long()}
        if x.ndim != 3 or not 1 <= x.shape[1] <= 3:
            raise ValueError(f"expected token tensor (B, k<=3, L), got shape {tuple(x.shape)}")
        inputs = {name: x[:, i].long() for i, name in enumerate(FIELDS[: x.shape[1]])}
        mask = inputs.get("attention_mask")
        if mask is not None:
            used = torch.nonzero(mask.any(0)).flatten()
            if len(used):
                lo, hi = int(used[0]), int(used[-1]) + 1
                inputs = {k: v[:, lo:hi] for k, v in inputs.items()}
        return inputs

    def forward(self, x) -> torch.Tensor:
        return self.model(**self.unpack(x)).logits

"""Block trainers for workers: ``trainer(indices) -> {key: (len(indices), ...)}``.

* ``BatchedSubsetTrainer``: the fast path; all models of a block trained at once with stacked parameters
  (``datamatters.training.ensemble``), for MLP / logistic / small CNN.
* ``LightningSubsetTrainer``: one model per index through Lightning and ``ClassifierModule`` (any zoo model).

Row ``i`` is model id ``id_offset + i``: it trains on ``mask_row(n, alpha, seed, id)`` (a function of (seed, id)
only) from an init keyed by (seed, id), so a row's content never depends on which job or block produced it, and a
held-out store (a separate id range) shares neither masks nor inits with the training store.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from datamatters.errors import UserError
from datamatters.training.ensemble import (auto_chunk, check_labels, init_seed, losses, margins, num_outputs,
                                           predict_ensemble, train_ensemble)
from datamatters.training.subsets import MODES, mask_row, subset_masks

ExtraFn = Callable[[Sequence[int], np.ndarray, torch.Tensor], Mapping[str, Any]]


def block_masks(n: int, alpha: float, seed: int, indices: Sequence[int], mode: str = "bernoulli") -> np.ndarray:
    """Masks of arbitrary (not necessarily contiguous) model indices; equal to ``subset_masks`` rows."""
    subset_masks(n, 0, alpha, seed, mode=mode)  # validates the arguments
    return np.stack([mask_row(n, alpha, seed, int(i), mode) for i in indices])


def target_outputs(logits: torch.Tensor, y: torch.Tensor, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """The requested per-target outputs of logits (M, T, C)."""
    out = {}
    if "margins" in outputs:
        out["margins"] = margins(logits, y).float().cpu().numpy()
    if "logits" in outputs:
        out["logits"] = logits.float().cpu().numpy()
    if "loss" in outputs:
        out["loss"] = losses(logits, y).float().cpu().numpy()
    return out


def _check_common(alpha: float, mode: str, outputs: Sequence[str]) -> None:
    if mode not in MODES:
        raise UserError(f"mask mode must be one of {MODES}, got {mode!r}")
    if not 0 < alpha <= 1:
        raise UserError(f"alpha must be in (0, 1], got {alpha}")
    bad = set(outputs) - {"masks", "margins", "logits", "loss"}
    if bad:
        raise UserError(f"unknown outputs {sorted(bad)}; declare custom keys through extra_fn")


@dataclass
class BatchedSubsetTrainer:
    """Trains a block of models at once; ``extra_fn(indices, masks, logits)`` may add user-declared keys."""

    model: nn.Module
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_targets: torch.Tensor
    y_targets: torch.Tensor
    alpha: float = 0.5
    seed: int = 0
    mode: str = "bernoulli"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.0
    outputs: Sequence[str] = ("masks", "margins")
    device: Any = None
    chunk: int | None = None
    extra_fn: ExtraFn | None = None
    id_offset: int = 0

    def __post_init__(self):
        _check_common(self.alpha, self.mode, self.outputs)
        self.X_train, self.X_targets = torch.as_tensor(self.X_train), torch.as_tensor(self.X_targets)
        if self.X_train.shape[1:] != self.X_targets.shape[1:]:
            raise UserError(f"training inputs have shape {tuple(self.X_train.shape[1:])} per point but targets "
                            f"{tuple(self.X_targets.shape[1:])}; they must come from the same data")
        for name, X in (("X_train", self.X_train), ("X_targets", self.X_targets)):
            if X.is_floating_point() and not bool(torch.isfinite(X).all()):
                raise UserError(f"{name} has non-finite values (NaN or inf); clean or impute them first")
        C = num_outputs(self.model, self.X_train)
        self.y_train = check_labels(self.y_train, C, "training labels")
        self.y_targets = check_labels(self.y_targets, C, "target labels")

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    def __call__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        ids = [self.id_offset + int(i) for i in indices]
        return self.train_masks(block_masks(self.n_train, self.alpha, self.seed, ids, self.mode), ids)

    def iter_rows(self, indices: Sequence[int]):
        """Rows ``chunk`` models at a time (the models trained together), so a worker flushes each chunk."""
        indices = [int(i) for i in indices]
        c = int(self.chunk) if self.chunk else auto_chunk(len(indices), self.batch_size, self.X_train)
        for s in range(0, len(indices), c):
            yield indices[s:s + c], self(indices[s:s + c])

    def train_masks(self, masks: np.ndarray, ids: Sequence[int]) -> dict[str, np.ndarray]:
        """Train models on given masks with given model ids (inits and batch orders); also used for
        counterfactual retraining."""
        params = train_ensemble(self.model, self.X_train, self.y_train, torch.from_numpy(masks),
                                epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                weight_decay=self.weight_decay, optimizer=self.optimizer, seed=self.seed,
                                device=self.device, chunk=self.chunk, model_ids=list(ids),
                                momentum=self.momentum)
        logits = predict_ensemble(self.model, params, self.X_targets.to(next(iter(params.values())).device))
        out: dict[str, Any] = {"masks": masks, **target_outputs(logits, self.y_targets, self.outputs)}
        if self.extra_fn is not None:
            out.update(self.extra_fn(list(ids), masks, logits))
        return out


@dataclass
class LightningSubsetTrainer:
    """One model per index through ``ClassifierModule`` and a Lightning ``Trainer`` (any zoo model).

    ``train_set`` and ``target_set`` are indexed datasets (items ``(index, x, y)``); mask column j is item j of
    ``train_set``. ``model_factory()`` builds a fresh network (seeded by (seed, index) before the call).
    """

    train_set: Any
    target_set: Any
    model_factory: Callable[[], nn.Module]
    optimizer: Callable | None = None
    alpha: float = 0.5
    seed: int = 0
    mode: str = "bernoulli"
    batch_size: int = 64
    trainer_kwargs: dict = field(default_factory=lambda: {"max_epochs": 10})
    outputs: Sequence[str] = ("masks", "margins")
    eval_batch_size: int = 1024
    extra_fn: ExtraFn | None = None
    id_offset: int = 0

    def __post_init__(self):
        _check_common(self.alpha, self.mode, self.outputs)
        self.y_targets = torch.as_tensor(np.asarray([int(self.target_set[i][2]) for i in range(len(self.target_set))]))

    def _fit_one(self, index: int, mask: np.ndarray) -> torch.Tensor:
        import lightning as L
        from torch.utils.data import DataLoader, Subset

        from datamatters.training.classifier import ClassifierModule, evaluate_losses

        s = init_seed(self.seed, index)
        L.seed_everything(s % (2**32), workers=True, verbose=False)
        net = self.model_factory()
        module = ClassifierModule(net, self.optimizer)
        gen = torch.Generator().manual_seed(s)
        loader = DataLoader(Subset(self.train_set, np.flatnonzero(mask).tolist()), batch_size=self.batch_size,
                            shuffle=True, generator=gen)
        kw = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
              "enable_model_summary": False, "num_sanity_val_steps": 0, **dict(self.trainer_kwargs)}
        L.Trainer(**kw).fit(module, loader)
        _, _, logits = evaluate_losses(copy.deepcopy(net).cpu(), DataLoader(self.target_set,
                                                                           batch_size=self.eval_batch_size),
                                       device="cpu")
        return torch.from_numpy(logits)

    def __call__(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        ids = [self.id_offset + int(i) for i in indices]
        return self.train_masks(block_masks(len(self.train_set), self.alpha, self.seed, ids, self.mode), ids)

    def iter_rows(self, indices: Sequence[int]):
        """One row at a time, so a worker writes each model as soon as it is trained."""
        for i in indices:
            yield [int(i)], self([int(i)])

    def train_masks(self, masks: np.ndarray, ids: Sequence[int]) -> dict[str, np.ndarray]:
        logits = torch.stack([self._fit_one(int(i), m) for i, m in zip(ids, masks)])
        out: dict[str, Any] = {"masks": masks, **target_outputs(logits, self.y_targets, self.outputs)}
        if self.extra_fn is not None:
            out.update(self.extra_fn(list(ids), masks, logits))
        return out

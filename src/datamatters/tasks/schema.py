"""Structured-config schemas registered in Hydra's ConfigStore, so a typo or a wrong type in these groups fails at
compose time (``selection.percent_train=abc`` -> error before any training)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SVPSchema:
    score: str = "entropy"
    keep_fraction: Optional[float] = None
    proxy_epochs: int = 25
    patience: int = 5
    batch_size: Optional[int] = 32


@dataclass
class InfoBatchSchema:
    prune_ratio: float = 0.5
    delta: float = 0.875


@dataclass
class SelectiveBackpropSchema:
    beta: float = 3.0
    history: int = 1024
    prime_epochs: int = 1


@dataclass
class SelectionSchema:
    method: str = "reducible_loss"
    percent_train: float = 0.1
    score_mode: str = "train"
    update_bn_on_score: bool = False
    score_precision: Optional[str] = None
    channels_last: bool = False
    temperature: Optional[Any] = None
    mc_samples: int = 10
    svp: SVPSchema = field(default_factory=SVPSchema)
    infobatch: InfoBatchSchema = field(default_factory=InfoBatchSchema)
    selective_backprop: SelectiveBackpropSchema = field(default_factory=SelectiveBackpropSchema)


@dataclass
class IrreducibleSchema:
    path: Optional[str] = None
    output: Optional[str] = None
    checkpoint: Optional[str] = None
    model: Any = None
    optimizer: Any = None
    max_epochs: int = 30
    batch_size: Optional[int] = None
    no_holdout: bool = False
    augment: bool = False
    early_stopping_patience: Optional[int] = None
    log_every_step: bool = True
    fit: str = "lightning"


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="selection", name="schema", node=SelectionSchema)
    cs.store(group="irreducible", name="schema", node=IrreducibleSchema)


register()

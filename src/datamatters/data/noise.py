"""Label noise applied to the target-train split only, deterministic from the seed.

``uniform``: a fraction ``pc_corrupted`` of the split is chosen and given a label drawn uniformly from all classes,
which may be the true one (as the reference does). ``structured``: a fraction of the points of the source classes
is mapped 3->5, 9->7, 4->9. ``is_corrupted`` marks the points whose label actually changed.
"""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError

STRUCTURED_MAP = {3: 5, 9: 7, 4: 9}


def corrupt_labels(
    targets: np.ndarray,
    indices: np.ndarray,
    pc_corrupted: float,
    kind: str = "uniform",
    num_classes: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(new_targets, is_corrupted)``: full-length new targets and a bool mask aligned with ``indices``."""
    targets = np.asarray(targets).copy()
    indices = np.asarray(indices, dtype=np.int64)
    if not 0.0 <= pc_corrupted <= 1.0:
        raise UserError(f"label_noise.pc_corrupted must be in [0, 1], got {pc_corrupted}")
    clean = targets[indices].copy()
    if pc_corrupted == 0 or kind in (None, "none"):
        return targets, np.zeros(len(indices), dtype=bool)
    rng = np.random.default_rng([int(seed), 0xC0 if kind == "uniform" else 0x5C])
    if kind == "uniform":
        num_classes = int(num_classes if num_classes is not None else targets.max() + 1)
        chosen = rng.permutation(len(indices))[: int(round(pc_corrupted * len(indices)))]
        targets[indices[chosen]] = rng.integers(0, num_classes, size=len(chosen))
    elif kind == "structured":
        for src, dst in STRUCTURED_MAP.items():
            pos = np.flatnonzero(clean == src)
            chosen = pos[rng.permutation(len(pos))[: int(round(pc_corrupted * len(pos)))]]
            targets[indices[chosen]] = dst
    else:
        raise UserError(f"unknown label_noise.kind {kind!r}; use 'uniform', 'structured' or 'none'")
    return targets, targets[indices] != clean

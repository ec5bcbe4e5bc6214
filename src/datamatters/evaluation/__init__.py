"""Metrics shared by every engine: LDS, noisy-label detection, point removal curves and plots."""
from datamatters.evaluation.metrics import (
    bootstrap_ci,
    lds,
    noisy_label_detection,
    spearman_per_column,
)

__all__ = ["bootstrap_ci", "lds", "noisy_label_detection", "spearman_per_column"]

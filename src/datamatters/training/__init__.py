"""Shared training pieces: the plain classifier module, batched ensemble training, subset masks."""
from datamatters.training.classifier import ClassifierModule, evaluate_losses, per_example_loss

__all__ = ["ClassifierModule", "evaluate_losses", "per_example_loss"]

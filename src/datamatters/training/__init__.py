"""Shared training pieces: the plain classifier module, batched ensemble training, subset masks.

The classifier module (Lightning: seconds to import) loads on first use, so that ``training.ensemble`` users
(valuation's TorchUtility, datamodels) do not pay for it."""
__all__ = ["ClassifierModule", "evaluate_losses", "per_example_loss"]


def __getattr__(name: str):
    if name in __all__:
        from datamatters.training import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

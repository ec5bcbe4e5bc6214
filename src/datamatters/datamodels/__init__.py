"""Datamodels (Ilyas et al., 2022): train many models on random subsets, regress outputs on masks, evaluate by LDS.

Notebook use needs no configs::

    spec = standard_spec(num_models, n_train, n_targets)
    store = initialize_store("store", spec)
    run_worker(store, BatchedSubsetTrainer(model, Xtr, ytr, Xt, yt, alpha=0.5), range(num_models))
    fit = fit_datamodels(store, "margins")            # W (n_train, T) raw units, b, lambda, val MSE, path
    evaluate_lds(fit, eval_store["masks"], eval_store["margins"])
"""
import importlib

# Lazy exports: the store and workers need only numpy, so worker processes (and pool workers started by the
# hundred) do not pay for importing torch until they train.
_EXPORTS = {
    "counterfactual": "evaluation", "evaluate_lds": "evaluation", "lds_curve": "evaluation",
    "plot_lds_curve": "plots", "plot_top_examples": "plots",
    "DatamodelFit": "regression", "fit_datamodels": "regression", "lasso_gram": "regression",
    "DatamodelSpec": "spec", "standard_spec": "spec",
    "DatamodelStore": "store", "initialize_store": "store", "open_store": "store",
    "BatchedSubsetTrainer": "trainers", "LightningSubsetTrainer": "trainers", "block_masks": "trainers",
    "ClaimBoard": "workers", "WorkerReport": "workers", "WorkerTimeout": "workers", "per_index": "workers",
    "run_worker": "workers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"datamatters.datamodels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'datamatters.datamodels' has no attribute {name!r}")


def __dir__():
    return __all__

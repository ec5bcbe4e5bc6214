"""u(S) for torch modules: a whole batch of subset models trained at once by the shared batched ensemble trainer
(``datamatters.training.ensemble``, vmap over stacked parameters) and scored from their logits in one pass.

Each subset's model is seeded by the subset itself (``subset_ids``), so u(S) is a deterministic function of S:
the same set gives the same model in any batch, chunk, worker or continued fit, which keeps caching and
reproducibility exact.

A model whose outputs are not finite (diverged training) is a failed fit, like an exception in sklearn's
``fit``: it gets the default score, is counted in ``n_failed`` and warned about, or raises a ``UserError`` when
``catch_errors=False`` (argmax of NaN logits would otherwise score it as "always class 0"). A NaN or infinite
score of a finite model is treated as in ``ModelUtility`` (the default, counted in ``n_nan``). Inputs are checked
once, at ``with_dataset``: finite features, the test set's feature shape, labels in ``[0, n_outputs)``.
"""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.dataset import check_finite, check_labels, check_same_features
from datamatters.valuation.utility import FIT_FAILED, OK, Utility, subset_ids


class TorchUtility(Utility):
    """``model`` is a template ``nn.Module`` (its own weights are not used); ``scorer`` must support
    ``from_logits`` (accuracy, neg_log_loss, class-wise). Training follows ``train_ensemble``'s arguments."""

    batches_models = True

    def __init__(self, model, scorer, *, epochs: int = 20, batch_size: int = 32, lr: float = 1e-2,
                 optimizer: str = "adam", weight_decay: float = 0.0, seed: int = 0, device: str | None = None,
                 max_models: int = 256, momentum: float = 0.0, **kw):
        super().__init__(scorer, **kw)
        import torch

        if not isinstance(model, torch.nn.Module):
            raise UserError(f"TorchUtility needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.train_kw = dict(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), optimizer=optimizer,
                             weight_decay=float(weight_decay), seed=int(seed), momentum=float(momentum))
        self.device, self.max_models = device, int(max_models)

    @property
    def preferred_batch(self) -> int:
        return self.max_models

    def _bind(self, data) -> None:
        test = getattr(self.scorer, "test_data", None)
        if test is not None:
            check_same_features(test, data)
            check_finite(test, "test set")
        check_finite(data, "training set")
        n_out = model_outputs(self.model, data.x[:1])
        check_labels(data, n_out, "training set")
        if test is not None:
            check_labels(test, n_out, "test set")

    def _tensors(self):
        import torch

        X = torch.as_tensor(np.asarray(self.data.x) if not hasattr(self.data.x, "dim") else self.data.x)
        X = X.float() if X.is_floating_point() else X
        y = torch.as_tensor(np.asarray(self.data.y) if not hasattr(self.data.y, "dim") else self.data.y).long()
        Xt = self.scorer.test_data.x
        Xt = torch.as_tensor(np.asarray(Xt) if not hasattr(Xt, "dim") else Xt)
        return X, y, (Xt.float() if Xt.is_floating_point() else Xt)

    def _compute(self, masks):
        import torch

        from datamatters.training.ensemble import predict_ensemble, train_ensemble

        X, y, Xt = self._tensors()
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = torch.as_tensor(self.data.row_masks(masks))
        ids = subset_ids(masks)
        out, finite = [], []
        for s in range(0, len(masks), self.max_models):
            params = train_ensemble(self.model, X, y, rows[s:s + self.max_models], device=device,
                                    model_ids=ids[s:s + self.max_models], chunk=self.max_models, **self.train_kw)
            logits = predict_ensemble(self.model, params, Xt.to(device))
            finite.append(torch.isfinite(logits).flatten(1).all(1).cpu().numpy())
            out.append(np.asarray(self.scorer.from_logits(logits), float))
        scores, finite = np.concatenate(out), np.concatenate(finite)
        nan = ~np.isfinite(scores).reshape(len(masks), -1).all(1) & finite  # a finite model's NaN or inf score
        if not self.catch_errors and not finite.all():
            raise UserError(f"training diverged for {int((~finite).sum())} of {len(masks)} subsets: the model's "
                            "outputs are NaN or inf (lower the learning rate, or pass catch_errors=True to score "
                            f"such subsets with the default {self.default})")
        status = np.where(finite, OK, FIT_FAILED).astype(np.int8)
        if np.count_nonzero(nan):
            status[nan] = self._nan_status(int(rows[int(np.argmax(nan))].sum()))
        scores[status != OK] = self.default
        return scores, status

    def __str__(self):
        return f"TorchUtility({type(self.model).__name__})"


def model_outputs(model, x_one) -> int:
    """Number of outputs (classes) of ``model`` on one example, evaluated in eval mode."""
    import torch

    x = torch.as_tensor(np.asarray(x_one) if not hasattr(x_one, "dim") else x_one)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x.float() if x.is_floating_point() else x).shape[-1])
    finally:
        model.train(was)

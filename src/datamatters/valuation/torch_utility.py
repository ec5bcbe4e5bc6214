"""u(S) for torch modules: a whole batch of subset models trained at once by the shared batched ensemble trainer
(``datamatters.training.ensemble``, vmap over stacked parameters) and scored from their logits in one pass.

Each subset's model is seeded by the subset itself (``subset_ids``), so u(S) is a deterministic function of S:
the same set gives the same model in any batch, chunk, worker or continued fit, which keeps caching and
reproducibility exact.
"""
from __future__ import annotations

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.utility import NAN_SCORE, OK, Utility, subset_ids


class TorchUtility(Utility):
    """``model`` is a template ``nn.Module`` (its own weights are not used); ``scorer`` must support
    ``from_logits`` (accuracy, neg_log_loss, class-wise). Training follows ``train_ensemble``'s arguments."""

    batches_models = True

    def __init__(self, model, scorer, *, epochs: int = 20, batch_size: int = 32, lr: float = 1e-2,
                 optimizer: str = "adam", weight_decay: float = 0.0, seed: int = 0, device: str | None = None,
                 max_models: int = 256, **kw):
        super().__init__(scorer, **kw)
        import torch

        if not isinstance(model, torch.nn.Module):
            raise UserError(f"TorchUtility needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.train_kw = dict(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), optimizer=optimizer,
                             weight_decay=float(weight_decay), seed=int(seed))
        self.device, self.max_models = device, int(max_models)

    @property
    def preferred_batch(self) -> int:
        return self.max_models

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
        out = []
        for s in range(0, len(masks), self.max_models):
            params = train_ensemble(self.model, X, y, rows[s:s + self.max_models], device=device,
                                    model_ids=ids[s:s + self.max_models], chunk=self.max_models, **self.train_kw)
            out.append(np.asarray(self.scorer.from_logits(predict_ensemble(self.model, params, Xt.to(device))),
                                  float))
        scores = np.concatenate(out)
        bad = np.isnan(scores).reshape(len(masks), -1).any(1)
        if bad.any() and not self.catch_errors:
            raise UserError(f"scorer {self.scorer.name} returned NaN for {int(bad.sum())} subsets (diverged training?)")
        status = np.where(bad, NAN_SCORE, OK).astype(np.int8)
        scores[bad] = self.default
        return scores, status

    def __str__(self):
        return f"TorchUtility({type(self.model).__name__})"

"""TracIn (Pruthi et al., NeurIPS 2020) and the curvature-free control, with the ``InfluenceModel`` interface.

TracInCP: ``influence(z_test, z) = sum_k eta_k <g_k(z_test), g_k(z)>`` over saved checkpoints ``theta_k`` of one
training run, ``g_k`` the per-example loss gradient at ``theta_k`` and ``eta_k`` the learning rate in force there.
Written as features, ``phi(z) = [sqrt(eta_1) g_1(z), ..., sqrt(eta_K) g_K(z)]`` (length K * p) and the "inverse
curvature" is the identity, so ``influences = phi_test phi_train^T`` goes through the shared interface (chunked
calculators, self-influence, perturbation mode) unchanged. Same sign convention as every other method: positive
means that training on z lowers the test loss (a gradient step on z moves the test loss by ``-eta g_test . g_z``).

``GradientDotInfluence`` is ``<g(z_test), g(z)>`` at the final parameters: TracIn with one checkpoint and
``eta = 1``, i.e. influence functions with identity curvature. It is the control of the attribution table: a method
that uses curvature and cannot beat it is not using the curvature well.

Differences from the paper: checkpoints are given as state dicts (any parameter subset named like the model's);
the paper's TracIn on the last layer only is ``block_structure={"last": [...]}``. The learning rate of Adam runs is
the nominal step size (the paper does the same; the per-parameter preconditioner is ignored).
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel, reject_options
from datamatters.influence.functional import ModelFunction


class GradientDotInfluence(InfluenceModel):
    """``<g(z_test), g(z)>`` at the model's parameters (identity curvature, no damping)."""

    def __init__(self, model, loss, *, block_structure="full", **kw):
        reject_options("GradientDotInfluence", kw, {"curvature": "its curvature is the identity",
                                                    "regularization": "it has no damping"})
        super().__init__(model, loss, regularization=None, block_structure=block_structure, **kw)

    def _fit(self, data: Iterable) -> None:
        pass  # nothing to prepare: the curvature is the identity

    def _solve(self, G: Tensor) -> Tensor:
        return G


class TracInInfluence(InfluenceModel):
    """TracInCP over ``checkpoints`` (state dicts of ``model``'s parameters along one run).

    Args:
        model: the network (its own weights are not used; each checkpoint is loaded into a copy).
        loss: per-batch mean loss ``loss(outputs, targets)``, e.g. ``F.cross_entropy``.
        checkpoints: non-empty sequence of ``{parameter name: tensor}`` saved during training.
        learning_rates: one positive number for all checkpoints, or one per checkpoint.
        block_structure, grad_chunk, ...: as for every ``InfluenceModel``.
    """

    def __init__(self, model, loss, *, checkpoints: Sequence[Mapping[str, Tensor]] | None = None,
                 learning_rates: float | Sequence[float] = 1.0, block_structure="full", **kw):
        reject_options("TracInInfluence", kw, {"curvature": "its curvature is the identity",
                                               "regularization": "it has no damping"})
        super().__init__(model, loss, regularization=None, block_structure=block_structure, **kw)
        if not checkpoints:
            raise UserError("TracIn needs the checkpoints saved during training (a non-empty list of state dicts); "
                            "none were given. Save checkpoints while training (e.g. attribution.tracin.epochs) or "
                            "use the gradient dot product (GradientDotInfluence) for the final model only")
        self.checkpoints = [dict(c) for c in checkpoints]
        lrs = [float(learning_rates)] * len(self.checkpoints) if isinstance(learning_rates, (int, float)) \
            else [float(v) for v in learning_rates]
        if len(lrs) != len(self.checkpoints):
            raise UserError(f"TracIn: {len(lrs)} learning rates for {len(self.checkpoints)} checkpoints")
        if not all(math.isfinite(v) and v > 0 for v in lrs):
            raise UserError(f"TracIn learning rates must be positive and finite, got {lrs}")
        self.learning_rates = lrs
        self.fns: list[ModelFunction] = []

    @property
    def feature_dim(self) -> int:
        return self.n_parameters * len(self.checkpoints)

    def _fit(self, data: Iterable) -> None:
        dtype, device = self.fn.dtype, self.fn.device
        names = set(dict(self.model.named_parameters()))
        self.fns = []
        for k, ckpt in enumerate(self.checkpoints):
            unknown = set(ckpt) - names - set(dict(self.model.named_buffers()))
            if unknown:
                raise UserError(f"TracIn checkpoint {k} has entries the model lacks: {sorted(unknown)[:5]}")
            m = copy.deepcopy(self.model)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if name in ckpt:
                        v = torch.as_tensor(ckpt[name])
                        if v.shape != p.shape:
                            raise UserError(f"TracIn checkpoint {k}: {name} has shape {tuple(v.shape)}, the model "
                                            f"{tuple(p.shape)}")
                        if not torch.isfinite(v).all():
                            raise UserError(f"TracIn checkpoint {k}: {name} holds NaN or infinite values")
                        p.copy_(v.to(device, dtype))
            m.eval()
            self.fns.append(ModelFunction(m, self.loss, self.blocks))

    def features(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.cat([math.sqrt(lr) * fn.grads(x, y, chunk=self.grad_chunk)
                          for lr, fn in zip(self.learning_rates, self.fns)], dim=1)

    def feature_fn(self):
        parts = [(math.sqrt(lr), fn.flat_grad_fn()) for lr, fn in zip(self.learning_rates, self.fns)]
        return lambda x1, y1: torch.cat([s * g(x1, y1) for s, g in parts])

    def _solve(self, G: Tensor) -> Tensor:
        return G

"""The interface every influence method shares (pyDVL 0.10's ``InfluenceFunctionModel``).

Definitions (pyDVL's, kept):

* ``influence_factors(x, y)`` = ``(C + lambda I)^-1 g(x, y)`` per example, ``C`` the (block-diagonal)
  curvature of the mean training loss and ``g`` the per-example loss gradient;
* ``influences(x_test, y_test, x, y, mode="up")[j, i] = <factor(z_test_j), g(z_i)>``;
* ``mode="perturbation"``: ``[j, i, ...] = grad_x <factor(z_test_j), g(x_i, y_i)>`` (shape (m, n, *x.shape[1:])).

Factors live in the method's *feature space*: parameter space (p numbers) for most methods, the random projection
for TRAK, and the top-eigenvector coordinates for Arnoldi without Woodbury (``expand_factors`` maps those back);
influences are the same numbers either way, only cheaper to multiply.

Sign: ``g_test^T H^-1 g_train`` is *minus* the derivative of the test loss when ``z_i`` is up-weighted, so a
**positive influence means that training on z_i lowers the test point's loss** (raises its margin). That is the
orientation the attribution scores and LDS use (``evaluate.attribution_scores`` returns the values as they are).
Self-influence ``<factor(z), g(z)>`` is large for points the model finds hard or mislabelled.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from datamatters.errors import UserError
from datamatters.influence.blocks import Block, BlockStructure, Regularization, block_regularization, make_blocks
from datamatters.influence.curvature import KINDS
from datamatters.influence.functional import Loss, ModelFunction, split_batch

MODES = ("up", "perturbation")


def as_mode(mode: Any) -> str:
    """Accept ``"up"``/``"perturbation"`` (any case) or an enum whose value is one of them."""
    value = str(getattr(mode, "value", mode)).lower()
    if value not in MODES:
        raise UserError(f"mode must be one of {MODES}, got {mode!r}")
    return value


def reject_options(method: str, kw: dict, why: dict[str, str]) -> None:
    """Options a method does not take are errors, not silently ignored: ``why`` maps option -> what it uses."""
    for key, reason in why.items():
        if key in kw:
            raise UserError(f"{method} does not take {key}= ({reason}); remove it")


def reiterable(data: Iterable, what: str = "training data") -> Iterable:
    if iter(data) is data:
        raise UserError(f"{what} must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    return data


class InfluenceModel(ABC):
    """Base class: ``fit(train_loader)``, ``influence_factors``, ``influences``, ``influences_from_factors``.

    Subclasses implement ``_fit(data)`` and ``_solve_block(block, G)`` (or ``_solve(G)`` for methods that are not
    block-wise). ``stats["solve_calls"]`` counts inverse-curvature applications (one per ``influence_factors``
    call), which lets tests check that calculators reuse factors.
    """

    is_thread_safe = False  # torch.func.functional_call swaps module attributes while it runs
    needs_positive_regularization = False
    symmetric = True  # the inverse is a fixed symmetric matrix, so sides may be swapped for speed

    def __init__(self, model: nn.Module, loss: Loss, *, regularization: Regularization = None,
                 block_structure: BlockStructure = "full", curvature: str = "hessian", grad_chunk: int = 512,
                 data_cache: int = 1 << 26, progress: bool = False):
        if not isinstance(model, nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise UserError("loss must be a callable loss(outputs, targets) -> scalar, e.g. F.cross_entropy")
        if curvature not in KINDS:
            raise UserError(f"curvature must be one of {KINDS}, got {curvature!r}")
        self.model, self.loss, self.curvature = model, loss, curvature
        self.blocks: list[Block] = make_blocks(model, block_structure)
        self.regularization = block_regularization(self.blocks, regularization, self.needs_positive_regularization)
        self.grad_chunk, self.progress, self.data_cache = int(grad_chunk), bool(progress), int(data_cache)
        self.fn: ModelFunction | None = None
        self.stats: Counter = Counter()
        self.timings: dict[str, float] = {}
        self._x_shape: tuple | None = None
        self._y_shape: tuple | None = None
        self._n_classes: int | None = None  # outputs per example when labels are class indices

    # ---- fitting -------------------------------------------------------------------------------------------
    def fit(self, data: Iterable) -> "InfluenceModel":
        """Prepare the inverse curvature from the training data (a DataLoader of (x, y) or (index, x, y))."""
        data = reiterable(data)
        first = next(iter(data), None)
        if first is None:
            raise UserError("the training data loader yielded no batches")
        x0, y0 = split_batch(first)
        self._x_shape, self._y_shape = tuple(x0.shape[1:]), tuple(torch.as_tensor(y0).shape[1:])
        self.model.eval()  # influence is a property of the trained function: no dropout, frozen batch-norm stats
        bad = [k for k, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise UserError(f"the model has non-finite parameters ({', '.join(bad[:5])}): a diverged training run; "
                            "retrain it (smaller learning rate) before computing influences")
        fn = ModelFunction(self.model, self.loss, self.blocks)
        x0, y0 = fn.prepare(x0, y0)
        with torch.no_grad():
            out0 = fn.forward(fn.theta, x0)
        self._n_classes = int(out0.shape[1]) if out0.dim() == 2 and not y0.is_floating_point() else None
        self.fn = fn
        try:
            t = time.perf_counter()
            data = self._cache(data)
            fn.check_fast_sum(x0, y0)
            self._fit(data)
            self.timings["fit_s"] = time.perf_counter() - t
        except BaseException:
            self.fn = None  # a failed fit leaves the model unfitted
            raise
        return self

    def _cache(self, data: Iterable) -> Iterable:
        """Checks every training batch (finite inputs and losses, labels in range) and returns the batches as a
        list of prepared (x, y) tensors when they hold at most ``data_cache`` numbers: iterative solvers then pass
        over memory instead of re-collating the loader each time. Same batches, same order, so results do not
        change."""
        out, size = [], 0
        for batch in data:
            x, y = self._checked(*self.fn.prepare(*split_batch(batch)), "training data")
            with torch.no_grad():
                loss = self.loss(self.fn.forward(self.fn.theta, x), y)
            if not bool(torch.isfinite(loss).all()):
                raise UserError("training data: the loss of a batch is not finite (overflowing outputs); the "
                                "influence curvature and gradients would be NaN. Check the inputs' scale and the model")
            size += x.numel() + y.numel()
            if out is not None and size <= self.data_cache:
                out.append((x, y))
            else:
                out = None
        return data if out is None else out

    def _checked(self, x: Tensor, y: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Non-finite inputs or labels, and class labels outside ``[0, n_classes)``, are errors (CG on NaN data
        would silently return zeros, Direct NaN). Out-of-range labels the loss accepts (``ignore_index``) pass."""
        for name, t in (("inputs x", x), ("labels y", y)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                rows = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero().squeeze(1)
                raise UserError(f"{what}: {name} contain NaN or inf (rows {rows[:5].tolist()}); remove or impute "
                                "them before computing influences")
        C = getattr(self, "_n_classes", None)
        if C is not None and not y.is_floating_point() and y.numel():
            bad = (y < 0) | (y >= C)
            if bool(bad.any()):
                try:  # the loss raises on them unless it ignores them (its mean over ignored rows may be NaN)
                    with torch.no_grad():
                        self.loss(self.fn.forward(self.fn.theta, x[bad]), y[bad])
                    ok = True
                except (IndexError, RuntimeError, ValueError):
                    ok = False
                if not ok:
                    raise UserError(f"{what}: labels must be class indices in [0, {C}) for a model with {C} outputs; "
                                    f"got {sorted(set(y[bad].tolist()))[:5]} (rows {bad.nonzero().squeeze(1)[:5].tolist()})")
        return x, y

    def _finite(self, T: Tensor, what: str) -> Tensor:
        if not bool(torch.isfinite(T).all()):
            raise UserError(f"{type(self).__name__}: non-finite {what} (NaN or inf), e.g. from overflowing outputs "
                            "or a singular curvature; check the inputs' scale, the model, and the regularization")
        return T

    @abstractmethod
    def _fit(self, data: Iterable) -> None: ...

    @property
    def is_fitted(self) -> bool:
        return self.fn is not None

    @property
    def n_parameters(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def feature_dim(self) -> int:
        """Length of a factor row (the number of parameters, or the projection size for TRAK)."""
        return self.n_parameters

    # ---- features (per-example gradients unless a method projects them) -------------------------------------
    def features(self, x: Tensor, y: Tensor) -> Tensor:
        return self.fn.grads(x, y, chunk=self.grad_chunk)

    def expand_factors(self, factors: Tensor) -> Tensor:
        """Factors in parameter space (pyDVL's ``H^-1 g``); identity unless the method uses a reduced space."""
        if self.feature_dim != self.n_parameters:
            raise UserError(f"{type(self).__name__} factors live in a {self.feature_dim}-dimensional projection that "
                            "cannot be mapped back to the parameters")
        return factors

    def feature_rows(self, x: Tensor, y: Tensor) -> Tensor:
        """Checked ``features``: what ``influences_from_factors`` multiplies the factors with (up mode)."""
        self._check_fitted()
        return self._finite(self.features(*self._check_xy(x, y, "features")), "gradients of the given points")

    def feature_fn(self):
        """``(x1, y1) -> feature vector`` for one example, differentiable in ``x1``."""
        return self.fn.flat_grad_fn()

    # ---- inverse curvature ---------------------------------------------------------------------------------
    def _solve(self, G: Tensor) -> Tensor:
        return torch.cat([self._solve_block(b, G[:, b.slice]) for b in self.blocks], dim=1)

    def _solve_block(self, block: Block, G: Tensor) -> Tensor:
        raise NotImplementedError

    # ---- public computations -------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise UserError(f"{type(self).__name__} is not fitted: call .fit(train_loader) first")

    def _check_xy(self, x, y, what: str) -> tuple[Tensor, Tensor]:
        if x is None or y is None:
            raise UserError(f"{what}: give both inputs and labels (got {'no x' if x is None else 'no y'})")
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise UserError(f"{what}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; they need the same "
                            "number of rows (the first dimension is the batch)")
        if self._x_shape is not None and tuple(x.shape[1:]) != self._x_shape:
            raise UserError(f"{what}: inputs have shape {tuple(x.shape[1:])} per example but the model was fitted on "
                            f"{self._x_shape}")
        if self._y_shape is not None and tuple(y.shape[1:]) != self._y_shape:
            raise UserError(f"{what}: labels have shape {tuple(y.shape[1:])} per example but the model was fitted on "
                            f"{self._y_shape}")
        return self._checked(*self.fn.prepare(x, y), what)

    def influence_factors(self, x: Tensor, y: Tensor) -> Tensor:
        """``(C + lambda I)^-1 g(x_j, y_j)`` for every row: (n, feature_dim)."""
        self._check_fitted()
        x, y = self._check_xy(x, y, "influence_factors")
        t = time.perf_counter()
        G = self._finite(self.features(x, y), "gradients of the given points")
        out = self._finite(self._solve(G).detach(), "influence factors")
        self.stats["solve_calls"] += 1
        self.stats["solved_rows"] += x.shape[0]
        self.timings["solve_s"] = self.timings.get("solve_s", 0.0) + time.perf_counter() - t
        return out

    def influences_from_factors(self, factors: Tensor, x: Tensor, y: Tensor, mode: Any = "up") -> Tensor:
        """Influences of the points ``(x, y)`` on the points whose ``factors`` are given: (m, n) for ``up``,
        (m, n, *x.shape[1:]) for ``perturbation``."""
        self._check_fitted()
        mode = as_mode(mode)
        x, y = self._check_xy(x, y, "influences_from_factors")
        factors = torch.as_tensor(factors).to(self.fn.device, self.fn.dtype)
        if factors.dim() != 2 or factors.shape[1] != self.feature_dim:
            raise UserError(f"factors must be (m, {self.feature_dim}) for this model, got {tuple(factors.shape)}")
        self._finite(factors, "factors")
        self.stats["from_factors_calls"] += 1
        if mode == "up":
            return factors @ self._finite(self.features(x, y), "gradients of the given points").T
        return self._finite(self.fn.perturbation(self.feature_fn(), factors, x, y), "perturbation influences")

    def influences(self, x_test: Tensor, y_test: Tensor, x: Tensor | None = None, y: Tensor | None = None,
                   mode: Any = "up") -> Tensor:
        """Influence of every train point ``(x, y)`` on every test point: (n_test, n_train[, *x.shape[1:]]).
        Without ``x, y`` the test points are used on both sides (pyDVL's symmetric case)."""
        self._check_fitted()
        mode = as_mode(mode)
        if (x is None) != (y is None):
            raise UserError("influences: give both x and y for the training side, or neither")
        x_test, y_test = self._check_xy(x_test, y_test, "influences (test side)")
        if x is None:
            x, y = x_test, y_test
        else:
            x, y = self._check_xy(x, y, "influences (train side)")
        if mode == "up" and self.symmetric and x_test.shape[0] > x.shape[0]:
            return self.influences_from_factors(self.influence_factors(x, y), x_test, y_test).T
        return self.influences_from_factors(self.influence_factors(x_test, y_test), x, y, mode)

    def self_influences(self, x: Tensor, y: Tensor) -> Tensor:
        """``<factor(z), g(z)>`` for every row (the diagonal of the symmetric influence matrix)."""
        factors = self.influence_factors(x, y)
        x, y = self._check_xy(x, y, "self_influences")
        return (factors * self.features(x, y)).sum(1)

"""Utilities u(S): the score of a model trained on the players in S, evaluated for whole batches of subsets.

``Utility.evaluate(masks (B, n))`` returns (B,) scores (or (B, C) for class-wise scorers). Per batch it answers
empty subsets with ``default`` (the scorer's), removes duplicate subsets, looks the rest up in the optional
cache (keyed by the set, so order never matters), and computes what is left in chunks, in this process or on
the workers of the active ``session`` (see ``parallel``). Subclasses implement ``_compute(masks)`` for
non-empty, distinct subsets and return ``(scores, status)`` with status 0 = ok, 1 = fit failed, 2 = NaN score
(model utilities - ``ModelUtility``, ``LogisticUtility``, ``TorchUtility``: NaN or inf, since an infinite u(S)
would make every marginal and value NaN).

A failed fit or such a score gives ``default`` with a warning (pyDVL's behaviour) when ``catch_errors``;
otherwise a ``UserError`` names the subset size and the error.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.dataset import Dataset, check_nonempty
from datamatters.valuation.parallel import make_executor, resolve_n_jobs, split
from datamatters.valuation.scorers import Scorer

OK, FIT_FAILED, NAN_SCORE = 0, 1, 2  # NAN_SCORE: a model utility's non-finite scores (NaN or inf)
_INF = float("inf")


class UtilityCache:
    """In-memory map from a subset (packed bit mask) to its score; order-independent by construction."""

    def __init__(self):
        self._store: dict[bytes, np.ndarray] = {}
        self.hits = self.misses = 0

    def get(self, key: bytes):
        v = self._store.get(key)
        if v is None:
            self.misses += 1
        else:
            self.hits += 1
        return v

    def put(self, key: bytes, value) -> None:
        self._store[key] = value

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.hits = self.misses = 0


def subset_keys(masks: np.ndarray) -> list[bytes]:
    """One ``bytes`` key per subset: its packed bit mask (each row's bytes, read in one call, not row by row)."""
    packed = np.ascontiguousarray(np.packbits(np.asarray(masks, bool), axis=1))
    return packed.view(np.dtype((np.void, packed.shape[1]))).ravel().tolist()


def _distinct(masks: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Rows of the first occurrence of each distinct subset, in their original order (so that warm starts see the
    same sequence), and for every row the position of its subset among them; (None, None) when all differ. One
    pass over the packed rows' bytes: a dict keeps first-occurrence order, so nothing is sorted."""
    keys = subset_keys(masks)
    if len(set(keys)) == len(keys):  # the usual case
        return None, None
    first_of: dict[bytes, int] = {}
    for j, k in enumerate(keys):
        first_of.setdefault(k, j)
    rank = {k: i for i, k in enumerate(first_of)}
    return (np.fromiter(first_of.values(), np.intp, len(first_of)),
            np.fromiter(map(rank.__getitem__, keys), np.intp, len(keys)))


def subset_ids(masks: np.ndarray) -> np.ndarray:
    """A 62-bit id per subset (hash of its members): seeds a torch model's init/order by the set itself, so a
    subset always trains the same model whatever batch or worker it lands in."""
    return np.array([int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little") >> 2
                     for k in subset_keys(masks)], dtype=np.int64)


_CONTROLLER = None
_HELD: int | None = None  # the BLAS thread limit an enclosing limit_threads holds in this process


@contextmanager
def limit_threads(n: int | None):
    """Context limiting BLAS/OpenMP threads to ``n`` (no-op if None, or within an enclosing limit of at most
    ``n``: a session holds it for a whole fit, so evaluations inside pay nothing). The threadpoolctl controller is
    built once per process (building it scans the loaded libraries: milliseconds); each library above ``n`` is
    set directly and restored on exit (threadpoolctl's own ``limit`` costs ~1 ms per entry)."""
    global _CONTROLLER, _HELD
    if n is None or (_HELD is not None and _HELD <= n):
        yield
        return
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    changed = [(lib, t) for lib in _CONTROLLER.lib_controllers if (t := lib.num_threads) > n]
    outer, _HELD = _HELD, n
    try:
        for lib, _ in changed:
            lib.set_num_threads(n)
        yield
    finally:
        for lib, t in changed:
            lib.set_num_threads(t)
        _HELD = outer


@contextmanager
def compute_env(utility: "Utility"):
    """Where a utility computes: BLAS threads limited to ``utility.blas_threads`` and, without
    ``show_warnings``, the model's own warnings ignored. Entered once per session, worker task, or top-level
    evaluate() call, never per subset (threadpoolctl and ``catch_warnings`` cost microseconds per entry)."""
    if utility._env_held:
        yield
        return
    utility._env_held = True
    try:
        with limit_threads(utility.blas_threads):
            if utility.show_warnings:
                yield
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    yield
    finally:
        utility._env_held = False


def _compute_chunk(utility: "Utility", masks: np.ndarray):
    own = utility.worker_copy()  # threads of one dask worker may share the payload
    with compute_env(own):
        return own._compute(masks)


class Utility:
    """Base class. ``with_dataset(data)`` returns a copy bound to the players being valued.

    ``batches_models``: whether one ``_compute`` call on many subsets is much cheaper than many calls on one
    (batched torch training, vectorised games); strategies then prefer big evaluate() calls over worker tasks."""

    batches_models = False
    blas_threads: int | None = None  # BLAS threads while computing (None: left alone), see ModelUtility
    _env_held = False  # inside compute_env

    def __init__(self, scorer: Scorer | None = None, *, default: float | None = None, catch_errors: bool = True,
                 cache: bool | UtilityCache = False, n_jobs: int = 1, dask_address: Any = None,
                 show_warnings: bool = True):
        self.scorer = scorer
        self._default = default
        self.catch_errors, self.show_warnings = bool(catch_errors), bool(show_warnings)
        self.cache = cache if isinstance(cache, UtilityCache) else (UtilityCache() if cache else None)
        resolve_n_jobs(n_jobs)  # refuse 0 or 1.5 here, not when the workers start
        self.n_jobs, self.dask_address = n_jobs, dask_address
        self.data: Dataset | None = None
        self._executor = None
        self._depth = 0
        self.n_evaluations = self.n_failed = self.n_nan = 0

    # ---- binding ----------------------------------------------------------------------------------------------
    @property
    def default(self) -> float:
        if self._default is not None:
            return float(self._default)
        return float(self.scorer.default) if self.scorer is not None else 0.0

    @property
    def n_outputs(self) -> int | None:
        return getattr(self.scorer, "n_outputs", None)

    def with_dataset(self, data: Dataset) -> "Utility":
        if not isinstance(data, Dataset):
            raise UserError(f"value a datamatters.valuation.Dataset, got {type(data).__name__}")
        check_nonempty(data, "training set to value")
        u = copy.copy(self)
        u.data = data
        u._executor, u._depth, u._env_held = None, 0, False
        if self.cache is not None and self.data is not data:
            u.cache = UtilityCache()
        u._bind(data)
        return u

    def _bind(self, data: Dataset) -> None:
        """Subclass hook: precompute what depends on the training data."""

    @property
    def preferred_batch(self) -> int:
        """Subsets one evaluate() call should carry for batching to pay off (1: none, fits are independent). It
        never depends on the workers, so that default batch sizes, and hence values, do not either."""
        return 1

    @property
    def n_workers(self) -> int:
        return self._executor.n_workers if self._executor is not None else 1

    def run_tasks(self, fn, items: list) -> list:
        """``[fn(utility, item) for item in items]``, on the session's workers when there are any (each worker
        uses its own copy of this utility, received once). For strategies whose inner loop must stay sequential,
        e.g. truncated permutations, so that a task is a whole permutation rather than one subset."""
        if self._executor is None:
            return [fn(self, it) for it in items]
        return self._executor.map(fn, items)

    def worker_copy(self) -> "Utility":
        """What workers receive: this utility without cache, workers or counters (it computes in-process)."""
        u = copy.copy(self)
        u.cache, u._executor, u._depth, u._env_held = None, None, 0, False
        u.n_evaluations = u.n_failed = u.n_nan = 0
        if hasattr(u, "_warm"):
            u._warm = None
        return u

    def __getstate__(self):
        state = self.__dict__.copy()
        state["cache"], state["_executor"], state["_env_held"] = None, None, False
        if "_warm" in state:
            state["_warm"] = None
        return state

    # ---- execution --------------------------------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator["Utility"]:
        """Start the workers (once per fit) and send them this utility; nested sessions reuse them. The compute
        environment (thread limit, warning filter) is entered here once for the whole fit, not per evaluation."""
        if self._depth > 0:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        ex = make_executor(self.n_jobs, self.dask_address)
        if ex.n_workers > 1 or self.dask_address:
            ex.bind(self.worker_copy())
            self._executor = ex
        else:
            ex.close()
        self._depth = 1
        try:
            with compute_env(self):
                yield self
        finally:
            self._depth = 0
            if self._executor is not None:
                self._executor.close()
                self._executor = None

    def __call__(self, subset) -> float:
        """u(S) for one subset, given as player positions or a boolean mask."""
        self._require_data()
        s = np.asarray(subset)
        mask = s.astype(bool) if s.dtype == bool else np.isin(np.arange(len(self.data)), s)
        return float(np.asarray(self.evaluate(mask[None, :]))[0]) if self.n_outputs is None else \
            self.evaluate(mask[None, :])[0]

    def evaluate(self, masks: np.ndarray) -> np.ndarray:
        """u(S) for each row of ``masks`` (B, n players): (B,) scores, or (B, C) for class-wise scorers."""
        if self.data is None:
            self._require_data()
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != len(self.data):
            raise UserError(f"subset masks must have shape (B, {len(self.data)}), got {masks.shape}")
        return self._evaluate(masks)

    def _evaluate(self, masks: np.ndarray, distinct: bool = False) -> np.ndarray:
        """``evaluate`` for masks the framework built itself (bound data, bool (B, n)): no input checks, and the
        compute environment entered here only outside a session. ``distinct``: the caller knows the subsets are
        distinct and non-empty (a permutation's prefixes), so without a cache they go to the model as they are."""
        if not self._env_held:
            with compute_env(self):
                return self._evaluate(masks, distinct)
        B = len(masks)
        shape = (B,) if self.n_outputs is None else (B, self.n_outputs)
        if self.cache is None and (distinct or (B == 1 and np.count_nonzero(masks))):  # nothing to deduplicate
            return self._compute_many(masks).reshape(shape)
        filled = masks.any(1)
        first = inverse = None
        if self.cache is None and filled.all():
            first, inverse = _distinct(masks)
            if first is None:  # the usual batch: as it is
                return self._compute_many(masks).reshape(shape)
        out = np.full(shape, self.default, dtype=float)
        nonempty = np.flatnonzero(filled)
        if len(nonempty) == 0:
            return out
        sub = masks if len(nonempty) == B else masks[nonempty]
        if self.cache is None:  # vectorised: no Python work per subset
            if first is None:  # not searched yet: some subsets were empty
                first, inverse = _distinct(sub)
            if first is None:
                out[nonempty] = self._compute_many(sub).reshape((len(sub),) + shape[1:])
            else:
                out[nonempty] = self._compute_many(sub[first]).reshape((len(first),) + shape[1:])[inverse]
            return out
        keys = subset_keys(sub)
        first_of: dict[bytes, int] = {}
        for j, k in enumerate(keys):
            first_of.setdefault(k, j)
        todo: list[int] = []
        found: dict[bytes, Any] = {}
        for k, j in first_of.items():
            hit = self.cache.get(k)
            if hit is None:
                todo.append(j)
            else:
                found[k] = hit
        if todo:
            for k, v in zip((keys[j] for j in todo), self._compute_many(sub[todo])):
                found[k] = v
                self.cache.put(k, v)
        out[nonempty] = np.asarray([found[k] for k in keys], dtype=float).reshape((len(nonempty),) + shape[1:])
        return out

    def _evaluate_one(self, mask: np.ndarray) -> float:
        """u of one distinct, non-empty subset the framework built (a permutation walk's prefix), as a float; the
        caller may change ``mask`` afterwards."""
        return float(self._evaluate(mask[None].copy(), distinct=True)[0])

    def _compute_many(self, masks: np.ndarray) -> np.ndarray:
        if self._executor is None:
            scores, status = self._compute(masks)
            scores, status = np.asarray(scores, float), np.asarray(status)
        else:
            parts = self._executor.map(_compute_chunk, split(masks, 2 * self._executor.n_workers))
            scores = np.concatenate([np.asarray(p[0], float) for p in parts])
            status = np.concatenate([np.asarray(p[1]) for p in parts])
        return self._record(scores, status)

    def _record(self, scores: np.ndarray, status: np.ndarray) -> np.ndarray:
        """Count the evaluations; failed fits and NaN scores get ``default``, with one warning."""
        self.n_evaluations += len(scores)
        if np.count_nonzero(status):  # 0 = OK (count_nonzero: no Python wrapper, unlike .any())
            self.n_failed += int((status == FIT_FAILED).sum())
            self.n_nan += int((status == NAN_SCORE).sum())
            if self.show_warnings:  # one fixed text and place, so Python shows it once, not once per batch
                warnings.warn(f"some fits failed or scored NaN or inf; such subsets get the default {self.default} "
                              "(counts in utility.n_failed / utility.n_nan)", RuntimeWarning, stacklevel=2)
            scores[status != OK] = self.default
        return scores

    def _compute(self, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _nan_status(self, size: int) -> int:
        """Status of a non-finite score (NaN or inf), for model utilities; ``size``: the first such subset's."""
        if not self.catch_errors:
            raise UserError(f"scorer {self.scorer.name} returned NaN or inf for a subset of {size} points")
        return NAN_SCORE

    def _require_data(self) -> None:
        if self.data is None:
            raise UserError("bind the utility to data first: utility = utility.with_dataset(train)")

    def require_fittable(self) -> float:
        """u(N), refusing a utility that cannot be fitted or scored on the full training set."""
        self._require_data()
        before = self.n_failed + self.n_nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            full = self.evaluate(np.ones((1, len(self.data)), bool))[0]
        if self.n_failed + self.n_nan > before:
            raise UserError(f"{self} cannot be fitted and scored on the full training set "
                            f"({len(self.data)} points): check the model, the data and the scorer")
        return full

    def _handle(self, exc: Exception, size: int) -> int:
        if not self.catch_errors:
            raise UserError(f"fitting {self} on a subset of {size} points failed: {exc!r}. Pass catch_errors=True "
                            f"to score such subsets with the default {self.default}") from exc
        return FIT_FAILED

    def __str__(self) -> str:
        return type(self).__name__


def _copy_is_clone(model) -> bool:
    """Whether ``copy.copy(model)`` gives what ``sklearn.base.clone`` would: an unfitted estimator (no attribute
    ending in ``_``) whose parameters are immutable scalars or strings (so no nested estimator or array that a fit
    could share). sklearn's clone costs tens of microseconds per fit, a noticeable share for cheap models."""
    if not hasattr(model, "get_params") or any(k.endswith("_") and not k.startswith("_") for k in vars(model)):
        return False
    try:
        params = model.get_params(deep=False)
    except Exception:  # noqa: BLE001 - not an sklearn estimator: keep sklearn's clone
        return False
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in params.values())


def _plain_copier(model):
    """``copy.copy(model)`` without its protocol (``__reduce_ex__``, sklearn's ``__getstate__`` adding a version
    that ``__setstate__`` removes): a new instance with the same ``__dict__``, ~1 us instead of ~5-20 us. Only for
    classes that customise none of it; otherwise ``copy.copy`` itself."""
    cls = type(model)
    custom = (cls.__new__ is not object.__new__ or "__slots__" in vars(cls) or not hasattr(model, "__dict__")
              or getattr(cls, "__copy__", None) is not None or cls.__reduce_ex__ is not object.__reduce_ex__
              or cls.__reduce__ is not object.__reduce__)
    setstate = getattr(cls, "__setstate__", None)
    if not custom and setstate is not None:
        from sklearn.base import BaseEstimator

        custom = setstate is not BaseEstimator.__setstate__ or cls.__getstate__ is not BaseEstimator.__getstate__
    if custom:
        return lambda: copy.copy(model)
    state, new = model.__dict__, object.__new__

    def plain_copy():
        m = new(cls)
        m.__dict__.update(state)
        return m

    return plain_copy


class ModelUtility(Utility):
    """u(S) = scorer(model fitted on S) for an sklearn-style model (``fit``/``predict``), cloned before each fit."""

    def __init__(self, model, scorer: Scorer, *, clone_before_fit: bool = True, blas_threads: int | None = 1,
                 warm_start: bool = False, **kw):
        """``blas_threads``: BLAS/OpenMP threads per fit while computing (1 by default: many small fits run
        fastest single-threaded, and workers must not oversubscribe the cores; None leaves them alone).

        ``warm_start``: start each fit from the previous fit's solution (the estimator's own ``warm_start``, e.g.
        ``LogisticRegression``, ``SGDClassifier``, ``MLPClassifier``), whenever the classes are the same.
        Consecutive prefixes of a permutation differ by one point, so TMC's fits need fewer solver iterations.
        For a convex objective the model equals a cold fit within the solver's tolerance; u(S) then depends on
        the evaluation order only within that tolerance. Refused for ensembles, where ``warm_start`` adds
        estimators instead."""
        super().__init__(scorer, **kw)
        if not hasattr(model, "fit"):
            raise UserError(f"{type(model).__name__} has no fit(); use an sklearn-style estimator or TorchUtility")
        if warm_start:
            params = model.get_params() if hasattr(model, "get_params") else {}
            if "warm_start" not in params or "n_estimators" in params:
                raise UserError(f"warm_start=True needs an estimator whose warm_start reuses the previous solution "
                                f"(e.g. LogisticRegression); {type(model).__name__} "
                                + ("is an ensemble (warm_start adds estimators)" if "n_estimators" in params
                                   else "has no warm_start parameter"))
        self.model, self.clone_before_fit, self.blas_threads = model, bool(clone_before_fit), blas_threads
        self.warm_start, self._warm = bool(warm_start), None
        self._bind_model()

    def _bind_model(self) -> None:
        # an unfitted estimator with plain parameters: a shallow copy is a clone (~1 us)
        self._copy = _plain_copier(self.model) if _copy_is_clone(self.model) else None

    def __setstate__(self, state):  # the copier closes over this process's model: rebuild it after unpickling
        self.__dict__.update(state)
        self._bind_model()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_copy", None)
        return state

    def _fresh_model(self):
        if not self.clone_before_fit:
            return self.model
        if self._copy is not None:
            return self._copy()
        from sklearn.base import clone

        try:
            return clone(self.model)
        except TypeError:
            return clone(self.model, safe=False)

    def _bind(self, data: Dataset) -> None:
        self._warm = None  # a warm start never crosses datasets

    def _model_for(self, y) -> Any:
        """A fresh clone, or with ``warm_start`` the previous fit when it saw the same classes."""
        w = self._warm
        if w is not None and (not hasattr(w, "classes_") or np.array_equal(w.classes_, np.unique(y))):
            return w
        if not self.warm_start:
            return self._fresh_model()
        from sklearn.base import clone

        return clone(self.model).set_params(warm_start=True)

    _inline_one = True  # whether one subset may skip _compute_many/_compute (not when a subclass overrides them)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls._inline_one = cls._compute is ModelUtility._compute and cls._compute_many is Utility._compute_many

    def _evaluate(self, masks, distinct=False):
        """One subset in this process (a TMC step, a user's ``u(S)``) is fitted and scored inline, without the
        batch's arrays and checks: their fixed cost is several times the fit of a trivial model."""
        if len(masks) != 1 or not self._can_inline() or not (distinct or np.count_nonzero(masks)):
            return super()._evaluate(masks, distinct)
        out = np.empty(1)
        out[0] = self._fit_one(masks[0])
        return out

    def _evaluate_one(self, mask):
        if not self._can_inline():
            return super()._evaluate_one(mask)
        return float(self._fit_one(mask.copy()))

    def _can_inline(self) -> bool:
        return (self._inline_one and self._env_held and self.cache is None and self._executor is None
                and getattr(self.scorer, "n_outputs", None) is None)

    def _fit_one(self, mask: np.ndarray):
        """u of one non-empty subset (player mask), with the batch path's counts, defaults and errors."""
        r = mask if self.data.group_labels is None else mask[self.data.group_of_row]
        score, status = self._fit_score(r)
        if status == OK and -_INF < score < _INF:  # finite (NaN fails both comparisons)
            self.n_evaluations += 1
            return score
        if status == OK:
            status = self._nan_status(int(r.sum()))
        return self._record(np.array([score], float), np.array([status], np.int8))[0]

    def _fit_score(self, r: np.ndarray) -> tuple[Any, int]:
        """Fit a model on the rows ``r`` (a boolean mask, as ``X[S]`` would select them) and score it."""
        try:
            yr = self.data.y[r]
            if self.warm_start:
                model = self._model_for(yr)
            elif self.clone_before_fit and self._copy is not None:
                model = self._copy()
            else:
                model = self._fresh_model()
            model.fit(self.data.x[r], yr)
            score = self.scorer(model)
        except Exception as exc:  # noqa: BLE001 - any fit/score error is the subset's, see catch_errors
            self._warm = None
            return 0.0, self._handle(exc, int(r.sum()))
        if self.warm_start:
            self._warm = model
        return score, OK

    @property
    def _plain_fits(self) -> bool:
        """Whether every fit is a fresh plain copy of the model (no warm start, no overridden _fit_score)."""
        return (not self.warm_start and self.clone_before_fit and self._copy is not None
                and type(self)._fit_score is ModelUtility._fit_score)

    def _compute(self, masks):
        """Fit and score each subset, with the check for non-finite scores vectorised after the loop."""
        rows = self.data.row_masks(masks)
        scores = np.zeros((len(masks),) + (() if self.n_outputs is None else (self.n_outputs,)))
        status = np.zeros(len(masks), np.int8)
        if self._plain_fits:  # _fit_score's common case with its lookups hoisted out of the loop (~1 us a subset)
            x, y, new, score = self.data.x, self.data.y, self._copy, self.scorer
            for j, r in enumerate(rows):
                try:
                    model = new()
                    model.fit(x[r], y[r])
                    s = score(model)
                except Exception as exc:  # noqa: BLE001 - as in _fit_score
                    s, status[j] = 0.0, self._handle(exc, int(r.sum()))
                scores[j] = s
        else:
            fit_score = self._fit_score
            for j, r in enumerate(rows):
                scores[j], st = fit_score(r)
                if st:
                    status[j] = st
        nan = ~np.isfinite(scores)
        if np.count_nonzero(nan):
            nan = nan.reshape(len(masks), -1).any(1)
            status[nan] = self._nan_status(int(rows[np.argmax(nan)].sum()))
        return scores, status

    def __str__(self):
        return f"ModelUtility({type(self.model).__name__})"

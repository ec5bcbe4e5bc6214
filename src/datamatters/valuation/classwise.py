"""Class-wise Shapley (Schoch, Xu & Ji 2022), following pyDVL 0.10's sampler and scorer.

For a point of class c the value is its Shapley value in the game u_c(S_c | T) = f(a_in) * g(a_out) of a model
trained on S_c + T, where S_c are points of class c and T a context of points of the other classes; a_in / a_out
are accuracies on the test points of class c / of the other classes (``ClasswiseScorer``). Each outer sample
takes the next class c (round robin), draws T uniformly from the points of other classes (resampled until it
holds ``min_elements_per_label`` points of every other class), and runs ``n_in_class_permutations`` permutations
of class c on top of T. All prefixes of a batch are one ``utility.evaluate`` call, and since the utility returns
the scores of *every* class for a fitted model, the cache serves any class.

Fix over pyDVL 0.10: the first marginal of a permutation is u_c(sigma_1 + T) - u_c(T); pyDVL subtracted the
scorer's default instead of u_c(T), crediting the context's utility to whichever point came first. With
``normalize_values`` (the paper's and pyDVL's default) the values of class c are rescaled to sum to the
in-class score of the model trained on all data.
"""
from __future__ import annotations

import copy
import time

import numpy as np

from datamatters.errors import UserError
from datamatters.valuation.base import Valuation
from datamatters.valuation.dataset import Dataset
from datamatters.valuation.result import ValuationResult
from datamatters.valuation.scorers import ClasswiseScorer
from datamatters.valuation.stopping import StoppingCriterion, check_terminates
from datamatters.valuation.utility import Utility


class ClasswiseShapleyValuation(Valuation):
    algorithm_name = "classwise_shapley"

    def __init__(self, utility: Utility, is_done: StoppingCriterion, n_in_class_permutations: int = 1,
                 min_elements_per_label: int = 1, *, batch_size: int | None = None, seed: int = 0,
                 normalize_values: bool = True, max_context_draws: int = 1000):
        super().__init__()
        if not isinstance(getattr(utility, "scorer", None), ClasswiseScorer):
            raise UserError("class-wise Shapley needs a utility whose scorer is a ClasswiseScorer")
        self.utility, self.is_done = utility, is_done
        self.n_perms, self.min_per_label = int(n_in_class_permutations), int(min_elements_per_label)
        self.batch_size, self.seed, self.normalize = batch_size, int(seed), bool(normalize_values)
        self.max_draws = int(max_context_draws)

    # ---- sampling ---------------------------------------------------------------------------------------------
    def _context(self, rng, labels_of, c) -> np.ndarray:
        others = labels_of != c
        need = [lab for lab in self.labels if lab != c]
        for _ in range(self.max_draws):
            mask = others & (rng.random(len(labels_of)) < 0.5)
            if all((labels_of[mask] == lab).sum() >= self.min_per_label for lab in need):
                return mask
        raise UserError(f"could not draw a context with {self.min_per_label} points of every class other than "
                        f"{c} in {self.max_draws} tries; lower min_elements_per_label")

    def _batch_masks(self, batch_id: int, size: int, labels_of: np.ndarray):
        """Prefix masks of every permutation of the batch, with their class column and permutation."""
        rng = np.random.default_rng([self.seed, 0xC1A55, batch_id])
        masks, cols, perms = [], [], []
        for j in range(size):
            ci = (batch_id * size + j) % len(self.labels)
            c = self.labels[ci]
            ctx = self._context(rng, labels_of, c)
            members = np.flatnonzero(labels_of == c)
            for _ in range(self.n_perms):
                perm = rng.permutation(members)
                pm = np.repeat(ctx[None, :], len(perm) + 1, axis=0)
                for k in range(1, len(perm) + 1):
                    pm[k, perm[:k]] = True
                masks.append(pm)
                cols.append(ci)
                perms.append(perm)
        return masks, cols, perms

    # ---- fitting ----------------------------------------------------------------------------------------------
    def fit(self, data: Dataset, continue_from: ValuationResult | None = None) -> "ClasswiseShapleyValuation":
        if data.is_grouped:
            raise UserError("class-wise Shapley values single points; pass an ungrouped Dataset")
        result = self._init_result(data, continue_from)
        check_terminates(self.is_done, False)
        labels_of = np.asarray(data.labels_of_players())
        self.labels = np.unique(labels_of)
        if len(self.labels) < 2:
            raise UserError("class-wise Shapley needs at least two classes in the training data")
        u = self.utility.with_dataset(data)
        u.scorer = copy.copy(u.scorer)
        u.scorer.set_labels(self.labels)
        self.utility = u
        batch_id = int(result.meta.get("next_batch", 0)) if result.meta.get("seed") == self.seed else 0
        size = self.batch_size or len(self.labels)
        self.is_done.reset()
        started, evals0 = time.perf_counter(), u.n_evaluations
        with u.session():
            while True:
                masks, cols, perms = self._batch_masks(batch_id, size, labels_of)
                U = u.evaluate(np.concatenate(masks))
                pos, marg, start = [], [], 0
                for pm, ci, perm in zip(masks, cols, perms):
                    col = U[start:start + len(pm), ci]
                    start += len(pm)
                    pos.append(perm)
                    marg.append(np.diff(col))
                result.update(np.concatenate(pos), np.concatenate(marg))
                batch_id += 1
                if self.is_done(result):
                    break
            if self.normalize:
                self._normalize(result, labels_of)
        result.meta.update({"seed": self.seed, "next_batch": batch_id, "normalized": self.normalize,
                            "utility_evaluations": int(result.meta.get("utility_evaluations", 0))
                            + u.n_evaluations - evals0,
                            "fit_seconds": float(result.meta.get("fit_seconds", 0.0)) + time.perf_counter() - started})
        self._result = result
        return self

    def _normalize(self, result: ValuationResult, labels_of: np.ndarray) -> None:
        """Scale class c's values to sum to the in-class score of the model trained on all points."""
        u_in = copy.copy(self.utility)
        u_in.cache, u_in._executor = None, None
        u_in.scorer = copy.copy(self.utility.scorer)
        u_in.scorer._g = lambda a: np.ones_like(np.asarray(a, float))  # f(a_in) * 1: the in-class score alone
        in_scores = u_in.evaluate(np.ones((1, len(labels_of)), bool))[0]
        self.utility.n_evaluations += 1
        for ci, c in enumerate(self.labels):
            sel = labels_of == c
            sigma = result.values[sel].sum()
            if sigma != 0:
                factor = in_scores[ci] / sigma
                result.values[sel] *= factor
                result.variances[sel] *= factor**2

"""The result of a valuation: per-player running means, variances and counts, with merge, sort and plain-file I/O.

Values are running means of (importance-weighted) marginal contributions; ``variances`` are the unbiased sample
variances of those marginals and ``stderr = sqrt(variances / counts)``, as in pyDVL. Differences from pyDVL 0.10:

* updates arrive as whole arrays and are merged with Chan's parallel formula (one ``np.bincount`` per batch), so
  a batch of m updates costs O(m + n), never O(m * n);
* merging two results pools the exact sums of squares (pyDVL mixes sample and population variances);
* sorting reorders the arrays themselves (pyDVL keeps a permutation and applied it twice in ``to_dataframe``);
* ``save``/``load`` write ``.npz`` + JSON metadata, never pickles, and check the data indices on load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from datamatters.errors import UserError

STATUSES = ("pending", "converged", "failed")


class ValuationResult:
    """Values of ``n`` players (data points or groups) identified by ``indices`` (positions 0..n-1 in the valued
    dataset) and ``names`` (e.g. global dataset indices), plus the sampler/stopping state needed to continue a fit.

    ``extra`` holds additional per-player arrays (length n) that a method needs to continue exactly (e.g. MSR's
    in-sample and out-of-sample running sums); ``meta`` holds JSON-serialisable facts (algorithm settings, seed,
    next batch id, utility evaluations).
    """

    def __init__(self, values, variances=None, counts=None, indices=None, names=None, algorithm: str = "",
                 status: str = "pending", extra: Mapping[str, np.ndarray] | None = None,
                 meta: Mapping[str, Any] | None = None):
        self.values = np.asarray(values, dtype=np.float64).copy()
        n = len(self.values)
        self.variances = np.zeros(n) if variances is None else np.asarray(variances, dtype=np.float64).copy()
        self.counts = np.zeros(n, np.int64) if counts is None else np.asarray(counts, dtype=np.int64).copy()
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).copy()
        self.names = self.indices.copy() if names is None else np.asarray(names).copy()
        for key, arr in (("variances", self.variances), ("counts", self.counts), ("indices", self.indices),
                         ("names", self.names)):
            if len(arr) != n:
                raise ValueError(f"{key} has length {len(arr)}, values has {n}")
        if len(np.unique(self.indices)) != n:
            raise ValueError("indices must be unique")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.algorithm, self.status = str(algorithm), status
        self.extra = {k: np.asarray(v).copy() for k, v in (extra or {}).items()}
        self.meta = dict(meta or {})

    # ---- constructors -----------------------------------------------------------------------------------------
    @classmethod
    def zeros(cls, n: int | None = None, indices=None, names=None, algorithm: str = "") -> "ValuationResult":
        if indices is None:
            indices = np.arange(int(n))
        return cls(np.zeros(len(indices)), indices=indices, names=names, algorithm=algorithm)

    def copy(self) -> "ValuationResult":
        return ValuationResult(self.values, self.variances, self.counts, self.indices, self.names, self.algorithm,
                               self.status, self.extra, json.loads(json.dumps(self.meta, default=_json_default)))

    # ---- views ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.values)

    @property
    def stderr(self) -> np.ndarray:
        """Standard error of each value estimate (0 where nothing was sampled)."""
        return np.sqrt(self.variances / np.maximum(1, self.counts))

    def __getitem__(self, key) -> "ValuationResult":
        """Sub-result by position (int, slice, int array or bool mask); ``extra`` arrays follow."""
        pos = np.arange(len(self))[key]
        pos = np.atleast_1d(pos)
        return ValuationResult(self.values[pos], self.variances[pos], self.counts[pos], self.indices[pos],
                               self.names[pos], self.algorithm, self.status,
                               {k: v[pos] for k, v in self.extra.items()}, self.meta)

    def positions(self, indices) -> np.ndarray:
        """Positions of the given data ``indices`` in this (possibly sorted) result."""
        lookup = {int(i): p for p, i in enumerate(self.indices)}
        try:
            return np.array([lookup[int(i)] for i in np.atleast_1d(indices)], dtype=np.int64)
        except KeyError as exc:
            raise UserError(f"index {exc} is not in this result") from exc

    def sort(self, reverse: bool = False, key: str = "value", inplace: bool = False) -> "ValuationResult":
        """Reorder by ``value``, ``variance``, ``stderr``, ``count``, ``index`` or ``name`` (ascending unless
        ``reverse``); stable, so ties keep their order."""
        keys = {"value": self.values, "variance": self.variances, "stderr": self.stderr, "count": self.counts,
                "index": self.indices, "name": self.names}
        if key not in keys:
            raise UserError(f"cannot sort by {key!r}; use one of {sorted(keys)}")
        order = np.argsort(keys[key], kind="stable")
        if reverse:
            order = order[::-1]
        out = self if inplace else self.copy()
        for attr in ("values", "variances", "counts", "indices", "names"):
            setattr(out, attr, getattr(out, attr)[order])
        out.extra = {k: v[order] for k, v in out.extra.items()}
        return out

    def to_dataframe(self, column: str | None = None, use_names: bool = True):
        """A pandas frame indexed by names (or indices) with columns value, variance, stderr, count."""
        import pandas as pd

        col = column or self.algorithm or "value"
        return pd.DataFrame(
            {col: self.values, f"{col}_variances": self.variances, f"{col}_stderr": self.stderr,
             f"{col}_counts": self.counts},
            index=pd.Index(self.names if use_names else self.indices, name="name" if use_names else "index"))

    def __repr__(self) -> str:
        return (f"ValuationResult(algorithm={self.algorithm!r}, n={len(self)}, status={self.status}, "
                f"updates={int(self.counts.sum())})")

    # ---- updates ----------------------------------------------------------------------------------------------
    def update(self, positions: np.ndarray, marginals: np.ndarray) -> None:
        """Add many samples at once: ``marginals[j]`` is one more sample for player ``positions[j]``."""
        self.values, self.variances, self.counts = merge_samples(
            self.values, self.variances, self.counts, positions, marginals)

    # ---- combination ------------------------------------------------------------------------------------------
    def __add__(self, other: "ValuationResult") -> "ValuationResult":
        return self.merge(other)

    def merge(self, other: "ValuationResult") -> "ValuationResult":
        """Count-weighted combination over the union of indices (same algorithm): means weighted by counts,
        sums of squares pooled exactly. A player with zero counts on one side keeps the other side's value."""
        if not isinstance(other, ValuationResult):
            raise TypeError(f"cannot merge ValuationResult with {type(other).__name__}")
        if self.algorithm and other.algorithm and self.algorithm != other.algorithm:
            raise UserError(f"cannot merge results of different algorithms ({self.algorithm!r}, {other.algorithm!r})")
        idx = np.union1d(self.indices, other.indices)
        a, b = np.searchsorted(idx, self.indices), np.searchsorted(idx, other.indices)
        names = np.empty(len(idx), dtype=np.result_type(self.names.dtype, other.names.dtype))
        names[b] = other.names
        names[a] = self.names
        both = np.intersect1d(a, b)
        if len(both):
            na = np.empty(len(idx), dtype=names.dtype)
            nb = np.empty(len(idx), dtype=names.dtype)
            na[a], nb[b] = self.names, other.names
            if np.any(na[both] != nb[both]):
                raise UserError("cannot merge results whose names disagree for the same index")
        stats = []
        for res, pos in ((self, a), (other, b)):
            v, s, c = np.zeros(len(idx)), np.zeros(len(idx)), np.zeros(len(idx), np.int64)
            v[pos], s[pos], c[pos] = res.values, res.variances, res.counts
            stats.append((v, s, c))
        mean, var, cnt = chan_merge(*stats[0], *stats[1])
        # players nobody sampled on either side keep a directly assigned value (left side wins)
        zero = cnt == 0
        if zero.any():
            fallback = np.zeros(len(idx))
            fallback[b], fallback[a] = other.values, self.values
            mean[zero] = fallback[zero]
        status = "converged" if self.status == other.status == "converged" else (
            "failed" if "failed" in (self.status, other.status) else "pending")
        return ValuationResult(mean, var, cnt, idx, names, self.algorithm or other.algorithm, status)

    # ---- files ------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` (arrays) with the metadata as a JSON string inside; no pickles."""
        from datamatters.artifacts import atomic_write_bytes

        path = Path(path)
        header = {"format": "datamatters.valuation.result/1", "algorithm": self.algorithm, "status": self.status,
                  "meta": self.meta, "extra": sorted(self.extra), "names_dtype": str(self.names.dtype)}
        names = self.names.astype(str) if self.names.dtype == object else self.names
        arrays = {"values": self.values, "variances": self.variances, "counts": self.counts,
                  "indices": self.indices, "names": names, "header": np.array(json.dumps(header, default=_json_default))}
        arrays.update({f"extra__{k}": v for k, v in self.extra.items()})
        atomic_write_bytes(path, lambda fh: np.savez(fh, **arrays))
        return path

    @classmethod
    def load(cls, path: str | Path, indices=None) -> "ValuationResult":
        """Read a file written by ``save``; if ``indices`` is given, they must match the stored ones exactly."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"valuation result not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("format") != "datamatters.valuation.result/1":
                    raise ValueError("unknown format")
                res = cls(z["values"], z["variances"], z["counts"], z["indices"], z["names"], header["algorithm"],
                          header["status"], {k: z[f"extra__{k}"] for k in header["extra"]}, header["meta"])
        except (OSError, KeyError, ValueError) as exc:
            raise UserError(f"{path} is not a saved ValuationResult ({exc})") from exc
        if indices is not None and not np.array_equal(np.asarray(indices), res.indices):
            raise UserError(f"{path} holds values for other data indices than the dataset being valued")
        return res


def chan_merge(m1, v1, c1, m2, v2, c2):
    """Combine two sets of running (mean, unbiased variance, count) arrays elementwise (Chan et al. 1979)."""
    c1, c2 = np.asarray(c1, np.int64), np.asarray(c2, np.int64)
    c = c1 + c2
    safe = np.maximum(c, 1)
    delta = m2 - m1
    mean = m1 + delta * (c2 / safe)
    ss = v1 * np.maximum(c1 - 1, 0) + v2 * np.maximum(c2 - 1, 0) + delta**2 * (c1 * c2 / safe)
    var = np.where(c > 1, ss / np.maximum(c - 1, 1), 0.0)
    mean = np.where(c > 0, mean, np.where(c1 > 0, m1, m2))
    return mean, var, c


def batch_stats(positions: np.ndarray, samples: np.ndarray, n: int):
    """Per-player (mean, unbiased variance, count) of a batch of samples, two exact passes with ``bincount``."""
    positions = np.asarray(positions, np.int64).ravel()
    samples = np.asarray(samples, np.float64).ravel()
    cnt = np.bincount(positions, minlength=n)
    mean = np.bincount(positions, weights=samples, minlength=n) / np.maximum(cnt, 1)
    ss = np.bincount(positions, weights=(samples - mean[positions]) ** 2, minlength=n)
    var = np.where(cnt > 1, ss / np.maximum(cnt - 1, 1), 0.0)
    return mean, var, cnt


def merge_samples(values, variances, counts, positions, samples):
    """Running stats after adding ``samples`` for ``positions``: batch statistics, then one Chan merge."""
    if len(np.asarray(positions).ravel()) == 0:
        return values, variances, counts
    bm, bv, bc = batch_stats(positions, samples, len(values))
    return chan_merge(values, variances, counts, bm, bv, bc)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)

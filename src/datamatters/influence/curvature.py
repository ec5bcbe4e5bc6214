"""The curvature of the empirical risk over the training data, for one parameter block, as an operator.

``kind``:
* ``"hessian"``: the Hessian of the mean training loss, ``(1/n) sum_i d^2 l_i``;
* ``"gauss_newton"``: the generalised Gauss-Newton ``(1/n) sum_i J_i^T H^out_i J_i`` (PSD for convex losses;
  equal to the Hessian for models linear in their parameters);
* ``"empirical_fisher"``: ``(1/n) sum_i g_i g_i^T`` with per-example loss gradients. This is what pyDVL 0.10 calls
  ``SecondOrderMode.GAUSS_NEWTON``; here the name says what it is.

Averages are over *points* (each batch weighted by its size); pyDVL's Hessian operator averages batch means
with equal weights, which differs when the last batch is smaller.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from datamatters.errors import UserError
from datamatters.influence.blocks import Block
from datamatters.influence.functional import ModelFunction, split_batch

KINDS = ("hessian", "gauss_newton", "empirical_fisher")


class Curvature:
    """``matvec(V)`` = rows of ``V`` (k, block size) times the block's curvature, one pass over ``data``."""

    def __init__(self, fn: ModelFunction, block: Block, data: Iterable, kind: str = "hessian",
                 vector_chunk: int = 64, work_chunk: int = 16384, graph_cache: int = 1 << 25,
                 closed_form: bool = True):
        if kind not in KINDS:
            raise UserError(f"curvature must be one of {KINDS}, got {kind!r}")
        self.fn, self.block, self.data, self.kind = fn, block, data, kind
        self.vector_chunk = max(1, int(vector_chunk))
        # rows x vectors per vmapped product: past ~16k the intermediates leave the CPU caches and a product costs
        # ~1.6x more per (row, vector) (MNIST-1D MLP: 3.4 us at 250 x 64, 5.6 us at 1000 x 128, one thread)
        self.work_chunk = max(1, int(work_chunk))
        # Hessian products on in-memory batches keep each batch's gradient graph between passes: building it (a
        # forward and a backward pass) was 60% of a 5-vector product on 1,000 rows, i.e. of every Lanczos/CG pass.
        # Bounded by rows x parameters (a proxy for the graph's size) <= graph_cache numbers.
        self.graph_cache = int(graph_cache) if isinstance(data, list) and kind == "hessian" else 0
        self._pulls: dict = {}
        self._cached = 0
        # dense Hessians of Linear/Sequential models whose first layer with block parameters is a Linear layer take
        # the Linear layers' rows in closed form (ModelFunction.leading_linear_hessian_sum); False (a test control)
        # forces one Hessian-vector product per parameter
        self.closed_form = bool(closed_form)
        self.size = block.size
        self.n_matvec = 0  # vectors multiplied (for tests and reports)

    def batches(self):
        for batch in self.data:
            yield self.fn.prepare(*split_batch(batch))

    def _pull(self, key, x: Tensor, y: Tensor):
        if key is None or not self.graph_cache:
            return None
        if key not in self._pulls:
            if self._cached + x.shape[0] * self.size > self.graph_cache:
                return None
            self._pulls[key] = self.fn.hvp_pull(self.block, x, y)
            self._cached += x.shape[0] * self.size
        return self._pulls[key]

    def _batch_product(self, V: Tensor, x: Tensor, y: Tensor, key=None) -> Tensor:
        """The batch's summed curvature times the rows of ``V``; ``key`` names a fixed in-memory batch."""
        if self.kind == "empirical_fisher":
            G = self.fn.grads(x, y, block=self.block)
            return (V @ G.T) @ G
        rows = max(1, self.work_chunk // min(self.vector_chunk, max(1, V.shape[0])))
        out = None
        for r in range(0, x.shape[0], rows):
            xs, ys = x[r:r + rows], y[r:r + rows]
            if self.kind == "hessian":
                pull = self._pull(None if key is None else (key, r, rows), xs, ys)
                part = torch.cat([self.fn.hvp_sum(self.block, V[s:s + self.vector_chunk], xs, ys, pull)
                                  for s in range(0, V.shape[0], self.vector_chunk)])
            else:
                part = torch.cat([self.fn.ggn_sum(self.block, V[s:s + self.vector_chunk], xs, ys)
                                  for s in range(0, V.shape[0], self.vector_chunk)])
            out = part if out is None else out + part
        return out

    def matvec(self, V: Tensor) -> Tensor:
        """(k, size) -> (k, size): ``V @ C`` with C the symmetric curvature averaged over the training points."""
        V = V.to(self.fn.device, self.fn.dtype)
        total, n = torch.zeros_like(V), 0
        if V.shape[0] == 0:
            return total
        for i, (x, y) in enumerate(self.batches()):
            total += self._batch_product(V, x, y, key=i)
            n += x.shape[0]
        if n == 0:
            raise UserError("the training data loader yielded no examples")
        self.n_matvec += V.shape[0]
        return total / n

    def batch_matvec(self, V: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The curvature of one mini-batch (mean over its points) times ``V``: LiSSA's stochastic product."""
        self.n_matvec += V.shape[0]
        return self._batch_product(V, x, y) / x.shape[0]

    def dense(self, column_chunk: int = 256) -> Tensor:
        """The (size, size) matrix, symmetrised."""
        p = self.size
        if self.kind == "hessian":
            eye = torch.eye(p, device=self.fn.device, dtype=self.fn.dtype)
            M, n = torch.zeros(p, p, device=self.fn.device, dtype=self.fn.dtype), 0
            for i, (x, y) in enumerate(self.batches()):
                closed = self.fn.leading_linear_hessian_sum(self.block, x, y) if self.closed_form else None
                if closed is not None:
                    M += closed
                else:
                    for s in range(0, p, column_chunk):
                        M[s:s + column_chunk] += self._batch_product(eye[s:s + column_chunk], x, y, key=i)
                n += x.shape[0]
        else:
            M, n = torch.zeros(p, p, device=self.fn.device, dtype=self.fn.dtype), 0
            for x, y in self.batches():
                if self.kind == "gauss_newton":
                    M += self.fn.ggn_dense_sum(self.block, x, y)
                else:
                    G = self.fn.grads(x, y, block=self.block)
                    M += G.T @ G
                n += x.shape[0]
        if n == 0:
            raise UserError("the training data loader yielded no examples")
        M /= n
        return (M + M.T) / 2

    def diagonal(self, samples: int = 1, seed: int = 0) -> Tensor:
        """Hutchinson estimate ``E[z * Cz]`` of the diagonal with Rademacher ``z`` (as pyDVL's Jacobi
        preconditioner); all ``samples`` probes go through one pass over the data."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        Z = (torch.randint(0, 2, (int(samples), self.size), generator=gen) * 2 - 1).to(self.fn.device, self.fn.dtype)
        return (Z * self.matvec(Z)).mean(0)

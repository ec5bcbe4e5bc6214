"""A model and its loss as pure functions of the (block) parameters, built on ``torch.func``.

Everything here is vectorised: per-example gradients are ``vmap(grad(...))`` over chunks of rows (so the full
examples x parameters gradient matrix is never materialised for more rows than ``chunk``), curvature products
are ``vmap`` over many vectors at once, and perturbation influences are ``vmap`` over train points of
``vmap`` over factors of a vector-Jacobian product.

The per-example loss is ``loss(model(x[None]), y[None])`` with the user's (mean-reduction) loss, e.g.
``torch.nn.functional.cross_entropy``; the empirical risk is the mean of the per-example losses over the
training data, and its curvature is what the influence methods invert.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from datamatters.errors import UserError
from datamatters.influence.blocks import Block

Loss = Callable[[Tensor, Tensor], Tensor]


def split_batch(batch) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a batch that is ``(x, y)`` (pyDVL style) or ``(index, x, y)`` (datamatters style)."""
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise UserError("data batches must be (x, y) or (index, x, y) tuples")
    return (batch[0], batch[1]) if len(batch) == 2 else (batch[1], batch[2])


class ModelFunction:
    """``model`` + ``loss`` restricted to the parameters of ``blocks`` (the others are constants)."""

    def __init__(self, model: nn.Module, loss: Loss, blocks: Sequence[Block]):
        self.model = model
        self.loss = loss
        self.blocks = list(blocks)
        named = dict(model.named_parameters())
        self.theta = {k: named[k].detach() for b in self.blocks for k in b.params}
        self.const = {k: p.detach() for k, p in named.items() if k not in self.theta}
        self.const.update({k: v.detach() for k, v in model.named_buffers()})
        first = next(iter(self.theta.values()))
        self.device, self.dtype = first.device, first.dtype
        self.dim = sum(b.size for b in self.blocks)
        self.fast_sum = False  # n * loss(batch) == sum of per-example losses (checked by check_fast_sum)

    # ---- inputs --------------------------------------------------------------------------------------------
    def prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.as_tensor(x).to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        y = torch.as_tensor(y).to(self.device)
        if y.is_floating_point():
            y = y.to(self.dtype)
        return x, y

    # ---- scalar functions ----------------------------------------------------------------------------------
    def forward(self, theta: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, {**self.const, **theta}, (x,))

    def sample_loss(self, out1: Tensor, y1: Tensor) -> Tensor:
        """Loss of one example from its output (no batch dim)."""
        return self.loss(out1.unsqueeze(0), y1.unsqueeze(0))

    def example_loss(self, theta: dict[str, Tensor], x1: Tensor, y1: Tensor) -> Tensor:
        return self.sample_loss(self.forward(theta, x1.unsqueeze(0))[0], y1)

    def sum_loss(self, theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Sum of per-example losses of a batch: ``n * loss(outputs, y)`` when that was verified to be the same
        (mean-reduction losses), else the per-example losses via vmap."""
        out = self.forward(theta, x)
        if self.fast_sum:
            return self.loss(out, y) * out.shape[0]
        return vmap(self.sample_loss)(out, y).sum()

    def check_fast_sum(self, x: Tensor, y: Tensor) -> bool:
        """Use ``n * loss(batch)`` for batch sums if it equals the per-example sum on this batch (it does for
        mean-reduced cross-entropy or MSE; not for class-weighted or ``ignore_index`` losses)."""
        x, y = self.prepare(x, y)
        with torch.no_grad():
            out = self.forward(self.theta, x)
            a = self.loss(out, y) * out.shape[0]
            b = vmap(self.sample_loss)(out, y).sum()
        self.fast_sum = bool(torch.isfinite(a)) and bool(torch.allclose(a, b, rtol=1e-6, atol=0.0)) and x.shape[0] > 1
        return self.fast_sum

    # ---- flat parameter helpers ----------------------------------------------------------------------------
    def flat_theta(self, block: Block) -> Tensor:
        return torch.cat([self.theta[k].reshape(-1) for k in block.params])

    def with_block(self, block: Block, flat: Tensor) -> dict[str, Tensor]:
        return {**self.theta, **block.unflatten(flat)}

    @staticmethod
    def flatten(grads: dict[str, Tensor], names: Iterable[str], n: int) -> Tensor:
        return torch.cat([grads[k].reshape(n, -1) for k in names], dim=1)

    @property
    def names(self) -> list[str]:
        return [k for b in self.blocks for k in b.params]

    # ---- per-example gradients -----------------------------------------------------------------------------
    def grads(self, x: Tensor, y: Tensor, chunk: int = 512, block: Block | None = None) -> Tensor:
        """Per-example loss gradients (n, dim) (or (n, block.size)), computed ``chunk`` rows at a time."""
        x, y = self.prepare(x, y)
        names = self.names if block is None else list(block.params)
        sub = {k: self.theta[k] for k in names}
        g = vmap(grad(lambda th, x1, y1: self.example_loss({**self.theta, **th}, x1, y1)), in_dims=(None, 0, 0))
        out = []
        for s in range(0, x.shape[0], chunk):
            gs = g(sub, x[s:s + chunk], y[s:s + chunk])
            out.append(self.flatten(gs, names, min(chunk, x.shape[0] - s)).detach())
        if not out:
            return torch.zeros(0, sum(self.theta[k].numel() for k in names), device=self.device, dtype=self.dtype)
        return torch.cat(out)

    def flat_grad_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """``(x1, y1) -> flat gradient (dim,)``, differentiable in ``x1`` (for perturbation influences)."""
        names = self.names

        def fn(x1: Tensor, y1: Tensor) -> Tensor:
            g = grad(self.example_loss)(self.theta, x1, y1)
            return torch.cat([g[k].reshape(-1) for k in names])

        return fn

    # ---- curvature products on one batch (sums over the batch) --------------------------------------------
    def hvp_pull(self, block: Block, x: Tensor, y: Tensor) -> Callable:
        """The pullback of the batch gradient, ``v -> (sum_i H_i v,)``: reusable, so a fixed batch's graph can be
        built once and multiplied with any number of vectors (reverse-over-reverse: H is symmetric)."""
        t0 = self.flat_theta(block)

        def loss_of(t):
            return self.sum_loss(self.with_block(block, t), x, y)

        return vjp(grad(loss_of), t0)[1]

    def hvp_sum(self, block: Block, V: Tensor, x: Tensor, y: Tensor, pull: Callable | None = None) -> Tensor:
        """``sum_i H_i V^T`` for the block's Hessian, rows of ``V`` (k, size) at once."""
        pull = pull or self.hvp_pull(block, x, y)
        return vmap(pull)(V)[0].detach()

    def ggn_sum(self, block: Block, V: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``sum_i J_i^T H^out_i J_i V^T``: the generalised Gauss-Newton product (J: outputs by block params)."""
        t0 = self.flat_theta(block)

        def f(t):
            return self.forward(self.with_block(block, t), x)

        out, vjp_fn = vjp(f, t0)
        Hout = self.output_hessians(out.detach(), y)  # (b, c, c), once for all vectors

        def one(v):
            Jv = jvp(f, (t0,), (v,))[1]
            HJv = torch.einsum("bcd,bd->bc", Hout, Jv.reshape(Jv.shape[0], -1))
            return vjp_fn(HJv.reshape(Jv.shape))[0]

        return vmap(one)(V).detach()

    def output_hessians(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-example Hessians of the loss in the (flattened) outputs, (b, c, c)."""
        shape = out.shape[1:]
        flat = out.reshape(out.shape[0], -1)
        H = vmap(torch.func.hessian(lambda o, t: self.sample_loss(o.reshape(shape), t)))(flat, y)
        return H.detach()

    # ---- dense curvature on one batch (sums) ---------------------------------------------------------------
    def ggn_dense_sum(self, block: Block, x: Tensor, y: Tensor, chunk: int = 64) -> Tensor:
        """``sum_i J_i^T H^out_i J_i`` as a dense (size, size) matrix via per-example Jacobians."""
        t0 = self.flat_theta(block)

        def f1(t, x1):
            return self.forward(self.with_block(block, t), x1.unsqueeze(0))[0]

        jac = vmap(torch.func.jacrev(f1), in_dims=(None, 0))
        total = torch.zeros(block.size, block.size, device=self.device, dtype=self.dtype)
        for s in range(0, x.shape[0], chunk):
            xs, ys = x[s:s + chunk], y[s:s + chunk]
            J = jac(t0, xs).detach()  # (b, C..., size)
            out = self.forward(self.theta, xs).detach()
            Hout = self.output_hessians(out, ys)
            J = J.reshape(J.shape[0], Hout.shape[1], block.size)
            total += torch.einsum("bcp,bcd,bdq->pq", J, Hout, J)
        return total

    # ---- perturbation: grad_x of <factor, feature(x, y)> ----------------------------------------------------
    @staticmethod
    def perturbation(feature: Callable[[Tensor, Tensor], Tensor], F: Tensor, x: Tensor, y: Tensor,
                     chunk: int = 64) -> Tensor:
        """``out[j, i] = d/dx_i <F_j, feature(x_i, y_i)>`` with shape (m, n, *x.shape[1:])."""
        if not x.is_floating_point():
            raise UserError("perturbation influence needs floating-point inputs x (it differentiates in x)")

        def per_example(x1, y1):
            _, pull = vjp(lambda xx: feature(xx, y1), x1)
            return vmap(pull)(F)[0]

        out = [vmap(per_example)(x[s:s + chunk], y[s:s + chunk]).detach() for s in range(0, x.shape[0], chunk)]
        if not out:
            return torch.zeros(F.shape[0], 0, *x.shape[1:], device=F.device, dtype=F.dtype)
        return torch.cat(out).movedim(0, 1)

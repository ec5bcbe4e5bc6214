"""EK-FAC (George et al. 2018; Grosse et al. 2023): Kronecker-factored Gauss-Newton per layer, optionally with
eigenvalue correction, for ``nn.Linear`` and ``nn.Conv2d`` layers and any loss that is convex in the outputs
(cross-entropy, MSE, ...).

Per layer with inputs ``a`` (a 1 appended for the bias) and output gradients ``ds``:
``A = E[sum_t a_t a_t^T]``, ``G = E[sum_t sum_j ds_jt ds_jt^T] / T`` (T spatial/sequence positions, 1 for a plain
linear layer; KFC of Grosse & Martens 2016), eigendecompositions ``A = Q_A L_A Q_A^T``, ``G = Q_G L_G Q_G^T``, and
``(C + lambda)^-1 v = Q_G [(Q_G^T V Q_A) / (L + lambda)] Q_A^T`` with ``L = L_G L_A^T`` (K-FAC) or, with
``update_diagonal=True`` (EK-FAC), ``L = E[sum_j (Q_G^T DW_j Q_A)^2]`` from per-example gradients.

``fisher="ggn"`` (default) uses the exact expectation over the model's predictive distribution: the per-example
output Hessian ``H = sum_j l_j l_j^T`` (from ``torch.func.hessian`` of the loss, so any convex loss works) gives
pseudo-gradients ``ds_j = J^T l_j``, one backward pass each; then K-FAC is exact for a linear layer with MSE.
pyDVL 0.10 instead back-propagates a single summed pseudo-gradient ``sum_c sqrt(p_c)(e_c - p)``, whose outer
product adds cross terms between classes (not the Fisher), supports only ``nn.Linear`` and cross-entropy, and
defaults to ``update_diagonal=False`` (kept here). ``fisher="empirical"`` uses the gradient at the true label.
``fisher="summed"`` computes pyDVL 0.10's approximation (cross-entropy only): one pseudo-gradient per example,
``sum_c sqrt(p_c)(e_c - p)`` (the gradient of its ``sum_c sqrt(p_c) log p_c`` with ``p`` detached), on every
Linear layer, the eigenvalue correction from the same pseudo-gradients, and ``regularization`` added to the
(corrected) eigenvalues. It is cheaper (one backward pass instead of C) but not the Fisher: the cross terms
``sqrt(p_c p_d)(e_c - p)(e_d - p)^T`` do not vanish.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamatters.errors import UserError
from datamatters.influence.base import InfluenceModel, reject_options
from datamatters.influence.blocks import Block
from datamatters.influence.functional import split_batch

FISHERS = ("ggn", "empirical", "summed")


@dataclass
class _Layer:
    block: Block
    module: nn.Module
    has_bias: bool
    A: Tensor | None = None
    G: Tensor | None = None
    QA: Tensor | None = None
    QG: Tensor | None = None
    L: Tensor | None = None  # (out, in') eigenvalues in the Kronecker eigenbasis


class EkfacInfluence(InfluenceModel):
    def __init__(self, model, loss=F.cross_entropy, *, regularization=0.0, update_diagonal: bool = False,
                 fisher: str = "ggn", cache_limit: int = 1 << 26, **kw):
        reject_options("EkfacInfluence", kw, {
            "curvature": "its curvature is the Kronecker-factored Gauss-Newton, see fisher=",
            "block_structure": "its blocks are the Linear/Conv2d layers"})
        if fisher not in FISHERS:
            raise UserError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        super().__init__(model, loss, regularization=regularization, block_structure="layer_wise",
                         curvature="gauss_newton", **kw)
        self.update_diagonal, self.fisher, self.cache_limit = bool(update_diagonal), fisher, int(cache_limit)
        modules = dict(model.named_modules())
        self.layers: list[_Layer] = []
        for b in self.blocks:
            mod = modules.get(b.name)
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                raise UserError(f"EK-FAC supports nn.Linear and nn.Conv2d layers; parameters {list(b.params)} belong "
                                f"to {type(mod).__name__} {b.name!r}. Freeze them (requires_grad=False) or use another "
                                "method")
            weight = f"{b.name}.weight" if b.name else "weight"
            if b.params[0] != weight:
                raise UserError(f"EK-FAC needs the weight of layer {b.name!r} to be trainable")
            if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or mod.padding_mode != "zeros"
                                               or isinstance(mod.padding, str) and mod.padding != "valid"):
                raise UserError(f"EK-FAC supports Conv2d with groups=1, zero padding given as numbers; "
                                f"layer {b.name!r} has groups={mod.groups}, padding={mod.padding!r}, "
                                f"padding_mode={mod.padding_mode!r}")
            self.layers.append(_Layer(b, mod, has_bias=len(b.params) == 2))

    # ---- layer inputs/outputs in matrix form ---------------------------------------------------------------
    @staticmethod
    def _inputs(layer: _Layer, inp: Tensor) -> Tensor:
        """(batch, in', T): layer input patches with a row of ones for the bias."""
        m = layer.module
        if isinstance(m, nn.Linear):
            a = inp.reshape(inp.shape[0], -1, m.in_features).transpose(1, 2)
        else:
            pad = 0 if m.padding == "valid" else m.padding
            a = F.unfold(inp, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
        if layer.has_bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        return a

    @staticmethod
    def _outputs(layer: _Layer, ds: Tensor) -> Tensor:
        """(batch, out, T) output gradients."""
        if isinstance(layer.module, nn.Linear):
            return ds.reshape(ds.shape[0], -1, ds.shape[-1]).transpose(1, 2)
        return ds.reshape(ds.shape[0], ds.shape[1], -1)

    def _to_matrix(self, layer: _Layer, V: Tensor) -> Tensor:
        out = layer.module.weight.shape[0]
        W = V[:, :layer.module.weight.numel()].reshape(V.shape[0], out, -1)
        return torch.cat([W, V[:, W[0].numel():, None]], 2) if layer.has_bias else W

    @staticmethod
    def _from_matrix(layer: _Layer, M: Tensor) -> Tensor:
        if layer.has_bias:
            return torch.cat([M[:, :, :-1].reshape(M.shape[0], -1), M[:, :, -1]], 1)
        return M.reshape(M.shape[0], -1)

    # ---- passes over the data ------------------------------------------------------------------------------
    def _pseudo_grads(self, out: Tensor, y: Tensor) -> Tensor:
        """(batch, C, m): columns l_j with sum_j l_j l_j^T = per-example output Hessian (ggn), or the gradient.
        Closed forms for cross-entropy (``l_c = sqrt(p_c) (e_c - p)``) and MSE; other losses by ``eigh``."""
        flat = out.detach().reshape(out.shape[0], -1)

        def loss1(o, t):
            return self.fn.sample_loss(o.reshape(out.shape[1:]), t)

        if self.fisher == "empirical":
            return torch.func.vmap(torch.func.grad(loss1))(flat, y)[:, :, None]
        cross_entropy = self.loss is F.cross_entropy and out.dim() == 2 and not y.is_floating_point()
        if self.fisher == "summed" and not cross_entropy:
            raise UserError("fisher='summed' (pyDVL's EK-FAC) is defined for F.cross_entropy on (batch, classes) "
                            "outputs with class-index labels only; use fisher='ggn'")
        if cross_entropy:
            p = torch.softmax(flat, 1)
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            cols = (eye[None] - p[:, :, None]) * p.sqrt()[:, None, :]
            return cols.sum(2, keepdim=True) if self.fisher == "summed" else cols
        if self.loss is F.mse_loss:
            c = flat.shape[1]
            eye = torch.eye(c, dtype=flat.dtype, device=flat.device) * (2.0 / c) ** 0.5
            return eye.expand(flat.shape[0], c, c)
        H = torch.func.vmap(torch.func.hessian(loss1))(flat, y)
        ev, Q = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
        return Q * ev.clamp(min=0).sqrt()[:, None, :]

    def _batches(self, data: Iterable):
        """Per batch: the layer input patches and, per pseudo-gradient column, the layer output gradients."""
        store: dict[int, tuple[Tensor, Tensor]] = {}

        def hook(i):
            def fn(mod, inp, out):
                store[i] = (inp[0].detach(), out)
            return fn

        handles = [ly.module.register_forward_hook(hook(i)) for i, ly in enumerate(self.layers)]
        try:
            for batch in data:
                x, y = self.fn.prepare(*split_batch(batch))
                store.clear()
                with torch.enable_grad():
                    out = self.model(x)
                    Lp = self._pseudo_grads(out, y)
                    outs = [store[i][1] for i in range(len(self.layers))]
                    acts = [self._inputs(ly, store[i][0]) for i, ly in enumerate(self.layers)]
                    cot = Lp.permute(2, 0, 1).reshape(Lp.shape[2], *out.shape)  # one cotangent per column
                    try:  # all pseudo-gradient columns in one vmapped backward pass
                        g = torch.autograd.grad(out, outs, grad_outputs=cot, is_grads_batched=True)
                    except RuntimeError:  # an op without a batching rule: one backward pass per column
                        cols = [torch.autograd.grad(out, outs, grad_outputs=cot[j], retain_graph=True)
                                for j in range(cot.shape[0])]
                        g = [torch.stack([c[i] for c in cols]) for i in range(len(outs))]
                    grads = [torch.stack([self._outputs(ly, gj.detach()) for gj in gi])
                             for ly, gi in zip(self.layers, g)]  # per layer (m, batch, out, T)
                yield x.shape[0], acts, grads
        finally:
            for h in handles:
                h.remove()

    def _fit(self, data: Iterable) -> None:
        for ly in self.layers:
            ly.A = ly.G = None
        n, cache, size = 0, [], 0
        for b, acts, grads in self._batches(data):
            n += b
            if self.update_diagonal and size < self.cache_limit:  # keep for the correction pass
                cache.append((acts, grads))
                size += sum(a.numel() for a in acts) + sum(g.numel() for g in grads)
            for i, ly in enumerate(self.layers):
                a, g = acts[i], grads[i]
                A = torch.einsum("bit,bjt->ij", a, a)
                G = torch.einsum("mbot,mbpt->op", g, g) / a.shape[2]
                ly.A = A if ly.A is None else ly.A + A
                ly.G = G if ly.G is None else ly.G + G
        for ly in self.layers:
            ly.A, ly.G = ly.A / n, ly.G / n
            evA, ly.QA = torch.linalg.eigh(ly.A)
            evG, ly.QG = torch.linalg.eigh(ly.G)
            ly.L = torch.outer(evG, evA)
        if self.update_diagonal:
            passes = cache if size < self.cache_limit else ((a, g) for _, a, g in self._batches(data))
            self._correct_eigenvalues(passes, n)

    def _correct_eigenvalues(self, passes, n: int) -> None:
        """``L = E[sum_j (Q_G^T DW_j Q_A)^2]``; for one position (T=1) ``DW_j = ds_j a^T`` so the square factorises."""
        sums = [torch.zeros_like(ly.L) for ly in self.layers]
        for acts, grads in passes:
            for i, ly in enumerate(self.layers):
                a = torch.einsum("ij,bjt->bit", ly.QA.T, acts[i])
                ds = torch.einsum("op,mbpt->mbot", ly.QG.T, grads[i])
                if a.shape[2] == 1:
                    sums[i] += torch.einsum("bo,bi->oi", (ds[..., 0] ** 2).sum(0), a[..., 0] ** 2)
                else:
                    sums[i] += (torch.einsum("mbot,bit->mboi", ds, a) ** 2).sum((0, 1))
        for ly, s in zip(self.layers, sums):
            ly.L = s / n

    # ---- solve ---------------------------------------------------------------------------------------------
    def _solve(self, G: Tensor) -> Tensor:
        out = []
        for ly in self.layers:
            M = self._to_matrix(ly, G[:, ly.block.slice])
            rot = ly.QG.T @ M @ ly.QA
            d = ly.L + self.regularization[ly.block.name]
            if bool((d == 0).any()):
                raise UserError(f"EK-FAC layer {ly.block.name!r} has zero curvature directions; set regularization > 0")
            out.append(self._from_matrix(ly, ly.QG @ (rot / d) @ ly.QA.T))
        return torch.cat(out, 1)

"""The dense Hessian that Direct inverts: the closed form for leading Linear layers
(``ModelFunction.leading_linear_hessian_sum``) against ``torch.autograd.functional.hessian`` of the mean training
loss, for several architectures and block structures, and Direct's factors against ``(H + lambda I)^-1 g`` built
from that independent Hessian."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamatters.influence import DirectInfluence
from datamatters.influence.curvature import Curvature


def _data(n=23, d=5, c=3, regression=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(n, c, generator=g, dtype=torch.float64) if regression else torch.randint(0, c, (n,), generator=g)
    return X, Y, [(X[:7], Y[:7]), (X[7:20], Y[7:20]), (X[20:], Y[20:])]  # uneven batches: a mean over points


def _autograd_hessian(model, loss, X, Y, names):
    """The Hessian of the mean training loss in the parameters ``names`` (flattened in that order)."""
    params = dict(model.named_parameters())
    shapes = [params[k].shape for k in names]
    flat0 = torch.cat([params[k].detach().reshape(-1) for k in names])

    def f(flat):
        theta = {k: p.detach() for k, p in params.items()}
        theta.update({k: v.reshape(s) for k, v, s in zip(names, flat.split([s.numel() for s in shapes]), shapes)})
        return loss(torch.func.functional_call(model, theta, (X,)), Y)

    return torch.autograd.functional.hessian(f, flat0)


def _mlp(*layers, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*layers).double().eval()


MODELS = {
    # (model, loss, regression targets, closed form used for the whole block)
    "mlp_tanh_ce": (lambda: _mlp(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), F.cross_entropy, False),
    "deep_no_bias_mse": (lambda: _mlp(nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 6), nn.Tanh(),
                                      nn.Linear(6, 3)), F.mse_loss, True),
    # a LayerNorm after the first layer: its parameters (and the last layer's) come from Hessian-vector products
    "layernorm_rest": (lambda: _mlp(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)), F.cross_entropy,
                       False),
    "linear_mse": (lambda: torch.nn.Linear(5, 3).double(), F.mse_loss, True),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["full", "layer_wise", "no_bias"])
def test_closed_form_hessian_equals_autograd(name, structure):
    make, loss, regression = MODELS[name]
    model = make()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for k, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    X, Y, data = _data(regression=regression)
    names = [k for k, _ in model.named_parameters()]
    if structure == "no_bias":  # a user block leaving out every bias (first layer's weight, the rest's weights)
        structure = {"weights": [k for k in names if k.endswith("weight")]}
    inf = DirectInfluence(model, loss, regularization=0.1, block_structure=structure).fit(data)
    for b in inf.blocks:
        ref = _autograd_hessian(model, loss, X, Y, list(b.params))
        dense = Curvature(inf.fn, b, data, "hessian").dense()
        generic = Curvature(inf.fn, b, data, "hessian", closed_form=False).dense()
        scale = ref.abs().max()
        assert (dense - ref).abs().max() < 1e-12 * scale, b.name
        assert (generic - ref).abs().max() < 1e-12 * scale, b.name
        assert torch.equal(inf.matrices[b.name], dense)  # what Direct factorised
        # the closed form serves every block whose first module is a Linear layer (not the LayerNorm's own block)
        closed = inf.fn.leading_linear_hessian_sum(b, *data[1])
        assert (closed is None) == (name == "layernorm_rest" and b.name == "1"), b.name
        if closed is not None:  # all points in row chunks of 4: the sum, not the mean
            chunked = inf.fn.leading_linear_hessian_sum(b, *inf.fn.prepare(X, Y), rows=4)
            assert (chunked / len(X) - ref).abs().max() < 1e-12 * scale, b.name


def test_closed_form_control_detects_a_wrong_hessian():
    """Controls: the Hessian of the *sum* instead of the mean, or one without the second-order term of the
    network (the Gauss-Newton matrix), fail the 1e-12 comparison by orders of magnitude."""
    make, loss, _ = MODELS["mlp_tanh_ce"]
    model = make()
    X, Y, data = _data()
    inf = DirectInfluence(model, loss, regularization=0.1).fit(data)
    b = inf.blocks[0]
    ref = _autograd_hessian(model, loss, X, Y, list(b.params))
    H = Curvature(inf.fn, b, data, "hessian").dense()
    ggn = Curvature(inf.fn, b, data, "gauss_newton").dense()
    assert (H - ref).abs().max() < 1e-12 * ref.abs().max()
    assert (H * len(X) - ref).abs().max() > 1e-2 * ref.abs().max()
    assert (ggn - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("name", ["mlp_tanh_ce", "deep_no_bias_mse"])
def test_direct_factors_are_the_regularised_inverse_of_the_autograd_hessian(name):
    """Direct's factors and influences equal ``(H + lambda I)^-1 g`` with H from autograd (1e-10); a missing
    regularisation or a flipped sign of the Hessian is far outside that tolerance (both controls are checked)."""
    make, loss, regression = MODELS[name]
    model = make()
    X, Y, data = _data(regression=regression)
    lam = 0.05
    inf = DirectInfluence(model, loss, regularization=lam).fit(data)
    names = list(inf.blocks[0].params)
    H = _autograd_hessian(model, loss, X, Y, names)
    G = inf.fn.grads(X, Y)
    Gt = G[:6]
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    want = torch.linalg.solve(H + lam * eye, Gt.T).T
    got = inf.influence_factors(X[:6], Y[:6])
    assert (got - want).abs().max() < 1e-10 * want.abs().max()
    M = inf.influences(X[:6], Y[:6], X, Y)
    assert (M - want @ G.T).abs().max() < 1e-10 * M.abs().max()
    no_reg = torch.linalg.pinv(H) @ Gt.T
    wrong_sign = torch.linalg.solve(-H + lam * eye, Gt.T)
    for bad in (no_reg.T, wrong_sign.T):
        assert (got - bad).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["full", "layer_wise", "no_bias"])
def test_products_equal_the_autograd_hessian_times_vectors(name, structure):
    """Curvature.matvec (the products Arnoldi, CG and LiSSA use) equals the autograd Hessian times random vectors to
    1e-12, with the graph cache (in-memory batches, reused) and without (LiSSA's mini-batches)."""
    make, loss, regression = MODELS[name]
    model = make()
    X, Y, data = _data(regression=regression)
    names = [k for k, _ in model.named_parameters()]
    if structure == "no_bias":
        structure = {"weights": [k for k in names if k.endswith("weight")]}
    inf = DirectInfluence(model, loss, regularization=0.1, block_structure=structure).fit(data)
    g = torch.Generator().manual_seed(3)
    for b in inf.blocks:
        ref = _autograd_hessian(model, loss, X, Y, list(b.params))
        V = torch.randn(5, b.size, generator=g, dtype=torch.float64)
        want = V @ ref
        op = Curvature(inf.fn, b, data, "hessian", vector_chunk=2)
        assert (op.matvec(V) - want).abs().max() < 1e-12 * want.abs().max(), b.name
        assert (op.matvec(V) - want).abs().max() < 1e-12 * want.abs().max(), b.name  # cached graphs reused
        one = op.batch_matvec(V, *data[1]) * 13 + op.batch_matvec(V, *data[0]) * 7 + op.batch_matvec(V, *data[2]) * 3
        assert (one / len(X) - want).abs().max() < 1e-12 * want.abs().max(), b.name


class _SquaredLinear(nn.Linear):
    """A Linear subclass with its own forward: not ``W u + b``, so the closed form must not assume it."""

    def forward(self, x):
        return super().forward(x) ** 2


class _Residual(nn.Sequential):
    """A Sequential subclass with its own forward: not the plain chain of its children."""

    def forward(self, x):
        return super().forward(x) + x[:, :3]


def _tied():
    model = _mlp(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[4].weight = model[2].weight
    return model


def _hooked():
    model = _mlp(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].register_forward_hook(lambda m, inp, out: out * out)  # changes the first layer's output
    return model


EDGE_MODELS = {
    # (model, closed form expected for the full block)
    "linear_not_first": (lambda: _mlp(nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), True),
    "tied_weights_later": (_tied, True),  # the first layer in closed form, the tied rest by products
    "tied_first_layer": (lambda: _mlp(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)),
                         True),
    "linear_subclass": (lambda: _mlp(_SquaredLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)), False),
    "sequential_subclass": (lambda: _Residual(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double(), False),
    "hooked_linear": (_hooked, False),
}


@pytest.mark.parametrize("name", list(EDGE_MODELS))
def test_closed_form_only_where_the_model_is_the_plain_chain(name):
    """The closed form's assumptions (a plain Sequential chain, ``z = W u + b``, weights not reused later) hold or it
    is not used: a Linear/Sequential subclass with its own forward gets Hessian-vector products, and every
    architecture's dense Hessian equals autograd's to 1e-12."""
    make, closed_expected = EDGE_MODELS[name]
    model = make()
    if name == "tied_first_layer":
        model[2].weight = model[0].weight  # the first layer's weight reused later: the rest's use of it counts
        closed_expected = False
    X, Y, data = _data()
    inf = DirectInfluence(model, F.cross_entropy, regularization=0.1).fit(data)
    b = inf.blocks[0]
    ref = _autograd_hessian(model, F.cross_entropy, X, Y, list(b.params))
    dense = Curvature(inf.fn, b, data, "hessian").dense()
    assert (dense - ref).abs().max() < 1e-12 * ref.abs().max()
    assert (inf.fn.leading_linear_hessian_sum(b, *data[1]) is not None) == closed_expected

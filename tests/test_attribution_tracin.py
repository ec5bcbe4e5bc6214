"""TracIn and the gradient-dot control against hand computations on a linear model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamatters.errors import UserError
from datamatters.influence.tracin import GradientDotInfluence, TracInInfluence


def _linear(d=3):
    torch.manual_seed(0)
    return torch.nn.Linear(d, 1).double()


def _hand_grads(w, b, X, y):
    """d/d(w, b) of (w.x + b - y)^2 per row (F.mse_loss of one example), by hand."""
    r = X @ w + b - y
    return np.concatenate([2 * r[:, None] * X, 2 * r[:, None]], axis=1)


def test_tracin_matches_hand_computation_on_two_checkpoints():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(7, 3)), rng.normal(size=7)
    Xt, yt = rng.normal(size=(4, 3)), rng.normal(size=4)
    ck = [(rng.normal(size=3), rng.normal()), (rng.normal(size=3), rng.normal())]
    lrs = [0.1, 0.03]
    model = _linear()
    ckpts = [{"weight": torch.tensor(w[None]), "bias": torch.tensor([b])} for w, b in ck]
    inf = TracInInfluence(model, F.mse_loss, checkpoints=ckpts, learning_rates=lrs)
    inf.fit([(torch.tensor(X), torch.tensor(y)[:, None])])
    got = inf.influences(torch.tensor(Xt), torch.tensor(yt)[:, None], torch.tensor(X), torch.tensor(y)[:, None])
    want = sum(lr * _hand_grads(w, b, Xt, yt) @ _hand_grads(w, b, X, y).T for lr, (w, b) in zip(lrs, ck))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9)  # torch CPU kernels here differ from numpy at ~1e-8
    # a single checkpoint gives a different matrix (the sum really runs over both)
    one = TracInInfluence(model, F.mse_loss, checkpoints=ckpts[:1], learning_rates=lrs[:1])
    one.fit([(torch.tensor(X), torch.tensor(y)[:, None])])
    assert not np.allclose(one.influences(torch.tensor(Xt), torch.tensor(yt)[:, None], torch.tensor(X),
                                          torch.tensor(y)[:, None]).numpy(), want)
    # self-influence is the diagonal
    si = inf.self_influences(torch.tensor(X), torch.tensor(y)[:, None]).numpy()
    Gs = [_hand_grads(w, b, X, y) for w, b in ck]
    np.testing.assert_allclose(si, sum(lr * (G * G).sum(1) for lr, G in zip(lrs, Gs)), rtol=1e-6)


def test_gradient_dot_is_tracin_at_the_final_model_with_unit_rate():
    rng = np.random.default_rng(1)
    X, y = torch.tensor(rng.normal(size=(6, 3))), torch.tensor(rng.normal(size=(6, 1)))
    model = _linear()
    w, b = model.weight.detach().numpy()[0], float(model.bias.detach())
    inf = GradientDotInfluence(model, F.mse_loss).fit([(X, y)])
    G = _hand_grads(w, b, X.numpy(), y.numpy()[:, 0])
    np.testing.assert_allclose(inf.influences(X, y).numpy(), G @ G.T, rtol=1e-6)


def test_tracin_without_checkpoints_is_one_clear_error():
    with pytest.raises(UserError, match="TracIn needs the checkpoints"):
        TracInInfluence(_linear(), F.mse_loss, checkpoints=[])
    with pytest.raises(UserError, match="learning rates"):
        TracInInfluence(_linear(), F.mse_loss, checkpoints=[{}], learning_rates=[0.1, 0.2])
    bad = TracInInfluence(_linear(), F.mse_loss, checkpoints=[{"weight": torch.full((1, 3), float("nan"))}])
    with pytest.raises(UserError, match="NaN"):
        bad.fit([(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))])

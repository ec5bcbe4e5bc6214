"""Bad input to the batched ensemble trainer and the datamodels block trainers: one clear UserError each (the
old code failed with "index 3 is out of bounds" inside vmap, or trained on NaN)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from datamatters.datamodels import BatchedSubsetTrainer
from datamatters.errors import UserError
from datamatters.training.ensemble import losses, margins, train_ensemble

N, D, C = 30, 4, 3


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.arange(N) % C, torch.rand(2, N, generator=g) < 0.6


def _train(X, y, masks):
    return train_ensemble(nn.Linear(D, C), X, y, masks, epochs=1, batch_size=8, lr=0.1)


@pytest.mark.parametrize("label, match", [(3, r"outside \[0, 3\).*e\.g\. 3 at position 5"),
                                          (-1, r"outside \[0, 3\).*e\.g\. -1 at position 5"),
                                          (1.5, "non-integer")])
def test_labels_outside_the_classes_are_a_user_error(label, match):
    X, y, masks = _data()
    y = y.double() if isinstance(label, float) else y.clone()
    y[5] = label
    with pytest.raises(UserError, match=match):
        _train(X, y, masks)
    logits = torch.zeros(2, N, C)
    with pytest.raises(UserError, match=r"outside \[0, 3\)"):
        margins(logits, torch.full((N,), 3))
    with pytest.raises(UserError, match=r"outside \[0, 3\)"):
        losses(logits, torch.full((N,), -2))
    with pytest.raises(UserError, match=r"training labels has 1 labels outside \[0, 3\)"):
        good = torch.arange(N) % C
        BatchedSubsetTrainer(nn.Linear(D, C), X, torch.where(torch.arange(N) == 7, 9, good), X, good)


def test_valid_float_labels_still_train():
    X, y, masks = _data()
    ref = _train(X, y, masks)
    same = _train(X, y.double(), masks)  # integer-valued floats are labels too
    for k in ref:
        torch.testing.assert_close(ref[k], same[k], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_a_user_error(bad):
    X, y, masks = _data()
    X[4, 2] = bad
    with pytest.raises(UserError, match=r"non-finite values \(NaN or inf\) in 1 rows \(first: \[4\]\)"):
        _train(X, y, masks)
    with pytest.raises(UserError, match="X_targets has non-finite"):
        BatchedSubsetTrainer(nn.Linear(D, C), _data()[0], y, X, y)
    with pytest.raises(UserError, match=r"targets \(5,\)"):
        BatchedSubsetTrainer(nn.Linear(D, C), _data()[0], y, torch.zeros(3, 5), y[:3])


def test_chunked_rows_equal_one_block():
    """iter_rows flushes chunk by chunk; the rows are the ones a single block gives (ids key every model)."""
    X, y, _ = _data()
    kw = dict(alpha=0.5, epochs=2, batch_size=8, lr=0.1)
    whole = BatchedSubsetTrainer(nn.Linear(D, C), X, y, X[:6], y[:6], **kw)([0, 3, 4, 9, 10])
    parts = list(BatchedSubsetTrainer(nn.Linear(D, C), X, y, X[:6], y[:6], chunk=2, **kw).iter_rows([0, 3, 4, 9, 10]))
    assert [p[0] for p in parts] == [[0, 3], [4, 9], [10]]
    for key in ("masks", "margins"):
        np.testing.assert_allclose(np.concatenate([p[1][key] for p in parts]), whole[key], rtol=1e-5, atol=1e-6)

"""Real-data loaders on tiny files written in the real on-disk formats; splits deterministic/disjoint; noise on train."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datamatters.errors import UserError


def _assert_disjoint(dm):
    seen = {}
    for name in ("train", "holdout", "val", "test"):
        sp = dm.splits[name]
        for g in sp.indices.tolist():
            assert (sp.source, g) not in seen, f"{name} overlaps {seen[(sp.source, g)]} at {g}"
            seen[(sp.source, g)] = name


def _noise_only_on_train(dm):
    tr = dm.splits["train"]
    for name in ("holdout", "val", "test"):
        sp = dm.splits[name]
        np.testing.assert_array_equal(dm.targets[sp.source][sp.indices], dm.clean_targets[sp.source][sp.indices])
    changed = dm.targets[tr.source][tr.indices] != dm.clean_targets[tr.source][tr.indices]
    np.testing.assert_array_equal(changed, dm.is_corrupted)
    assert dm.is_corrupted.any()


# ---- MNIST-1D -------------------------------------------------------------------------------------------------
def test_mnist1d_matches_package_and_caches(tmp_path):
    from mnist1d.data import get_dataset_args, make_dataset

    from datamatters.data.mnist1d import MNIST1DDataModule, mnist1d_arrays

    args = get_dataset_args()
    args.num_samples, args.seed = 400, 7
    ref = make_dataset(args)
    state = np.random.get_state()
    a = mnist1d_arrays(400, 7, cache_dir=tmp_path)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # global RNG untouched
    np.testing.assert_allclose(a["x"], ref["x"].astype(np.float32))
    np.testing.assert_array_equal(a["y_test"], ref["y_test"])
    (f,) = list(tmp_path.iterdir())
    np.testing.assert_array_equal(mnist1d_arrays(400, 7, cache_dir=tmp_path)["x"], a["x"])  # from the cache

    kw = dict(data_dir=tmp_path, num_samples=400, generation_seed=7, seed=3,
              label_noise={"kind": "uniform", "pc_corrupted": 0.3})
    dm, dm2 = MNIST1DDataModule(**kw), MNIST1DDataModule(**kw)
    dm.setup(), dm2.setup()
    _assert_disjoint(dm)
    _noise_only_on_train(dm)
    for s in ("train", "holdout", "val", "test"):
        np.testing.assert_array_equal(dm.split_indices(s), dm2.split_indices(s))
    np.testing.assert_array_equal(dm.split_targets("train"), dm2.split_targets("train"))
    assert len(dm.split_indices("test")) == 80 and len(dm.split_indices("val")) == 32
    assert abs(len(dm.split_indices("train")) - len(dm.split_indices("holdout"))) <= 1
    other = MNIST1DDataModule(**{**kw, "seed": 4})
    assert not np.array_equal(other.split_indices("train"), dm.split_indices("train"))
    idx, x, y = next(iter(dm.loader("train", batch_size=16)))
    assert x.shape == (16, 40) and x.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), dm.targets["train"][idx.numpy()])


def test_mnist1d_bad_input(tmp_path):
    from datamatters.data.mnist1d import mnist1d_arrays

    with pytest.raises(UserError, match="num_samples"):
        mnist1d_arrays(5, cache_dir=tmp_path)
    with pytest.raises(UserError, match="train_split"):
        mnist1d_arrays(100, train_split=1.5)

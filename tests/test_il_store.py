"""Irreducible-loss file: round trip, and rejection of a file made for another dataset/split/seed/labels."""
import numpy as np
import pytest

from datamatters.data.digits import DigitsDataModule
from datamatters.errors import UserError
from datamatters.selection.il_store import ILTable, load_irreducible_losses, save_irreducible_losses


def _dm(**kw):
    dm = DigitsDataModule(label_noise={"kind": "uniform", "pc_corrupted": 0.1}, **kw)
    dm.setup()
    return dm


def test_round_trip_in_any_order(tmp_path):
    dm = _dm()
    idx = dm.split_indices("train")
    values = np.linspace(0, 1, len(idx)).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(idx))
    path = save_irreducible_losses(tmp_path / "il.npz", values[perm], idx[perm], dm.metadata("train"))
    loaded, meta = load_irreducible_losses(path, dm.metadata("train"), idx)
    assert np.array_equal(loaded, values)
    assert meta["dataset"] == "digits" and meta["split"] == "train"
    table = ILTable(idx, loaded)
    import torch

    assert torch.allclose(table(torch.as_tensor(idx[:5])), torch.as_tensor(values[:5]))
    with pytest.raises(UserError, match="no irreducible loss"):
        table(torch.as_tensor([int(dm.split_indices("test")[0])]))


@pytest.mark.parametrize("other", [
    dict(seed=1),                                                   # another data seed: other split
    dict(label_noise={"kind": "uniform", "pc_corrupted": 0.3}),     # other labels
])
def test_file_from_another_config_is_rejected(tmp_path, other):
    dm = _dm()
    idx = dm.split_indices("train")
    path = save_irreducible_losses(tmp_path / "il.npz", np.zeros(len(idx)), idx, dm.metadata("train"))
    dm2 = DigitsDataModule(**({"label_noise": {"kind": "uniform", "pc_corrupted": 0.1}} | other))
    dm2.setup()
    with pytest.raises(UserError, match="made for|other global indices|entries"):
        load_irreducible_losses(path, dm2.metadata("train"), dm2.split_indices("train"))


def test_file_for_another_split_or_dataset_is_rejected(tmp_path):
    dm = _dm()
    idx = dm.split_indices("holdout")
    path = save_irreducible_losses(tmp_path / "il.npz", np.zeros(len(idx)), idx, dm.metadata("holdout"))
    with pytest.raises(UserError, match="split='holdout'"):
        load_irreducible_losses(path, dm.metadata("train"), dm.split_indices("train"))
    meta = dm.metadata("train") | {"dataset": "cifar10"}
    path = save_irreducible_losses(tmp_path / "il2.npz", np.zeros(len(dm.split_indices("train"))),
                                   dm.split_indices("train"), meta)
    with pytest.raises(UserError, match="dataset='cifar10'"):
        load_irreducible_losses(path, dm.metadata("train"), dm.split_indices("train"))


def test_missing_or_corrupt_file(tmp_path):
    dm = _dm()
    with pytest.raises(UserError, match="not found"):
        load_irreducible_losses(tmp_path / "nope.npz", dm.metadata("train"), dm.split_indices("train"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(UserError, match="not a datamatters artifact"):
        load_irreducible_losses(bad, dm.metadata("train"), dm.split_indices("train"))


def test_nan_losses_are_refused(tmp_path):
    with pytest.raises(UserError, match="NaN/inf: the IL model diverged.*irreducible.optimizer.lr"):
        save_irreducible_losses(tmp_path / "il.npz", np.array([np.nan, 1.0]), np.array([0, 1]), {})

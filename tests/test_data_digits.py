"""Splits and label noise: deterministic, disjoint, noise on target-train only; indexed items and fast loaders."""
import numpy as np
import pytest
import torch

from datamatters.data.digits import DigitsDataModule
from datamatters.data.noise import STRUCTURED_MAP, corrupt_labels
from datamatters.errors import UserError


def _dm(**kw):
    dm = DigitsDataModule(**kw)
    dm.setup()
    return dm


def test_splits_are_deterministic_disjoint_and_cover():
    a, b = _dm(seed=0), _dm(seed=0)
    for s in ("train", "holdout", "val", "test"):
        assert np.array_equal(a.split_indices(s), b.split_indices(s))
    allidx = np.concatenate([a.split_indices(s) for s in ("train", "holdout", "val", "test")])
    assert len(allidx) == len(np.unique(allidx)) == 1797
    c = _dm(seed=1)
    assert not np.array_equal(a.split_indices("train"), c.split_indices("train"))


def test_uniform_noise_deterministic_train_only():
    noise = {"kind": "uniform", "pc_corrupted": 0.2, "seed": 3}
    a, b = _dm(label_noise=noise), _dm(label_noise=noise)
    assert np.array_equal(a.split_targets("train"), b.split_targets("train"))
    assert np.array_equal(a.is_corrupted, b.is_corrupted)
    changed = a.split_targets("train") != a.split_clean_targets("train")
    assert np.array_equal(changed, a.is_corrupted)
    # ~20% chosen, of which ~9/10 get a different class (the new label may keep the true class, as the reference)
    assert 0.14 < a.is_corrupted.mean() <= 0.2
    for s in ("holdout", "val", "test"):
        assert np.array_equal(a.split_targets(s), a.split_clean_targets(s))


def test_structured_noise_maps_only_source_classes():
    y = np.repeat(np.arange(10), 50)
    idx = np.arange(len(y))
    new, corrupted = corrupt_labels(y, idx, 0.5, "structured", 10, seed=0)
    for src, dst in STRUCTURED_MAP.items():
        moved = (y == src) & (new != y)
        assert moved.sum() == 25 and (new[moved] == dst).all()
    assert (new[~np.isin(y, list(STRUCTURED_MAP))] == y[~np.isin(y, list(STRUCTURED_MAP))]).all()
    assert corrupted.sum() == 75
    with pytest.raises(UserError, match="pc_corrupted"):
        corrupt_labels(y, idx, 1.5)


def test_items_carry_global_index_and_loaders_batch():
    dm = _dm(label_noise={"kind": "uniform", "pc_corrupted": 0.3}, batch_size=50)
    ds = dm.dataset("train")
    g, x, y = ds[3]
    assert g == dm.split_indices("train")[3] and x.shape == (1, 8, 8)
    assert int(y) == dm.targets["all"][g]
    seen = torch.cat([b[0] for b in dm.loader("train", shuffle=True)])
    assert sorted(seen.tolist()) == sorted(dm.split_indices("train").tolist())
    b1 = next(iter(dm.loader("train", shuffle=True, seed=5)))[0]
    b2 = next(iter(dm.loader("train", shuffle=True, seed=5)))[0]
    assert torch.equal(b1, b2)


def test_overlapping_splits_are_refused():
    from datamatters.data.base import Split

    dm = _dm()
    dm.splits["holdout"] = Split("all", np.concatenate([dm.split_indices("holdout"), dm.split_indices("train")[:1]]))
    with pytest.raises(RuntimeError, match="overlap"):
        dm._check_disjoint()


def test_pretrained_weights_keep_matching_tensors_and_refresh_the_head(tmp_path):
    from datamatters.models.zoo import torchvision_model

    src = torchvision_model((3, 32, 32), 1000, arch="resnet18")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    dst = torchvision_model((3, 32, 32), 14, arch="resnet18", pretrained_path=str(tmp_path / "w.pth"))
    assert torch.equal(dst.conv1.weight, src.conv1.weight) and dst.fc.weight.shape == (14, 512)
    with pytest.raises(UserError, match="pretrained weights not found"):
        torchvision_model((3, 32, 32), 14, arch="resnet18", pretrained_path=str(tmp_path / "missing.pth"))

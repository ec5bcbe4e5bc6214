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
    args.num_samples, args.seed = 100, 7
    ref = make_dataset(args)
    state = np.random.get_state()
    a = mnist1d_arrays(100, 7, cache_dir=tmp_path)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # global RNG untouched
    np.testing.assert_allclose(a["x"], ref["x"].astype(np.float32))
    np.testing.assert_array_equal(a["y_test"], ref["y_test"])
    (f,) = list(tmp_path.iterdir())
    np.testing.assert_array_equal(mnist1d_arrays(100, 7, cache_dir=tmp_path)["x"], a["x"])  # from the cache

    kw = dict(data_dir=tmp_path, num_samples=100, generation_seed=7, seed=3,
              label_noise={"kind": "uniform", "pc_corrupted": 0.3})
    dm, dm2 = MNIST1DDataModule(**kw), MNIST1DDataModule(**kw)
    dm.setup(), dm2.setup()
    _assert_disjoint(dm)
    _noise_only_on_train(dm)
    for s in ("train", "holdout", "val", "test"):
        np.testing.assert_array_equal(dm.split_indices(s), dm2.split_indices(s))
    np.testing.assert_array_equal(dm.split_targets("train"), dm2.split_targets("train"))
    assert len(dm.split_indices("test")) == 20 and len(dm.split_indices("val")) == 8
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


# ---- CIFAR-10/100: python pickle batches in the official layout -------------------------------------------------
def _write_cifar10(root, n_per_batch=8, n_test=6, seed=0):
    import pickle

    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    data, labels = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n_per_batch).tolist()
        data.append(x), labels.extend(y)
        with open(d / f"data_batch_{i}", "wb") as fh:  # bytes keys and protocol 2, as the Python 2 originals
            pickle.dump({b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
                         b"filenames": [b"img.png"] * n_per_batch}, fh, protocol=2)
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, n_test).tolist()
    with open(d / "test_batch", "wb") as fh:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt,
                     b"filenames": [b"img.png"] * n_test}, fh, protocol=2)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, fh)
    return np.concatenate(data), np.asarray(labels), xt, np.asarray(yt)


def test_cifar10_reads_pickle_batches_and_splits_like_the_reference(tmp_path):
    from datamatters.data.cifar import CIFAR10DataModule

    X, y, Xt, yt = _write_cifar10(tmp_path)
    kw = dict(data_dir=tmp_path, val_fraction=0.25, seed=5, label_noise={"kind": "uniform", "pc_corrupted": 0.5})
    dm = CIFAR10DataModule(**kw)
    dm.setup()
    n = len(y)
    np.testing.assert_array_equal(dm.split_indices("train"), np.arange(0, n, 2))  # even indices
    odd = np.arange(1, n, 2)
    holdout, val = dm.split_indices("holdout"), dm.split_indices("val")
    np.testing.assert_array_equal(np.sort(np.concatenate([holdout, val])), odd)  # val carved from the odd half
    assert len(val) == 5
    np.testing.assert_array_equal(dm.split_indices("test"), np.arange(len(yt)))
    _assert_disjoint(dm)
    _noise_only_on_train(dm)
    np.testing.assert_array_equal(dm.split_clean_targets("train"), y[0::2])
    dm2 = CIFAR10DataModule(**kw)
    for s in ("train", "holdout", "val", "test"):
        np.testing.assert_array_equal(dm2.split_indices(s), dm.split_indices(s))
    np.testing.assert_array_equal(dm2.split_targets("train"), dm.split_targets("train"))

    # eval batches: whole-tensor path, the reference's ToTensor + Normalize(0.5, 0.5) of the stored bytes
    idx, x, yb = next(iter(dm.loader("holdout", batch_size=4)))
    ref = (torch.from_numpy(X[idx.numpy()].reshape(-1, 3, 32, 32)).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(x, ref)
    np.testing.assert_array_equal(yb.numpy(), y[idx.numpy()])
    idx, x, _ = next(iter(dm.loader("test", batch_size=6)))
    torch.testing.assert_close(x, (torch.from_numpy(Xt.reshape(-1, 3, 32, 32)).float() / 255 - 0.5) / 0.5)
    # augmented train batches: same shape/range, labels are the (noisy) train labels
    idx, x, yb = next(iter(dm.loader("train", shuffle=True, augment=True, batch_size=5)))
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(yb.numpy(), dm.targets["train"][idx.numpy()])


def test_cifar100_and_no_holdout_variant(tmp_path):
    import pickle

    from datamatters.data.cifar import CIFAR100DataModule

    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 30), ("test", 7)):
        with open(d / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": rng.integers(0, 100, n).tolist(),
                         b"coarse_labels": rng.integers(0, 20, n).tolist()}, fh, protocol=2)
    dm = CIFAR100DataModule(data_dir=tmp_path, holdout=False, val_fraction=0.2)
    dm.setup()
    assert dm.num_classes == 100 and len(dm.split_indices("holdout")) == 0
    assert len(dm.split_indices("train")) == 24 and len(dm.split_indices("val")) == 6
    _assert_disjoint(dm)


def test_cifar_missing_or_tampered_data_is_a_clear_user_error(tmp_path):
    import pickle

    from datamatters.data.cifar import CIFAR10DataModule

    with pytest.raises(UserError, match=r"cifar-10-batches-py.*data.download=true"):
        CIFAR10DataModule(data_dir=tmp_path / "nowhere").setup()
    _write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(UserError, match="data_batch_3 is not a CIFAR python batch"):
        CIFAR10DataModule(data_dir=tmp_path).setup()


def test_random_crop_flip_matches_pad_crop_flip_then_normalise():
    """Every augmented image is one of torchvision's RandomCrop(32, padding=4) + flip outcomes, normalised after."""
    import torchvision.transforms.v2.functional as F

    from datamatters.data.transforms import NormalizedImages, RandomCropFlip

    raw = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    view = NormalizedImages(raw, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    aug = RandomCropFlip(32, padding=4, fill=view.black())
    gen = torch.Generator().manual_seed(0)
    batched = aug(view[torch.arange(3)], generator=gen)  # one gather for the batch
    for b in range(3):
        padded = F.pad(raw[b], [4, 4, 4, 4], fill=0)
        candidates = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        norm = [(c.float() / 255 - view.mean) / view.std for c in candidates]
        for out in (batched[b], aug(view[b], generator=gen)):  # and the per-item slicing path
            assert out.shape == (3, 32, 32)
            assert any(torch.allclose(out, c, atol=1e-6) for c in norm)
    no_pad = RandomCropFlip(32, padding=0, fill=view.black())
    for flips in (no_pad(view[torch.zeros(64, dtype=torch.long)], generator=gen),
                  torch.stack([no_pad(view[0], generator=gen) for _ in range(64)])):
        n_flipped = sum(bool(torch.equal(f, view[0].flip(-1))) for f in flips)
        assert 10 < n_flipped < 54  # about half flipped, the rest untouched
        assert all(torch.equal(f, view[0]) or torch.equal(f, view[0].flip(-1)) for f in flips)


# ---- MNIST / QMNIST: idx files ----------------------------------------------------------------------------------
def _idx(path, arr, code):
    """Write an idx (SN3 pascalvincent) file: magic = type code << 8 | ndim, big-endian dims, then the data."""
    import struct

    arr = np.ascontiguousarray(arr)
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", (code << 8) | arr.ndim))
        fh.write(struct.pack(f">{arr.ndim}I", *arr.shape))
        fh.write(arr.astype(">i4" if code == 0x0C else np.uint8).tobytes())


def test_mnist_reads_idx_files(tmp_path):
    from datamatters.data.mnist import MNISTDataModule

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 10, 40)
    Xt, yt = rng.integers(0, 256, (9, 28, 28)), rng.integers(0, 10, 9)
    _idx(raw / "train-images-idx3-ubyte", X, 0x08)
    _idx(raw / "train-labels-idx1-ubyte", y, 0x08)
    _idx(raw / "t10k-images-idx3-ubyte", Xt, 0x08)
    _idx(raw / "t10k-labels-idx1-ubyte", yt, 0x08)
    dm = MNISTDataModule(data_dir=tmp_path, val_fraction=0.2, label_noise={"kind": "structured", "pc_corrupted": 1.0})
    dm.setup()
    np.testing.assert_array_equal(dm.split_indices("train"), np.arange(0, 40, 2))
    assert len(dm.split_indices("val")) == 4 and len(dm.split_indices("test")) == 9
    _assert_disjoint(dm)
    clean = dm.split_clean_targets("train")
    assert set(np.flatnonzero(dm.is_corrupted)) == set(np.flatnonzero(np.isin(clean, [3, 9, 4])))
    idx, x, yb = next(iter(dm.loader("test")))
    torch.testing.assert_close(x, ((torch.from_numpy(Xt).float() / 255 - 0.1307) / 0.3081).unsqueeze(1))
    np.testing.assert_array_equal(yb.numpy(), yt)
    with pytest.raises(UserError, match=r"MNIST/raw"):
        MNISTDataModule(data_dir=tmp_path / "empty").setup()


def test_qmnist_reads_idx2_int_labels_and_test50k_holdout(tmp_path, monkeypatch):
    from datamatters.data.mnist import QMNISTDataModule

    raw = tmp_path / "QMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for what, n in (("train", 30), ("test", 20)):
        _idx(raw / f"qmnist-{what}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x08)
        labels = np.zeros((n, 8), dtype=np.int64)  # column 0: the digit; the rest: QMNIST's extra metadata
        labels[:, 0] = rng.integers(0, 10, n)
        labels[:, 1:] = 7
        _idx(raw / f"qmnist-{what}-labels-idx2-int", labels, 0x0C)
    dm = QMNISTDataModule(data_dir=tmp_path, val_fraction=0.2)
    dm.setup()
    assert dm.clean_targets["train"].max() < 10
    np.testing.assert_array_equal(dm.split_indices("train"), np.arange(0, 30, 2))
    assert len(dm.split_indices("test")) == 20
    monkeypatch.setattr(QMNISTDataModule, "test10k", 8)  # shrink the 10k/50k boundary to the tiny file
    dm = QMNISTDataModule(data_dir=tmp_path, holdout_from="test50k", val_fraction=0.25)
    dm.setup()
    np.testing.assert_array_equal(dm.split_indices("train"), np.arange(30))
    np.testing.assert_array_equal(dm.split_indices("test"), np.arange(8))
    assert dm.splits["holdout"].source == "test" and len(dm.split_indices("val")) == 3
    np.testing.assert_array_equal(np.sort(np.r_[dm.split_indices("holdout"), dm.split_indices("val")]),
                                  np.arange(8, 20))
    _assert_disjoint(dm)
    with pytest.raises(UserError, match="holdout_from"):
        QMNISTDataModule(data_dir=tmp_path, holdout_from="nist")


# ---- image folders: CINIC-10 and Clothing-1M --------------------------------------------------------------------
def _png(path, rng, size=(32, 32)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return a


CINIC_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _write_cinic(root, per_class=(2, 3, 1)):
    rng = np.random.default_rng(0)
    pixels = {}
    for folder, k in zip(("train", "valid", "test"), per_class):
        for c in CINIC_CLASSES:
            for i in range(k):
                pixels[(folder, c, i)] = _png(root / "CINIC-10" / folder / c / f"{c}-{i}.png", rng)
    return pixels


def test_cinic10_reads_image_folders_in_memory_or_per_item(tmp_path):
    from datamatters.data.cinic import CINIC10DataModule

    pixels = _write_cinic(tmp_path)
    kw = dict(data_dir=tmp_path, val_fraction=0.2, seed=1, label_noise={"kind": "uniform", "pc_corrupted": 0.5})
    lazy, eager = CINIC10DataModule(**kw), CINIC10DataModule(in_memory=True, **kw)
    lazy.setup(), eager.setup()
    assert len(lazy.split_indices("train")) == 20 and len(lazy.split_indices("test")) == 10
    assert len(lazy.split_indices("val")) == 6 and len(lazy.split_indices("holdout")) == 24
    assert lazy.splits["holdout"].source == lazy.splits["val"].source == "valid"
    _assert_disjoint(lazy)
    _noise_only_on_train(lazy)
    for s in ("train", "holdout", "val", "test"):
        np.testing.assert_array_equal(lazy.split_indices(s), eager.split_indices(s))
        np.testing.assert_array_equal(lazy.split_targets(s), eager.split_targets(s))
    # global index = ImageFolder order (class folder, then file name); labels = class folder
    np.testing.assert_array_equal(lazy.clean_targets["train"], np.repeat(np.arange(10), 2))
    for split in ("holdout", "test"):
        i1, x1, y1 = next(iter(lazy.loader(split, batch_size=64)))
        i2, x2, y2 = next(iter(eager.loader(split, batch_size=64)))
        torch.testing.assert_close(x1, x2)  # the PIL pipeline and the uint8 view give the same normalised tensors
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())
    folder = "test"
    a = pixels[(folder, "bird", 0)]
    mean, std = np.array(lazy.mean_std[0]), np.array(lazy.mean_std[1])
    i, x, _ = next(iter(lazy.loader("test", batch_size=64)))
    np.testing.assert_allclose(x[2].permute(1, 2, 0).numpy(), (a / 255 - mean) / std, atol=1e-5)
    for dm in (lazy, eager):
        idx, x, y = next(iter(dm.loader("train", shuffle=True, augment=True, batch_size=8)))
        assert x.shape == (8, 3, 32, 32)
    with pytest.raises(UserError, match=r"CINIC-10.*datashare"):
        CINIC10DataModule(data_dir=tmp_path / "none").setup()


C1M_LABELED = 14


def test_clothing1m_folders_layout_holdout_disjoint_from_train(tmp_path):
    from datamatters.data.clothing1m import CLASSES, Clothing1MDataModule

    rng = np.random.default_rng(0)
    root = tmp_path / "clothing1m"
    for i in range(40):  # pool: label-id folders
        _png(root / "train" / str(i % C1M_LABELED) / f"n{i:03d}.jpg", rng, (12, 10))
    for i in range(6):  # test: class-name folders map to the official ids
        _png(root / "test" / CLASSES[i] / f"t{i}.jpg", rng, (12, 10))
    kw = dict(data_dir=tmp_path, holdout_size=10, val_fraction=0.1, resize=16, crop=8, seed=3)
    dm = Clothing1MDataModule(**kw)
    dm.setup()
    train, holdout, val = (dm.split_indices(s) for s in ("train", "holdout", "val"))
    assert len(holdout) == 10 and len(val) == 4 and len(train) == 26
    assert not set(train) & set(holdout)  # the reference trains on its holdout too: here disjoint
    assert set(train) | set(holdout) | set(val) == set(range(40))
    assert {dm.splits[s].source for s in ("train", "holdout", "val")} == {"pool"}
    _assert_disjoint(dm)
    names = sorted(CLASSES[:6])  # ImageFolder order is by folder name; the label is the official id of the name
    np.testing.assert_array_equal(dm.clean_targets["test"], [CLASSES.index(n) for n in names])
    np.testing.assert_array_equal(dm.clean_targets["pool"][:3], [0, 0, 0])  # folders "0".."13", files sorted
    assert dm.input_shape == (3, 8, 8)
    idx, x, y = next(iter(dm.loader("test", batch_size=6)))
    assert x.shape == (6, 3, 8, 8)
    idx, x, y = next(iter(dm.loader("train", shuffle=True, augment=True, batch_size=4)))
    assert x.shape == (4, 3, 8, 8)
    dm2 = Clothing1MDataModule(**kw)
    np.testing.assert_array_equal(dm2.split_indices("holdout"), holdout)
    assert not np.array_equal(Clothing1MDataModule(**{**kw, "seed": 4}).split_indices("holdout"), holdout)
    with pytest.raises(UserError, match="holdout_size"):
        Clothing1MDataModule(**{**kw, "holdout_size": 36}).setup()
    (root / "train" / "Socks").mkdir()
    with pytest.raises(UserError, match="Socks"):
        Clothing1MDataModule(**kw).setup()


def test_clothing1m_annotations_layout(tmp_path):
    from datamatters.data.clothing1m import Clothing1MDataModule

    rng = np.random.default_rng(0)
    root = tmp_path / "clothing1m"
    keys = {n: [f"images/{n}/{i}.jpg" for i in range(k)]
            for n, k in (("noisy", 20), ("ctrain", 6), ("cval", 3), ("ctest", 4))}
    for ks in keys.values():
        for k in ks:
            _png(root / k, rng, (9, 9))
    shared = keys["noisy"][0]  # an image with both a noisy and a clean label, listed in both train lists
    ann = root / "annotations"
    ann.mkdir()
    (ann / "noisy_train_key_list.txt").write_text("\n".join(keys["noisy"]) + "\n")
    (ann / "clean_train_key_list.txt").write_text("\n".join(keys["ctrain"] + [shared]) + "\n")
    (ann / "clean_val_key_list.txt").write_text("\n".join(keys["cval"]))
    (ann / "clean_test_key_list.txt").write_text("\n".join(keys["ctest"] + [keys["noisy"][1]]))  # leak attempt
    (ann / "noisy_label_kv.txt").write_text("\n".join(f"{k} {i % 14}" for i, k in enumerate(keys["noisy"])))
    clean = keys["ctrain"] + keys["cval"] + keys["ctest"] + [shared, keys["noisy"][1]]
    (ann / "clean_label_kv.txt").write_text("\n".join(f"{k} 13" for k in clean))
    dm = Clothing1MDataModule(data_dir=tmp_path, holdout_size=0.25, resize=12, crop=8)
    dm.setup()
    paths = dm.sources["pool"].paths
    assert len(paths) == len(set(paths)) == 6 + 20 - 1  # the shared key once; the test key left out of the pool
    assert str(root / keys["noisy"][1]) not in paths
    assert dm.sources["pool"].targets[paths.index(str(root / shared))] == 13  # its clean label wins
    assert len(dm.split_indices("val")) == 3 and dm.splits["val"].source == "val"
    assert len(dm.split_indices("test")) == 5
    assert len(dm.split_indices("holdout")) == 6 and len(dm.split_indices("train")) == 19
    assert not set(dm.split_indices("train")) & set(dm.split_indices("holdout"))
    _assert_disjoint(dm)
    n_clean = dm.split_is_clean("train").sum() + dm.split_is_clean("holdout").sum()
    assert n_clean == 7  # 6 clean-train keys + the shared one
    (ann / "clean_label_kv.txt").unlink()
    with pytest.raises(UserError, match="clean_label_kv.txt"):
        Clothing1MDataModule(data_dir=tmp_path).setup()
    with pytest.raises(UserError, match=r"clothing1m.*Clothing-1M"):
        Clothing1MDataModule(data_dir=tmp_path / "none").setup()


# ---- GLUE: datasets saved to disk + a local tokenizer -------------------------------------------------------------
SENTENCES = ["a good movie", "bad film", "the plot was great fun", "terrible acting and a bad plot", "i loved it",
             "boring", "what a fun ride", "the worst film of the year", "great acting", "dull and long"]


def make_tokenizer(path):
    """A tiny WordLevel tokenizer with BERT-style specials, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_input_names=["input_ids", "token_type_ids",
                                                                         "attention_mask"])
    fast.save_pretrained(str(path))
    return fast


def _glue_dict(n):
    return {"sentence": [SENTENCES[i % 10] for i in range(n)], "label": [int(i % 10 in (0, 2, 4, 6, 8)) for i in range(n)],
            "idx": list(range(n))}


def test_glue_sst2_from_disk_with_local_tokenizer(tmp_path):
    import datasets

    from datamatters.data.glue import GLUEDataModule

    tok = make_tokenizer(tmp_path / "tok")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(_glue_dict(30)),
                          "validation": datasets.Dataset.from_dict(_glue_dict(7))}).save_to_disk(
        str(tmp_path / "glue" / "sst2"))
    kw = dict(task="sst2", data_dir=tmp_path, tokenizer_path=str(tmp_path / "tok"), val_fraction=0.2, seed=2,
              label_noise={"kind": "uniform", "pc_corrupted": 0.5})
    dm = GLUEDataModule(**kw)
    dm.setup()
    np.testing.assert_array_equal(dm.split_indices("train"), np.arange(0, 30, 2))
    assert len(dm.split_indices("val")) == 3 and len(dm.split_indices("test")) == 7
    _assert_disjoint(dm)
    _noise_only_on_train(dm)
    assert dm.num_classes == 2 and dm.name == "sst2"
    X = dm.sources["train"].X
    assert X.shape[1] == 3 and dm.input_shape == tuple(X.shape[1:])  # rows: input_ids, attention_mask, token_type_ids
    enc = tok(SENTENCES[3])
    L = len(enc["input_ids"])
    np.testing.assert_array_equal(X[3, 0, :L].numpy(), enc["input_ids"])
    np.testing.assert_array_equal(X[3, 1, :L].numpy(), np.ones(L))  # attention mask
    assert (X[3, 1, L:] == 0).all() and (X[3, 0, L:] == tok.pad_token_id).all()
    assert dm.sources["test"].X.shape[-1] == X.shape[-1]  # both sources padded to one length
    idx, x, y = next(iter(dm.loader("train", batch_size=4)))
    assert x.shape == (4, *dm.input_shape)
    np.testing.assert_array_equal(y.numpy(), dm.targets["train"][idx.numpy()])


def test_glue_cola_from_parquet_and_bad_input(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datamatters.data.glue import GLUEDataModule

    make_tokenizer(tmp_path / "tok")
    d = tmp_path / "glue" / "cola"
    d.mkdir(parents=True)
    pq.write_table(pa.table(_glue_dict(12)), d / "train-00000-of-00001.parquet")
    pq.write_table(pa.table(_glue_dict(5)), d / "validation-00000-of-00001.parquet")
    dm = GLUEDataModule(task="cola", data_dir=tmp_path, tokenizer_path=str(tmp_path / "tok"), max_seq_length=4)
    dm.setup()
    assert dm.input_shape[-1] == 4  # truncated to max_seq_length
    assert len(dm.split_indices("train")) == 6 and len(dm.split_indices("test")) == 5
    with pytest.raises(UserError, match=r"glue/sst2"):
        GLUEDataModule(task="sst2", data_dir=tmp_path, tokenizer_path=str(tmp_path / "tok")).setup()
    with pytest.raises(UserError, match="tokenizer not found"):
        GLUEDataModule(task="cola", data_dir=tmp_path, tokenizer_path=str(tmp_path / "nope")).setup()
    with pytest.raises(UserError, match="unknown GLUE task"):
        GLUEDataModule(task="squad", data_dir=tmp_path)
    pq.write_table(pa.table({"sentence": ["x"], "label": [-1], "idx": [0]}), d / "test-00000-of-00001.parquet")
    with pytest.raises(UserError, match="hidden labels"):
        GLUEDataModule(task="cola", data_dir=tmp_path, tokenizer_path=str(tmp_path / "tok"), test_split="test").setup()

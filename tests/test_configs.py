"""Every config option and every experiment composes, and its data module and model instantiate."""
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_cfg

from datamatters.errors import UserError

GROUPS_WITH_OPTIONS = ["data", "model", "selection", "optimizer", "scheduler", "trainer", "logger", "task"]
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if p.stem != "schema")


@pytest.mark.parametrize("group", GROUPS_WITH_OPTIONS)
def test_every_option_composes(group):
    for option in _options(group):
        cfg = compose_cfg([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=False)
        own = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")) or {}
        own.pop("defaults", None)
        if not own:  # an option that switches the group off (scheduler=none)
            assert not cfg.get(group), (group, option)
            continue
        for key, value in own.items():  # the option's own settings are what the job gets
            assert key in cfg[group], (group, option, key)
            if not isinstance(value, (dict, list)) and not (isinstance(value, str) and "${" in value):
                assert cfg[group][key] == value, (group, option, key)


def _instantiate(cfg):
    from datamatters.models import build_model

    dm = hydra.utils.instantiate(cfg.data)
    kw = OmegaConf.to_container(cfg.model, resolve=True)
    # pretrained weights are not on this machine: instantiate the same architecture with random init
    for key in ("pretrained_path", "path"):
        if kw.get(key):
            kw[key] = None
    if kw["name"] == "hf" and not kw.get("config"):
        kw["config"] = {"model_type": "bert", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "intermediate_size": 32}
    model = build_model(kw.pop("name"), dm.input_shape, dm.num_classes, **kw)
    assert sum(p.numel() for p in model.parameters()) > 0
    for opt_key in ("optimizer", "scheduler"):
        if cfg.get(opt_key) and "_target_" in cfg[opt_key]:
            hydra.utils.instantiate(cfg[opt_key])
    return dm, model


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment):
    cfg = compose_cfg([f"+experiment={experiment}", "paths.output_dir=/tmp/x"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task"]["name"]
    _instantiate(cfg)


def test_default_config_is_the_main_job():
    cfg = compose_cfg([])
    assert cfg.task.name == "rho" and cfg.selection.method == "reducible_loss"
    assert cfg.data._target_.endswith("DigitsDataModule") and cfg.data.label_noise.pc_corrupted == 0.1
    assert cfg.irreducible.path is None


def test_typos_and_wrong_types_fail_at_compose_time():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_cfg(["selection.typo=1"])
    with pytest.raises(Exception, match="percent_train"):
        compose_cfg(["selection.percent_train=abc"])


def test_data_dir_env_override(monkeypatch):
    monkeypatch.setenv("DATA_DIR", "/some/where")
    cfg = compose_cfg([])
    assert cfg.paths.data_dir == "/some/where" and cfg.data.data_dir == "/some/where"
    assert Path(compose_cfg(["paths.data_dir=mine"]).data.data_dir) == Path("mine")


# ---- options no experiment builds: compose, instantiate, and run one batch ---------------------------------------
def _idx(path: Path, arr: np.ndarray) -> None:
    """An idx file as LeCun's MNIST / Facebook's QMNIST ship them: magic (0, 0, dtype code, ndim), big-endian dims."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">i4").tobytes()
    path.write_bytes(header + arr.tobytes())


def _digits(rng, n):
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def _check_images(dm, images, labels, n_train, n_test):
    from datamatters.data.transforms import MNIST_MEAN_STD

    dm.setup()
    tr, te = dm.split_indices("train"), dm.split_indices("test")
    np.testing.assert_array_equal(tr, np.arange(0, n_train, 2))  # target-train = even indices of the train file
    assert len(te) == n_test and len(dm.split_indices("holdout")) + len(dm.split_indices("val")) == n_train // 2
    np.testing.assert_array_equal(dm.split_targets("train"), labels["train"][tr])
    np.testing.assert_array_equal(dm.split_targets("test"), labels["test"][te])
    _, x, y = next(iter(dm.loader("train", batch_size=4)))
    (mean,), (std,) = MNIST_MEAN_STD
    expect = (torch.as_tensor(images["train"][tr[:4]], dtype=torch.float32)[:, None] / 255 - mean) / std
    torch.testing.assert_close(x, expect)
    np.testing.assert_array_equal(y.numpy(), labels["train"][tr[:4]])


def test_data_mnist_reads_the_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = {}, {}
    for split, prefix, n in (("train", "train", 40), ("test", "t10k", 12)):
        images[split], labels[split] = _digits(rng, n)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images[split])
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels[split].astype(np.uint8))
    cfg = compose_cfg(["data=mnist", f"paths.data_dir={tmp_path}", "data.val_fraction=0.25"])
    dm = hydra.utils.instantiate(cfg.data)
    _check_images(dm, images, labels, 40, 12)
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10


def test_data_qmnist_reads_the_idx_files(tmp_path):
    """QMNIST's labels are an idx2 int32 table (class, writer, ...): the class is column 0."""
    rng = np.random.default_rng(1)
    raw = tmp_path / "QMNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = {}, {}
    for split, n in (("train", 30), ("test", 14)):
        images[split], labels[split] = _digits(rng, n)
        table = np.zeros((n, 8), ">i4")
        table[:, 0], table[:, 1] = labels[split], rng.integers(0, 500, n)  # class, writer id
        _idx(raw / f"qmnist-{split}-images-idx3-ubyte", images[split])
        _idx(raw / f"qmnist-{split}-labels-idx2-int", table)
    cfg = compose_cfg(["data=qmnist", f"paths.data_dir={tmp_path}", "data.val_fraction=0.2"])
    dm = hydra.utils.instantiate(cfg.data)
    _check_images(dm, images, labels, 30, 14)
    bad = compose_cfg(["data=qmnist", f"paths.data_dir={tmp_path}", "data.holdout_from=test50k"])
    with pytest.raises(UserError, match="needs the full 60k QMNIST test file"):
        hydra.utils.instantiate(bad.data).setup()


def _one_batch(cfg, x):
    """Build the model of ``cfg`` as a job does and take one optimiser step on a batch: the loss must go down."""
    from datamatters.tasks.building import build_datamodule, build_network, build_optimizer, build_scheduler

    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    model = build_network(cfg.model, dm)
    y = torch.arange(len(x)) % dm.num_classes
    opt = build_optimizer(cfg.optimizer)(model.parameters())
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    return model, opt, build_scheduler(cfg.get("scheduler"))


def test_model_cnn_trains_on_digits():
    from datamatters.models import SmallCNN

    cfg = compose_cfg(["model=cnn", "optimizer.lr=0.01"])
    model, _, _ = _one_batch(cfg, torch.rand(8, 1, 8, 8))
    assert isinstance(model, SmallCNN)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(cfg.model.channels)


def test_model_hf_tiny_is_a_random_bert():
    cfg = compose_cfg(["model=hf_tiny", "optimizer.lr=0.001"])
    model, _, _ = _one_batch(cfg, torch.randint(0, 100, (4, 12)))
    bert = model.model
    assert bert.config.model_type == "bert" and bert.config.num_hidden_layers == 2 and bert.config.hidden_size == 32
    assert bert.config.num_labels == 10  # the head follows the data's classes (digits here)


def test_model_transformer_layernorm_on_modular_addition():
    plain = compose_cfg(["+experiment=modular_addition", "data.p=7"])
    cfg = compose_cfg(["+experiment=modular_addition", "model=transformer_layernorm", "data.p=7"])
    assert cfg.model.layernorm is True and plain.model.layernorm is False
    model, _, _ = _one_batch(cfg, torch.tensor([[1, 2, 7], [3, 5, 7], [6, 6, 7], [0, 4, 7]]))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and not [m for m in build_network_of(plain).modules() if isinstance(m, torch.nn.LayerNorm)]


def build_network_of(cfg):
    from datamatters.tasks.building import build_datamodule, build_network

    return build_network(cfg.model, build_datamodule(cfg))


def test_scheduler_cosine_anneals_over_max_epochs():
    cfg = compose_cfg(["scheduler=cosine", "trainer.max_epochs=4", "optimizer.lr=0.01"])
    _, opt, make = _one_batch(cfg, torch.rand(8, 1, 8, 8))
    sched = make(opt)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    np.testing.assert_allclose(lrs, [0.01 * (1 + np.cos(np.pi * t / 4)) / 2 for t in range(4)], rtol=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # T_max = trainer.max_epochs

"""Every config option and every experiment composes, and its data module and model instantiate."""
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, compose_cfg

GROUPS_WITH_OPTIONS = ["data", "model", "selection", "optimizer", "scheduler", "trainer", "logger", "task"]
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if p.stem != "schema")


@pytest.mark.parametrize("group", GROUPS_WITH_OPTIONS)
def test_every_option_composes(group):
    for option in _options(group):
        cfg = compose_cfg([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=False)
        assert cfg[group] is not None or group == "scheduler"


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

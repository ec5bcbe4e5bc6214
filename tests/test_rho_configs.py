"""The RHO-LOSS paper experiments as composed: what reaches the IL trainer and the target trainer (batch size, epochs,
checkpoint cadence), and plans refused before any training. No data is read: the trainer is replaced by a probe."""
from pathlib import Path

import pytest
import torch

from conftest import CONFIG_DIR, compose_cfg, run_job
from datamatters.errors import UserError

# the reference's IL batch sizes (OATML/RHO-Loss; issue 10 item 1) and the NLP IL budget (item 4)
IL_BATCH = {"cifar10_resnet18_irred": 320, "cifar100_resnet18_irred": 320, "cinic10_resnet18_irred": 640,
            "sst2_irred": 32, "cola_irred": 32, "c1m_resnet18_irred": 64, "mnist1d_irred": 320}
NLP = ("sst2_irred", "cola_irred")


class _Stop(Exception):
    pass


class _FakeDM:
    num_classes, fit_split, augment, batch_size = 10, "train", False, 999

    def split_indices(self, split):
        import numpy as np

        return np.arange(8)


def _probe_il_trainer(monkeypatch, tmp_path, overrides):
    """Run the IL job's training on a probe: returns what the Lightning Trainer and the datamodule got."""
    import lightning

    from datamatters.tasks import irreducible
    from datamatters.tasks.common import RunContext

    seen = {}
    dm = _FakeDM()

    class ProbeTrainer:
        def __init__(self, **kw):
            seen.update(kw, batch_size=dm.batch_size)
            raise _Stop

    monkeypatch.setattr(lightning, "Trainer", ProbeTrainer)
    monkeypatch.setattr(irreducible, "build_datamodule", lambda cfg: dm)
    monkeypatch.setattr(irreducible, "build_network", lambda cfg, dm: torch.nn.Linear(2, 10))
    cfg = compose_cfg([f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides], "irreducible")
    with pytest.raises(_Stop):
        irreducible.train_irreducible(cfg, RunContext(cfg, tmp_path, "h", "irreducible"), tmp_path / "il.npz")
    return seen


def test_every_irred_experiment_is_listed():
    assert {p.stem for p in (CONFIG_DIR / "experiment").glob("*_irred.yaml")} == set(IL_BATCH)


@pytest.mark.parametrize("name", sorted(IL_BATCH))
def test_il_batch_size_and_budget_reach_the_il_trainer(monkeypatch, tmp_path, name):
    seen = _probe_il_trainer(monkeypatch, tmp_path, [f"+experiment={name}"])
    assert seen["batch_size"] == IL_BATCH[name]
    if name in NLP:  # the reference's documented NLP IL command: 10 epochs, checkpoint chosen every 0.05 epoch
        assert seen["max_epochs"] == 10 and seen["val_check_interval"] == 0.05
    else:
        assert seen.get("val_check_interval") in (None, 1.0)


def test_il_batch_size_is_not_the_target_big_batch(monkeypatch, tmp_path):
    """data.batch_size is the target's n_B; only irreducible.batch_size sets the IL minibatch."""
    seen = _probe_il_trainer(monkeypatch, tmp_path, ["+experiment=sst2_irred", "data.batch_size=320"])
    assert seen["batch_size"] == 32


@pytest.mark.parametrize("name, epochs", [("sst2_main", 15), ("cola_main", 100), ("cifar10_resnet18_main", 175),
                                          ("cifar100_resnet18_main", 150), ("cinic10_resnet18_main", 150),
                                          ("c1m_resnet50_main", 50)])
def test_target_budgets_as_the_reference(name, epochs):
    cfg = compose_cfg([f"+experiment={name}"])
    assert cfg.trainer.max_epochs == epochs and cfg.selection.percent_train == 0.1


QUIET = ["trainer.enable_progress_bar=false", "logger.wandb.enabled=false"]


@pytest.mark.parametrize("args, message", [
    (["+data.holdout=false"], "data.holdout=false leaves no holdout split .* irreducible.no_holdout=true"),
    (["trainer.max_epochs=0"], r"trainer.max_epochs must be >= 1, got 0"),
    (["irreducible.max_epochs=0"], r"irreducible.max_epochs must be >= 1, got 0"),
])
def test_impossible_plans_fail_before_any_training(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        run_job(tmp_path, [*args, *QUIET])
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "cache").exists() and not list(Path(tmp_path).rglob("*.ckpt"))  # nothing trained


def test_irreducible_job_refuses_no_holdout_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_job(tmp_path, ["+data.holdout=false", *QUIET], config_name="irreducible")
    assert "irreducible.no_holdout=true" in capsys.readouterr().err
    assert not list(Path(tmp_path).rglob("*.ckpt"))

"""The train (RHO-LOSS) and irreducible jobs end to end: fast_dev_run, resume, W&B offline, the noisy-digits check,
and each bad input giving one clear message with a non-zero exit."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg, run_cli, run_job
from datamatters.errors import UserError


def test_fast_dev_run_irreducible_then_train_from_the_command_line(tmp_path):
    """Both entry points as a user runs them: the IL job (its Hydra main called in-process, which saves a spawn) writes
    the file the main job (spawned) reads. The main job's console shows each message once and no ads (Lightning's own handler and Hydra's
    root handler both printed every line; Lightning advertised litlogger; W&B warned about the `anonymous` setting);
    progress bars, the summary table and run.log stay."""
    il = tmp_path / "il.npz"
    run_entry_point("run_irreducible.py", ["trainer.fast_dev_run=true", f"irreducible.output={il}",
                                           f"hydra.run.dir={tmp_path}/il_run", f"paths.log_dir={tmp_path}"])
    assert il.is_file()
    run_dir = tmp_path / "run"
    res = run_cli(["trainer.fast_dev_run=true", f"irreducible.path={il}", "logger.wandb.enabled=true",
                   "trainer.enable_progress_bar=true", f"hydra.run.dir={run_dir}"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("`Trainer.fit` stopped") == 1, out
    assert out.count("GPU available:") == 1, out
    for noise in ("litlogger", "anonymous setting", "The `srun` command", "LeafSpec"):
        assert noise not in out, noise
    assert "Epoch 0/" in out and "test/acc" in out  # the progress bar and the summary table
    assert (run_dir / "run.log").read_text().count("`Trainer.fit` stopped") == 1


def run_entry_point(script: str, args: list[str]) -> None:
    """Call an entry point's Hydra ``main`` in this process with ``args`` as its command line; Hydra's global state and
    logging setup (root handlers on the captured console and run.log) are undone afterwards."""
    import importlib.util
    import logging
    import sys

    from conftest import ROOT

    # named __main__ so Hydra resolves config_path next to the script, and its `if __name__ == "__main__"` runs main
    spec = importlib.util.spec_from_file_location("__main__", ROOT / script)
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    handlers, level, argv, hydra_cfg = list(root.handlers), root.level, sys.argv, HydraConfig.instance().cfg
    sys.argv = [str(ROOT / script), *args]
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    finally:
        sys.argv, HydraConfig.instance().cfg = argv, hydra_cfg  # later in-process jobs must not see this run dir
        GlobalHydra.instance().clear()
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:], root.level = handlers, level


def test_irreducible_then_main_uses_the_file(tmp_path, tiny):
    il = tmp_path / "il.npz"
    s = run_job(tmp_path, [*tiny, f"irreducible.output={il}"], config_name="irreducible")
    assert il.is_file() and s["irreducible/val_acc"] > 0.3
    s = run_job(tmp_path / "main", [*tiny, f"irreducible.path={il}"])
    summary = json.loads(Path(s["run_dir"], "summary.json").read_text())
    assert summary["trainer/steps"] == 6 and summary["config_hash"]
    sel = np.load(summary["artifacts"]["selected_indices"])
    assert sel.shape == (6, 32)  # n_b = int(0.1 * 320) per step


def test_rho_selects_far_fewer_corrupted_points_than_uniform(tmp_path):
    """Digits with 20% uniform noise: RHO-LOSS's selected corrupted fraction is well below uniform's."""
    common = ["data.label_noise.pc_corrupted=0.2", "trainer.max_epochs=12", "irreducible.max_epochs=12",
              "trainer.enable_progress_bar=false", "logger.wandb.enabled=false"]
    rho = run_job(tmp_path / "rho", common)
    uni = run_job(tmp_path / "uni", [*common, "selection=uniform"])
    print("corrupted frac rho", rho["selection/corrupted_frac"], "uniform", uni["selection/corrupted_frac"],
          "data", rho["data/corrupted_frac"])
    assert rho["data/corrupted_frac"] == pytest.approx(uni["data/corrupted_frac"])
    assert 0.12 < uni["selection/corrupted_frac"] < 0.26  # uniform selects about the base rate (~18%)
    assert rho["selection/corrupted_frac"] < 0.05         # RHO-LOSS avoids noisy labels
    assert rho["test/acc"] > 0.85


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    s = run_job(tmp_path, ["trainer.max_epochs=2", "irreducible.max_epochs=1", "trainer.enable_progress_bar=false",
                           "trainer.log_every_n_steps=1"])
    wb = Path(s["wandb/run_dir"])
    assert wb.name.startswith("offline-run-")
    history = (wb / "files" / "wandb-summary.json")
    data = list(wb.glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0
    if history.exists():  # written at finish
        keys = json.loads(history.read_text())
        assert "test/acc" in keys and "selection/corrupted_frac" in keys
    csv = Path(s["run_dir"]) / "csv" / "metrics.csv"
    header = csv.read_text().splitlines()[0]
    for key in ("train/loss_step", "val/acc", "test/acc", "selection/corrupted_frac", "trainer/examples_seen"):
        assert key in header


def test_rerun_into_same_dir_resumes(tmp_path, tiny):
    run_dir = tmp_path / "run"
    first = run_job(tmp_path, [*tiny, "callbacks.checkpoint.every_n_train_steps=1"])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    again = run_job(tmp_path, [*tiny, "trainer.max_epochs=5", "callbacks.checkpoint.every_n_train_steps=1"])
    assert again["trainer/steps"] == 10 and first["trainer/steps"] == 6
    sel = np.load(Path(again["artifacts"]["selected_indices"]))
    assert sel.shape[0] == 10  # selections made before the restart were restored from the checkpoint


def run_task(tmp_path: Path, overrides: list[str], config_name: str = "train") -> dict:
    """Compose and call the task function itself (no dispatch, no new process): a UserError propagates."""
    import importlib

    cfg = compose_cfg([f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", *overrides], config_name)
    return importlib.import_module(f"datamatters.tasks.{cfg.task.name}").run(cfg)


@pytest.mark.parametrize("args, message", [
    (["data=cifar10", "paths.data_dir=/nonexistent/dm-data"], "/nonexistent/dm-data"),
    (["selection.method=foo"], "unknown selection method 'foo'"),
    (["selection.percent_train=0"], r"percent_train must be in \(0, 1\]"),
    (["selection.percent_train=1.5"], r"percent_train must be in \(0, 1\]"),
])
def test_bad_input_gives_one_clear_message(tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        run_task(tmp_path, [*args, "trainer.fast_dev_run=true"])


def test_unknown_config_group_option_is_named():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Could not find 'selection/foo'"):
        compose_cfg(["selection=foo"])


def test_bad_input_from_the_command_line_exits_non_zero_with_one_line(tmp_path):
    """The one spawned bad-input case: a UserError becomes exit 1 and a single `error:` line, no traceback."""
    res = run_cli(["irreducible.path=/nonexistent/il.npz", "trainer.fast_dev_run=true"], tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "irreducible-loss file not found" in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_il_file_from_another_config_is_refused(tmp_path, tiny):
    il = tmp_path / "il.npz"
    run_job(tmp_path, [*tiny, f"irreducible.output={il}"], config_name="irreducible")
    before = il.read_bytes()
    with pytest.raises(UserError, match="irreducible-loss file") as err:
        run_task(tmp_path, [f"irreducible.path={il}", "data.seed=1", "trainer.fast_dev_run=true"])
    assert "recompute" in str(err.value).lower()
    assert il.read_bytes() == before  # nothing already stored is touched


# (test/acc, selection/corrupted_frac) of the deterministic tiny digits job (3 epochs, seed 0, one thread), pinned:
# a rule that picked other points or trained differently moves them. 359 test points (1 = 0.0028), 186 selected.
PINNED = {
    "selection=ce_loss": (0.2591, 0.1075),
    "selection=gradnorm_ub": (0.2507, 0.1237),
    "selection=irreducible_loss": (0.1643, 0.0),
    "selection=gradnorm_is": (0.3565, 0.0806),
    "selection=boltzmann selection.temperature.schedule=geometric": (0.3955, 0.0161),
    "selection=bald model.dropout=0.2 selection.mc_samples=3": (0.1643, 0.0860),
    "selection=entropy model.dropout=0.2": (0.3287, 0.0860),
    "selection=svp selection.svp.score=forgetting selection.svp.proxy_epochs=2": (0.2006, 0.1111),
}


@pytest.mark.parametrize("extra", sorted(PINNED))
def test_every_selection_method_runs(tmp_path, tiny, extra):
    s = run_job(tmp_path, [*tiny, *extra.split()])
    acc, frac = PINNED[extra]
    assert s["trainer/steps"] == 6
    assert s["test/acc"] == pytest.approx(acc, abs=0.006)  # two test points
    assert s["selection/corrupted_frac"] == pytest.approx(frac, abs=0.011)  # two selected points


def test_il_on_the_fly_from_checkpoint_and_no_holdout_variant(tmp_path, tiny):
    from datamatters.artifacts import load_indexed

    run_job(tmp_path / "il", [*tiny, "irreducible.max_epochs=3"], config_name="irreducible")
    ckpt = tmp_path / "il" / "run" / "checkpoints_il" / "best.ckpt"
    assert ckpt.is_file()
    s = run_job(tmp_path / "fly", [*tiny, f"irreducible.checkpoint={ckpt}"])
    assert s["trainer/steps"] == 6
    nh = tmp_path / "nh.npz"
    run_job(tmp_path / "nh", [*tiny, "irreducible.no_holdout=true", f"irreducible.output={nh}"], config_name="irreducible")
    values, idx, meta = load_indexed(nh)
    from datamatters.data.digits import DigitsDataModule

    dm = DigitsDataModule(label_noise={"kind": "uniform", "pc_corrupted": 0.1})
    assert sorted(idx.tolist()) == sorted(dm.split_indices("train").tolist()) and meta["no_holdout"]
    assert np.isfinite(values).all()


def test_diverged_training_is_one_clear_error(tmp_path, capsys, tiny):
    """A NaN loss in a big batch (lr far too high) ends the job with one message, not a traceback; so does an IL
    model that diverged (nothing written)."""
    with pytest.raises(SystemExit):
        run_job(tmp_path / "t", [*tiny, "selection=ce_loss", "optimizer.lr=1e30"])
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "training diverged; lower the learning rate (optimizer.lr)" in err, err
    il = tmp_path / "il.npz"
    with pytest.raises(SystemExit):
        run_job(tmp_path / "i", [*tiny, "optimizer.lr=1e30", f"irreducible.output={il}"], config_name="irreducible")
    assert "the IL model diverged" in capsys.readouterr().err and not il.exists()


def test_il_job_refuses_to_fall_back_to_last_epoch_weights(tmp_path, capsys, tiny):
    il = tmp_path / "il.npz"
    with pytest.raises(SystemExit):
        run_job(tmp_path, [*tiny, "+trainer.limit_val_batches=0", f"irreducible.output={il}"], config_name="irreducible")
    err = capsys.readouterr().err
    assert "best checkpoint" in err and "refusing to use the last-epoch weights" in err and not il.exists()


def test_compare_runs_plots_one_curve_per_method(tmp_path, tiny):
    for m in ("reducible_loss", "uniform"):
        run_job(tmp_path / m, [*tiny, f"selection={m}", "trainer.log_every_n_steps=1"])
    s = run_job(tmp_path / "cmp", ["task=compare", f"compare.runs=[{tmp_path}/*/run]"])
    assert s["compare/runs"] == 2 and Path(s["artifacts"]["plot"]).is_file()
    import pandas as pd

    table = pd.read_csv(s["artifacts"]["table"])
    assert set(table["selection/method"]) == {"reducible_loss", "uniform"}

"""`+debug=fast` shrinks every job to a config check in seconds, and a job's console shows each message once."""
from conftest import run_cli


def test_a_job_prints_each_message_once_and_no_ads(tmp_path):
    """Under Hydra, Lightning's own console handler and Hydra's root handler both printed every line; Lightning
    advertised litlogger and W&B warned about the `anonymous` setting Lightning passes. Progress bars, the summary
    table and run.log stay."""
    run_dir = tmp_path / "run"
    res = run_cli(["task=classifier", "+debug=fast", "logger.wandb.enabled=true", "trainer.enable_progress_bar=true",
                   f"hydra.run.dir={run_dir}"], tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert out.count("`Trainer.fit` stopped") == 1, out
    assert out.count("GPU available:") == 1, out
    for noise in ("litlogger", "anonymous setting", "The `srun` command", "LeafSpec"):
        assert noise not in out, noise
    assert "Epoch 0/0" in out and "test/acc" in out  # the progress bar and the summary table
    assert (run_dir / "run.log").read_text().count("`Trainer.fit` stopped") == 1

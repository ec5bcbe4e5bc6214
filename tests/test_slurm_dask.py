"""dask for valuation/influence: the valuation job on a dask LocalCluster (worker processes) gives the values it gives
in-process; the dask-jobqueue SLURMCluster config makes a worker job script; on the SLURM cluster, workers started
as SLURM jobs by scripts/dask_cluster.py run a valuation and the influence job, and go away when it stops."""
import importlib.util
import signal
import subprocess
import sys

import distributed
import numpy as np
import pytest

from conftest import ROOT, run_job
from slurm_fixtures import slurm_cluster, wait_for  # noqa: F401 (fixture)

from datamatters.artifacts import load_indexed

SMALL = ["+experiment=digits_valuation", "valuation=loo", "valuation.n_train=24", "valuation.utility.backend=sklearn",
         "valuation.utility.sklearn_model=gaussian_nb", "valuation.removal.step=0.25", "valuation.removal.n_random=1",
         "logger.wandb.enabled=false"]


def _dask_cluster_script():
    spec = importlib.util.spec_from_file_location("dask_cluster", ROOT / "scripts" / "dask_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_valuation_job_runs_on_a_dask_localcluster(tmp_path):
    serial = run_job(tmp_path / "serial", SMALL)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        before = c.scheduler.transition_counter
        dask = run_job(tmp_path / "dask", [*SMALL, f"valuation.dask_address={c.scheduler_address}"])
        ran_there = c.scheduler.transition_counter - before
    assert ran_there > 0  # the utility evaluations went through the dask scheduler to the worker process
    assert dask["utility/evaluations"] == serial["utility/evaluations"] == 25  # LOO on 24 points: n + 1 utilities
    values = [load_indexed(tmp_path / name / "run" / "values.npz")[0] for name in ("serial", "dask")]
    np.testing.assert_array_equal(*values)


def test_slurmcluster_config_makes_the_worker_job_script(capsys):
    dask_cluster = _dask_cluster_script()
    kw, own = dask_cluster.load(["queue=cpu", "cores=8", "processes=8", "memory=32GB", "walltime=01:00:00",
                                 "jobs=3", "job_extra_directives=[--qos=normal]"])
    assert kw["_target_"] == "dask_jobqueue.SLURMCluster" and own["jobs"] == 3 and "jobs" not in kw
    assert dask_cluster.main(["--print-job-script", "queue=cpu", "cores=8", "processes=8", "memory=32GB",
                              "walltime=01:00:00", "job_extra_directives=[--qos=normal]",
                              "scheduler_options.dashboard_address=null"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH -p cpu", "#SBATCH --cpus-per-task=8", "#SBATCH -t 01:00:00", "#SBATCH --qos=normal",
                 "export OMP_NUM_THREADS=1", "--nthreads 1", "--death-timeout 120"):
        assert line in script, line
    assert "#SBATCH --mem=30G" in script  # 32 GB in SLURM's GiB


@pytest.mark.slurm
def test_dask_workers_as_slurm_jobs_run_a_valuation(slurm_cluster, tmp_path):  # noqa: F811
    from distributed import Client

    from datamatters.valuation import Dataset, MaxChecks, ModelUtility, SupervisedScorer, TMCShapleyValuation
    from sklearn.naive_bayes import GaussianNB

    address_file, name = tmp_path / "scheduler_address", "dm-dask-test"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "dask_cluster.py"), "jobs=1", "cores=1",
                             "processes=1", "memory=3GB", "walltime=00:15:00", f"job_name={name}",
                             f"log_directory={tmp_path}/logs", f"address_file={address_file}",
                             "scheduler_options.dashboard_address=null"],
                            cwd=tmp_path, env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        address = wait_for(lambda: address_file.is_file() and address_file.read_text().strip(), 120,
                           "the scheduler address")
        wait_for(lambda: slurm_cluster.jobs(name), 60, "the worker's SLURM job", poll=0.5)  # submitted asynchronously
        rng = np.random.default_rng(0)
        centers = rng.normal(scale=2, size=(3, 4))
        y, yt = rng.integers(0, 3, 16), rng.integers(0, 3, 30)
        train = Dataset(centers[y] + rng.normal(size=(16, 4)), y)
        test = Dataset(centers[yt] + rng.normal(size=(30, 4)), yt)

        def values(dask_address=None):
            u = ModelUtility(GaussianNB(), SupervisedScorer("accuracy", test), dask_address=dask_address,
                             show_warnings=False)
            return TMCShapleyValuation(u, is_done=MaxChecks(2), seed=3, batch_size=2).fit(train).result.values

        with Client(address) as client:
            client.wait_for_workers(1, timeout=300)
            workers = client.scheduler_info()["workers"]
            assert len(workers) == 1
            np.testing.assert_array_equal(values(), values(dask_address=address))
        # the influence job with influence.dask_address: the test x train matrix computed on the SLURM worker
        over = ["+experiment=digits_influence", "influence=ekfac", "model.hidden=[6]", "influence.num_test=6",
                "influence.train.epochs=2", "influence.self_influence=false", "influence.lds.num_models=4",
                "influence.lds.n_boot=20", "influence.test_chunk=3", "influence.train_chunk=256",
                "logger.wandb.enabled=false"]
        seq = run_job(tmp_path / "seq", over)
        on_slurm = run_job(tmp_path / "dask", [*over, "influence.calculator=dask", f"influence.dask_address={address}"])
        from datamatters.influence import store

        a, b = store.open_matrix(seq["artifacts"]["influences"]), store.open_matrix(on_slurm["artifacts"]["influences"])
        np.testing.assert_allclose(b[0][:], a[0][:], rtol=1e-8, atol=1e-10)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    wait_for(lambda: not slurm_cluster.jobs(name), 60, "the worker job to be cancelled", poll=0.5)

"""The container recipe (no Singularity here): spython parses singularity/datamatters.def; its sections, pinned base,
lock and install steps are checked; its %test and %runscript run against this checkout; and the slurm_singularity
preset's srun wrapper really runs a job's command inside `singularity exec`."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from spython.main.parse.parsers import SingularityParser

ROOT = Path(__file__).resolve().parents[1]
DEF = ROOT / "singularity" / "datamatters.def"
LOCK = ROOT / "singularity" / "requirements.lock"


def sections(text: str) -> dict[str, str]:
    """Raw section bodies (``%post`` -> its lines), to check text that spython turns into comments or scripts."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)", line)
        if m:
            name = m.group(1)
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


@pytest.fixture(scope="module")
def recipe():
    parsed = SingularityParser(str(DEF)).recipe
    assert list(parsed) == ["spython-base"]  # one stage
    return parsed["spython-base"]


def test_base_image_is_a_pinned_cuda_tag(recipe):
    assert DEF.read_text().splitlines()[0].strip() == "Bootstrap: docker"
    image = recipe.fromHeader
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", image), image  # full x.y.z tag
    import importlib.util

    version_py = Path(importlib.util.find_spec("torch").origin).parent / "version.py"  # no torch import needed
    cuda = re.search(r"^cuda(?:: \S+)? = '([\d.]+)'", version_py.read_text(), re.M).group(1)
    assert image.split(":")[1].startswith(cuda + ".")  # the CUDA the locked torch wheels were built for


def test_it_installs_the_locked_dependencies_then_this_project(recipe):
    files = dict(line.split() for line in recipe.files)
    for src in ("pyproject.toml", "src", "configs", "run.py", "singularity/requirements.lock"):
        assert src in files and (ROOT / src).exists(), src
    post = "\n".join(recipe.install)
    lock_at = files["singularity/requirements.lock"]
    i_lock = post.index(f"pip install --no-cache-dir -r {lock_at}")
    i_self = post.index(f"pip install --no-cache-dir --no-deps {files['pyproject.toml'].rsplit('/', 1)[0]}")
    assert i_lock < i_self and "pip check" in post[i_self:]
    assert "python3.11 -m venv /opt/venv" in post
    assert sys.version_info[:2] == (3, 11)  # the lock comes from a 3.11 venv, and jobs are pickled across it


def test_the_lock_pins_every_dependency_of_the_project():
    import tomllib

    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!\[ ;]", dep)[0]).lower()
        assert name in pins, f"{name} missing from the lock: run scripts/lock_requirements.sh"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1" and pins["hydra-core"].startswith("1.3")
    assert "datamatters" not in pins  # the project itself is installed from the source, not the lock


def test_environment_runscript_labels(recipe):
    env = dict(e.split("=", 1) for e in recipe.environ)
    assert env["WANDB_MODE"] == "${WANDB_MODE:-offline}" and env["HYDRA_FULL_ERROR"] == "${HYDRA_FULL_ERROR:-1}"
    assert env["PATH"].startswith("/opt/venv/bin")
    assert recipe.cmd == 'exec python /opt/datamatters/run.py "$@"'
    assert recipe.test  # %test exists (spython turns it into a script)
    assert any(label.startswith("datamatters.torch 2.14.1") for label in recipe.labels)


def test_help_documents_gpus_binds_and_the_slurm_preset():
    text = sections(DEF.read_text())["help"]
    for needed in ("--nv", "--bind", "hydra/launcher=slurm_singularity", "DM_IMAGE", "WANDB_MODE"):
        assert needed in text, needed
    assert (ROOT / "configs" / "hydra" / "launcher" / "slurm_singularity.yaml").is_file()


def _in_checkout(script: str) -> str:
    """A section's script with the image's paths pointed at this checkout and venv."""
    return script.replace("/opt/datamatters", str(ROOT))


def test_the_test_section_passes_against_this_checkout():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", "-c", _in_checkout(sections(DEF.read_text())["test"])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "composed the default job: rho" in res.stdout


def test_the_runscript_passes_arguments_to_run_py():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = _in_checkout(sections(DEF.read_text())["runscript"])
    res = subprocess.run(["bash", "-c", script, "runscript", "--cfg", "job", "trainer.max_epochs=7"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "max_epochs: 7" in res.stdout


def test_slurm_singularity_preset_runs_the_job_inside_the_image(tmp_path):
    """The preset's setup lines go into submitit's sbatch script; run that script with stand-ins for `srun` and
    `singularity` and check the job command ends up as `singularity exec --nv ... <image> python -u -m submitit...`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from submitit.slurm.slurm import _make_sbatch_string

    import datamatters.tasks.schema  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm_singularity", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    setup = instantiate(cfg.hydra.launcher).params["setup"]  # as Hydra builds the launcher
    folder = tmp_path / "sub"
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    script = _make_sbatch_string(command=command, folder=str(folder), setup=setup)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("srun", "singularity"):  # record the argv each receives
        (bin_dir / tool).write_text(f'#!/bin/bash\nprintf "{tool}" >> {log}\nprintf " [%s]" "$@" >> {log}\n'
                                    f'echo >> {log}\n')
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "DM_IMAGE": "/img/datamatters.sif"}
    res = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (call,) = log.read_text().splitlines()
    args = re.findall(r"\[(.*?)\]", call)
    assert call.startswith("srun") and args[:2] == ["--unbuffered", "--output"]
    i = args.index("singularity")
    assert args[i:i + 5] == ["singularity", "exec", "--nv", "--bind", str(tmp_path)]
    assert args[i + 5:] == ["/img/datamatters.sif", "python", "-u", "-m", "submitit.core._submit", str(folder)]
    assert sys.executable not in args  # the host interpreter is replaced by the image's python
    # without DM_IMAGE the job stops with a clear message instead of running outside the image
    res = subprocess.run(["bash", "-c", script], env={k: v for k, v in env.items() if k != "DM_IMAGE"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "set DM_IMAGE" in res.stderr

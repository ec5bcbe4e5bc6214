#!/usr/bin/env bash
# Fetch, into the ignored folder .whl/, the cp312 manylinux / pure-Python wheels of the project's dependencies that the
# GPU machine lacks (see ../shared/ENVIRONMENT.md): run here (pip reads the local index), then name .whl in the device
# call's `carry`; benchmarks/gpu/check.sh installs them with --no-index --no-deps --target when the folder exists.
# The GPU check itself imports none of them (tests/test_gpu_check.py runs it with them blocked): they are for running
# the Hydra jobs there (python run.py ... logger=csv).
#   bash benchmarks/gpu/wheels.sh [DEST]        # default DEST: .whl (in the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$DEST"
# versions pinned to the development venv's (one version of each: two stop the install there)
PKGS=(hydra-core==1.3.8 omegaconf==2.3.1 hmmlearn==0.3.3 mnist1d==0.0.2.post1 submitit==1.5.4
      zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
      dask==2026.8.0 distributed==2026.8.0 toolz==1.2.0 cloudpickle==3.1.3 partd==1.4.2 locket==1.0.0)
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLAT+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d "$DEST" "${PKGS[@]}"
# omegaconf's pin antlr4-python3-runtime 4.9.3 has no wheel: build its pure-Python wheel here
if ! ls "$DEST"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" antlr4-python3-runtime==4.9.3 \
    || "$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
fi
ls -1 "$DEST"/*.whl | wc -l | xargs echo "wheels in $DEST:"
du -sh "$DEST" | cut -f1 | xargs echo "size:"

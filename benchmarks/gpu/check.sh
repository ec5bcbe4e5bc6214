#!/usr/bin/env bash
# The GPU check (see benchmarks/README.md): at most 8 minutes on one GPU; one JSON per part into $OUT when set (the
# device call's returned folder), else benchmarks/results/gpu/. Runs the project from src/ on the machine's own torch.
#   bash benchmarks/gpu/check.sh                 # on the GPU machine
#   bash benchmarks/gpu/check.sh --tiny          # CPU, toy sizes (tests/test_gpu_check.py)
#   bash benchmarks/gpu/check.sh --tiny --parts lasso knn_shapley    # any check.py arguments pass through
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# wheels from benchmarks/gpu/wheels.sh (carried as .whl): not needed by the check, installed for later jobs
if [ -d .whl ] && [ "${1:-}" != "--tiny" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUTDIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout -k 10 460 "$PYTHON" benchmarks/gpu/check.py --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/check.log"

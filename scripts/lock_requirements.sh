#!/usr/bin/env bash
# Write singularity/requirements.lock: the exact versions of every dependency installed in the project venv
# (`make install`), which singularity/datamatters.def installs before `pip install --no-deps .`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
out=singularity/requirements.lock
{
  echo "# Lock of datamatters' dependencies for singularity/datamatters.def, from $("$VENV/bin/python" -V)."
  echo "# Regenerate with scripts/lock_requirements.sh after changing pyproject.toml and running make install."
  "$VENV/bin/pip" freeze --exclude-editable
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -c '==' "$out") pinned packages)"

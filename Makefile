# Two commands: `make run` (the main job) and `make test` (the test suite). Both call `make install`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers: the suite's jobs are mostly single-threaded processes, so one worker per core (CI has 2).
TEST_WORKERS ?= 2

.PHONY: install run test test-all bench-env bench-env-attribution clean

install: $(STAMP)

# (Re)create the venv when pyproject.toml changes. pip (not uv/poetry) so torch comes from the local wheel store.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: install
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) run.py $(ARGS)

test: install
	WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

test-all: install
	WANDB_MODE=offline $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "" $(PYTEST_ARGS)

# The reference libraries for side-by-side benchmarks (pyDVL 0.10 pins numpy 1.x, so it gets its own venv).
bench-env:
	@test -x .venv-ref/bin/python || $(PYTHON) -m venv .venv-ref
	.venv-ref/bin/python -m pip install -q -e . pydvl==0.10.0

# traker and kronfluence for benchmarks/attribution_refs.py (their own venv; this package is installed there too).
bench-env-attribution:
	@test -x .venv-attr-refs/bin/python || $(PYTHON) -m venv .venv-attr-refs
	.venv-attr-refs/bin/python -m pip install -q -e . traker==0.3.2 kronfluence==1.0.1

clean:
	rm -rf outputs multirun .pytest_cache

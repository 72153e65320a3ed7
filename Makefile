# Two commands on a fresh clone: `make run` (install + run the pipeline on the embedded data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch this project's machines carry on disk; GPU users may set TORCH_SPEC to their own build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install run test test-slow test-all lint browser clean delete-runs

install: $(VENV)/.installed

# An editable install leaves the project's own modules uncompiled (pip compiles only what it copies), and where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines) every process compiled them again: 0.45 s
# per start, measured. Compiled here once; Python recompiles a module whose source changed.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,notebooks,mlflow,pdf]"
	$(PY) -m compileall -q auditml_core pipeline federated explain
	touch $@

run: install
	$(PY) -m pipeline $(ARGS)

# Debian's chromium for the report's headless-browser test (tests/pipeline/test_report.py): installs system
# packages, so only when asked (`make browser`); `make test` never runs it and skips that test with the reason.
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium) \
		|| echo "chromium could not be installed: the browser test will be skipped"

# The default tier (what the README gives and CI runs first): under 10 minutes on 2 cores. pytest-xdist runs it
# in one process per CPU (-n auto; 2 on this project's machines: 3 min 49 s - 4 min 01 s against 6 min in one
# process), at most 4 (each test may start a pipeline with a worker per CPU of its own).
test: install
	$(PY) -m pytest -q -m "not slow" -n auto --maxprocesses 4

# The slow tier (Flower simulations, notebooks, hostile and scale cases); CI runs it after `make test`.
test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Caches and build outputs only. The run directories are the evidence an auditor relies on: `make clean` never
# touches them; deleting them is `make delete-runs CONFIRM=yes`.
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

delete-runs:
	@test "$(CONFIRM)" = yes || { echo "make delete-runs deletes every run directory under runs/ (models, reports, manifests: the evidence); run it as: make delete-runs CONFIRM=yes" >&2; exit 2; }
	rm -rf runs

# One command sets up and runs the default recipe (`make demo`), one sets up and runs the tests (`make test`).
# Both create .venv when it is missing; nothing needs installing by hand beforehand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and exactly: pip then takes the CPU wheel; any other version pulls CUDA packages.
TORCH := torch==2.13.0

.PHONY: demo test test-fast lint bench figures install install-dev clean

demo: $(VENV)/.installed
	$(VENV)/bin/lightning-dl run digits

test: $(VENV)/.installed-dev
	$(PY) -m pytest

test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -m "not slow"

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check lightning_dl tests examples benchmarks docs
	$(PY) -m mypy lightning_dl

# Every benchmarks/bench_*.py, one after another; `make bench BENCH_ARGS=--quick` checks them in seconds each,
# `BENCH_ARGS="--out DIR"` writes elsewhere than benchmarks/results.
BENCH_ARGS ?=
bench: $(VENV)/.installed-dev
	set -e; for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script $(BENCH_ARGS); done

figures: $(VENV)/.installed-dev
	$(PY) docs/figures.py

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

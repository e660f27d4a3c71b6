# deepfit: `make demo` trains the embedded default; `make test` lints, type-checks and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
DATASETS ?= $(abspath ../shared/datasets)

.PHONY: demo test test-slow test-gpu lint bench bench-gpu install clean

# A failed recipe removes its target, so a half-made .venv (say, from a full disk) is made again
# on the next run rather than taken as ready.
.DELETE_ON_ERROR:

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { echo "make: '$(PYTHON) -m venv $(VENV)' failed; is the disk full? ($$(df -h . | awk 'NR==2 {print $$4}') free here)" >&2; exit 1; }
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/deepfit train

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src
	$(BIN)/lint-imports

test: lint
	DEEPFIT_DATASETS=$${DEEPFIT_DATASETS:-$(DATASETS)} $(BIN)/pytest -m "not slow"

test-slow: $(STAMP)
	DEEPFIT_DATASETS=$${DEEPFIT_DATASETS:-$(DATASETS)} $(BIN)/pytest -m slow

# The GPU machines have torch, pytest and pytest-xdist but no network: no venv, the sources from src/.
GPU_PYTHON ?= python3
GPU_WORKERS ?= 14
CIFAR ?= $(DATASETS)/cifar10-jpg.zip

test-gpu:
	DEEPFIT_TEST_DEVICE=cuda OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PYTHONPATH=$(CURDIR)/src DEEPFIT_DATASETS=$${DEEPFIT_DATASETS:-$(DATASETS)} \
		$(GPU_PYTHON) -m pytest -m "not slow" -q -p no:cacheprovider \
		$$($(GPU_PYTHON) -c "import xdist" 2>/dev/null && echo "-n $(GPU_WORKERS)")

bench-gpu:
	DEEPFIT_DATASETS=$${DEEPFIT_DATASETS:-$(DATASETS)} PYTHONPATH=$(CURDIR)/src \
		$(GPU_PYTHON) bench/gpu.py --cifar $(CIFAR) $(if $(AIRBENCH),--airbench $(AIRBENCH)) --workers $(GPU_WORKERS) $(BENCH_GPU_ARGS)

bench: $(STAMP)
	DEEPFIT_DATASETS=$${DEEPFIT_DATASETS:-$(DATASETS)} $(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

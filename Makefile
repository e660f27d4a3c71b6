# deepfit: `make demo` trains the embedded default; `make test` lints, type-checks and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
DATASETS ?= $(abspath ../shared/datasets)

.PHONY: demo test test-slow lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
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

bench: $(STAMP)
	DEEPFIT_DATASETS=$${DEEPFIT_DATASETS:-$(DATASETS)} $(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# membench: two commands for a newcomer.
#   make bench   build the default dataset, run the notebooks, print the report
#   make test    run the test suite (unit, integration, nbval over the notebooks)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= default
REPORT ?= reports/$(PRESET)
STAMP := $(VENV)/.installed

# Notebook kernels and matplotlib write caches here instead of the home folder.
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export IPYTHONDIR := $(CURDIR)/.cache/ipython
export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter-config
export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter-data

.PHONY: bench test lint format dataset reference-report clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

dataset: $(STAMP)
	@test -f datasets/$(PRESET)/manifest.json || $(BIN)/membench dataset build --preset $(PRESET)

bench: dataset
	$(BIN)/membench notebooks --preset $(PRESET) --out $(REPORT)

# The committed reference report: every notebook at the default preset.
reference-report: $(STAMP)
	@test -f datasets/default/manifest.json || $(BIN)/membench dataset build --preset default
	$(BIN)/membench notebooks --preset default --out reports/reference

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache reports results

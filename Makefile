# `make run`: create the environment if needed, then regenerate the whole pipeline (dvc repro).
# `make test`: create the environment if needed, then run the whole test suite (what CI runs: .ci/run).
# `make test-fast`: the same without the tests marked `slow` (subprocesses, torchrun, dvc repro): under a minute.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-fast lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

run: setup
	dvc repro

test: setup
	python -m pytest -q

test-fast: setup
	python -m pytest -q -m "not slow"

lint: setup
	ruff check . && ruff format --check .

bench: setup
	python benchmarks/train_step.py

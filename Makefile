# The two commands a newcomer needs:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test venv dev lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

## Run the ticket rush on the embedded server (20 buyers, 100 tickets, then the checker).
demo: $(VENV)/.installed
	$(BIN)/procsync demo tickets

## Install the dev extras and run the whole suite (lint, types, tests).
test: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: dev
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache

.PHONY: bench bench-quick

## Benchmarks against every peer (about 10 minutes): raw JSON in benchmarks/results/,
## table and DESIGN targets in docs/benchmarks.md. Peers come from the `bench` extra.
bench: $(VENV)/.installed-dev
	@$(BIN)/python -c "import filelock, portalocker, redis_lock, pottery" 2>/dev/null \
	  || $(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m benchmarks

## The one-minute smoke run of the same benchmarks (prints; leaves the docs alone).
bench-quick: $(VENV)/.installed-dev
	@$(BIN)/python -c "import filelock, portalocker, redis_lock, pottery" 2>/dev/null \
	  || $(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m benchmarks --quick

.PHONY: chaos

## The randomized nemesis run (issue 10): 8 workers doing fenced writes under mixed faults,
## about 3 minutes; a table and a verdict, non-zero exit if a promised count is not 0.
## More: make chaos CHAOS_ARGS="--server redis --seconds 60 --seed 7"
CHAOS_ARGS ?=
chaos: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.chaos $(CHAOS_ARGS)

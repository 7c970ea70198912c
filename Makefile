# One entry point for people and CI. Each target creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo check test lint clean bench

$(BIN)/fieldsync: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/fieldsync

demo: install
	$(BIN)/fieldsync demo

check: install
	$(BIN)/ruff format --check node hub shared tests
	$(BIN)/ruff check node hub shared tests
	$(BIN)/mypy
	$(BIN)/pytest

test: install
	$(BIN)/pytest

# Benchmark (several minutes; see bench/README.md). Options: make bench BENCH_ARGS=--quick
bench: install
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff format node hub shared tests
	$(BIN)/ruff check --fix node hub shared tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info

# One entry point for people and CI. Each target creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install browser demo check test lint clean bench

$(BIN)/fieldsync: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/fieldsync

demo: install
	$(BIN)/fieldsync demo

# The dashboard's browser test drives Debian's Chromium (Playwright's own browser
# download cannot work everywhere). Installed here when missing and we are root;
# otherwise that one test is skipped and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's chromium for the browser test..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

check: install browser
	$(BIN)/ruff format --check fieldsync node hub shared tests
	$(BIN)/ruff check fieldsync node hub shared tests
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest

test: install browser
	$(BIN)/pytest

# Benchmark (several minutes; see bench/README.md). Options: make bench BENCH_ARGS=--quick
bench: install
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff format fieldsync node hub shared tests
	$(BIN)/ruff check --fix fieldsync node hub shared tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache *.egg-info

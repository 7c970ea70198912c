# One entry point for people and CI. Each target creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install browser postgres demo check test lint clean bench

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

# The tests start a throwaway PostgreSQL cluster of their own (tests/engines.py) from
# Debian's server binaries, installed here when missing and we are root; the package's
# own cluster is not created (createcluster.conf), so nothing else runs.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's postgresql for the tests..."; \
		mkdir -p /etc/postgresql-common && \
		echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive UCF_FORCE_CONFFOLD=1 apt-get install -y -qq \
			-o Dpkg::Options::=--force-confold postgresql >/dev/null; \
	fi

check: install browser postgres
	$(BIN)/ruff format --check fieldsync node hub shared tests
	$(BIN)/ruff check fieldsync node hub shared tests
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest

test: install browser postgres
	$(BIN)/pytest

# Benchmark (several minutes; see bench/README.md). Options: make bench BENCH_ARGS=--quick
bench: install
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

lint: install
	$(BIN)/ruff format fieldsync node hub shared tests
	$(BIN)/ruff check --fix fieldsync node hub shared tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache *.egg-info

# Two commands for a fresh machine: `make demo` and `make test`.
# Packages are installed with their bytecode compiled: every task and run imports them in a fresh process,
# and a machine may forbid writing __pycache__ at run time (PYTHONDONTWRITEBYTECODE, a read-only venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The UI's pages: a React app bundle the Airflow UI loads, built from ui/ with Node (npm ci from the lock, then
# esbuild) and shipped built in the wheel: no Node where Airflow runs. See docs/ui.md.
UI_BUNDLE := airflow_amlrun/plugin/static/amlrun-ui.js
UI_MODULES := ui/node_modules/.package-lock.json

.PHONY: install demo test lint typecheck docs unit services bench clean screenshots

install: $(UI_BUNDLE) $(STAMP)

$(UI_MODULES): ui/package.json ui/package-lock.json
	cd ui && npm ci --no-audit --no-fund --loglevel=error

$(UI_BUNDLE): $(UI_MODULES) ui/build.mjs ui/tsconfig.json $(shell find ui/src -type f)
	cd ui && npm run --silent build

$(STAMP): pyproject.toml requirements-dev.lock Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements-dev.lock
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q -j 0 airflow_amlrun
	@touch $@

# Runs the example DAG end to end on the embedded workspace and prints the run history.
demo: install
	scripts/demo.sh

# Starts what the tests need, then runs lint, type checks, the docs build and the whole suite: the unit tests
# (`make unit`), then the browser and integration tests on two processes (each module as a whole in one of them,
# the slowest handed out first: tests/integration/conftest.py). They spend most of their time waiting on what
# they started (Airflow's components, containers, Spark, sshd), so two share the two cores.
test: install services lint typecheck docs unit
	$(BIN)/python -m pytest -p no:cacheprovider -n 2 tests/browser tests/integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy
	cd ui && npm run --silent typecheck

# The documentation site, from docs/ and the package's docstrings into site/. Always strict: a broken link,
# a missing page or a docstring the reference cannot render fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The unit tests on three processes (pytest-xdist) on a two-core machine: many of them wait on processes they
# start (the supervisor's tests on its time limits, grace periods and output holds), and a third process keeps
# the cores busy meanwhile (16 to 17 s against 18.6 to 19.5 s on two, measured in turns). Only they: the
# integration tests share one sshd host, the Docker engine and the like.
# The plugins they use are named, not found: pytest rewrites the asserts of every module of a plugin it finds
# (all of Hypothesis, all of anyio), in each of its processes, and where Python may not write bytecode
# (PYTHONDONTWRITEBYTECODE) it does so on every run: a second or two of the run's cores.
unit: install
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(BIN)/python -m pytest -p no:cacheprovider -p xdist -p timeout \
		-p hypothesispytest -n 3 tests/unit

services:
	scripts/services.sh

# The package's bytecode is compiled again first: where Python may not write it, edited modules would be
# compiled by every process the benchmarks start.
bench: install services
	$(BIN)/python -m compileall -q -j 0 airflow_amlrun
	$(BIN)/python benchmarks/overhead.py

# The lock is regenerated from pyproject.toml by hand when dependencies change.
requirements-dev.lock: pyproject.toml
	@test -x $(BIN)/uv || ($(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet uv)
	$(BIN)/uv pip compile --quiet --python-version 3.11 --extra dev -o $@ pyproject.toml

# The browser tests again, their screenshots written to docs/screenshots/ (the README shows them).
screenshots: install services
	AMLRUN_UI_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -p no:cacheprovider tests/browser

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache site ui/node_modules $(UI_BUNDLE)

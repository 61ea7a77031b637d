# cdcsync — every target installs what it needs: a fresh machine needs only make.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= .stack/demo
PYTEST_ARGS ?=

.PHONY: test demo install venv lint unit integration faults bench clean stack-down

venv: $(STAMP)
$(STAMP): pyproject.toml
	@echo "== python venv"
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VENV); \
	$(BIN)/pip install -q --upgrade pip; \
	$(BIN)/pip install -q -e '.[test]'; \
	echo "venv ready in $$(( $$(date +%s) - start ))s"
	@touch $@

install: venv
	@echo "== Debian packages and JVM jars"
	@$(BIN)/cdcsync stack install --all

lint: venv
	@echo "== ruff"
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .
	@echo "== mypy --strict"
	@$(BIN)/mypy

unit: venv
	@$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

# The whole suite: unit tests, then integration tests against the real stack, which the
# fixtures start (and stop) as local processes. Exit code 5 (no tests ran) fails too.
test: install lint
	@echo "== pytest"
	@start=$$(date +%s); \
	$(BIN)/pytest -q -m "not slow" --durations=15 $(PYTEST_ARGS) tests; \
	echo "pytest finished in $$(( $$(date +%s) - start ))s"

# The whole fault matrix (every scenario of tests/faults, slow ones included) plus the
# other long tests; it ends with the fault suite's summary table.
faults: install
	@$(BIN)/pytest -q -m "faults or slow" $(PYTEST_ARGS) tests

demo: install
	@$(BIN)/cdcsync stack up --dir $(DEMO_DIR)
	@set -a; eval "$$($(BIN)/cdcsync stack env --dir $(DEMO_DIR))"; set +a; \
	CDCSYNC_STACK_DIR=$(DEMO_DIR) $(BIN)/cdcsync demo

stack-down:
	@$(BIN)/cdcsync stack down --dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# rbee — every install, run and test step lives here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rbee-setup
PYTEST_ARGS ?=
# Processes the suite runs on (pytest-xdist; 0 runs it in this one). conftest.py
# keeps each file on one process and every real-engine file in one group.
TEST_JOBS ?= 2

.PHONY: help setup model run test test-deps test-unit protos protos-check protos-freeze bench clean

help:
	@echo "make run           set up, fetch the default model, start rbee locally and stream an answer"
	@echo "make test          set up and run the whole suite (unit, integration, features)"
	@echo "make setup         create $(VENV) and install rbee with the engine for this machine"
	@echo "make model         obtain the default model (SmolLM2-135M-Instruct) into \$$RBEE_HOME/models"
	@echo "make protos        regenerate rbee/v1 stubs from protos/"
	@echo "make protos-check  fail if the committed stubs differ from protos/ or protos/ breaks the released contracts"
	@echo "make protos-freeze make protos/ the released contracts (protos/baseline.json) that protos-check holds to"
	@echo "make test-deps     system programs the suite needs (OpenSSH sshd, Chromium and its driver; apt when missing)"
	@echo "make bench         benchmarks (not part of the tests)"

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) scripts/setup.sh
	@touch $@

model: setup
	$(BIN)/rbee-hive models fetch-default

run: model
	scripts/run.sh

protos: setup
	scripts/gen_protos.sh

protos-check: setup
	scripts/gen_protos.sh --check
	$(BIN)/python scripts/protos_breaking.py check

# At a release: the contracts as they are become the baseline that
# protos-check holds later changes to (additions only).
protos-freeze: setup
	$(BIN)/python scripts/protos_breaking.py freeze

test-deps:
	scripts/test-deps.sh

test: model protos-check test-deps
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: model
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Many more fuzz examples than `make test` runs (tests/fuzz), with a random
# seed; RBEE_FUZZ_SCALE=N multiplies the examples of every fuzz test.
.PHONY: fuzz
fuzz: setup
	RBEE_FUZZ_SCALE=$${RBEE_FUZZ_SCALE:-25} $(BIN)/python -m pytest tests/fuzz -p no:cacheprovider $(PYTEST_ARGS)

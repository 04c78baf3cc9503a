# All set-up lives here: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow test-all bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the runner with its test tools

run: $(STAMP) ## Benchmark the embedded simulated server (extra Hydra overrides: ARGS='load.parallel=8')
	$(PY) -m runner $(ARGS)

test: $(STAMP) ## Run the default test suite (about 5 minutes on 2 cores)
	$(PY) -m pytest -m "not slow and not engine" -q $(ARGS)

test-slow: $(STAMP) ## Run the slow end-to-end tests (SLA tunes, sweeps)
	$(PY) -m pytest -m "slow and not engine" -q $(ARGS)

test-all: $(STAMP) ## Run every test that needs no real engine
	$(PY) -m pytest -m "not engine" -q $(ARGS)

bench: $(STAMP) ## Run the benchmark scripts and print where the results went
	$(PY) -m bench.run $(ARGS)

clean: ## Remove the virtual environment and run outputs
	rm -rf $(VENV) outputs multirun .pytest_cache

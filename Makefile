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

test: $(STAMP) ## Run the default test suite (about 8 minutes on 2 cores)
	$(PY) -m pytest -m "not slow and not engine" -q $(ARGS)

test-slow: $(STAMP) ## Run the slow end-to-end tests (SLA tunes, sweeps)
	$(PY) -m pytest -m "slow and not engine" -q $(ARGS)

test-all: $(STAMP) ## Run every test that needs no real engine
	$(PY) -m pytest -m "not engine" -q $(ARGS)

bench: $(STAMP) ## Run the benchmark scripts and print where the results went
	$(PY) -m bench.run $(ARGS)

clean: ## Remove the virtual environment and run outputs
	rm -rf $(VENV) outputs multirun .pytest_cache

# Real inference engine for the engine tests: llama.cpp's llama-server,
# built from the llama.cpp source inside PyPI's llama-cpp-python sdist,
# plus a tiny random-weight model. Everything lands in .engine/ (git-ignored).
LLAMA_CPP_PYTHON_VERSION := 0.3.36
ENGINE_DIR := .engine
ENGINE_MODEL := $(ENGINE_DIR)/models/tiny-qwen2.gguf
ENGINE_EXTRA := $(VENV)/.installed-engine
TOKENIZER_DIR := runner/tokenizers/qwen2.5
# Ninja from the PATH (Debian's ninja-build) when present; otherwise PyPI's
# `ninja` wheel, which ships the binary, is installed into the venv.
NINJA ?= $(shell command -v ninja 2>/dev/null)

.PHONY: engine test-engine

$(ENGINE_EXTRA): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,fast,engine]'
	touch $(ENGINE_EXTRA)

$(ENGINE_MODEL): engine/make_model.py $(TOKENIZER_DIR)/tokenizer.json $(TOKENIZER_DIR)/tokenizer_config.json | $(ENGINE_EXTRA)
	$(PY) engine/make_model.py $(ENGINE_MODEL) --tokenizer $(TOKENIZER_DIR)

engine: $(ENGINE_MODEL) ## Build llama-server and the tiny model into .engine/ (5-10 minutes once, then cached)
	@ninja="$(NINJA)"; \
	if [ -z "$$ninja" ]; then $(PY) -m pip install --quiet ninja && ninja="$(VENV)/bin/ninja"; fi; \
	engine/build.sh $(LLAMA_CPP_PYTHON_VERSION) $(ENGINE_DIR) $(PY) "$$ninja"

test-engine: engine ## Run the tests against the real llama.cpp server (under a minute once built)
	$(PY) -m pytest -m engine -q $(ARGS)

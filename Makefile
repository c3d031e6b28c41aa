# The README's two commands: `make quickstart` (set up + the whole method on SST-2) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ARGS ?=

.PHONY: setup quickstart test lint smoke wheel clean

setup: $(VENV)/.installed

# torch first: pip finds the local CPU wheel for 2.13.0; a bare `torch` would pull GBs of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

quickstart: setup
	$(OFFLINE) $(BIN)/skeleton-train experiment=quickstart $(ARGS)

test: setup
	$(OFFLINE) $(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check skeleton tests benchmarks
	$(BIN)/ruff format --check skeleton tests benchmarks

# A short real end-to-end run (MiniLM, shared SST-2): keeps the main job from silently breaking.
smoke: setup
	$(OFFLINE) $(BIN)/skeleton-train experiment=smoke $(ARGS)

# The wheel is the product: build it, install it in a fresh venv, run every command outside the checkout.
wheel: setup
	PYTHON=$(BIN)/python .ci/wheel

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

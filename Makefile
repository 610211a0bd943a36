# Set-up is part of every target: a fresh machine needs only Python 3.10+ and make.
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install first (any torch>=2.4 with its torchvision works). Without an
# NVIDIA GPU (no nvidia-smi) it comes from PyTorch's CPU-only index, a fraction of the CUDA
# build's size, where that index answers within seconds; else the default (CUDA) build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.cnnlab-installed

.PHONY: setup train test test-fast lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	    echo "an NVIDIA GPU is here: installing PyTorch's default (CUDA) build"; \
	    $(BIN)/pip install -q $(TORCH); \
	elif ! $(BIN)/pip install -q --timeout 5 --retries 0 --index-url $(TORCH_CPU_INDEX) \
	    $(TORCH) 2>/dev/null; then \
	    echo "PyTorch's CPU-only build could not be installed from its index; installing" \
	        "the default build"; $(BIN)/pip install -q $(TORCH); fi
	@$(BIN)/python -c "import torch; print('installed PyTorch', torch.__version__, \
	    '(CUDA build)' if torch.version.cuda else '(CPU-only build)')"
	$(BIN)/pip install -q -e '.[dev,export,postgres]'
	touch $(STAMP)

train: setup  ## train LeNet-5 on MNIST (extra options: make train ARGS="--epochs 1")
	$(BIN)/cnnlab train lenet5 mnist $(ARGS)

test: setup  ## the whole test suite
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: setup  ## the quick tests (under 3 minutes), every module touched
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check src tests

# Set-up is part of every target: a fresh machine needs only Python 3.10+ and make.
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install first (any torch>=2.4 with its torchvision works).
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.cnnlab-installed

.PHONY: setup train test lint bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,export]'
	touch $(STAMP)

train: setup  ## train LeNet-5 on MNIST (extra options: make train ARGS="--epochs 1")
	$(BIN)/cnnlab train lenet5 mnist $(ARGS)

test: setup  ## the whole test suite
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check src tests

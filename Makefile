# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := models/resnet_small.onnx

.PHONY: demo test lint clean reliability

# torch and torchvision are pinned to the CPU builds in this machine's wheel store (torchvision 0.29.1 imports only
# beside torch 2.14.1); the package itself accepts a range. realmodels brings timm, torchvision and
# segmentation_models_pytorch, whose model code tests/torch/real/ folds with random weights.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -e '.[dev,torch,realmodels]'
	touch $@

demo: $(VENV)/.installed
	mkdir -p build
	$(BIN)/bnfold fold $(SAMPLE) -o build/resnet_small.folded.onnx

test: $(VENV)/.installed
	$(BIN)/ruff check bnfold tests models bench cli.py
	$(BIN)/mypy
	$(BIN)/pytest -q $(PYTEST_FLAGS)

# The long reliability profile (bad inputs, 5000 random graphs, 5000 byte mutants); rewrites docs/reliability.md.
reliability: $(VENV)/.installed
	$(BIN)/python -m tests.support.fuzz

clean:
	rm -rf $(VENV) build

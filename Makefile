# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := models/resnet_small.onnx

.PHONY: demo test lint clean reliability

# torch is pinned to the CPU build that lies on this machine's disk; the package itself accepts a range.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[dev,torch]'
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

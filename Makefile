# `make demo` and `make test` each create the virtual environment when it is missing, install, and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medssl-installed
DEMO_OUT ?= medssl-demo

.PHONY: demo test lint typecheck install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medssl demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Gates: lint and format (checked, never rewritten here), types of the core layers, the layer table.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:randomly tests/test_layers.py

# Types of the core layers alone (pyproject's [tool.mypy]: config, errors, fileio, runs, methods, train,
# bench, the CKA modules); `make lint` runs it too.
typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEMO_OUT)

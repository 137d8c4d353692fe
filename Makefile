# `make demo` and `make test` each create the virtual environment when it is missing, install, and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medssl-installed
RUNTIME_STAMP := $(VENV)/.medssl-runtime
DEMO_OUT ?= medssl-demo
PIP_INSTALL := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test lint typecheck install clean

# The package with its development tools (tests, lint, types).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e ".[dev]"
	touch $(STAMP) $(RUNTIME_STAMP)

# What the demo needs: the package without the development tools (fewer downloads on a fresh clone).
$(RUNTIME_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $(RUNTIME_STAMP)

install: $(STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/medssl demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Gates: lint and format (checked, never rewritten here), types of the whole package, the layer table.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:randomly tests/test_layers.py

# Types of the whole package (pyproject's [tool.mypy]: files = src/medssl); `make lint` runs it too.
typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEMO_OUT)

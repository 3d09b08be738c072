PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: lowest test lint typecheck typecheck-examples pytest docs demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: lint typecheck typecheck-examples pytest docs

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy statemachine_metrics

# Two workers: the suite's subprocess, hypothesis and real-server tests run side by side.
pytest: $(STAMP)
	$(BIN)/python -m pytest -n 2

# examples/ and the docs' python blocks under mypy --strict (with the plugin) and pyright strict.
typecheck-examples: $(STAMP)
	$(BIN)/python tests/typing/check.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# The demo needs the package and rich only: its own venv, not the dev tools of .venv.
DEMO_VENV := .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed
PORT ?= 8000

$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet -e '.[demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/python examples/demo.py --port $(PORT)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m tests.benchmarks

# The lowest versions pyproject.toml declares, in a venv of their own, against the tests
# of the metric, the machine, the collector and multiprocess mode.
LOWEST := .venv-lowest
lowest:
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet -e . $$($(PYTHON) .ci/lowest_pins.py) \
		pytest hypothesis
	$(LOWEST)/bin/python -m pytest -q tests/test_enum.py tests/test_machine.py \
		tests/test_collector.py tests/test_multiprocess.py tests/test_multiprocess_storage.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) $(LOWEST) .cache .pytest_cache .mypy_cache .ruff_cache .hypothesis site

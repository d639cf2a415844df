# Two commands do everything on a fresh machine (see README):
#   make demo   create .venv, install moe-app, run the tiny pipeline on the built-in offline data
#   make test   create .venv, install moe-app, run the test suite
# TORCH is installed first so that pip does not resolve a multi-GB CUDA wheel on CPU machines;
# on a GPU machine use e.g. `make demo TORCH="torch==2.13.0 --index-url <your CUDA index>"`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.moe-app-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/pipeline.py

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts && $(BIN)/ruff format --check src tests benchmarks scripts

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache

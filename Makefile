# Two entry points, each doing all set-up on a fresh machine (Python >= 3.11 on PATH as python3):
#   make run    # train + probe the default Mess3 model on CPU, write runs/mess3/
#   make test   # ruff check + ruff format --check, then every CPU test tier (gpu tests skip without a GPU)
# GPU users: make TORCH='torch --index-url https://download.pytorch.org/whl/cu128' run
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,judge]'
	touch $@

.PHONY: install run test test-fast
install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m toy.experiments.pipeline

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not realmodel" $(PYTEST_ARGS)

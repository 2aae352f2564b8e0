# Everything runs from the project's own virtual environment (.venv), installed with pip
# (torch 2.13.0 comes from a local CPU wheel that uv and poetry do not see).
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FIXTURES := .fixtures/tiny
PORT ?= 3000
export BENTOML_HOME ?= $(CURDIR)/.bentoml

.PHONY: install test lint fixtures demo clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PYTHON_BIN) >/dev/null || { echo "$(PYTHON_BIN) not found: set PYTHON_BIN=python3"; exit 1; }
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

fixtures: install $(FIXTURES)/vae-oid.npz

$(FIXTURES)/vae-oid.npz: scripts/make_tiny_model.py scripts/make_vae_fixture.py
	$(PY) scripts/make_tiny_model.py --out $(FIXTURES)

clean:
	rm -rf $(VENV) .fixtures .pytest_cache .ruff_cache

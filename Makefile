# `make serve` and `make test` set everything up on a fresh machine (only Python needed), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PDS_ARGS ?=

.PHONY: setup test serve lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build, so no CUDA packages are pulled in by anything after it
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/ruff check pdserve tests bench
	$(BIN)/python -m pytest -q

serve: setup
	$(BIN)/pdserve serve $(PDS_ARGS)

lint: setup
	$(BIN)/ruff check pdserve tests bench

bench: setup
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info

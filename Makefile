# `make serve` and `make test` set everything up on a fresh machine (only Python needed), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PDS_ARGS ?=
# The index torch comes from; empty: pip's own (on PyPI, Linux torch is the CUDA build and pulls NVIDIA's CUDA
# wheels). A CPU machine: make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=

.PHONY: setup test prometheus serve lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned (constraints.txt), from TORCH_INDEX_URL when set; nothing after it replaces it
	$(BIN)/python -m pip install -q -c constraints.txt $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: setup prometheus
	$(BIN)/ruff check pdserve tests bench
	$(BIN)/python -m pytest -q

# The tests marked needs_binary("prometheus") run a real Prometheus: install it where we can (as root, with
# apt-get), else say which tests skip (under CI=true they fail instead; .ci/run stops before them).
prometheus:
	@have() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }; \
	if ! have && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing prometheus (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
	    || echo "apt-get could not install prometheus"; \
	fi; \
	if ! have; then \
	  echo "note: prometheus and promtool are not on PATH and could not be installed (that takes root and"; \
	  echo "apt-get: apt-get install prometheus); these tests will skip (under CI=true they fail):"; \
	  grep -rl --include='*.py' 'needs_binary("prometheus"' tests | sort | sed 's/^/  /'; \
	fi

serve: setup
	$(BIN)/pdserve serve $(PDS_ARGS)

lint: setup
	$(BIN)/ruff check pdserve tests bench

bench: setup
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info

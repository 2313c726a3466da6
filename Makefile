# Set-up lives here so that the README's two commands work on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000

.PHONY: serve test test-gpu lint bench cluster cluster-down

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

serve: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PORT=$(PORT) ./scripts/serve.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The venv's bin/ on PATH: the tests run its commands (schemathesis, kubectl) by name.
test: lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

# The GPU lane: the tests marked gpu (tests/test_gpu.py), on a machine with CUDA; they
# skip elsewhere. The venv's Python where there is one, else python3 (the GPU machine,
# see scripts/gpu_check.sh).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
test-gpu:
	$(GPU_PY) -m pytest -m gpu -v

bench: $(VENV)/.installed
	$(PY) bench/bench.py
	$(PY) bench/prefix_cache.py
	$(PY) bench/http_overhead.py
	$(PY) bench/output_side.py

# Replicas of the image behind HAProxy (deploy/): builds what is missing, prints the URL.
cluster: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./scripts/cluster.sh

cluster-down:
	./scripts/cluster.sh down

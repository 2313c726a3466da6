# Set-up lives here so that the README's two commands work on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000

.PHONY: serve test lint bench cluster cluster-down

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

bench: $(VENV)/.installed
	$(PY) bench/bench.py
	$(PY) bench/prefix_cache.py
	$(PY) bench/http_overhead.py

# Replicas of the image behind HAProxy (deploy/): builds what is missing, prints the URL.
cluster: $(VENV)/.installed
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./scripts/cluster.sh

cluster-down:
	./scripts/cluster.sh down

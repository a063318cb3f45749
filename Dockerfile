# The edgeplane image that manifests/deploy/ runs: `edgeplane` (serve, gateway, the CLI) is
# its entrypoint, and the agent runs from the same image with `command: ["edgeplane-agent"]`.
#   docker build -t ghcr.io/edgeplane/edgeplane:0.1.0 .
# It runs as the user 10001 (the manifests' runAsUser and fsGroup), on a read-only root
# filesystem there: what the processes write goes to their data dir and /tmp, both volumes.

FROM python:3.11-slim AS build
# a C compiler for the optional native JSON reader (setup.py goes on without it)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY edgeplane_proto edgeplane_proto
COPY orchestrator orchestrator
COPY edge_agent edge_agent
# the example manifests and artifacts `edgeplane demo` applies: the build puts them in the package
COPY manifests/examples manifests/examples
# the build generates the gRPC modules from protos/ (setup.py) into the wheel, and bakes the
# version agents report with this build's identifier (no .git here: give it, e.g.
# --build-arg EDGEPLANE_BUILD=$(git describe --always --dirty))
ARG EDGEPLANE_BUILD=""
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
RUN groupadd --gid 10001 edgeplane \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin edgeplane
COPY --from=build /wheels /wheels
# the CPU onnxruntime for agents, psycopg for the PostgreSQL store; no dev extras
RUN pip install --no-cache-dir "$(ls /wheels/edgeplane-*.whl)[cpu,postgres]" && rm -rf /wheels
USER 10001:10001
ENTRYPOINT ["edgeplane"]

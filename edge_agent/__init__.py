"""The edgeplane edge agent: joins a control plane, fetches verified ONNX artifacts and
serves them over the Open Inference Protocol, and keeps serving when the uplink is gone.

``main``       command line, wiring, signals
``daemon``     the Agent: composes everything below and owns the shutdown order
``uplink``     the only gRPC client of the control plane (join, heartbeats, assignments)
``diagnosis``  why the control plane cannot be had, said as the flag that fixes it
``registry``   which model versions serve now, and converging them on the desired set
``artifacts``  content-addressed, resumable, sha256-verified artifact cache
``runtime``    model execution (``runtime.onnx`` is the only user of onnxruntime)
``http``       the v2 API routes and /metrics
``httpserver`` the HTTP/1.1 connections those routes run on (``httpstream``: their streamed
             answers; ``refusals``: the errors they answer themselves, in the shape of the
             API asked; ``httplistener``: the listener, its connection limit and the drain)
``inflight``   the memory budget of requests in flight, and the refusal of one past it
``metrics``    the Prometheus series, in the text format
``capacity``   measured hardware and load
``state``      what survives a restart (last assignment set, identity)
"""

__version__ = "0.1.0"

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024  # --max-request-bytes: larger bodies get a 413
# --max-artifact-gb: the largest artifact downloaded. Generative packages are large
# (gpt-oss-20b, docs/generative.md, is about 14 GB); the limit guards the cache disk
# against a wrong URL, not against the models the agent is meant to serve.
DEFAULT_MAX_ARTIFACT_GIB = 64
# --listen's default port: clear of the control plane's 8080 (HTTP), 8081 (agents) and 8082
# (joins), so an agent and `edgeplane serve` run side by side on one machine.
DEFAULT_LISTEN_PORT = 8090
# --heartbeat-interval: what the control plane takes (it clamps an agent's interval to this),
# and what a Join carries (uint32 milliseconds, which ends at about 49 days).
MIN_HEARTBEAT_S = 0.05
MAX_HEARTBEAT_S = 300.0

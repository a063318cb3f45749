"""The agent's Prometheus metrics, written in the text exposition format (version 0.0.4).

The agent has four series and one writer (the event loop), so it keeps them in plain
dicts and renders the text itself: importing ``prometheus_client`` costs 3 MB resident
(its exposition module brings an HTTP server, WSGI and ``urllib.request``), a lot in an
80 MB budget. The tests parse this output with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last one is +Inf
        self.sum = 0.0


class AgentMetrics:
    """Requests by model and status, inference latency by model, in-flight and serving."""

    def __init__(self, inflight: Callable[[], int], serving: Callable[[], int]) -> None:
        self._inflight = inflight
        self._serving = serving
        self._requests: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _Histogram] = {}

    def observe_ok(self, model: str, seconds: float) -> None:
        key = (model, "200")
        self._requests[key] = self._requests.get(key, 0) + 1
        histogram = self._latency.get(model)
        if histogram is None:
            histogram = self._latency[model] = _Histogram(len(LATENCY_BUCKETS))
        histogram.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram.sum += seconds

    def model_load(self) -> list[tuple[str, int, float]]:
        """``(model, requests answered, their seconds summed)`` per model, since start:
        what heartbeats carry for the control plane's autoscaler."""
        return [(model, sum(h.counts), h.sum) for model, h in self._latency.items()]

    def observe_error(self, model: str, code: int) -> None:
        key = (model, str(code))
        self._requests[key] = self._requests.get(key, 0) + 1

    def render(self) -> bytes:
        out = [
            "# HELP edgeplane_agent_infer_requests_total Inference requests by model and HTTP status",
            "# TYPE edgeplane_agent_infer_requests_total counter",
        ]
        for (model, code), n in sorted(self._requests.items()):
            out.append(f'edgeplane_agent_infer_requests_total{{code="{code}",model="{_label(model)}"}} {_number(n)}')
        out += [
            "# HELP edgeplane_agent_infer_seconds Inference latency inside the agent (body read to response)",
            "# TYPE edgeplane_agent_infer_seconds histogram",
        ]
        for model, histogram in sorted(self._latency.items()):
            name = _label(model)
            running = 0
            for bound, n in zip((*LATENCY_BUCKETS, math.inf), histogram.counts):
                running += n
                out.append(f'edgeplane_agent_infer_seconds_bucket{{le="{_number(bound)}",model="{name}"}} {_number(running)}')
            out.append(f'edgeplane_agent_infer_seconds_count{{model="{name}"}} {_number(running)}')
            out.append(f'edgeplane_agent_infer_seconds_sum{{model="{name}"}} {_number(histogram.sum)}')
        for metric, help_text, read in (
            ("edgeplane_agent_inflight", "Requests being served", self._inflight),
            ("edgeplane_agent_models_serving", "Models serving", self._serving),
        ):
            out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", f"{metric} {_number(read())}"]
        return ("\n".join(out) + "\n").encode()

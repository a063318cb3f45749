"""The agent's Prometheus metrics, written in the text exposition format (version 0.0.4).

The agent has twenty metric families and one writer (the event loop), so it keeps them in
plain dicts and renders the text itself: importing ``prometheus_client`` costs 3 MB resident
(its exposition module brings an HTTP server, WSGI and ``urllib.request``), a lot in an
80 MB budget. The tests parse this output with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

from edge_agent.inflight import Budget

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
    """Requests by model and status, inference latency by model, in-flight and serving, and
    the memory requests in flight hold (``budget``: none, no bound)."""

    def __init__(self, inflight: Callable[[], int], serving: Callable[[], int], budget: Budget | None = None) -> None:
        self._inflight = inflight
        self._serving = serving
        self._budget = budget
        self._requests: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _Histogram] = {}
        # Generative models: outcomes, token counts, time to first token, running/queued.
        self._generation: dict[tuple[str, str], int] = {}
        self._ttft: dict[str, _Histogram] = {}
        self.generation_gauges: Callable[[], list[tuple[str, int, int]]] = list
        # (open, turned away) HTTP connections: set by the daemon to its HTTP server's
        self.connections: Callable[[], tuple[int, int]] = lambda: (0, 0)
        # (connected, last reached, client certificate's expiry): set by the daemon to its uplink's
        self.uplink: Callable[[], tuple[bool, float | None, float | None]] = lambda: (False, None, None)
        # (bytes received, downloads running, waiting their turn): set by the daemon to its artifact cache's
        self.downloads: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        # Whether a model's series are kept (see retain): a request that ends after its model
        # was unassigned (a stream running on) would otherwise add them back.
        self._kept: Callable[[str], bool] = lambda _: True

    def generation(self, model: str, what: str, n: int) -> None:
        """Count ``n`` of ``what``: an outcome (completed, cancelled, failed) or
        prompt_tokens / completion_tokens."""
        if not self._kept(model):
            return
        key = (model, what)
        self._generation[key] = self._generation.get(key, 0) + n

    def generation_count(self, model: str, what: str) -> int:
        return self._generation.get((model, what), 0)

    def observe_ttft(self, model: str, seconds: float) -> None:
        histogram = self._ttft.get(model)
        if histogram is None:
            if not self._kept(model):
                return
            histogram = self._ttft[model] = _Histogram(len(LATENCY_BUCKETS))
        histogram.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram.sum += seconds

    def observe_ok(self, model: str, seconds: float) -> None:
        if not self._kept(model):
            return
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

    def retain(self, kept: Callable[[str], bool]) -> None:
        """Drop the series of every model ``kept`` says no: those no longer assigned. Over
        months of models coming and going, every heartbeat would carry each one's load and
        every scrape its series. One assigned again counts from zero, which Prometheus
        and the control plane's autoscaler take as a restart. What a dropped model's requests
        still running count when they end is not counted."""
        self._kept = kept
        self._latency = {m: h for m, h in self._latency.items() if kept(m)}
        self._ttft = {m: h for m, h in self._ttft.items() if kept(m)}
        self._requests = {k: n for k, n in self._requests.items() if kept(k[0])}
        self._generation = {k: n for k, n in self._generation.items() if kept(k[0])}

    def observe_error(self, model: str, code: int) -> None:
        if not self._kept(model):
            return
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
        out += self._render_generation()
        for metric, help_text, read in (
            ("edgeplane_agent_inflight", "Requests being served", self._inflight),
            ("edgeplane_agent_models_serving", "Models serving", self._serving),
        ):
            out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", f"{metric} {_number(read())}"]
        connections, turned_away = self.connections()
        out += ["# HELP edgeplane_agent_http_connections HTTP connections open",
                "# TYPE edgeplane_agent_http_connections gauge", f"edgeplane_agent_http_connections {_number(connections)}",
                "# HELP edgeplane_agent_http_connections_refused_total HTTP connections answered 503 at once: "
                "the agent's connection limit (--max-connections) was reached",
                "# TYPE edgeplane_agent_http_connections_refused_total counter",
                f"edgeplane_agent_http_connections_refused_total {_number(turned_away)}"]
        out += self._render_memory()
        out += self._render_uplink()
        out += self._render_downloads()
        return ("\n".join(out) + "\n").encode()

    def _render_memory(self) -> list[str]:
        budget = self._budget or Budget()
        limit = math.inf if budget.limit is None else budget.limit
        return ["# HELP edgeplane_agent_inflight_bytes Memory held by requests in flight (bodies, and their JSON's "
                "decoding), as charged against --max-inflight-bytes",
                "# TYPE edgeplane_agent_inflight_bytes gauge", f"edgeplane_agent_inflight_bytes {_number(budget.held)}",
                "# HELP edgeplane_agent_inflight_bytes_limit The memory requests in flight may hold (--max-inflight-bytes)",
                "# TYPE edgeplane_agent_inflight_bytes_limit gauge",
                f"edgeplane_agent_inflight_bytes_limit {_number(limit)}",
                "# HELP edgeplane_agent_requests_refused_for_memory_total Requests refused for the memory they would hold: "
                "503, requests in flight held it; 413, more than all of them may hold",
                "# TYPE edgeplane_agent_requests_refused_for_memory_total counter",
                f'edgeplane_agent_requests_refused_for_memory_total{{code="413"}} {_number(budget.refused_too_large)}',
                f'edgeplane_agent_requests_refused_for_memory_total{{code="503"}} {_number(budget.refused_busy)}']

    def _render_downloads(self) -> list[str]:
        received, running, waiting = self.downloads()
        return ["# HELP edgeplane_agent_artifact_received_bytes_total Bytes model downloads received, each once "
                "(a resumed download's earlier bytes are not counted again)",
                "# TYPE edgeplane_agent_artifact_received_bytes_total counter",
                f"edgeplane_agent_artifact_received_bytes_total {_number(received)}",
                "# HELP edgeplane_agent_artifact_downloads Model downloads running, and waiting their turn (--max-downloads)",
                "# TYPE edgeplane_agent_artifact_downloads gauge",
                f'edgeplane_agent_artifact_downloads{{state="running"}} {_number(running)}',
                f'edgeplane_agent_artifact_downloads{{state="waiting"}} {_number(waiting)}']

    def _render_uplink(self) -> list[str]:
        """The link to the control plane; a time not known (no contact since the agent
        started, no certificate read, an agent run without TLS) has no sample."""
        connected, reached, expires = self.uplink()
        out = ["# HELP edgeplane_agent_control_plane_connected 1 while a session with the control plane is joined, else 0",
               "# TYPE edgeplane_agent_control_plane_connected gauge",
               f"edgeplane_agent_control_plane_connected {_number(1 if connected else 0)}",
               "# HELP edgeplane_agent_control_plane_last_contact_timestamp_seconds When the control plane was last "
               "reached (a join answered, a heartbeat sent, assignments received), Unix time",
               "# TYPE edgeplane_agent_control_plane_last_contact_timestamp_seconds gauge"]
        if reached is not None:
            out.append(f"edgeplane_agent_control_plane_last_contact_timestamp_seconds {_number(reached)}")
        out += ["# HELP edgeplane_agent_client_certificate_expiry_timestamp_seconds When the agent's client certificate "
                "expires, Unix time: past it, it enrols again with its bootstrap token",
                "# TYPE edgeplane_agent_client_certificate_expiry_timestamp_seconds gauge"]
        if expires is not None:
            out.append(f"edgeplane_agent_client_certificate_expiry_timestamp_seconds {_number(expires)}")
        return out

    def _render_generation(self) -> list[str]:
        gauges = self.generation_gauges()  # live: a model no longer assigned may still finish a stream
        if not self._generation and not self._ttft and not gauges:
            return []
        out = ["# HELP edgeplane_agent_generations_total Generations by model and outcome (completed, cancelled: the client left, failed)",
               "# TYPE edgeplane_agent_generations_total counter"]
        tokens = {"prompt_tokens": "edgeplane_agent_prompt_tokens_total", "completion_tokens": "edgeplane_agent_completion_tokens_total"}
        for (model, what), n in sorted(self._generation.items()):
            if what not in tokens:
                out.append(f'edgeplane_agent_generations_total{{model="{_label(model)}",outcome="{what}"}} {_number(n)}')
        for what, metric in tokens.items():
            out += [f"# HELP {metric} Tokens {'read from prompts' if what == 'prompt_tokens' else 'generated'}", f"# TYPE {metric} counter"]
            out += [f'{metric}{{model="{_label(m)}"}} {_number(n)}' for (m, w), n in sorted(self._generation.items()) if w == what]
        out += ["# HELP edgeplane_agent_time_to_first_token_seconds Request received to first token generated",
                "# TYPE edgeplane_agent_time_to_first_token_seconds histogram"]
        for model, histogram in sorted(self._ttft.items()):
            name, running = _label(model), 0
            for bound, n in zip((*LATENCY_BUCKETS, math.inf), histogram.counts):
                running += n
                out.append(f'edgeplane_agent_time_to_first_token_seconds_bucket{{le="{_number(bound)}",model="{name}"}} {_number(running)}')
            out.append(f'edgeplane_agent_time_to_first_token_seconds_count{{model="{name}"}} {_number(running)}')
            out.append(f'edgeplane_agent_time_to_first_token_seconds_sum{{model="{name}"}} {_number(histogram.sum)}')
        for metric, idx, help_text in (("edgeplane_agent_generation_running", 1, "Sequences being generated"),
                                       ("edgeplane_agent_generation_queued", 2, "Requests waiting for a sequence slot")):
            out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
            out += [f'{metric}{{model="{_label(g[0])}"}} {_number(g[idx])}' for g in gauges]
        return out

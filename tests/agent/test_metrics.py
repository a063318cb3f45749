"""The agent's hand-written exposition, read back by prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from edge_agent import inflight
from edge_agent.metrics import AgentMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_counters_histograms_and_gauges_parse_back() -> None:
    metrics = AgentMetrics(lambda: 3, lambda: 2)
    metrics.connections = lambda: (5, 7)
    for seconds in (0.0004, 0.0005, 0.003, 7.0):
        metrics.observe_ok("mlp", seconds)
    metrics.observe_error("mlp", 400)
    metrics.observe_error('we"ird\\name\n', 503)
    samples = _samples(metrics.render().decode())

    assert samples[("edgeplane_agent_infer_requests_total", (("code", "200"), ("model", "mlp")))] == 4
    assert samples[("edgeplane_agent_infer_requests_total", (("code", "400"), ("model", "mlp")))] == 1
    assert samples[("edgeplane_agent_infer_requests_total", (("code", "503"), ("model", 'we"ird\\name\n')))] == 1

    def bucket(le: str) -> float:
        return samples[("edgeplane_agent_infer_seconds_bucket", (("le", le), ("model", "mlp")))]

    assert bucket("0.0005") == 2  # a value on a bound belongs to that bucket
    assert bucket("0.001") == 2
    assert bucket("0.005") == 3
    assert bucket("5.0") == 3
    assert bucket("+Inf") == 4
    assert samples[("edgeplane_agent_infer_seconds_count", (("model", "mlp"),))] == 4
    assert abs(samples[("edgeplane_agent_infer_seconds_sum", (("model", "mlp"),))] - 7.0039) < 1e-9
    assert samples[("edgeplane_agent_inflight", ())] == 3
    assert samples[("edgeplane_agent_models_serving", ())] == 2
    assert samples[("edgeplane_agent_http_connections", ())] == 5
    assert samples[("edgeplane_agent_http_connections_refused_total", ())] == 7


def test_empty_metrics_still_parse() -> None:
    samples = _samples(AgentMetrics(lambda: 0, lambda: 0).render().decode())
    assert samples == {("edgeplane_agent_inflight", ()): 0, ("edgeplane_agent_models_serving", ()): 0,
                       ("edgeplane_agent_http_connections", ()): 0, ("edgeplane_agent_http_connections_refused_total", ()): 0,
                       ("edgeplane_agent_inflight_bytes", ()): 0, ("edgeplane_agent_inflight_bytes_limit", ()): float("inf"),
                       ("edgeplane_agent_requests_refused_for_memory_total", (("code", "413"),)): 0,
                       ("edgeplane_agent_requests_refused_for_memory_total", (("code", "503"),)): 0,
                       ("edgeplane_agent_control_plane_connected", ()): 0,  # no contact, no certificate: no time
                       ("edgeplane_agent_artifact_received_bytes_total", ()): 0,
                       ("edgeplane_agent_artifact_downloads", (("state", "running"),)): 0,
                       ("edgeplane_agent_artifact_downloads", (("state", "waiting"),)): 0}


def test_the_link_to_the_control_plane() -> None:
    metrics = AgentMetrics(lambda: 0, lambda: 0)
    metrics.uplink = lambda: (True, 1_800_000_000.5, 1_802_592_000.0)
    samples = _samples(metrics.render().decode())
    assert samples[("edgeplane_agent_control_plane_connected", ())] == 1
    assert samples[("edgeplane_agent_control_plane_last_contact_timestamp_seconds", ())] == 1_800_000_000.5
    assert samples[("edgeplane_agent_client_certificate_expiry_timestamp_seconds", ())] == 1_802_592_000.0


def test_the_memory_of_requests_in_flight_and_its_refusals() -> None:
    budget = inflight.Budget(1000)
    held = budget.take(600, "its body")
    assert isinstance(held, inflight.Hold)
    assert isinstance(budget.take(600, "its body"), inflight.Refused)  # 503: the others hold it
    assert isinstance(budget.take(1001, "its body"), inflight.Refused)  # 413: more than all of it
    samples = _samples(AgentMetrics(lambda: 0, lambda: 0, budget).render().decode())
    assert samples[("edgeplane_agent_inflight_bytes", ())] == 600
    assert samples[("edgeplane_agent_inflight_bytes_limit", ())] == 1000
    assert samples[("edgeplane_agent_requests_refused_for_memory_total", (("code", "503"),))] == 1
    assert samples[("edgeplane_agent_requests_refused_for_memory_total", (("code", "413"),))] == 1


def test_model_load_counts_answers_and_their_seconds() -> None:
    metrics = AgentMetrics(lambda: 0, lambda: 1)
    assert metrics.model_load() == []
    for seconds in (0.01, 0.02, 0.5):
        metrics.observe_ok("mlp", seconds)
    metrics.observe_error("mlp", 400)  # refusals are not load the autoscaler should follow
    [(name, requests, busy)] = metrics.model_load()
    assert name == "mlp" and requests == 3 and abs(busy - 0.53) < 1e-9


def test_the_downloads_and_the_bytes_they_received() -> None:
    metrics = AgentMetrics(lambda: 0, lambda: 0)
    metrics.downloads = lambda: (3_145_728, 1, 2)
    samples = _samples(metrics.render().decode())
    assert samples[("edgeplane_agent_artifact_received_bytes_total", ())] == 3_145_728
    assert samples[("edgeplane_agent_artifact_downloads", (("state", "running"),))] == 1
    assert samples[("edgeplane_agent_artifact_downloads", (("state", "waiting"),))] == 2

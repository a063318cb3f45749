"""The metrics reference in docs/deploy.md ("Metrics") against the code: every metric the
control plane, the gateways and the agents expose is in the table, under the name a PromQL
query uses and with its type, and the metric names the other docs give are the table's.

The control plane's and the gateway's metrics are read from the source (every
``prometheus_client`` constructor in ``orchestrator/``), so a metric added anywhere is
caught without starting a control plane; the agent's are read from what it renders.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent import metrics as agent_metrics
from orchestrator.api import simulate
from orchestrator.gateway import cascade, proxy

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: prometheus_client's constructors and the type each one exposes.
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary", "Info": "info",
         "Enum": "stateset", "CounterMetricFamily": "counter", "GaugeMetricFamily": "gauge",
         "HistogramMetricFamily": "histogram", "SummaryMetricFamily": "summary", "InfoMetricFamily": "info"}


def exposed_name(name: str, kind: str) -> str:
    """The family name on /metrics: prometheus_client writes a counter's with ``_total``."""
    return name.removesuffix("_total") + "_total" if kind == "counter" else name


def documented() -> dict[str, str]:
    """``{metric: type}`` of the table under ``## Metrics`` in docs/deploy.md."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    start = text.index("\n## Metrics\n")
    section = text[start:text.index("\n## ", start + 1)]
    rows = re.findall(r"^\| `(edgeplane_[a-z0-9_]+)` \| (\w+) \|", section, flags=re.M)
    assert rows, "the metrics table of docs/deploy.md is gone or reshaped"
    return dict(rows)


def defined_in_orchestrator() -> dict[str, str]:
    """``{metric: type}`` of every prometheus_client constructor call in ``orchestrator/``."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        # only the names imported from prometheus_client: collections.Counter is no metric
        local = {alias.asname or alias.name: alias.name for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client")
                 for alias in node.names if alias.name in KINDS}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in local):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                f"{where}: name the metric with a string literal, so that its documentation can be checked"
            kind = KINDS[local[node.func.id]]
            found[exposed_name(first.value, kind)] = kind
    return found


def rendered_by_the_agent() -> dict[str, str]:
    """``{metric: type}`` of an agent's /metrics once it has served a generative model."""
    m = agent_metrics.AgentMetrics(lambda: 0, lambda: 0)
    m.observe_ok("m", 0.01)
    m.generation("m", "completed", 1)
    m.observe_ttft("m", 0.1)
    return types_in(m.render().decode())


def types_in(exposition: str) -> dict[str, str]:
    return {parts[2]: parts[3] for parts in (line.split() for line in exposition.splitlines()) if parts[:2] == ["#", "TYPE"]}


def test_the_source_scan_finds_the_metrics_under_the_names_they_are_exposed_as() -> None:
    registry = CollectorRegistry()
    proxy.GatewayMetrics.create(registry)
    cascade.CascadeMetrics.create(registry)
    simulate.Simulations(registry=registry)
    exposed = types_in(generate_latest(registry).decode())
    scanned = defined_in_orchestrator()
    assert len(exposed) >= 12 and exposed.items() <= scanned.items(), sorted(exposed.items() - scanned.items())


@pytest.mark.parametrize(("where", "defined"), [("orchestrator", defined_in_orchestrator), ("agent", rendered_by_the_agent)])
def test_every_metric_defined_in_the_code_is_in_the_reference_table(where: str, defined: Callable[[], dict[str, str]]) -> None:
    table, metrics = documented(), defined()
    missing = sorted(name for name in metrics if name not in table)
    assert not missing, f"metrics of the {where} missing from docs/deploy.md's Metrics table: {missing}"
    wrong = {name: (table[name], kind) for name, kind in metrics.items() if table[name] != kind}
    assert not wrong, f"docs/deploy.md gives these metrics another type than the code (doc, code): {wrong}"


def test_metric_names_given_in_the_docs_are_the_ones_a_query_uses() -> None:
    table = documented()
    named: dict[str, set[str]] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in re.findall(r"`(edgeplane_[a-z0-9_]+)(?:\{[^}`]*\})?`", path.read_text()):
            named.setdefault(name, set()).add(path.name)
    named.pop("edgeplane_proto", None)  # the package of the protocols' code, no metric
    unknown = {name: sorted(files) for name, files in named.items() if name not in table}
    assert not unknown, f"the docs name metrics the Metrics table of docs/deploy.md does not list: {unknown}"

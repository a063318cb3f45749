"""Letting go of the gateway's metric series of models and sites gone from its endpoint table.

Every label value is a series the process keeps for good: a gateway that runs for months
while deployments come and go (a model renamed at each release, a distilled one, sites of a
DaemonSet's nodes) would grow its memory and every scrape without bound. At each scrape the
series of a model, cascade or site the table no longer names go, as the agent's own do
(``edge_agent.metrics``). What such a series counted since the scrape before is not seen;
a name that comes back counts from zero, which Prometheus reads as a restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client.metrics import MetricWrapperBase

from orchestrator.gateway import endpoints as endpoints_mod

#: The ``model`` label of requests for a name the table does not know: the name is the
#: caller's, and every label value is a series the process keeps (a series that stays).
UNKNOWN_MODEL = "_unknown"


def stale(labels: Mapping[str, str], known: endpoints_mod.EndpointTable, sites: frozenset[str]) -> bool:
    """Whether a series labelled ``labels`` names a model or cascade the table no longer
    knows, or a site none of its endpoints is at (``site`` empty: the gateway's own answer)."""
    for key in ("model", "cascade"):
        name = labels.get(key)
        if name is not None and name != UNKNOWN_MODEL and not known.knows(name):
            return True
    site = labels.get("site")
    return bool(site) and site not in sites


def label_names(metric: MetricWrapperBase) -> tuple[str, ...]:
    """``metric``'s label names, in the order it was declared with (``remove`` takes its
    values so). Read from the metric, not repeated beside it: a label added to a metric and
    not to such a copy would stop its pruning, or break the scrape that prunes.
    prometheus_client has no public reader of them; its metrics have kept them there since
    label support began."""
    return tuple(metric._labelnames)


def prune(table: endpoints_mod.EndpointTable, metrics: Iterable[MetricWrapperBase]) -> None:
    """Remove the series of ``metrics`` that are :func:`stale` in ``table``. Nothing before
    the table's first version: a gateway that has not heard from the control plane yet knows
    no model, which is not that every model is gone."""
    if not table.published:
        return
    sites = frozenset(e.site for e in table.all_endpoints())
    for metric in metrics:
        names = label_names(metric)
        gone = {tuple(s.labels[n] for n in names) for family in metric.collect() for s in family.samples
                if stale(s.labels, table, sites)}
        for values in gone:
            metric.remove(*values)

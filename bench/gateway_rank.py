"""What ranking a model's replicas costs the gateway per request, by how many sites run it.

    .venv/bin/python -m bench.gateway_rank [--quick] [--sizes 100,1000,5000] [--output gateway_rank.json]

A model on N edge sites (the spec's task model on every site of a fleet), one in-flight
request of the gateway's own and one ejected replica. Per request, in CPU microseconds:

- ``rule (baseline)``: ``routing.rank`` over the model's whole table with the gateway's load
  folded in: what every request cost before the table kept its models as arrays;
- ``3 best, same place``: ``EndpointTable.rank(limit=3)`` for callers that give no position
  (the gateway's own is used: distances computed by the first request are reused);
- ``3 best, new place``: the same for a caller at coordinates not seen before (every
  distance computed);
- ``all, ranked``: every replica in order, as ``GET /v1/endpoints/{model}`` lists them;
- ``index build``: laying the model out once per table (the first request after a change);
- ``table change, model laid out again (baseline)``: a new table in which another model's
  load moved, then the model's 3 best from its arrays laid out again: what the first
  request after every table change cost while a change dropped every model's arrays;
- ``table change touching one model``: the same through the table (``EndpointTable.replace``,
  then ``rank(limit=3)``), which keeps the arrays of the models whose replicas are unchanged
  (compared with the line above);
- ``versioned, whole then held (baseline)``: a ``/versions/{v}`` request as it was ranked
  before it had the arrays' path: every replica ranked, then those that may answer for the
  version kept (``routing.holding``); 4 in 5 replicas hold it;
- ``versioned, 3 best``: the same through the table (``rank(limit=3, version=v)``);
- ``cascade rule (baseline)``: a request to the model's cascade as it was ranked before its
  stages used the arrays: ``cascade_rules.cascade_for`` (which cascade) then
  ``stage_ranking`` of its first stage, each over the whole table;
- ``cascade, 3 best``: the same through the table (``EndpointTable.cascade_for`` and
  ``rank_stage(limit=3)``), as the cascade handler asks it (compared with the cascade rule);
- ``skips, answered by the nearest``: what an answer adds to ``3 best, same place`` to say
  which nearer replicas were skipped (``EndpointTable.skipped``, then the header's text)
  when the nearest replica answered: nothing to say (compared with ``3 best, same place``:
  how many times less it costs);
- ``skips, answered by the farthest, worked out``: the same when the farthest replica
  answered, every other replica nearer: the most it costs, paid by the first such answer
  after a table change (the index's kept skips are let go before each call);
- ``skips, residency, worked out``: a caller with residency FR at the gateway's position,
  whose nearest sites (one in ten, the northernmost) are in DE, answered by the nearest FR
  site, as the first such answer after a table change pays it;
- ``skips, ... kept``: the same answers again, as every request after the first pays them
  (compared with its ``worked out`` row).

Median of rounds, the paths taking turns. Writes bench/results/gateway_rank.json (``--output``: another name there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.gateway import cascade_rules, endpoints, replica_index, routing, skips
from orchestrator.scheduler import geo

RESULTS = Path(__file__).parent / "results" / "gateway_rank.json"
GATEWAY = (48.85, 2.35)
#: The version a versioned request asks for: 4 in 5 replicas hold it, the others an older one.
VERSION, OLDER = "0123456789ab", "ba9876543210"
#: The model's cascade: a first stage on every edge site, then one on datacenters (none here).
CASCADE = cascade_rules.CascadeRoute("intent", "intent-edge", (cascade_rules.StageRoute("small", frozenset({"edge"}), None),
                                                               cascade_rules.StageRoute("large", frozenset({"datacenter"}), None)))


def replicas_of(n: int, pager_load: int = 0) -> list[routing.Endpoint]:
    """The model on ``n`` sites, and another model on 10 of them with ``pager_load`` in flight
    at each: new values each time, as the control plane's passes make them."""
    return [*(routing.Endpoint("intent", "intent-edge", f"edge-{i:05d}", "edge", "DE" if i % 100 >= 90 else "FR", "fr", 42.0 + (i % 100) / 20,
                               -4.0 + (i // 100) / 50, f"http://edge-{i}:8081", inflight=i % 3, version=OLDER if i % 5 == 0 else VERSION) for i in range(n)),
            *(routing.Endpoint("pager", "pager-edge", f"edge-{i:05d}", "edge", "FR", "fr", 42.0, -4.0 + i / 50,
                               f"http://edge-{i}:8081", inflight=pager_load) for i in range(10))]


def table_of(n: int) -> endpoints.EndpointTable:
    table = endpoints.EndpointTable()
    table.replace(replicas_of(n))
    table.started("http://edge-7:8081")
    table.eject("http://edge-8:8081")
    return table


def paths(table: endpoints.EndpointTable, changing: endpoints.EndpointTable,
          changes: list[list[routing.Endpoint]]) -> dict[str, Callable[[int], object]]:
    """``changing``: a table of its own that ``changes`` replace in turn (the other paths' arrays stay)."""
    caller = routing.Caller()
    ranked = table.rank("intent", caller, GATEWAY)
    assert isinstance(ranked, list)
    by_distance = sorted(ranked, key=lambda r: geo.rtt_ms(*GATEWAY, r.endpoint.lat, r.endpoint.lon))
    nearest, farthest = by_distance[0].endpoint.site, by_distance[-1].endpoint.site

    in_fr = routing.Caller(residency=frozenset({"FR"}))
    best_fr = table.rank("intent", in_fr, GATEWAY, limit=1)
    assert isinstance(best_fr, list)
    index = table._index("intent")  # noqa: SLF001  whose kept skips the "worked out" rows let go
    assert index is not None

    def skips_of(answered: str, who: routing.Caller = caller, afresh: bool = False) -> Callable[[int], object]:
        def answer(i: int) -> object:
            if afresh:
                index._skips.clear()  # noqa: SLF001
            return skips.header(table.skipped("intent", who, GATEWAY, answered, ()))
        return answer

    def laid_out_again(i: int) -> object:
        changing.replace(changes[i % 2])
        index = replica_index.ReplicaIndex.build(changing.endpoints("intent"))
        return index.rank(caller, GATEWAY, api=routing.API_V2, ejected=changing.ejected(), local_load={}, limit=3)

    def one_model_changed(i: int) -> object:
        changing.replace(changes[i % 2])
        return changing.rank("intent", caller, GATEWAY, limit=3)

    return {
        "rule (baseline)": lambda i: routing.rank(table.with_local_load("intent"), caller, gateway_position=GATEWAY,
                                                  ejected=table.ejected()),
        "3 best, same place": lambda i: table.rank("intent", caller, GATEWAY, limit=3),
        "3 best, new place": lambda i: table.rank("intent", routing.Caller(44.0 + i * 1e-6, 3.0), GATEWAY, limit=3),
        "all, ranked": lambda i: table.rank("intent", caller, GATEWAY),
        "index build": lambda i: replica_index.ReplicaIndex.build(table.endpoints("intent")),
        "table change, model laid out again (baseline)": laid_out_again,
        "table change touching one model": one_model_changed,
        "versioned, whole then held (baseline)": lambda i: routing.holding(table.rank("intent", caller, GATEWAY), "intent", VERSION),
        "versioned, 3 best": lambda i: table.rank("intent", caller, GATEWAY, limit=3, version=VERSION),
        "cascade rule (baseline)": lambda i: (
            cascade_rules.cascade_for([CASCADE], table.with_local_load("intent"), caller, gateway_position=GATEWAY, ejected=table.ejected()),
            cascade_rules.stage_ranking(CASCADE, 0, table.with_local_load("intent"), caller, gateway_position=GATEWAY,
                                        ejected=table.ejected())),
        "cascade, 3 best": lambda i: (table.cascade_for([CASCADE], caller, GATEWAY), table.rank_stage(CASCADE, 0, caller, GATEWAY, limit=3)),
        "skips, answered by the nearest": skips_of(nearest),
        "skips, answered by the farthest, worked out": skips_of(farthest, afresh=True),
        "skips, answered by the farthest, kept": skips_of(farthest),
        "skips, residency, worked out": skips_of(best_fr[0].endpoint.site, in_fr, afresh=True),
        "skips, residency, kept": skips_of(best_fr[0].endpoint.site, in_fr),
    }


def baseline_of(path: str) -> str:
    if path.startswith("skips") and path.endswith(", kept"):
        return path.removesuffix(", kept") + ", worked out"
    if path.startswith("skips"):
        return "3 best, same place"
    if path.startswith("table change"):
        return "table change, model laid out again (baseline)"
    if path.startswith("versioned"):
        return "versioned, whole then held (baseline)"
    return "cascade rule (baseline)" if path.startswith("cascade") else "rule (baseline)"


def per_call_us(fn: Callable[[int], object], calls: int, start: int) -> float:
    began = time.process_time()
    for i in range(start, start + calls):
        fn(i)
    return (time.process_time() - began) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--sizes", default="100,1000,5000", help="replicas of the model [100,1000,5000]")
    parser.add_argument("--output", default=RESULTS.name, help=f"file name under bench/results/ [{RESULTS.name}]")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rounds = 3 if args.quick else 7
    rows = []
    for n in sizes:
        table = table_of(n)
        ways = paths(table, table_of(n), [replicas_of(n, load) for load in (0, 1)])
        for fn in ways.values():
            fn(0)  # the first request builds the model's index and caches the gateway's distances
        calls = max(5, 20_000 // n)
        taken: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(rounds):
            names = list(ways)
            for name in names[r % len(names):] + names[:r % len(names)]:
                taken[name].append(per_call_us(ways[name], calls, 1 + r * calls))
        for name, t in taken.items():
            base = statistics.median(taken[baseline_of(name)])
            rows.append({"replicas": n, "path": name, "median_cpu_us": round(statistics.median(t), 1),
                         "best_cpu_us": round(min(t), 1), "x_faster_than_rule": round(base / statistics.median(t), 1)})
    table_out = Table(title=f"ranking one model's replicas per request ({os.cpu_count()} cores, CPU µs per call, "
                            f"median of {rounds} rounds taking turns)")
    for col in ("replicas", "path", "median µs", "best µs", "× vs baseline"):
        table_out.add_column(col, justify="left" if col == "path" else "right")
    for row in rows:
        table_out.add_row(f"{row['replicas']:,}", row["path"], f"{row['median_cpu_us']:,.1f}", f"{row['best_cpu_us']:,.1f}",
                          f"{row['x_faster_than_rule']:,.1f}")
    Console().print(table_out)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS.parent / args.output).write_text(json.dumps({"benchmark": "gateway_rank", "quick": args.quick, "cpu_count": os.cpu_count(),
                                   "load_avg_1m": os.getloadavg()[0], "rounds": rounds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

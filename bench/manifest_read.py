"""Reading a fleet's manifests: the loader with libyaml's parser against PyYAML's Python one,
same files, same process, taking turns.

    .venv/bin/python -m bench.manifest_read [--quick] [--sites N]

The fleet is ``bench.fleet_manifests``'s (10,000 sites and 1,000 deployments by default,
2,000 and 200 with ``--quick``), written as its files of 500 documents. Each round reads
every file with :func:`orchestrator.manifests.loader.read_text` (parse, line numbers,
validation: what ``apply``, ``plan`` and ``simulate -f`` do before anything else) twice,
once through libyaml (the loader's default) and once with it turned off, in alternating
order; ``yaml.safe_load_all`` and libyaml's ``CSafeLoader`` alone show what the parse itself
costs. CPU seconds per read of the whole fleet, best and median of the rounds; then the
peak of Python's allocations (``tracemalloc``) reading one file of 1,000 deployments with
60 demand points each (2.75 MB), each way. Writes bench/results/manifest_read.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from bench import fleet_manifests
from orchestrator.manifests import loader, parsing, schema

RESULTS = Path(__file__).parent / "results" / "manifest_read.json"


def read_all(texts: list[tuple[str, str]], libyaml: bool) -> int:
    documents = 0
    with contextlib.nullcontext() if libyaml else parsing.python_parser_only():
        for name, text in texts:
            reading = loader.read_text(text, name)
            if reading.issues:
                raise SystemExit(f"{name}: {reading.issues[0]}")
            documents += len(reading.documents)
    return documents


def peak_mb(text: str, libyaml: bool) -> float:
    """The most Python held while reading ``text``, in MB."""
    tracemalloc.start()
    try:
        read_all([("large.yaml", text)], libyaml)
        return round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
    finally:
        tracemalloc.stop()


def large_file() -> str:
    docs = [{"apiVersion": schema.API_VERSION, "kind": "ModelDeployment", "metadata": {"name": f"d{i}"},
             "spec": {"model": "m", "replicas": {"min": 1, "max": 2}, "placement": {"tiers": ["edge"]},
                      "demand": [{"lat": 45.1 + j / 1000, "lon": 4.2, "rps": j} for j in range(60)]}} for i in range(1000)]
    return yaml.dump_all(docs, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def cpu_s(fn: Callable[[], object]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 sites, 3 rounds")
    parser.add_argument("--sites", type=int, help="fleet size [10,000; 2,000 with --quick]")
    args = parser.parse_args()
    sites = args.sites or (2_000 if args.quick else 10_000)
    rounds = 3 if args.quick else 5
    with tempfile.TemporaryDirectory() as work:
        fleet_manifests.write(Path(work), sites)
        texts = [(path.name, path.read_text()) for path in sorted(Path(work).glob("*.yaml"))]
    size = sum(len(text.encode()) for _, text in texts)
    documents = read_all(texts, libyaml=True)
    if read_all(texts, libyaml=False) != documents:
        raise SystemExit("the two parsers read different documents")
    paths: dict[str, Callable[[], object]] = {
        "read_text, libyaml (default)": lambda: read_all(texts, libyaml=True),
        "read_text, PyYAML's Python parser": lambda: read_all(texts, libyaml=False),
        "yaml.safe_load_all alone": lambda: [list(yaml.safe_load_all(text)) for _, text in texts],
        "yaml.load_all with CSafeLoader alone": lambda: [list(yaml.load_all(text, Loader=yaml.CSafeLoader)) for _, text in texts],
    }
    taken: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(rounds):
        names = list(paths)
        for name in names[i % len(names):] + names[:i % len(names)]:
            taken[name].append(cpu_s(paths[name]))
    rows = [{"path": name, "best_cpu_s": round(min(t), 3), "median_cpu_s": round(statistics.median(t), 3),
             "mb_per_s": round(size / 1e6 / statistics.median(t), 2)} for name, t in taken.items()]
    speedup = round(statistics.median(taken["read_text, PyYAML's Python parser"])
                    / statistics.median(taken["read_text, libyaml (default)"]), 2)
    table = Table(title=f"reading {sites:,} sites' manifests ({documents:,} documents, {size / 1e6:.1f} MB, {len(texts)} files; "
                        f"{os.cpu_count()} cores, CPU s, {rounds} rounds taking turns)")
    for col in ("path", "best", "median", "MB/s"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for row in rows:
        table.add_row(row["path"], f"{row['best_cpu_s']:.3f}", f"{row['median_cpu_s']:.3f}", f"{row['mb_per_s']:.2f}")
    Console().print(table)
    Console().print(f"read_text with libyaml: {speedup}x faster than with PyYAML's Python parser (medians)")
    large = large_file()
    peaks = {"libyaml": peak_mb(large, libyaml=True), "python_parser": peak_mb(large, libyaml=False)}
    Console().print(f"peak of Python's allocations reading one file of {len(large) / 1e6:.2f} MB (1,000 deployments): "
                    f"{peaks['libyaml']} MB with libyaml, {peaks['python_parser']} MB with PyYAML's Python parser")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "manifest_read", "quick": args.quick, "cpu_count": os.cpu_count(),
                                   "load_avg_1m": os.getloadavg()[0], "sites": sites, "documents": documents,
                                   "bytes": size, "files": len(texts), "rounds": rounds, "speedup": speedup,
                                   "rows": rows, "large_file_bytes": len(large), "large_file_peak_mb": peaks}, indent=2))


if __name__ == "__main__":
    main()

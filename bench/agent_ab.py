"""Two versions of the agent against raw ``session.run``, interleaved in the same minutes.

    .venv/bin/python -m bench.agent_ab BEFORE_TREE [AFTER_TREE] [--rounds N] [--slice S] [--cases ...]

On a shared machine the raw baseline itself moves by 2-5x from one minute to the next, so
two ``bench.agent_infer`` runs taken minutes apart cannot compare two versions. Here one
agent per source tree (``PYTHONPATH`` = the tree; AFTER defaults to this checkout) serves
the same wide model, and each round measures, in rotating order, short slices of raw
``session.run`` (onnxruntime's defaults and the agent's options, the faster kept) and of
each agent. A round's ratio is agent req/s over that round's raw req/s; the median over
rounds is reported with its quartiles. Cases: ``j64c1`` = JSON, batch 64, one request at
a time; ``b8c4`` = binary, batch 8, 4 in flight. Writes bench/results/agent_ab.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.agent_common import ControlPlaneAndAgent
from bench.agent_infer import InFlight, Raw, infer_request
from edge_agent.runtime import onnx
from orchestrator.agents import model
from orchestrator.testing import onnx_models

RESULTS = Path(__file__).parent / "results" / "agent_ab.json"
DEFAULT_CASES = "j64c1,j64c4,b8c1,b24c1"


def _parse_case(case: str) -> tuple[bool, int, int]:
    """``j64c1`` -> (binary False, batch 64, 1 in flight)."""
    if case[0] not in "jb" or "c" not in case:
        raise SystemExit(f"bad case {case!r}: j|b, batch, c, in flight (e.g. j64c1)")
    batch, concurrency = case[1:].split("c")
    return case[0] == "b", int(batch), int(concurrency)


async def run(trees: list[str], cases: list[str], rounds: int, seconds: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wide = onnx_models.build_mlp(root / "wide.onnx", in_dim=1024, hidden=1024, out_dim=16, layers=4, softmax=False)
        rigs: dict[str, ControlPlaneAndAgent] = {}
        for i, tree in enumerate(trees):
            rig = ControlPlaneAndAgent(root / f"agent{i}", tree=tree)
            await rig.start()
            await rig.assign([model.Assignment("wide", "wide", "cpu", wide.path.as_uri(), wide.sha256)], ["wide"])
            rigs[tree] = rig
        try:
            rng = np.random.default_rng(0)
            for case in cases:
                binary, batch, concurrency = _parse_case(case)
                x = rng.standard_normal((batch, 1024)).astype(np.float32)
                # raw: onnxruntime's defaults and the agent's options, the faster kept per round
                raws = [Raw(wide.path, x, options) for options in (ort.SessionOptions(), onnx.session_options())]
                agents = {tree: await InFlight.open(rig.url, infer_request(rig.url, "wide", x, binary), concurrency)
                          for tree, rig in rigs.items()}
                items = ["raw", *trees]
                raw_rates: list[float] = []
                ratios: dict[str, list[float]] = {tree: [] for tree in trees}
                for r in range(rounds):
                    order = items[r % len(items):] + items[:r % len(items)]
                    got: dict[str, float] = {}
                    for item in order:
                        if item == "raw":
                            got[item] = max([await raw.slice(seconds / 2) for raw in raws])
                        else:
                            got[item] = await agents[item].slice(seconds)
                    raw_rates.append(got["raw"])
                    for tree in trees:
                        ratios[tree].append(got[tree] / got["raw"])
                for tree in trees:
                    q = statistics.quantiles(ratios[tree], n=4)
                    rows.append({"case": case, "tree": tree, "raw_per_s_median": round(statistics.median(raw_rates), 1),
                                 "vs_raw_median": round(statistics.median(ratios[tree]), 3),
                                 "vs_raw_q1": round(q[0], 3), "vs_raw_q3": round(q[2], 3), "rounds": rounds})
                    print(f"{case:7} {tree:40} raw {statistics.median(raw_rates):8.1f}/s  x raw median "
                          f"{statistics.median(ratios[tree]):.2f} (quartiles {q[0]:.2f}-{q[2]:.2f})", flush=True)
                for agent in agents.values():
                    agent.close()
        finally:
            for rig in rigs.values():
                await rig.stop()
    return rows


def _label(tree: str, role: str) -> str:
    """``before`` / ``after`` with the tree's commit when it is a git checkout (``+`` when it
    has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return role
    return f"{role}: {head}{'+' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", help="source tree of the first agent (a checkout or an exported commit)")
    parser.add_argument("after", nargs="?", default=str(Path(__file__).resolve().parents[1]),
                        help="source tree of the second agent (default: this checkout)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated (default {DEFAULT_CASES})")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--slice", type=float, default=0.4, help="seconds per agent slice")
    parser.add_argument("--quick", action="store_true", help="6 rounds")
    args = parser.parse_args()
    if Path(args.before).resolve() == Path(args.after).resolve():
        parser.error(f"before and after are the same tree ({args.after}): compare two different source trees")
    rounds = 6 if args.quick else args.rounds
    load_before = os.getloadavg()
    rows = asyncio.run(run([args.before, args.after], args.cases.split(","), rounds, args.slice))
    names = {tree: _label(tree, role) for tree, role in ((args.before, "before"), (args.after, "after"))}
    rows = [{**row, "tree": names[row["tree"]]} for row in rows]  # the results name commits, not this machine's paths
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "agent_ab", "cpu_count": os.cpu_count(), "slice_s": args.slice,
                                   "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                                   "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

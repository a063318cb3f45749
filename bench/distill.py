"""One distillation loop on the cascade benchmark's task, through the real fleet.

Same task as ``bench/cascade.py`` (the 3×1024 tanh teacher in the Ray data centre
``dc-paris``, a 128-wide ReLU student at ``edge-paris``, threshold chosen on validation),
except that the student starts out distilled from fewer examples (``--student-train``,
default 2,000 instead of 20,000): the edge model an operator ships before there is any
traffic. Then:

1. **before**: the held-out test split goes through the cascade (escalation rate,
   accuracy against the labels) and the serving student's agreement with the teacher's
   class is measured on it;
2. **capture**: ``--traffic`` fresh requests go through the cascade with
   ``spec.cascade.capture`` on (FR zone, sample rate 1); the records are written off the
   request path;
3. **distil**: ``POST /v1/distill/task`` (what ``edgeplane distill`` calls): train from
   the captured records, gate on held-out captured data, publish;
4. **after**: once the edge agent serves the new student (the rollout), the same test
   split goes through the cascade again, at the same threshold.

Run::

    .venv/bin/python -m bench.distill [--quick] [--student-train 20000]
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any

import httpx
import numpy as np

from bench import cli
from bench.cascade import CALLER, DC, EDGES, _body, _send, choose_threshold
from orchestrator.adapters import local_ray
from orchestrator.distill import student as student_mod
from orchestrator.testing import cascade_task, harness

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "distill.json"
# the caller states residency FR (bench.cascade.CALLER): its records may be kept in a FR store only
CAPTURE = {"sampleRate": 1.0, "dailyCap": 1_000_000, "retentionDays": 30, "zones": ["FR"]}


def _measure(rows: list[dict[str, Any]], labels: np.ndarray) -> dict[str, float]:
    return {"escalation_rate": float(np.mean([r["tier"] != "edge" for r in rows])),
            "accuracy": float(np.mean([r["cls"] == y for r, y in zip(rows, labels)]))}


async def _distil(client: httpx.AsyncClient) -> dict[str, Any]:
    result = None
    async with client.stream("POST", "/v1/distill/task", json={"epochs": 60}, timeout=600) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.strip():
                result = json.loads(line).get("result", result)
    assert result is not None
    return result


async def run(quick: bool, student_train: int, traffic: int) -> dict[str, Any]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="epbench-distill-"))
    task = cascade_task.build(train=student_train, test=600 if quick else 2000, seed=0)
    threshold, chosen = choose_threshold(task)
    student, teacher = cascade_task.write_models(task, workdir / "artifacts")
    manifests = cascade_task.manifests(student, teacher, threshold=threshold, edges=EDGES, datacentre=DC, capture=CAPTURE)
    test_bodies = [_body(x) for x in task.x_test]
    traffic_x = np.random.default_rng(101).standard_normal((traffic, task.dim)).astype(np.float32)
    teacher_cls = task.teacher.probabilities(task.x_test).argmax(-1)
    cluster = local_ray.LocalRayCluster(num_cpus=2)
    endpoints = cluster.start()
    fleet = harness.Fleet(workdir)
    try:
        cp = await fleet.start_control_plane(local_ray_endpoints=endpoints, resync_s=1.0)
        async with httpx.AsyncClient(base_url=cp.http_url, timeout=60) as client:
            (await client.post("/v1/apply", content=manifests)).raise_for_status()
            for site, (country, lat, lon) in EDGES.items():
                await fleet.start_agent(site, country=country, lat=lat, lon=lon)
            await harness.wait_until(lambda: {e.site for e in cp.table.endpoints("task") if e.healthy} == {*EDGES, DC[0]}
                                     and "task" in cp.table.cascades, 300, interval=0.2, what="the edge and data-centre replicas")
            url = f"{cp.http_url}/v2/models/task/infer"
            before = _measure(await _send(client, url, test_bodies, "on", 2), task.y_test)
            began = time.perf_counter()
            await _send(client, url, [_body(x) for x in traffic_x], "on", 4)
            capture_s = time.perf_counter() - began
            await cp.capture_writer.flush()
            captured, dropped = cp.capture_writer.captured, cp.capture_writer.dropped
            if captured < traffic:
                raise RuntimeError(f"only {captured} of {traffic} requests were captured ({dropped} dropped)")
            began = time.perf_counter()
            result = await _distil(client)
            distil_s = time.perf_counter() - began
            if not result["published"]:
                raise RuntimeError(f"the run published nothing: {result}")
            new = student_mod.read_onnx(workdir / "artifacts" / result["artifact"]["uri"])
            probe = _body(task.x_test[0])
            expected = new.probabilities(task.x_test[:1])[0]
            began = time.perf_counter()
            while True:  # the rollout: until the edge answers with the new student
                resp = await client.post(url, content=probe, headers={**CALLER, "content-type": "application/json",
                                                                      "x-edgeplane-cascade": "force-first"})
                if np.allclose(resp.json()["outputs"][0]["data"], expected, atol=1e-5):
                    break
                if time.perf_counter() - began > 300:
                    raise TimeoutError("the edge never served the distilled student")
                await asyncio.sleep(0.5)
            rollout_s = time.perf_counter() - began
            after = _measure(await _send(client, url, test_bodies, "on", 2), task.y_test)
            cascades = (await client.get("/v1/cascades")).json()["items"]
    finally:
        await fleet.stop()
        cluster.stop()
    before["edge_agreement"] = float((task.student.probabilities(task.x_test).argmax(-1) == teacher_cls).mean())
    after["edge_agreement"] = float((new.probabilities(task.x_test).argmax(-1) == teacher_cls).mean())
    return {
        "benchmark": "distill", "quick": quick,
        "task": {"dim": task.dim, "classes": task.classes, "teacher_parameters": task.teacher.parameters,
                 "student_parameters": task.student.parameters, "student_trained_on": student_train,
                 "test_requests": len(test_bodies), **chosen},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "capture": {"requests": traffic, "captured": captured, "dropped": dropped, "seconds": round(capture_s, 2)},
        "distil": {"seconds": round(distil_s, 2), "gate": result["gate"], "artifact": result["artifact"]},
        "rollout_s": round(rollout_s, 2),
        "before": before, "after": after,
        "checks": {"agreement_rises": after["edge_agreement"] > before["edge_agreement"],
                   "escalation_falls_by": round(before["escalation_rate"] - after["escalation_rate"], 4),
                   "accuracy_kept": after["accuracy"] >= before["accuracy"]},
        "gateway_view": cascades,
    }


def print_table(report: dict[str, Any]) -> None:
    t, b, a = report["task"], report["before"], report["after"]
    print(f"\nteacher {t['teacher_parameters']:,} params, student {t['student_parameters']:,} params first distilled from "
          f"{t['student_trained_on']:,} examples; threshold {t['threshold']}; {t['test_requests']} held-out requests; "
          f"{report['capture']['captured']} captured ({report['capture']['dropped']} dropped)")
    print(f"{'':<8} {'edge agrees w/ teacher':>23} {'escalation rate':>16} {'cascade accuracy':>17}")
    for name, r in (("before", b), ("after", a)):
        print(f"{name:<8} {r['edge_agreement']:>23.2%} {r['escalation_rate']:>16.2%} {r['accuracy']:>17.2%}")
    g = report["distil"]["gate"]
    print(f"gate on held-out captured escalations: agreement {g['current']['agreement']} -> {g['candidate']['agreement']}, "
          f"latency {g['current']['latency_ms']} -> {g['candidate']['latency_ms']} ms; distil {report['distil']['seconds']} s, "
          f"rollout {report['rollout_s']} s")
    c = report["checks"]
    print(f"agreement rises: {'yes' if c['agreement_rises'] else 'NO'}; escalation falls by {c['escalation_falls_by']:+.2%} "
          f"(points); cascade accuracy kept: {'yes' if c['accuracy_kept'] else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(__doc__, "600 held-out requests and 3,000 captured instead of 2,000 and 10,000")
    parser.add_argument("--student-train", type=int, default=2000, help="examples the first student is distilled from")
    parser.add_argument("--traffic", type=int, help="captured requests (default 10,000; 3,000 with --quick)")
    return cli.main(parser, argv, lambda args: run(args.quick, args.student_train, args.traffic or (3000 if args.quick else 10_000)), print_table, RESULTS)


if __name__ == "__main__":
    sys.exit(main())

"""``POST /v1/distill/{deployment}``: run one distillation loop and publish what passes.

The run happens in the control plane's process, next to the zone store it reads (the
embedded setup, where the control plane's machine is the data centre that keeps the
zone's records), in a worker thread so the gateway keeps serving. Progress streams back
as NDJSON lines (``{"progress": {...}}``) and the last line is ``{"result": {...}}``.

What it does, in order, and why nothing is published otherwise:

1. checks the deployment: a tensor cascade (``onnx`` first and last stage) with
   ``spec.cascade.capture``, which this version reads as stored, as its Model (one an
   earlier version stored under rules made stricter since is refused, 409, naming it), and
   picks the zone (``zone`` in the body, or the only zone with records);
2. trains and verifies (:func:`orchestrator.distill.job.run`); a failed or worse run
   writes no artifact and changes no object;
3. records the report as a ``distill`` event on the deployment (``edgeplane describe``);
4. on a pass, applies the Model with the edge variant's new ``artifact`` through the
   normal apply path, so the deployment's ``spec.rollout`` canaries it to the edge. The
   Model is read again at that moment and only the artifact changes, applied over the
   version read (``resourceVersion``): a change made during the run is never undone, and
   one made in between is a conflict in the result. The caller's token is looked up again
   in the store at that moment: one revoked (on any replica) or expired during the run
   publishes nothing (``failed``). Those reads are a store call of their own, before the
   apply's: a store that does not answer them has applied nothing, and the result says so.
   Before them the zone's records are read again: a record the run trained on that was
   erased meanwhile (not expired, by its own expiry or a retention lowered meanwhile)
   publishes nothing either, and the candidate, derived from it, is deleted (``failed``,
   saying how many).
   One run per deployment at a time.

The result's ``state`` says how the run ended: ``published``, ``rejected`` (the gate kept
the serving student), ``failed`` (``error`` says why) or ``stopped``: the control plane
stopping asks each run to stop at its next step (:meth:`Runs.stop`), which it does within
the stop's grace, writing no artifact and changing no object, and records it so. A store
that refuses the publish or the ``distill`` event still ends the stream with the result:
``failed`` with why, and ``notRecorded`` when the event could not be written.
"""

from __future__ import annotations

import asyncio
import sqlite3
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from orchestrator import catalog
from orchestrator.api import auth, bodies, paging, problems
from orchestrator.artifacts.catalog import ArtifactCatalog, ArtifactError
from orchestrator.distill import capture as capture_mod
from orchestrator.distill import job
from orchestrator.distill import store as capture_store
from orchestrator.manifests import loader
from orchestrator.manifests.errors import ManifestError
from orchestrator.store import sqlite as store_mod

log = logging.getLogger(__name__)


class Refused(ValueError):
    """The deployment cannot be distilled as it is; the message says why."""


#: The largest options body (three small fields).
MAX_BODY = 64 * 1024
OPTIONS = ("zone", "epochs", "minGain")


def read_options(raw: bytes) -> tuple[int, float, str | None]:
    """``(epochs, minGain, zone)`` of a request body (``{}`` or none: the defaults); a
    ``ValueError`` naming the field otherwise."""
    try:
        options = json.loads(raw or b"{}", parse_constant=_no_constant)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, NaN/Infinity, nested past the parser
        raise ValueError('body must be a JSON object: {"zone", "epochs", "minGain"}') from None
    if not isinstance(options, dict):
        raise ValueError(f'body must be a JSON object: {{"zone", "epochs", "minGain"}}, not {type(options).__name__}')
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (the options are {', '.join(OPTIONS)})")
    epochs, min_gain, zone = options.get("epochs", 60), options.get("minGain", 0.005), options.get("zone")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 1000:
        raise ValueError(f"epochs must be a whole number from 1 to 1000, not {json.dumps(epochs)[:40]}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
        raise ValueError(f"minGain must be a number from 0 to less than 1, not {json.dumps(min_gain)[:40]}")
    if zone is not None and (not isinstance(zone, str) or not zone.strip() or len(zone) > 64):
        raise ValueError(f"zone must be a residency zone such as EU or CH, not {json.dumps(zone)[:40]}")
    return epochs, float(min_gain), zone.strip() if zone is not None else None


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _read(store: store_mod.Store, name: str) -> tuple[store_mod.StoredObject, store_mod.StoredObject | None]:
    """The deployment and its Model, as stored now: all :func:`_plan` asks of the store."""
    obj = store.get("ModelDeployment", name)
    if obj is None:
        raise store_mod.NotFound(f"ModelDeployment {name!r} does not exist")  # 404, as every route answers a missing object
    return obj, store.get("Model", catalog.read_stored(obj, catalog.parse_deployment).model)


def _plan(obj: store_mod.StoredObject, model_obj: store_mod.StoredObject | None, captures: capture_store.ZoneStores,
          artifacts: ArtifactCatalog, name: str, zone: str | None) -> dict[str, Any]:
    spec = catalog.read_stored(obj, catalog.parse_deployment)
    if spec.cascade is None or spec.cascade.capture is None:
        raise Refused(f"ModelDeployment {name!r} captures nothing: distillation needs spec.cascade.capture")
    first, last = spec.cascade.stages[0], spec.cascade.stages[-1]
    if first.escalate is None or first.escalate.confidence is None:
        raise Refused("distillation trains tensor students: the first stage needs an 'escalate.confidence' rule")
    if first.escalate.confidence.scores != "probabilities":  # before any wait for records: none would make it trainable
        raise Refused(not_trained(first.escalate.confidence.scores))
    if model_obj is None:
        raise Refused(f"Model {spec.model!r} does not exist")
    variants = {v.name: v for v in catalog.read_stored(model_obj, catalog.parse_model).variants}
    edge = variants.get(first.variant)
    if edge is None or edge.runtime != "onnx" or edge.artifact is None or not edge.inputs:
        raise Refused(f"variant {first.variant!r} is not an ONNX tensor model with declared inputs")
    try:
        current = artifacts.local_path(edge.artifact.uri)
    except ArtifactError as exc:
        raise Refused(str(exc)) from None
    if current is None:
        raise Refused(f"the serving student {edge.artifact.uri} is remote; distillation warm-starts from a local artifact")
    # the new artifact goes next to the serving one, under the same artifact root
    root = next(r for r in artifacts.roots if current.resolve().is_relative_to(r.resolve()))
    with_records = [z for z in spec.cascade.capture.zones if z in captures.zones() and captures.zone(z).count(name, model=spec.model)]
    if zone is None:
        if len(with_records) != 1:
            raise Refused(f"say which zone's records to train on ('zone'); zones with records: {', '.join(with_records) or 'none'}")
        zone = with_records[0]
    elif zone not in with_records:
        raise Refused(f"zone {zone!r} holds no records of {name!r} serving Model {spec.model!r} (zones with records: {', '.join(with_records) or 'none'})")
    rule = first.escalate.confidence
    return {"spec": spec, "serving": edge.artifact, "edge": first.variant, "teacher": last.variant, "current": current, "zone": zone,
            "root": root, "input": edge.inputs[0].name, "output": rule.output, "threshold": job.Threshold(rule.below, rule.measure)}


def not_trained(scores: str) -> str:
    """Why a cascade whose first stage's rule reads ``scores`` is not distilled here: the student
    is trained with softmax cross-entropy on the teacher's class probabilities, and judged by
    the class it picks (:mod:`orchestrator.distill.student`)."""
    why = (f"distillation trains single-label students only: a softmax over classes, whose rule reads its probabilities "
           f"(escalate.confidence.scores: probabilities); the first stage's rule reads scores: {scores}")
    if scores.startswith("independent"):
        return (f"{why}, and a multi-label student (one sigmoid per label) is not trained here: its targets, loss and agreement "
                f"with the teacher are per label, not one class. Its records are still captured and kept; train the student "
                f"elsewhere and publish it as a new artifact of the Model's edge variant")
    return (f"{why}: a student answering logits is not trained here; have it end in a Softmax and its rule read "
            f"scores: probabilities to distil it")


def _published_model(model_obj: store_mod.StoredObject, variant: str, serving: Any, artifact: dict[str, str]) -> str:
    """The Model as stored now with only ``variant``'s artifact replaced, applied only over this
    very version (``resourceVersion``): a change made meanwhile is a conflict, never undone.
    ``serving`` is the artifact the candidate was verified against; if the variant serves
    another one now (another run published first), this candidate's gate says nothing about it."""
    stored = next((v for v in catalog.read_stored(model_obj, catalog.parse_model).variants if v.name == variant), None)
    if stored is None or stored.artifact != serving:
        now = stored.artifact.uri if stored is not None and stored.artifact is not None else "none"
        raise Refused(f"variant {variant!r} of Model {model_obj.name!r} changed during the run (its artifact is now {now}, "
                      f"the candidate was verified against {serving.uri})")
    spec = json.loads(json.dumps(model_obj.spec))
    for v in spec["variants"]:
        if v["name"] == variant:
            v["artifact"] = {"uri": artifact["uri"], "sha256": artifact["sha256"]}
    metadata = {"name": model_obj.name, "resourceVersion": str(model_obj.resource_version),
                **({"labels": dict(model_obj.labels)} if model_obj.labels else {}),
                **({"annotations": dict(model_obj.annotations)} if model_obj.annotations else {})}
    return json.dumps({"apiVersion": "edgeplane.io/v1alpha1", "kind": "Model", "metadata": metadata, "spec": spec})


def _summary(result: dict[str, Any]) -> str:
    """The event's one line (``edgeplane describe`` shows it; the details hold the whole report)."""
    gate = result.get("gate") or {}
    cur, cand = gate.get("current") or {}, gate.get("candidate") or {}
    measured = (f"agreement {cur.get('agreement')} -> {cand.get('agreement')}, escalation {cur.get('escalation')} -> "
                f"{cand.get('escalation')}, latency {cur.get('latency_ms')} -> {cand.get('latency_ms')} ms") if cur else ""
    if result.get("published"):
        return f"published {result['artifact']['uri']}: {measured}"[:500]
    why = result.get("error") or "; ".join(gate.get("reasons") or [])
    return (f"not published: {why}" + (f" ({measured})" if measured else ""))[:500]


def erased_meanwhile(read: Sequence[tuple[str, float, float]], held: set[str], now: float, retention_s: float,
                     covered: capture_mod.Covered | None = None) -> int:
    """How many of the records a run ``read`` (id, captured at, expires at) its zone no longer
    ``held`` though none of them is due to expire by ``now`` (by its own expiry, or the
    deployment's retention: ``retention_s``, the one the run read them under, or the one in
    force now, ``covered``, when shorter): erased while the run trained (a data subject's
    erasure; or purged, capture turned off meanwhile), not expired (a retention lowered
    meanwhile expires those past it, as the purge does)."""
    if covered is not None:
        retention_s = min(retention_s, covered.retention_s)
    return sum(1 for record_id, captured_at, expires_at in read
               if record_id not in held and now < min(expires_at, captured_at + retention_s))


def state_of(result: dict[str, Any]) -> str:
    """How a run ended, in one word (see the module's docstring)."""
    if result.get("published"):
        return "published"
    return "failed" if result.get("error") else "rejected"


class Runs:
    """The runs under way on this control plane, by deployment, and the stop that ends them
    between two steps (a run is in a worker thread: it is asked, not cancelled)."""

    def __init__(self) -> None:
        self.running: dict[str, asyncio.Task[None]] = {}
        self.stopping = threading.Event()

    async def stop(self, timeout: float) -> None:
        """Ask every run to stop at its next step and wait up to ``timeout`` for them to end
        (each records that it stopped); a step longer than that is cut by the process's exit."""
        self.stopping.set()
        if self.running:
            _, late = await asyncio.wait(list(self.running.values()), timeout=timeout)
            if late:
                log.warning("%d distillation run(s) did not reach a step's end within %.0f s of the stop", len(late), timeout)


def routes(authenticator: auth.Authenticator, store: store_mod.Store, captures: capture_store.ZoneStores,
           artifacts: ArtifactCatalog, changed: Callable[[str], None], cascades_view: Callable[[], dict[str, Any]],
           clock: Callable[[], float] = time.time, runs: Runs | None = None) -> list[BaseRoute]:
    runs = runs or Runs()
    running = runs.running  # deployment -> its run on this control plane

    def not_now(name: str) -> Response | None:
        """Why no run of ``name`` starts now: one is running (two would train from the same
        student and the later one replace the first's), or the control plane is stopping (its
        stop waits only for the runs it finds)."""
        if name in running:
            return problems.answer(409, f"a distillation of {name!r} is running; wait for its result", problems.Reason.ALREADY_RUNNING)
        if runs.stopping.is_set():
            return problems.answer(503, "the control plane is stopping; run it again once it is back", headers={"retry-after": "5"})
        return None

    async def distill(request: Request) -> Response:
        caller = await authenticator.admit(request, write=True, needs="distillation needs 'admin'")
        if isinstance(caller, Response):
            return caller
        try:
            paging.refuse_unknown(request.query_params, [], "this route (its options are the JSON body's)")
        except problems.BadParameter as exc:
            return problems.refusal(exc)
        secret = auth.bearer_secret(request.headers.get("authorization"))  # checked again before the run publishes
        name = request.path_params["deployment"]
        try:
            raw = await bodies.read_body(request, MAX_BODY)
        except bodies.BodyTooLarge as exc:
            return problems.answer(413, str(exc))
        try:
            epochs, min_gain, zone = read_options(raw)
        except ValueError as exc:
            return problems.answer(400, str(exc))
        if (busy := not_now(name)) is not None:
            return busy
        try:  # the objects on the store's threads; the artifacts (a network mount, maybe) and the zones' records on another
            plan = await asyncio.to_thread(_plan, *await store.run(_read, store, name), captures, artifacts, name, zone)
            retention = await store.run(catalog.capture_retention, store)
        except Refused as exc:
            return problems.answer(409, str(exc), problems.Reason.NOT_DISTILLABLE)
        except catalog.Unreadable as exc:
            return problems.answer(409, str(exc), problems.Reason.UNREADABLE)
        except store_mod.NotFound as exc:
            return problems.answer(404, str(exc))
        except store_mod.StoreError as exc:
            return auth.store_refusal(exc, caller, request)
        if (busy := not_now(name)) is not None:  # asked again: a run started meanwhile, or the stop began
            return busy

        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        read: list[tuple[str, float, float]] = []  # (id, captured at, expires at) of each record the run trains on

        def progress(p: dict[str, object]) -> None:
            loop.call_soon_threadsafe(lines.put_nowait, {"progress": p})

        def work() -> dict[str, Any]:
            # as every read: first what no policy covers now goes (captured before capture was turned off and on again, say)
            captures.zone(plan["zone"]).purge(clock(), retention)
            # a deployment re-created under this name for another model: its old records are not this model's traffic
            policy = plan["spec"].cascade.capture  # its retentionDays now, not when a record was captured
            records = captures.zone(plan["zone"]).records(name, model=plan["spec"].model, now=clock(),
                                                          retention_s=policy.retentionDays * capture_mod.DAY_S)
            read.extend((r.id, r.captured_at, r.expires_at) for r in records)
            return _run(plan, records, progress)

        def erased(covered: capture_mod.Covered | None) -> str | None:
            """Why the student must not be published when records it trained on were erased
            since they were read (it learned from them); None when none was. ``covered``:
            what the deployment's capture keeps now (None: capture off, or not read)."""
            try:
                held = captures.zone(plan["zone"]).held([r[0] for r in read])
            except (sqlite3.Error, OSError) as exc:
                return f"the zone's records could not be read again to check that none was erased during the run: {exc}"
            n = erased_meanwhile(read, held, clock(), plan["spec"].cascade.capture.retentionDays * capture_mod.DAY_S, covered)
            if not n:
                return None
            return (f"{n} of the records it trained on {'was' if n == 1 else 'were'} erased during the run (a data subject's "
                    f"erasure, or capture turned off): the student learned from {'it' if n == 1 else 'them'}, so it is not "
                    f"published and its file is deleted; run it again to train on the records kept")

        async def produce() -> None:
            try:
                result = await asyncio.to_thread(work)
            except job.Stopped as exc:
                log.info("distill %s: %s", name, exc)
                result = {"published": False, "state": "stopped", "error": str(exc)}
            except (ValueError, OSError, RuntimeError, sqlite3.Error) as exc:  # DistillError, a bad artifact, onnxruntime, the zone's records
                result = {"published": False, "error": str(exc)}
            except Exception as exc:  # a fault of ours: the caller still gets a result, the log the traceback
                log.exception("distill %s failed", name)
                result = {"published": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
            try:
                lines.put_nowait({"result": await _finish(name, plan, result, caller)})
            finally:
                running.pop(name, None)
                lines.put_nowait(None)

        def _run(plan: dict[str, Any], records: list[capture_store.Record], progress: job.Progress) -> dict[str, Any]:
            outcome = job.run(records, plan["current"], plan["root"], input_name=plan["input"], output_name=plan["output"],
                              teacher_variant=plan["teacher"], threshold=plan["threshold"], epochs=epochs, min_gain=float(min_gain),
                              progress=progress, stopped=runs.stopping.is_set)
            return {"published": outcome.artifact is not None, **outcome.report}

        async def _finish(name: str, plan: dict[str, Any], result: dict[str, Any], caller: auth.Caller) -> dict[str, Any]:
            live = next((c for c in cascades_view().get("items", []) if c.get("name") == name), {})
            result = {"deployment": name, "zone": plan["zone"], "variant": plan["edge"],
                      "liveEscalationRateBefore": live.get("escalationRate"), **result}
            if result["published"]:
                result = await _publish(name, plan, result, caller)
            result.setdefault("state", state_of(result))
            try:
                await store.run(store.record, store_mod.Event(caller.identity, "distill", "ModelDeployment", name, _summary(result), result))
            except store_mod.StoreError as exc:  # the caller still gets the result it waited minutes for, saying so
                log.warning("distill %s: the report was not recorded: %s", name, exc)
                result["notRecorded"] = f"the distill event was not recorded: {exc}"
            return result

        async def _publish(name: str, plan: dict[str, Any], result: dict[str, Any], caller: auth.Caller) -> dict[str, Any]:
            """``result`` once its artifact is applied to the Model, or saying why it was not."""
            def current() -> store_mod.StoredObject:
                # from the store, not the verdicts kept a few seconds: another replica's revocation counts at once
                if secret is not None and store.verify_token(secret, "api") is None:
                    raise Refused("the token that started the run was revoked or has expired since")
                # the Model as it is now, not as it was before training
                model_obj = store.get("Model", plan["spec"].model)
                if model_obj is None:
                    raise Refused(f"Model {plan['spec'].model!r} was deleted during the run")
                return model_obj

            def publish(model_obj: store_mod.StoredObject) -> catalog.ApplyResult:
                # applied over the version read: a change made since is a conflict, never undone
                return catalog.apply_documents(store, loader.load_text(_published_model(model_obj, plan["edge"], plan["serving"],
                                                                                        result["artifact"])),
                                               actor=caller.identity, reason=f"distill {name}: new {plan['edge']} artifact")

            try:  # a retention lowered during the run expired what it purged: not erased
                covered = (await store.run(catalog.capture_retention, store)).get(name)
            except store_mod.StoreError:  # the retention the run read under stands (the reads below say the store is down)
                covered = None
            if (why := await asyncio.to_thread(erased, covered)) is not None:
                # the candidate is derived from the erased records: not kept where it was written
                kept = plan["root"] / result["artifact"]["uri"]
                if kept.resolve() != plan["current"].resolve():
                    await asyncio.to_thread(kept.unlink, missing_ok=True)
                unpublished = {k: v for k, v in result.items() if k != "artifact"}
                return {**unpublished, "published": False, "error": f"the new Model was not applied: {why}"}
            # Checked in a call of its own, which writes nothing: a store that does not answer it
            # is told apart from one that does not answer the apply, which may have landed.
            try:
                model_obj = await store.run(current)
            except Refused as exc:
                return {**result, "published": False, "error": f"the new Model was not applied: {exc}"}
            except store_mod.StoreError as exc:
                return {**result, "published": False,
                        "error": f"the new Model was not applied: the store did not answer when the run's token and the Model "
                                 f"were read again before it: {exc}"}
            try:
                # in a thread, as the API's applies: it may wait for one of them to be written
                applied = await store.run(publish, model_obj)
            except (ManifestError, store_mod.Conflict, Refused, catalog.Unreadable) as exc:
                return {**result, "published": False, "error": f"the new Model was not applied: {exc}"}
            except store_mod.StoreUnavailable as exc:  # the write may have landed: the caller must look, not assume
                return {**result, "published": False,
                        "error": f"the store did not answer the new Model's apply, which may or may not have taken effect "
                                 f"(see Model {plan['spec'].model!r}): {exc}"}
            except store_mod.StoreError as exc:
                log.error("distill %s: publishing: %s", name, exc, exc_info=exc)
                return {**result, "published": False, "error": f"the new Model was not applied: {exc}"}
            changed(f"distill {name} by {caller.identity}")
            return {**result, "generation": applied.outcomes[0].generation}

        # started here, not when the response streams: the run goes on (and ends, freeing the
        # deployment) even if the caller hangs up before reading a line
        task = running[name] = asyncio.create_task(produce(), name=f"distill-{name}")

        async def stream() -> AsyncIterator[bytes]:
            try:
                while (line := await lines.get()) is not None:
                    yield (json.dumps(line) + "\n").encode()
            finally:
                await task

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    return [Route("/v1/distill/{deployment}", distill, methods=["POST"])]

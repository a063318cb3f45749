"""Which model versions answer requests, and converging them on the desired set.

A new version replaces the serving one only once it is downloaded, verified and loaded,
and takes what its variant declares (``signature``); a package is loaded from the folder it
was unpacked into (:class:`packagefolders.PackageFolders`), which, once whole, is what the version keeps on
the disk, and what a later attempt, after a restart too, loads with no download; until then the previous version keeps
serving and the model's state says why the new one is not there. Models absent from the
desired set are unloaded.

Each model's fetch and load is an attempt of its own (a task), so a download that takes
hours holds up no other model, nor a new assignment set: :meth:`ModelRegistry.apply` acts
on a set at once and waits for no attempt; an attempt at an assignment that changed, or at
a model no longer assigned, is cancelled (its download child killed). A load cannot be
cut short on its thread: a cancelled attempt keeps its turn among the loads, and the room
made for it, until its thread ends (:meth:`ModelRegistry._to_its_end`), as its memory is
taken until then; only a stopping agent does not wait for it.

A failed fetch or load is retried with jittered exponential backoff (:class:`RetryPolicy`,
1 s doubling to 60 s), because the usual causes pass on their own: a control plane or
artifact store briefly unreachable, an artifact published a moment after its assignment.
The registry only records *when* a slot is due again (:meth:`ModelRegistry.retry_due_in`);
the daemon's reconcile loop owns the waiting and calls :meth:`ModelRegistry.apply` again
(woken by ``on_attempt_end`` when an attempt ends), so a new assignment set simply
supersedes a pending retry.

A replacement under ``replaceWhenFull`` (the version serving unloaded first for a new one
that does not fit beside it) is remembered outside the process, through ``remember``
(the daemon keeps it in the data dir), before the old version is let go of, and forgotten
once the new one's attempt ends: an agent restarted mid-way, given that memory back
(:meth:`ModelRegistry.recall`), still reports the version it unloaded, keeps it in the
cache (:meth:`ModelRegistry.kept_aside`) and loads it again if the new one fails.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import math
import random
import pathlib
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from edge_agent import admission, artifacts, assignments, errors, footprint, heap, outage, packagefolders, signature
from edge_agent.retry import MODEL_RETRY, Jitter, RetryPolicy
from edge_agent.runtime import onnx
from edgeplane_proto.agent.v1 import agent_pb2 as pb

if TYPE_CHECKING:  # the daemon imports it with the first generative model it loads
    from edge_agent.runtime import genai

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelPhase(enum.Enum):
    LOADING = pb.MODEL_PHASE_LOADING
    READY = pb.MODEL_PHASE_READY
    FAILED = pb.MODEL_PHASE_FAILED


@dataclass(frozen=True)
class ModelStatus:
    name: str
    sha256: str
    phase: ModelPhase
    message: str
    provider: str
    requests_served: int
    serving_sha256: str
    deployment: str
    variant: str
    failures: int = 0
    replaced_sha256: str = ""  # replaceWhenFull: the version unloaded first for sha256's load under way

    def to_proto(self) -> pb.ModelState:
        return pb.ModelState(
            name=self.name,
            sha256=self.sha256,
            phase=self.phase.value,
            message=self.message,
            provider=self.provider,
            requests_served=self.requests_served,
            serving_sha256=self.serving_sha256,
            deployment=self.deployment,
            variant=self.variant,
            failures=self.failures,
            replaced_sha256=self.replaced_sha256,  # always said, "" included: the control plane tells it from an earlier agent's silence
        )


class ServedModel:
    """One loaded version; ``requests`` and ``run_s`` are kept by the HTTP layer:
    answers given, and a moving average of how long one takes to compute (infinite
    until the first answer)."""

    __slots__ = ("body_bytes", "kind", "max_concurrent", "max_queued", "name", "requests", "run_s", "runtime", "sha256")

    def __init__(self, name: str, sha256: str, runtime: onnx.OnnxModel | genai.GenAIModel,
                 max_concurrent: int = 0, max_queued: int = 0) -> None:
        self.name = name
        self.sha256 = sha256
        self.runtime = runtime
        self.kind = getattr(runtime, "kind", assignments.RUNTIME_ONNX)
        self.max_concurrent = max_concurrent  # generative models: sequences at once (0 = default)
        self.max_queued = max_queued
        self.requests = 0
        self.run_s = math.inf
        self.body_bytes = 0.0  # moving average of request sizes

    def answered(self, run_s: float, body_bytes: int | None = None) -> None:
        """Fold one answer's compute time (and request size, when known) into the averages."""
        self.requests += 1
        self.run_s = run_s if self.run_s == math.inf else 0.8 * self.run_s + 0.2 * run_s
        if body_bytes is not None:
            self.body_bytes = body_bytes if not self.body_bytes else 0.8 * self.body_bytes + 0.2 * body_bytes

    def usual_size(self, body_bytes: int) -> bool:
        """Whether a request of ``body_bytes`` is no larger than this model usually gets
        (twice the moving average, 4 KiB of slack)."""
        return body_bytes <= 2 * self.body_bytes + 4096


class _Slot:
    __slots__ = ("assignment", "attempt", "failures", "message", "phase", "received", "replace_failed", "replaced", "retry_at", "said",
                 "serving", "serving_as", "serving_bytes")

    def __init__(self, assignment: assignments.Assignment) -> None:
        self.assignment = assignment
        self.serving: ServedModel | None = None
        self.serving_as: assignments.Assignment | None = None  # the assignment ``serving`` was loaded at
        self.serving_bytes = 0  # the file or folder ``serving`` was loaded from: about what it keeps resident (footprint)
        # replaceWhenFull: the version the attempt under way unloaded first, loaded again if it fails
        self.replaced: assignments.Assignment | None = None
        self.replace_failed = ""  # why ``assignment`` failed once it had unloaded the version serving: not again
        self.phase = ModelPhase.LOADING
        self.message = ""
        self.failures = 0  # consecutive failed attempts at ``assignment``
        self.received = 0  # bytes the last attempt added to its partial download
        self.retry_at: float | None = None  # clock time of the next attempt, when FAILED
        self.attempt: asyncio.Task[None] | None = None  # fetching and loading ``assignment``, while it runs
        self.said = outage.Reminder()  # the failure last logged at error level


Loader = Callable[[bytes], onnx.OnnxModel]
class ModelRegistry:
    def __init__(
        self,
        cache: artifacts.ArtifactCache,
        load: Loader,
        on_change: Callable[[], None] = lambda: None,
        *,
        on_attempt_end: Callable[[], None] = lambda: None,
        load_package: packagefolders.PackageLoader | None = None,
        load_onnx_package: packagefolders.OnnxPackageLoader | None = None,
        folders: packagefolders.PackageFolders | None = None,
        generative_on_gpu: Callable[[], bool] = lambda: False,
        memory_available: Callable[[], int | None] = lambda: None,
        kept_for_requests: Callable[[int, int], int] = lambda need, available: 0,
        loading: Callable[[int], None] = lambda need: None,
        runtimes: Collection[str] = (assignments.RUNTIME_ONNX, assignments.RUNTIME_GENAI),
        retry: RetryPolicy = MODEL_RETRY,
        clock: Callable[[], float] = time.monotonic,
        rng: Jitter | None = None,
        remember: Callable[[dict[str, assignments.Replacement]], Awaitable[None]] | None = None,
    ) -> None:
        """``remember``: keeps the replacements under way (replaceWhenFull) where a restarted
        agent finds them again, awaited before the version serving is unloaded for one."""
        self._cache = cache
        self._load = load
        self._load_package = load_package
        self._load_onnx_package = load_onnx_package
        self._folders = folders  # where packages are unpacked: none, and no package is loaded
        # whether a generative model loads on a GPU, its KV cache in GPU memory (placement
        # counts it), not this machine's: asked once a load, which is weighed and made so
        self._generative_on_gpu = generative_on_gpu
        self._memory_available = memory_available  # bytes this agent may still use (None: not measured)
        # what requests in flight may hold while a load of (need) bytes runs, with (available) free
        self._kept_for_requests = kept_for_requests
        self._loading = loading  # a load of this many bytes starts (0: it ended)
        self._loads = asyncio.Lock()  # loads take turns (see footprint)
        # those offered: a model of another is refused before its download
        self._runtimes = tuple(r for r in runtimes
                               if r != assignments.RUNTIME_GENAI or (load_package is not None and folders is not None))
        self._on_change = on_change
        self._on_attempt_end = on_attempt_end
        self._retry = retry
        self._clock = clock
        self._rng = rng or random.Random()
        self._slots: dict[str, _Slot] = {}
        self._attempts: set[asyncio.Task[None]] = set()  # cancelled ones too, until they have unwound
        self._closing = False  # stopping: a cancelled attempt does not wait for its load's thread
        self._remember = remember
        # replaceWhenFull, per model: the version unloaded first for the load under way, as remembered
        self._replacing: dict[str, assignments.Replacement] = {}
        self.applied_version = 0

    def get(self, name: str) -> ServedModel | None:
        slot = self._slots.get(name)
        return slot.serving if slot is not None else None

    def known(self, name: str) -> bool:
        return name in self._slots

    def serving(self) -> list[ServedModel]:
        return [s.serving for s in self._slots.values() if s.serving is not None]

    def _serving_versions(self) -> set[tuple[str, str]]:
        return {(m.name, m.sha256) for m in self.serving()}

    def statuses(self) -> tuple[ModelStatus, ...]:
        out = []
        for name, slot in self._slots.items():
            served = slot.serving
            out.append(
                ModelStatus(
                    name=name,
                    sha256=slot.assignment.sha256,
                    phase=slot.phase,
                    message=slot.message,
                    provider=served.runtime.provider if served else "",
                    requests_served=served.requests if served else 0,
                    serving_sha256=served.sha256 if served else "",
                    deployment=slot.assignment.deployment,
                    variant=slot.assignment.variant,
                    failures=slot.failures,
                    replaced_sha256=slot.replaced.sha256 if slot.replaced is not None else "",
                )
            )
        return tuple(out)

    def recall(self, replacing: dict[str, assignments.Replacement]) -> None:
        """The replacements under way when this agent last stopped (``remember``'s last word):
        a model still assigned the version a replacement was for, and serving nothing, goes on
        with it, reporting the version it unloaded and loading it again if the new one fails."""
        self._replacing = dict(replacing)

    def kept_aside(self) -> set[str]:
        """The sha256 of each version unloaded first for a load still assigned and under way
        (replaceWhenFull): its artifact is kept, to be loaded again if the new one fails."""
        return {entry.replaced.sha256 for name, entry in self._replacing.items() if self._replacing_now(name, entry)}

    def _replacing_now(self, name: str, entry: assignments.Replacement) -> bool:
        slot = self._slots.get(name)
        return slot is not None and slot.serving is None and slot.assignment.sha256 == entry.sha256

    def retry_due_in(self) -> float | None:
        """Seconds until the earliest failed model is due another attempt (None: none is)."""
        due = [s.retry_at for s in self._slots.values() if s.retry_at is not None]
        return max(0.0, min(due) - self._clock()) if due else None

    def busy(self) -> bool:
        """Whether an attempt (a fetch or load) is under way."""
        return any(not t.done() for t in self._attempts)

    async def settled(self) -> None:
        """Wait until no attempt is under way."""
        while pending := [t for t in self._attempts if not t.done()]:
            await asyncio.wait(pending)

    async def converge(self, desired: assignments.AssignmentSet) -> None:
        """:meth:`apply` ``desired``, then wait for the attempts it started."""
        self.apply(desired)
        await self.settled()

    async def close(self) -> None:
        """Cancel every attempt and wait for them (download children killed)."""
        self._closing = True
        for task in self._attempts:
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)

    def apply(self, desired: assignments.AssignmentSet) -> None:
        """Act on ``desired`` at once, waiting for no download or load; per-model
        failures land in the states.

        A model no longer assigned is unloaded and its attempt cancelled; a changed
        assignment cancels the attempt at the old one and its backoff, and is attempted
        at once; a model that failed at the same assignment is attempted again only once
        its backoff has run out; one whose attempt is under way is left to it.
        """
        wanted = {a.model: a for a in desired.assignments}
        before = self._serving_versions()
        for name in [n for n in self._slots if n not in wanted]:
            self._unassign(name)
        for want in wanted.values():
            self._apply_one(want)
        self.applied_version = desired.version
        self._on_change()  # the server lets go of the versions dropped: freed now unless one still generates
        if self._serving_versions() != before:
            heap.release_freed()

    def _unassign(self, name: str) -> None:
        # (a method of its own: a local of apply's would hold the slot, and the version it
        # serves, past the memory release)
        slot = self._slots.pop(name)
        if slot.attempt is not None:
            slot.attempt.cancel()
        log.info("model %s unassigned: unloaded", name)

    def _apply_one(self, want: assignments.Assignment) -> None:
        slot = self._slots.get(want.model)
        if slot is None:
            slot = self._slots[want.model] = _Slot(want)
        elif slot.assignment != want:
            slot.failures, slot.retry_at = 0, None  # a new assignment cancels the backoff
            slot.replace_failed = ""  # and may unload the version serving first
            if slot.attempt is not None:  # and the attempt at the old one
                slot.attempt.cancel()
                slot.attempt = None
        elif slot.attempt is not None:
            return  # under way at this very assignment
        elif slot.retry_at is not None and self._clock() < slot.retry_at:
            return  # failed at this very assignment and not due yet: keep backing off
        slot.assignment = want
        slot.retry_at = None
        if want.desired_state is assignments.DesiredState.STOPPED:
            slot.serving, slot.serving_as = None, None
            slot.phase, slot.message = ModelPhase.READY, "stopped"
            return
        if slot.serving is not None and slot.serving.sha256 == want.sha256:
            # The same version: only its limits may have changed, and they apply to it as it runs.
            slot.serving.max_concurrent, slot.serving.max_queued = want.max_concurrent_sequences, want.max_queued
            slot.serving_as = want
            slot.phase, slot.message = ModelPhase.READY, ""
            return
        attempt = f" (attempt {slot.failures + 1})" if slot.failures else ""
        slot.phase, slot.message = ModelPhase.LOADING, f"fetching {want.artifact_url}{attempt}"
        task = asyncio.get_running_loop().create_task(self._attempt(slot, want, attempt), name=f"load {want.model}")
        slot.attempt = task
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    async def _attempt(self, slot: _Slot, want: assignments.Assignment, attempt: str) -> None:
        try:
            await self._fetch_and_load(slot, want, attempt)
        finally:
            if slot.attempt is asyncio.current_task():
                slot.attempt = None
            self._on_attempt_end()

    async def _fetch_and_load(self, slot: _Slot, want: assignments.Assignment, attempt: str) -> None:
        def downloading(done: str) -> None:  # "downloading <url>: 40% of 812.3 MB at 2.0 Mbit/s, ..." in status and `get placements`
            if slot.assignment is want:
                slot.message = f"downloading {want.artifact_url}: {done}{attempt}"
                self._on_change()

        if want.runtime not in self._runtimes:  # a control plane of a release before agents said what they run
            self._failed(slot, want, f"this agent does not run {want.runtime} models (it runs: {', '.join(self._runtimes) or 'none'})")
            return
        slot.replaced, slot.received = self._recalled(slot, want), 0
        failure = await self._fetched_and_loaded(slot, want, downloading, want)
        if failure is not None:
            if slot.replaced is not None and slot.assignment is want and self._slots.get(want.model) is slot:
                slot.replace_failed = failure
                failure += await self._restore(slot, slot.replaced)
            slot.replaced = None
            self._failed(slot, want, failure)
            await self._forget(want)
            return
        slot.replaced = None
        if slot.assignment is want and self._slots.get(want.model) is slot:  # else superseded, or unassigned, while it loaded
            slot.failures, slot.retry_at = 0, None
            slot.phase, slot.message = ModelPhase.READY, ""
            self._on_change()
            heap.release_freed()  # the load's temporary buffers (and the version it replaced)
        await self._forget(want)

    async def _fetched_and_loaded(self, slot: _Slot, want: assignments.Assignment, progress: Callable[[str], None],
                                  attempt_of: assignments.Assignment) -> str | None:
        """Fetch, weigh and load ``want``, serving it in ``slot`` unless the assignment the
        attempt is of was superseded, or unassigned, meanwhile; why it failed (None: it did not)."""
        try:
            # a package an unpack finished before (this agent's, or one killed since) is served
            # from its folder: neither downloaded nor hashed again, its tar gone
            folder = await asyncio.to_thread(self._folders.reuse, want.sha256, want.runtime) \
                if self._folders is not None and self._unpacks(want) is not artifacts.Unpack.NEVER else None
            reused = folder is not None  # as an unpack left it, maybe damaged since: removed if its load fails
            path = None if folder is not None else await self._cache.fetch(
                want.artifact_url, want.sha256, progress, want.artifact_hosts, unpack=self._unpacks(want), name=want.model)
            if slot.assignment is want:
                slot.message = "loading"
            runtime: onnx.OnnxModel | genai.GenAIModel
            async with self._loads:  # one at a time: each weighed against what the one before left free
                if path is not None and self._folders is not None:
                    folder = await asyncio.to_thread(self._unpacked, self._folders, want, path)
                if folder is not None and self._folders is not None:
                    # the folder is what loads, and what it needs: the tar beside it would double its room
                    await asyncio.to_thread(self._cache.drop, want.sha256)
                    size = await asyncio.to_thread(self._folders.size, folder)
                else:
                    size = path.stat().st_size if path is not None else 0
                if want.runtime == assignments.RUNTIME_GENAI and self._load_package is not None and folder is not None:
                    # one answer for the weighing and the load: the GPUs a probe finds may change
                    # between them (the first answer may import onnxruntime-genai: on a thread)
                    on_gpu = await asyncio.to_thread(self._generative_on_gpu)
                    kv_per_token, context = (0, 0) if on_gpu else await asyncio.to_thread(footprint.package_kv, folder)
                    need = await self._weighed(slot, want, footprint.genai_need(
                        size, kv_per_token, context, want.max_concurrent_sequences or admission.DEFAULT_MAX_CONCURRENT))
                    self._loading(need)
                    try:
                        runtime = await self._to_its_end(packagefolders.loaded(
                            self._folders, folder, want.sha256, reused, self._load_package, on_gpu))
                    finally:
                        self._loading(0)
                else:
                    need = await self._weighed(slot, want, footprint.onnx_need(size, package=folder is not None))
                    self._loading(need)
                    try:
                        runtime = await self._to_its_end(self._read_and_load(want, folder, reused))
                    finally:
                        self._loading(0)
        except errors.AgentError as exc:
            exc.__traceback__ = None  # its frames hold the file's bytes and what was loaded (see _restore)
            if isinstance(exc, errors.ArtifactUnavailable) and slot.assignment is attempt_of:
                slot.received = exc.received
            return str(exc)
        except Exception as exc:  # a fault of ours or of a library: this model fails, the others go on
            log.exception("model %s sha256 %s: unexpected error while loading", want.model, want.sha256[:12])
            exc.__traceback__ = None
            return f"unexpected error while loading: {type(exc).__name__}: {exc}"
        if slot.assignment is attempt_of and self._slots.get(want.model) is slot:
            slot.serving = ServedModel(want.model, want.sha256, runtime, want.max_concurrent_sequences, want.max_queued)
            slot.serving_as, slot.serving_bytes = want, size
            log.info("model %s sha256 %s serving on %s", want.model, want.sha256[:12], runtime.provider)
        return None

    def _recalled(self, slot: _Slot, want: assignments.Assignment) -> assignments.Assignment | None:
        """The version a replacement for ``want`` under way when the agent last stopped had
        unloaded (None: none, or one no longer so: the model serves, or is assigned another)."""
        entry = self._replacing.get(want.model)
        if entry is None:
            return None
        if slot.serving is None and entry.sha256 == want.sha256:
            return entry.replaced
        del self._replacing[want.model]  # written with the next change (stale, it is not read as one meanwhile)
        return None

    async def _forget(self, want: assignments.Assignment) -> None:
        """The attempt at ``want`` ended: no replacement for it is under way any more."""
        entry = self._replacing.get(want.model)
        if entry is not None and entry.sha256 == want.sha256:
            del self._replacing[want.model]
            await self._remembered()

    async def _remembered(self) -> None:
        """Hand the replacements under way to ``remember``."""
        if self._remember is not None:
            await self._remember({name: e for name, e in self._replacing.items() if name in self._slots})

    async def _unload_first(self, slot: _Slot, want: assignments.Assignment, arithmetic: str) -> None:
        """replaceWhenFull: let go of the version serving for ``want``'s load, once it is
        remembered (:meth:`_remembered`) as the version to load again if that load fails."""
        old, kept = slot.serving, slot.serving_as
        if old is None or kept is None:  # (not so: _weigh replaces only a version serving)
            return
        self._replacing[want.model] = assignments.Replacement(want.sha256, kept)
        await self._remembered()
        slot.replaced = kept
        slot.serving, slot.serving_as, slot.serving_bytes = None, None, 0
        slot.message = (f"replacing sha256 {old.sha256[:12]}: unloaded first, as both versions do not fit in memory "
                        f"(it {arithmetic} beside it); loading")
        log.warning("model %s: %s", want.model, slot.message)
        del old
        self._on_change()  # the server lets go of it: freed once its requests in flight have their answers
        heap.release_freed()

    def _unpacks(self, want: assignments.Assignment) -> artifacts.Unpack:
        """Whether ``want``'s artifact is unpacked after its download: a generative one is a
        package; an onnx one is when it is a tar, and this agent loads onnx packages."""
        if want.runtime == assignments.RUNTIME_GENAI:
            return artifacts.Unpack.ALWAYS
        loads = self._load_onnx_package is not None and self._folders is not None
        return artifacts.Unpack.IF_TAR if loads else artifacts.Unpack.NEVER

    async def _restore(self, slot: _Slot, old: assignments.Assignment) -> str:
        """After a load that unloaded ``old`` first failed (replaceWhenFull): ``old`` loaded
        again, weighed as any load, so that the model serves what it served; what the
        failure's message adds."""
        # what the failed load took: the file's bytes and the session it made, held by its
        # traceback's frames and the load's future, in cycles only the collector frees
        gc.collect()
        heap.release_freed()
        failure = await self._fetched_and_loaded(slot, old, lambda done: None, slot.assignment)
        if failure is not None:
            return f"; sha256 {old.sha256[:12]}, unloaded first for it, could not be loaded again: {failure}"
        self._on_change()
        return "; the version it replaced was loaded again"

    def _unpacked(self, folders: packagefolders.PackageFolders, want: assignments.Assignment,
                  path: pathlib.Path) -> pathlib.Path | None:
        """The folder ``want``'s cached artifact at ``path`` loads from: one an attempt of another
        model at the same package unpacked while this one fetched (its tar then gone), else
        ``path`` unpacked if this agent unpacks it (generative, or onnx and a tar); None: not."""
        if (unpack := self._unpacks(want)) is artifacts.Unpack.NEVER:
            return None
        if (folder := folders.reuse(want.sha256, want.runtime)) is not None:
            return folder
        is_package = unpack is artifacts.Unpack.ALWAYS or artifacts.is_package(path)
        return folders.unpack(path, want.sha256, want.runtime) if is_package else None

    async def _read_and_load(self, want: assignments.Assignment, folder: pathlib.Path | None = None,
                             reused: bool = False) -> onnx.OnnxModel:
        """``want``'s model, from its verified bytes or, a package, from the ``folder`` it was
        unpacked into (``reused``: see :func:`packagefolders.loaded`)."""
        if folder is not None and self._load_onnx_package is not None:
            model = await packagefolders.loaded(self._folders, folder, want.sha256, reused, self._load_onnx_package)
        else:
            data = await self._cache.read(want.sha256)
            model = await asyncio.to_thread(self._load, data)  # its bytes let go of with this frame, before the next load
        refused = signature.mismatch(want.inputs, want.outputs, model.inputs, model.outputs)
        if refused is not None:  # it would answer 400 to callers writing to the declaration
            raise errors.ModelLoadError(refused)
        return model

    async def _to_its_end(self, load: Awaitable[T]) -> T:
        """``load`` (work on a thread, which cannot be cut short), awaited to its end even when
        its attempt is cancelled (the model unassigned or changed while it loads): its memory is
        taken until the thread ends, so until then its turn is kept, the next load weighed
        only after, and requests may not take back the room made for it. An agent stopping
        does not wait for it."""
        work = asyncio.ensure_future(load)
        work.add_done_callback(_retrieved)  # a load no longer wanted: its failure is nobody's
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if not self._closing:
                await asyncio.wait([work])
            raise

    async def _weighed(self, slot: _Slot, want: assignments.Assignment, need: footprint.Need) -> int:
        """:meth:`_weigh`, the version serving unloaded first where it says so; the bytes ``want`` needs."""
        needed, replacing = self._weigh(slot, want, need)
        if replacing is not None:
            await self._unload_first(slot, want, replacing)
        return needed

    def _weigh(self, slot: _Slot, want: assignments.Assignment, need: footprint.Need) -> tuple[int, str | None]:
        """Refuse a load that needs more memory than this agent has free beside what requests
        in flight may hold while it runs (footprint); the bytes it needs when it fits.

        A new version that does not fit beside the version serving, and would without it,
        replaces it when its assignment allows (``replace_when_full``): the old version is
        let go of first, and the model answers nothing until the new one has loaded (or,
        when the new one fails, the old one again: :meth:`_restore`; a version that failed
        so does not replace it again): the bytes it needs, and when the version serving is to
        be unloaded first, what the load needs beside it (None: it is not)."""
        available = self._memory_available()
        kept = 0 if available is None else self._kept_for_requests(need.bytes, available)
        refused = footprint.refusal(need, available, kept)
        if refused is None:
            return need.bytes, None
        if want.replace_when_full and slot.serving is not None and available is not None and slot.assignment is want:
            if slot.replace_failed:
                raise errors.ModelLoadError(f"{refused}; it is not loaded in place of the version serving again, as it "
                                            f"failed so before: {slot.replace_failed}")
            freed = available + slot.serving_bytes
            if footprint.refusal(need, freed, self._kept_for_requests(need.bytes, freed)) is None:
                return need.bytes, footprint.arithmetic(need, available, kept)
        raise errors.ModelLoadError(refused)

    def _failed(self, slot: _Slot, want: assignments.Assignment, reason: str) -> None:
        if slot.assignment is not want or self._slots.get(want.model) is not slot:
            return  # superseded, or unassigned, while it was loading
        # A download cut off after bytes came (a lossy uplink's dropped connection or stall)
        # resumes past them: retried soon, as a first failure, not backed off towards a minute.
        resumable = slot.received > 0
        slot.failures = 1 if resumable else slot.failures + 1
        delay = self._retry.delay(slot.failures, self._rng)
        slot.retry_at = self._clock() + delay
        slot.phase = ModelPhase.FAILED
        slot.message = reason
        if slot.serving is not None:
            slot.message += f"; still serving sha256 {slot.serving.sha256[:12]}"
        slot.message += f"; retrying in {delay:.1f}s (failed {slot.failures}x)"
        # A model whose artifact cannot be had (the uplink down for days) fails at every
        # retry: the same reason is said again every outage.REMIND_S, not each time.
        if resumable:
            log.warning("model %s sha256 %s: %s", want.model, want.sha256[:12], slot.message)
        elif slot.said.due(reason, self._clock(), anew=slot.failures == 1):
            again = "" if slot.failures == 1 else f"; said again every {outage.REMIND_S / 60:g} minutes while it fails so"
            log.error("model %s sha256 %s failed: %s%s", want.model, want.sha256[:12], slot.message, again)
        else:
            log.debug("model %s sha256 %s failed: %s", want.model, want.sha256[:12], slot.message)
        self._on_change()


def _retrieved(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()

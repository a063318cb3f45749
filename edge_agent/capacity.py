"""Measured hardware and load, reported to the control plane.

The numbers placement uses must be what this process can have, not what a manifest
claims, nor what the host has when the agent runs in a container:

- CPU cores: the CPUs this process may run on (its affinity), capped by its cgroup's CPU
  quota, rounded up (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); the agent's inference
  threads, and onnxruntime's threads per session, follow them, the latter no more than the
  physical cores those CPUs belong to (``/sys/devices/system/cpu``);
- memory: ``MemTotal`` / ``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup's
  memory limit and what is left under it (v2 ``memory.max`` / ``memory.current``, v1
  ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``). What is used under the limit is
  the working set, as the kubelet counts it: the usage less the inactive file cache
  (``inactive_file`` of ``memory.stat``, v1 ``total_inactive_file``), which the kernel
  reclaims before it would hit the limit. A container that has read a large model file
  is not full;
- CPU load: the whole machine's busy share between two reports, from ``/proc/stat``;
- GPUs through NVML when ``pynvml`` is importable, only those ``CUDA_VISIBLE_DEVICES``
  leaves to this process (NVML sees the whole host's), and the onnxruntime execution
  providers that can actually run here: onnxruntime-gpu lists CUDA whether or not there is
  a GPU, so without one the agent reports, and loads its models on, the others. Its
  generative models follow the same decision (:meth:`CapacityProbe.generative_on_cuda`).

The limits read are those of the process's own cgroup (looked up under its path from
``/proc/self/cgroup``, or at the mount's root inside a cgroup namespace); a tighter limit
set on a parent cgroup is not seen. Where there is no ``/proc`` (not Linux), psutil
measures instead. Reading a few files costs the agent nothing, where psutil's import costs
it 1 MB of its 80 MB.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edgeplane_proto.capacity import Capacity, Gpu

__all__ = ["Capacity", "CapacityProbe", "Gpu", "Load", "probe_gpus", "usable_providers"]

log = logging.getLogger(__name__)
PROC = pathlib.Path("/proc")
CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
CPU_ROOT = pathlib.Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class Load:
    cpu_percent: float  # whole machine, 0-100
    memory_available_bytes: int
    gpu_free_bytes: tuple[tuple[int, int], ...]


def cuda_visible(value: str | None) -> tuple[int | str, ...] | None:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` lets CUDA (and so onnxruntime) use, in its order:
    NVML indices and ``GPU-``/``MIG-`` UUIDs (None: unset, every GPU). Read as CUDA reads
    it: the list ends at the first entry that is neither, so "", "-1" and "NoDevFiles" mean
    none."""
    if value is None:
        return None
    devices: list[int | str] = []
    for entry in (e.strip() for e in value.split(",")):
        if entry.isdigit() and entry.isascii():
            devices.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            devices.append(entry)
        else:
            break
    return tuple(devices)


#: onnxruntime execution providers that run on an NVIDIA GPU. onnxruntime-gpu lists those it
#: was built with, not those this machine can run: on a machine without a GPU (or with none
#: left to this process) creating a session with one fails and falls back to the CPU.
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


def usable_providers(offered: Sequence[str], gpus: Sequence[Gpu]) -> tuple[str, ...]:
    """The execution providers of ``offered`` (onnxruntime's) that can run here: all of them
    where this process has a GPU, the others where it has none."""
    return tuple(offered) if gpus else tuple(p for p in offered if p not in GPU_PROVIDERS)


def no_gpu_reason(visible: str | None, nvml_installed: bool) -> str:
    """Why this process sees no GPU, for the one line that says its GPU providers go unused."""
    if visible is not None and cuda_visible(visible) == ():
        return f"CUDA_VISIBLE_DEVICES={visible!r} leaves it none"
    if not nvml_installed:
        return "pynvml is not installed (pip install nvidia-ml-py; the gpu extra brings it)"
    return "NVML finds none (no NVIDIA GPU or driver here)"


def why_no_gpu() -> str:
    """:func:`no_gpu_reason` for this process."""
    nvml_installed = "pynvml" in sys.modules or importlib.util.find_spec("pynvml") is not None
    return no_gpu_reason(os.environ.get("CUDA_VISIBLE_DEVICES"), nvml_installed)


def probe_gpus() -> tuple[Gpu, ...]:
    """The GPUs this process can use, through NVML; none when pynvml or the driver is
    missing. NVML sees every GPU of the host, so only those ``CUDA_VISIBLE_DEVICES`` names
    are kept, in its order and numbered as CUDA numbers them (from 0): the others cannot
    run this agent's models. Never raises: a GPU NVML cannot query (fallen off the bus,
    "GPU is lost") is left out and logged once, and the others are reported, since every
    join and heartbeat carries this."""
    visible = cuda_visible(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible == ():
        return ()
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver: a CPU-only machine
        log.debug("NVML unavailable: %s", exc)
        return ()
    gpus = []
    try:
        count = pynvml.nvmlDeviceGetCount()
        for ordinal, device in enumerate(range(count) if visible is None else visible):
            try:
                handle = _handle(pynvml, device, count)
                if handle is None:
                    break  # CUDA too sees none from a device that is not there on
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            except pynvml.NVMLError as exc:
                _unqueryable(f"GPU {device}", exc)
                continue
            gpus.append(
                Gpu(
                    index=ordinal,
                    model=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_bytes=int(memory.total),
                    memory_free_bytes=int(memory.free),
                )
            )
    except pynvml.NVMLError as exc:
        _unqueryable("the GPU count", exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("NVML shutdown: %s", exc)
    return tuple(gpus)


def _handle(pynvml: Any, device: int | str, count: int) -> Any:
    """NVML's handle of one ``CUDA_VISIBLE_DEVICES`` entry; None for one that names no GPU
    here. A GPU UUID may be given by a unique prefix, as CUDA allows; a MIG instance is
    looked up by its whole UUID."""
    if isinstance(device, int):
        return pynvml.nvmlDeviceGetHandleByIndex(device) if device < count else None
    if device.startswith("MIG-"):
        return pynvml.nvmlDeviceGetHandleByUUID(device)
    found = []
    for index in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        if (uuid.decode() if isinstance(uuid, bytes) else str(uuid)).startswith(device):
            found.append(handle)
    return found[0] if len(found) == 1 else None


_unqueryable_logged: set[str] = set()  # what was logged already: the probe runs with every heartbeat


def _unqueryable(what: str, exc: Exception) -> None:
    message = f"NVML cannot query {what}: {exc}; not reported to the control plane"
    if message not in _unqueryable_logged:
        _unqueryable_logged.add(message)
        log.warning("%s", message)


def genai_built_with_cuda() -> bool:
    """Whether the installed onnxruntime-genai was built with CUDA (imports it)."""
    from edge_agent.runtime import genai

    return genai.built_with_cuda()


def cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a kernel CPU list (``0-3,8,10-11``), as ``/sys/devices/system/cpu/online``
    and ``thread_siblings_list`` write them. ValueError for text that is not one."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return frozenset(cpus)


def physical_cores(cpus: Iterable[int], siblings: Callable[[int], str | None]) -> int:
    """How many physical cores ``cpus`` belong to: ``siblings(cpu)`` is the CPU list of the
    core's hardware threads (its SMT siblings, the CPU itself included), the same text for
    each of them; a CPU whose core is unknown counts as a core of its own."""
    cores: set[object] = set()
    for cpu in cpus:
        text = siblings(cpu)
        try:
            cores.add(cpu_list(text) if text else cpu)
        except ValueError:
            cores.add(cpu)
    return len(cores)


def session_threads(cores: int, machine_cpus: int, physical_cores: int) -> int:
    """The threads an onnxruntime session runs a model on (its intra-op threads), for a process
    that may use ``cores`` of the machine's ``machine_cpus`` CPUs (its affinity capped by its
    quota), its affinity's CPUs being ``physical_cores`` physical cores: 0, onnxruntime's own
    default (a thread per physical core of the machine), where it may use every CPU; else the
    cores it may use, and no more than those physical cores. onnxruntime counts the host's
    cores, which neither a cgroup quota nor a cpuset changes: a container given 2 of a host's
    64 CPUs would run each model on 32 threads, which the quota then throttles by turns; and
    a thread per CPU of a cpuset holding both hardware threads of some cores (48 of 64 with
    SMT) would run two on those cores, where onnxruntime's own default runs one."""
    if cores >= machine_cpus:
        return 0
    return max(1, min(cores, physical_cores))


class CapacityProbe:
    """Measures capacity and load; the GPU and provider probes (onnxruntime's, and whether
    onnxruntime-genai has CUDA), the roots of ``/proc``, the cgroup file system and the CPUs'
    topology, and the CPUs this process may run on, are injectable. The execution providers
    the agent's models load on (``execution_providers``) follow the GPUs the last probe found:
    decided at the start, and again with each capacity probe (at each join, and now and then),
    so that a GPU seen later (a driver loaded late, a GPU reset that ended) is used by the
    models loaded from then on, as placement, which counts the GPUs reported, expects; its
    generative models follow them too (:meth:`generative_on_cuda`)."""

    def __init__(
        self,
        providers: Callable[[], Sequence[str]],
        gpus: Callable[[], tuple[Gpu, ...]] = probe_gpus,
        *,
        genai_cuda: Callable[[], bool] = genai_built_with_cuda,
        proc: pathlib.Path = PROC,
        cgroup_root: pathlib.Path = CGROUP_ROOT,
        cpu_root: pathlib.Path = CPU_ROOT,
        affinity: Callable[[], Collection[int]] = lambda: os.sched_getaffinity(0),
    ) -> None:
        self._gpus = gpus
        self._genai_cuda = genai_cuda
        self._genai_has_cuda: bool | None = None
        self._host: _Host = _Linux(proc, cgroup_root, cpu_root, affinity) if (proc / "meminfo").is_file() else _Psutil()
        self._host.cpu_percent()  # primes the counter: later calls are deltas
        self._last_gpus: tuple[Gpu, ...] = ()
        self._offered = tuple(providers())
        self.execution_providers = usable_providers(self._offered, gpus())
        unused = [p for p in self._offered if p not in self.execution_providers]
        if unused:
            log.warning("onnxruntime offers %s, but this agent has no GPU: %s; it reports none and runs its models on %s",
                        ", ".join(unused), why_no_gpu(), ", ".join(self.execution_providers) or "the CPU")

    def generative_on_cuda(self) -> bool:
        """Whether generative models load on CUDA, their KV cache in GPU memory: where this
        agent runs its models on CUDA now (``execution_providers``, as the last probe left
        them) and its onnxruntime-genai was built with it; on the CPU otherwise, their KV
        cache in this machine's memory. The library is asked once, at the first generative
        load on a GPU, not at the start: asking imports onnxruntime-genai, which an agent
        that serves no generative model never holds."""
        if "CUDAExecutionProvider" not in self.execution_providers:
            return False
        if self._genai_has_cuda is None:
            self._genai_has_cuda = self._genai_cuda()
        return self._genai_has_cuda

    def cpu_cores(self) -> int:
        """The CPUs this process may run on, capped by its cgroup's quota."""
        return self._host.cpu_cores()

    def session_threads(self) -> int:
        """The threads an onnxruntime session runs a model on here (:func:`session_threads`)."""
        return session_threads(self.cpu_cores(), self._host.machine_cpus(), self._host.physical_cores())

    def capacity(self) -> Capacity:
        self._last_gpus = self._gpus()
        self._follow_gpus()
        return Capacity(
            cpu_cores=self.cpu_cores(),
            memory_total_bytes=self._host.memory_total(),
            gpus=self._last_gpus,
            execution_providers=self.execution_providers,
        )

    def _follow_gpus(self) -> None:
        """The providers for the GPUs just probed, and one line when that changes them."""
        usable = usable_providers(self._offered, self._last_gpus)
        if usable == self.execution_providers:
            return
        gained = [p for p in usable if p not in self.execution_providers]
        if gained:
            log.warning("this agent now has a GPU (%s): models loaded from now on run on %s; those loaded before stay where "
                        "they are until loaded again", ", ".join(g.model for g in self._last_gpus), ", ".join(usable))
        else:
            log.warning("this agent no longer has a GPU: %s; models loaded from now on run on %s", why_no_gpu(),
                        ", ".join(usable) or "the CPU")
        self.execution_providers = usable

    def memory_available(self) -> int:
        """Bytes this process may still use: what the machine has available, capped by what
        is left under its cgroup's limit."""
        return self._host.memory_available()

    def load(self) -> Load:
        gpus = self._gpus() if self._last_gpus else ()
        return Load(
            cpu_percent=self._host.cpu_percent(),
            memory_available_bytes=self.memory_available(),
            gpu_free_bytes=tuple((g.index, g.memory_free_bytes) for g in gpus),
        )


class _Host(Protocol):
    def cpu_cores(self) -> int: ...
    def machine_cpus(self) -> int: ...
    def physical_cores(self) -> int: ...
    def memory_total(self) -> int: ...
    def memory_available(self) -> int: ...
    def cpu_percent(self) -> float: ...


class _Linux:
    def __init__(self, proc: pathlib.Path, cgroup_root: pathlib.Path, cpu_root: pathlib.Path,
                 affinity: Callable[[], Collection[int]]) -> None:
        self._proc = proc
        self._cpu_root = cpu_root
        self._affinity = affinity
        self._cgroups = _cgroup_dirs(proc, cgroup_root)
        self._last_stat: tuple[int, int] | None = None

    def cpu_cores(self) -> int:
        cores = len(self._affinity())
        quota = self._cpu_quota()
        return max(1, min(cores, math.ceil(quota))) if quota else cores

    def machine_cpus(self) -> int:
        """The machine's CPUs online, as ``os.cpu_count`` counts them (glibc reads this file)."""
        try:
            return len(cpu_list((self._cpu_root / "online").read_text()))
        except (OSError, ValueError):
            return os.cpu_count() or 1

    def physical_cores(self) -> int:
        """The physical cores the CPUs this process may run on belong to."""
        def siblings(cpu: int) -> str | None:
            try:
                return (self._cpu_root / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
            except OSError:
                return None

        return physical_cores(self._affinity(), siblings)

    def memory_total(self) -> int:
        limit = self._memory_limit()
        total = self._meminfo("MemTotal")
        return min(total, limit) if limit else total

    def memory_available(self) -> int:
        available = self._meminfo("MemAvailable")
        limit = self._memory_limit()
        if limit:
            available = min(available, max(0, limit - self._working_set()))
        return available

    def _working_set(self) -> int:
        used = self._read_int("memory", "memory.current", "memory.usage_in_bytes") or 0
        stat = self._read("memory", "memory.stat") or ""
        counters = dict(line.split(" ", 1) for line in stat.splitlines() if line.count(" ") == 1)
        # v1 names the hierarchy's total (what usage_in_bytes counts) total_inactive_file
        inactive = counters.get("total_inactive_file", counters.get("inactive_file", "0"))
        return max(0, used - int(inactive)) if inactive.isdigit() else used

    def cpu_percent(self) -> float:
        fields = [int(v) for v in (self._proc / "stat").read_text().split("\n", 1)[0].split()[1:9]]
        total, idle = sum(fields), fields[3] + fields[4]  # idle + iowait
        last, self._last_stat = self._last_stat, (total, idle)
        if last is None or total <= last[0]:
            return 0.0
        return round(100.0 * (1 - (idle - last[1]) / (total - last[0])), 1)

    def _meminfo(self, key: str) -> int:
        for line in (self._proc / "meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
        raise OSError(f"{self._proc / 'meminfo'} has no {key}")

    def _cpu_quota(self) -> float | None:
        """Cores' worth of CPU time the cgroup may use; None when unlimited."""
        text = self._read("cpu", "cpu.max")
        if text is not None:  # v2: "max 100000" or "150000 100000"
            quota, _, period = text.partition(" ")
            return int(quota) / int(period) if quota.isdigit() and period.isdigit() and int(period) else None
        quota_us, period_us = self._read_int("cpu", "cpu.cfs_quota_us"), self._read_int("cpu", "cpu.cfs_period_us")
        return quota_us / period_us if quota_us and quota_us > 0 and period_us else None

    def _memory_limit(self) -> int | None:
        limit = self._read_int("memory", "memory.max", "memory.limit_in_bytes")
        # v1 writes "no limit" as a huge number (2^63 rounded down to a page)
        return limit if limit and limit < 1 << 62 else None

    def _read_int(self, controller: str, *names: str) -> int | None:
        for name in names:
            text = self._read(controller, name)
            if text is not None:
                return int(text) if text.isdigit() else None
        return None

    def _read(self, controller: str, name: str) -> str | None:
        for folder in self._cgroups.get(controller, ()):
            try:
                return (folder / name).read_text().strip()
            except OSError:
                continue
        return None


def _cgroup_dirs(proc: pathlib.Path, root: pathlib.Path) -> dict[str, tuple[pathlib.Path, ...]]:
    """Where each controller's files for this process may be, most specific first.

    ``/proc/self/cgroup`` names the process's cgroup path per hierarchy: ``0::/path`` for
    v2, ``4:memory:/path`` for v1. Inside a cgroup namespace that path is relative to a
    root the container cannot see, so the mount's own root is tried after it.
    """
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, tuple[pathlib.Path, ...]] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        rel = path.lstrip("/")
        if not controllers:  # v2: one hierarchy, every controller's files in one folder
            if (root / "cgroup.controllers").exists():
                for c in ("cpu", "memory"):
                    found.setdefault(c, (root / rel, root))
            continue
        for c in controllers.split(","):
            if c in ("cpu", "memory"):
                found[c] = (root / c / rel, root / c)
    return found


class _Psutil:
    """Not Linux: psutil knows how to ask."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil

    def cpu_cores(self) -> int:
        return int(self._psutil.cpu_count(logical=True) or 1)

    def machine_cpus(self) -> int:
        return self.cpu_cores()

    def physical_cores(self) -> int:
        return int(self._psutil.cpu_count(logical=False) or self.cpu_cores())

    def memory_total(self) -> int:
        return int(self._psutil.virtual_memory().total)

    def memory_available(self) -> int:
        return int(self._psutil.virtual_memory().available)

    def cpu_percent(self) -> float:
        return float(self._psutil.cpu_percent(interval=None))

"""Measured hardware and load, reported to the control plane.

The numbers placement uses must be what this machine has, not what a manifest claims:
CPU cores and memory from psutil, GPUs through NVML when ``pynvml`` is importable, and the
onnxruntime execution providers that can actually run here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil

from edgeplane_proto.capacity import Capacity, Gpu

__all__ = ["Capacity", "CapacityProbe", "Gpu", "Load", "probe_gpus"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Load:
    cpu_percent: float  # whole machine, 0-100
    memory_available_bytes: int
    gpu_free_bytes: tuple[tuple[int, int], ...]


def probe_gpus() -> tuple[Gpu, ...]:
    """GPUs through NVML; none when pynvml or the driver is missing."""
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
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    index=index,
                    model=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_bytes=int(memory.total),
                    memory_free_bytes=int(memory.free),
                )
            )
    finally:
        pynvml.nvmlShutdown()
    return tuple(gpus)


class CapacityProbe:
    """Measures capacity and load; the GPU and provider probes are injectable."""

    def __init__(
        self,
        providers: Callable[[], Sequence[str]],
        gpus: Callable[[], tuple[Gpu, ...]] = probe_gpus,
    ) -> None:
        self._providers = providers
        self._gpus = gpus
        psutil.cpu_percent(interval=None)  # primes the counter: later calls are deltas
        self._last_gpus: tuple[Gpu, ...] = ()

    def capacity(self) -> Capacity:
        self._last_gpus = self._gpus()
        return Capacity(
            cpu_cores=psutil.cpu_count(logical=True) or 1,
            memory_total_bytes=psutil.virtual_memory().total,
            gpus=self._last_gpus,
            execution_providers=tuple(self._providers()),
        )

    def load(self) -> Load:
        gpus = self._gpus() if self._last_gpus else ()
        return Load(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_available_bytes=psutil.virtual_memory().available,
            gpu_free_bytes=tuple((g.index, g.memory_free_bytes) for g in gpus),
        )

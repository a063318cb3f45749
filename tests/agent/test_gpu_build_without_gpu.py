"""onnxruntime-gpu (the ``gpu`` extra) on a machine with no GPU, or none this agent may use.

onnxruntime lists the CUDA provider it was built with whether or not there is a GPU: the
agent reported it to the control plane as one it runs, and asked onnxruntime for it at every
model load, where it failed (a traceback-like "EP Error" banner, or a library that does not
load) and fell back to the CPU; the session then kept the model's bytes for that fallback.
Now it reports the providers it runs on, and says once, at the start, why CUDA is not one.
Its generative models follow the same decision: onnxruntime-genai was given CUDA wherever
/dev/nvidia0 existed, so with the GPU hidden from the agent (``CUDA_VISIBLE_DEVICES=""``) a
package failed to load at every attempt and its KV cache was not weighed against this
machine's memory. Real onnxruntime and onnxruntime-genai (the CPU builds: a load on CUDA is
checked on the options the agent builds, not made), real gRPC and HTTP; what onnxruntime
offers, whether onnxruntime-genai has CUDA and what NVML sees are the probe's constructor seams.
"""

from __future__ import annotations

import logging
import pathlib
import warnings
from collections.abc import Callable, Sequence

import pytest

from edge_agent import capacity, inflight
from orchestrator.agents import model

from . import genai_serving
from .conftest import SITE, ControlPlane, MakeAgent, Models
from .test_agent import assignment, wait_model
from .test_capacity import fake_proc, files
from .test_model_memory import FAST_RETRY, MB

GPU_BUILD = ("CUDAExecutionProvider", "CPUExecutionProvider")
L4 = capacity.Gpu(0, "NVIDIA L4", 24 << 30, 20 << 30)


def _no_gpu_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "CUDAExecutionProvider" in r.getMessage()]


def test_a_gpu_build_without_a_gpu_reports_the_cpu_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    probe = capacity.CapacityProbe(lambda: GPU_BUILD, gpus=lambda: ())
    assert probe.capacity().execution_providers == ("CPUExecutionProvider",)
    probe.capacity()  # every heartbeat carries it: said at the start, not with each
    lines = _no_gpu_lines(caplog)
    assert len(lines) == 1, lines
    assert "no GPU" in lines[0] and "CPU" in lines[0], lines[0]


def test_a_gpu_build_with_a_gpu_keeps_cuda(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    probe = capacity.CapacityProbe(lambda: GPU_BUILD, gpus=lambda: (L4,))
    assert probe.capacity().execution_providers == GPU_BUILD
    assert _no_gpu_lines(caplog) == []


async def test_the_agent_loads_its_models_on_the_cpu_alone_and_reports_it(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await make_agent(control_plane, probe=capacity.CapacityProbe(lambda: GPU_BUILD, gpus=lambda: ()))
        control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
        state = await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    assert state.provider == "CPUExecutionProvider"
    status = control_plane.hub.status(SITE)
    assert status is not None and status.providers == ("CPUExecutionProvider",)
    asked = [str(w.message) for w in caught if "CUDAExecutionProvider" in str(w.message)]
    assert asked == []  # onnxruntime was not asked for CUDA



def test_the_line_says_why_there_is_no_gpu(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    caplog.set_level(logging.INFO, logger="edge_agent")
    capacity.CapacityProbe(lambda: GPU_BUILD, gpus=lambda: ())
    [line] = _no_gpu_lines(caplog)
    assert "CUDA_VISIBLE_DEVICES='' leaves it none" in line, line


@pytest.mark.parametrize(("visible", "nvml", "says"), [
    ("-1", True, "CUDA_VISIBLE_DEVICES='-1' leaves it none"),
    (None, False, "pynvml is not installed (pip install nvidia-ml-py"),
    ("0", True, "NVML finds none"),
    (None, True, "NVML finds none"),
])
def test_why_there_is_no_gpu(visible: str | None, nvml: bool, says: str) -> None:
    assert says in capacity.no_gpu_reason(visible, nvml)


def in_container(root: pathlib.Path, free: int, gpus: Sequence[capacity.Gpu] | Callable[[], tuple[capacity.Gpu, ...]], *,
                 genai_cuda: Callable[[], bool] = lambda: True) -> capacity.CapacityProbe:
    """A probe of onnxruntime-gpu and onnxruntime-genai-cuda (the gpu extra: ``genai_cuda``
    answers whether it has CUDA) in a container of 1 GiB with ``free`` bytes of it free, NVML
    seeing ``gpus`` (or what it returns at each probe)."""
    cgroups = root / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory")
    files(cgroups / "agent", memory_max=str(1 << 30), memory_current=str((1 << 30) - free))
    seen = gpus if callable(gpus) else lambda: tuple(gpus)
    return capacity.CapacityProbe(lambda: GPU_BUILD, gpus=seen, genai_cuda=genai_cuda,
                                  proc=fake_proc(root, "0::/agent\n"), cgroup_root=cgroups)


async def test_a_generative_model_without_a_gpu_loads_on_the_cpu_its_kv_cache_weighed_in_memory(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: genai_serving.Packages, tmp_path: pathlib.Path) -> None:
    small = packages.small
    kv = small.kv_bytes_per_token * small.context_length
    # its weights and the caches of 8 sequences, beside the least requests in flight may hold
    free = int(1.25 * small.size_bytes) + 8 * kv + inflight.MIN_DEFAULT_BYTES
    probe = in_container(tmp_path, free, ())
    agent = await make_agent(control_plane, probe=probe, model_retry=FAST_RETRY)
    options = agent.generative_options(probe.generative_on_cuda())
    assert (options.cuda, options.providers) == (False, [])
    control_plane.hub.set_assignments(SITE, [genai_serving.assignment(packages.small_url, small.sha256, concurrent=64)], version=1)
    refused = await genai_serving.wait_state(control_plane, lambda s: s.phase is model.ModelPhase.FAILED)
    assert f"{64 * kv / MB:.1f} MB of KV cache for 64 sequence(s)" in refused.message, refused.message
    control_plane.hub.set_assignments(SITE, [genai_serving.assignment(packages.small_url, small.sha256, concurrent=8)], version=2)
    state = await genai_serving.wait_state(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    assert state.provider == "CPUExecutionProvider"


async def test_a_generative_model_with_a_gpu_is_configured_for_cuda_its_kv_cache_left_to_placement(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: genai_serving.Packages, tmp_path: pathlib.Path) -> None:
    small = packages.small
    # too little for its weights: refused before a load on CUDA is tried, saying what it was weighed with
    free = small.size_bytes + inflight.MIN_DEFAULT_BYTES
    probe = in_container(tmp_path, free, (L4,))
    agent = await make_agent(control_plane, probe=probe, model_retry=FAST_RETRY)
    options = agent.generative_options(probe.generative_on_cuda())
    assert (options.cuda, options.providers, options.provider) == (True, ["cuda"], "CUDAExecutionProvider")
    control_plane.hub.set_assignments(SITE, [genai_serving.assignment(packages.small_url, small.sha256, concurrent=64)], version=1)
    refused = await genai_serving.wait_state(control_plane, lambda s: s.phase is model.ModelPhase.FAILED)
    assert f"(1.25 x its {small.size_bytes / MB:.1f} MB package)" in refused.message, refused.message
    assert "KV cache" not in refused.message, refused.message  # in GPU memory, which placement counts


@pytest.mark.parametrize(("offered", "gpus", "genai_cuda", "on_cuda"), [
    (GPU_BUILD, (L4,), True, True),
    (GPU_BUILD, (), True, False),  # no GPU left to the agent: whatever the libraries have
    (GPU_BUILD, (L4,), False, False),  # onnxruntime-genai's CPU build
    (("CPUExecutionProvider",), (L4,), True, False),
])
def test_where_generative_models_run(offered: tuple[str, ...], gpus: tuple[capacity.Gpu, ...], genai_cuda: bool,
                                     on_cuda: bool) -> None:
    asked: list[bool] = []

    def genai_has_cuda() -> bool:
        asked.append(genai_cuda)
        return genai_cuda

    probe = capacity.CapacityProbe(lambda: offered, gpus=lambda: gpus, genai_cuda=genai_has_cuda)
    assert asked == []  # not at the start: asking imports onnxruntime-genai
    assert probe.generative_on_cuda() is on_cuda
    assert probe.generative_on_cuda() is on_cuda
    assert len(asked) <= 1


class GpuLater:
    """NVML's view of a machine whose GPU is seen only after the agent started (its driver
    loaded late in the boot, or a GPU reset that ended): none, then ``L4``."""

    def __init__(self) -> None:
        self.gpus: tuple[capacity.Gpu, ...] = ()

    def __call__(self) -> tuple[capacity.Gpu, ...]:
        return self.gpus


def test_a_gpu_seen_after_the_start_brings_cuda_back(caplog: pytest.LogCaptureFixture) -> None:
    """The providers were decided once, at the start: a GPU seen later was reported (the
    capacity is probed again at each join and now and then) while every model went on
    loading on the CPU, and placement, which counts the GPUs an agent reports, put GPU
    variants there. The providers now follow the GPUs each probe finds, and say so."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    nvml = GpuLater()
    probe = capacity.CapacityProbe(lambda: GPU_BUILD, gpus=nvml)
    assert probe.capacity().execution_providers == ("CPUExecutionProvider",)
    nvml.gpus = (L4,)
    measured = probe.capacity()
    assert (measured.gpus, measured.execution_providers) == ((L4,), GPU_BUILD)
    assert probe.execution_providers == GPU_BUILD  # what the next model loads on
    assert any("now has a GPU" in line for line in _no_gpu_lines(caplog)), _no_gpu_lines(caplog)
    nvml.gpus = ()  # lost again: its models load on the CPU, as at a start without one
    assert probe.capacity().execution_providers == ("CPUExecutionProvider",)


async def test_a_model_loaded_after_a_gpu_is_seen_is_asked_for_cuda(
    control_plane: ControlPlane, make_agent: MakeAgent, models: Models
) -> None:
    nvml = GpuLater()
    agent = await make_agent(control_plane, probe=capacity.CapacityProbe(lambda: GPU_BUILD, gpus=nvml))
    nvml.gpus = (L4,)
    assert agent.capacity().execution_providers == GPU_BUILD  # probed again, as a join or a heartbeat does
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
        await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    # onnxruntime's CPU build, asked for CUDA, says it is not there and runs on the CPU
    assert [str(w.message) for w in caught if "CUDAExecutionProvider" in str(w.message)], [str(w.message) for w in caught]


def test_generative_models_follow_a_gpu_seen_after_the_start() -> None:
    """Where generative models ran was decided at the first one's load and kept: a GPU seen
    later left them on the CPU while the agent's other models went to CUDA."""
    nvml = GpuLater()
    probe = capacity.CapacityProbe(lambda: GPU_BUILD, gpus=nvml, genai_cuda=lambda: True)
    assert probe.generative_on_cuda() is False
    nvml.gpus = (L4,)
    probe.capacity()
    assert probe.generative_on_cuda() is True
    nvml.gpus = ()
    probe.capacity()
    assert probe.generative_on_cuda() is False


async def test_a_gpu_lost_while_a_generative_model_is_weighed_does_not_load_it_unweighed_on_the_cpu(
        control_plane: ControlPlane, make_agent: MakeAgent, packages: genai_serving.Packages, tmp_path: pathlib.Path) -> None:
    """A generative load asked where it runs twice: when it was weighed (on a GPU: its KV cache
    in GPU memory, left to placement) and again when it loaded. A capacity probe between the
    two (a heartbeat's) that found the GPU gone had it load on the CPU, the KV cache of its 64
    sequences never weighed against this machine's memory, which it does not fit. A load now
    runs where it was weighed (on CUDA: it fails, as a load on a GPU just lost does), and the
    next attempt is weighed for the CPU and refused, saying why."""
    small = packages.small
    kv = small.kv_bytes_per_token * small.context_length
    free = int(1.25 * small.size_bytes) + 8 * kv + inflight.MIN_DEFAULT_BYTES  # its weights and 8 sequences' caches
    nvml = GpuLater()
    nvml.gpus = (L4,)

    def lost_while_weighed() -> bool:  # onnxruntime-genai asked whether it has CUDA: at the first load weighed for a GPU
        nvml.gpus = ()
        probe.capacity()  # a heartbeat's probe, meanwhile, finds the GPU gone
        return True

    probe = in_container(tmp_path, free, nvml, genai_cuda=lost_while_weighed)
    await make_agent(control_plane, probe=probe, model_retry=FAST_RETRY)
    control_plane.hub.set_assignments(SITE, [genai_serving.assignment(packages.small_url, small.sha256, concurrent=64)], version=1)
    ended = await genai_serving.wait_state(control_plane, lambda s: s.phase is model.ModelPhase.READY or "KV cache" in s.message)
    assert ended.phase is model.ModelPhase.FAILED, (ended.phase, ended.provider)  # never on the CPU unweighed
    assert f"{64 * kv / MB:.1f} MB of KV cache for 64 sequence(s)" in ended.message, ended.message

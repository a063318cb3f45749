"""onnxruntime-gpu (the ``gpu`` extra) on a machine with no GPU, or none this agent may use.

onnxruntime lists the CUDA provider it was built with whether or not there is a GPU: the
agent reported it to the control plane as one it runs, and asked onnxruntime for it at every
model load, where it failed (a traceback-like "EP Error" banner, or a library that does not
load) and fell back to the CPU; the session then kept the model's bytes for that fallback.
Now it reports the providers it runs on, and says once, at the start, why CUDA is not one.
Real onnxruntime (the CPU build: asked for CUDA, it warns and runs on the CPU), real gRPC
and HTTP; what onnxruntime offers and what NVML sees are the probe's constructor seams.
"""

from __future__ import annotations

import logging
import warnings

import pytest

from edge_agent import capacity
from orchestrator.agents import model

from .conftest import SITE, ControlPlane, MakeAgent, Models
from .test_agent import assignment, wait_model

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

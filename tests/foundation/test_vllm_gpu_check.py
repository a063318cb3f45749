"""The GPU check `python -m bench.vllm_gpu` on machines without a working GPU: it says why
it skips and exits 0 (`python -m bench` runs it with every other benchmark). An
``nvidia-smi`` that hangs (a driver stuck on a lost GPU) ended it in a traceback
(subprocess.TimeoutExpired) instead. The ``nvidia-smi`` here is a real executable put first
on PATH."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

from bench import vllm_gpu


@pytest.fixture
def nvidia_smi(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def install(script: str) -> None:
        folder = tmp_path / "bin"
        folder.mkdir()
        tool = folder / "nvidia-smi"
        tool.write_text("#!/bin/sh\n" + script)
        tool.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")

    return install


def test_an_nvidia_smi_that_hangs_is_a_reason_to_skip(nvidia_smi: Callable[[str], None]) -> None:
    nvidia_smi("exec sleep 60\n")
    reason = vllm_gpu.skip_reason(nvidia_smi_timeout_s=0.5)
    assert reason is not None and "nvidia-smi did not answer in 0.5 s" in reason, reason


def test_an_nvidia_smi_without_its_driver_is_a_reason_to_skip(nvidia_smi: Callable[[str], None]) -> None:
    nvidia_smi("echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\nexit 9\n")
    reason = vllm_gpu.skip_reason()
    assert reason is not None and "couldn't communicate with the NVIDIA driver" in reason, reason

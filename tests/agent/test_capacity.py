"""Measured capacity: /proc and the cgroup file system (v2 and v1), on trees the tests
write, then on this machine."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import types

import psutil
import pytest

from edge_agent import capacity, daemon
from orchestrator.agents import model

from .conftest import SITE, ControlPlane, MakeAgent, Models
from .test_agent import assignment, wait_model

GiB = 1 << 30
HOST_MEMORY = 64 * GiB
HOST_AVAILABLE = 60 * GiB


def fake_proc(root: pathlib.Path, cgroup: str, stat: tuple[int, ...] = (100, 0, 100, 800, 0, 0, 0, 0)) -> pathlib.Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {HOST_MEMORY // 1024} kB\nMemFree:        1 kB\nMemAvailable:   {HOST_AVAILABLE // 1024} kB\n"
    )
    write_stat(proc, stat)
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


def write_stat(proc: pathlib.Path, fields: tuple[int, ...]) -> None:
    (proc / "stat").write_text("cpu  " + " ".join(map(str, fields)) + " 0 0\ncpu0 1 2 3\n")


def files(folder: pathlib.Path, **contents: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def probe(proc: pathlib.Path, cgroups: pathlib.Path) -> capacity.CapacityProbe:
    return capacity.CapacityProbe(lambda: ["CPUExecutionProvider"], gpus=lambda: (), proc=proc, cgroup_root=cgroups)


CORES = len(os.sched_getaffinity(0))


def test_cgroup_v2_limits_cap_what_is_reported(tmp_path: pathlib.Path) -> None:
    cgroups = tmp_path / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory")
    files(cgroups / "kubepods" / "pod1", cpu_max="50000 100000", memory_max=str(GiB), memory_current=str(GiB // 4))
    measured = probe(fake_proc(tmp_path, "0::/kubepods/pod1\n"), cgroups)
    assert measured.capacity().cpu_cores == 1  # half a core's quota is still one core to place on
    assert measured.capacity().memory_total_bytes == GiB
    assert measured.load().memory_available_bytes == GiB - GiB // 4


def test_an_agent_runs_one_inference_thread_per_core_it_may_use(tmp_path: pathlib.Path) -> None:
    cgroups = tmp_path / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory")
    files(cgroups / "kubepods" / "pod1", cpu_max="100000 100000")  # one core's quota, whatever the host has
    measured = probe(fake_proc(tmp_path, "0::/kubepods/pod1\n"), cgroups)
    config = daemon.AgentConfig(control_plane="127.0.0.1:1", site="edge-a", token="t", data_dir=tmp_path / "agent")
    agent = daemon.Agent(config, probe=measured)
    assert agent.workers == agent.capacity().cpu_cores == 1
    assert daemon.Agent(dataclasses.replace(config, workers=3), probe=measured).workers == 3


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a quota below the machine's CPUs needs two of them")
async def test_onnxruntime_runs_one_thread_per_core_the_agent_may_use_not_per_core_of_the_host(
        control_plane: ControlPlane, make_agent: MakeAgent, models: Models, tmp_path: pathlib.Path) -> None:
    # onnxruntime sizes a session's threads by the host's cores, which a quota does not
    # change: a container given one core of many ran as many threads per model on it
    cgroups = tmp_path / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory")
    files(cgroups / "pod", cpu_max="100000 100000")
    agent = await make_agent(control_plane, probe=probe(fake_proc(tmp_path, "0::/pod\n"), cgroups))
    control_plane.hub.set_assignments(SITE, [assignment(models.v1_url, models.v1)], version=1)
    await wait_model(control_plane, lambda s: s.phase is model.ModelPhase.READY)
    served = agent.registry.get("mlp")
    assert served is not None and served.runtime._session.get_session_options().intra_op_num_threads == 1
    generative = agent.generative_options(cuda=False).overlay
    assert generative is not None and generative["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 1


def fake_cpus(root: pathlib.Path, cpus: int, smt: bool) -> pathlib.Path:
    """``/sys/devices/system/cpu`` of a machine of ``cpus`` CPUs, CPU n and n + cpus/2 the two
    hardware threads of one core where ``smt`` (as Linux numbers them on x86)."""
    files(root, online=f"0-{cpus - 1}")
    half = cpus // 2
    for cpu in range(cpus):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(f"{cpu % half},{cpu % half + half}\n" if smt else f"{cpu}\n")
    return root


@pytest.mark.parametrize(("allowed", "quota", "smt", "threads"), [
    (range(64), None, True, 0),  # every CPU: onnxruntime's own default, one thread per physical core (32)
    (range(48), None, True, 32),  # a cpuset of 48 CPUs, the two threads of 16 cores among them: 32 cores
    (range(24), None, True, 24),  # 24 CPUs of 24 cores
    ([0, 32], None, True, 1),  # the two threads of one core
    (range(64), 48.0, True, 32),  # a quota of 48 cores' time over 32 cores
    (range(64), 2.0, True, 2),
    (range(48), None, False, 48),  # no SMT: a core a CPU
    (range(64), 1.5, False, 2),
])
def test_onnxruntime_runs_no_more_threads_than_the_physical_cores_the_agent_may_use(
        tmp_path: pathlib.Path, allowed: range | list[int], quota: float | None, smt: bool, threads: int) -> None:
    # onnxruntime's own default runs a thread per physical core: a thread per CPU of a
    # cpuset that holds both threads of some cores ran two threads on one core's units
    cgroups = tmp_path / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory", cpu_max="max 100000" if quota is None else f"{int(quota * 100000)} 100000")
    measured = capacity.CapacityProbe(lambda: ["CPUExecutionProvider"], gpus=lambda: (), proc=fake_proc(tmp_path, "0::/\n"),
                                      cgroup_root=cgroups, cpu_root=fake_cpus(tmp_path / "cpu", 64, smt),
                                      affinity=lambda: set(allowed))
    assert measured.session_threads() == threads


@pytest.mark.parametrize("v1", [False, True])
def test_inactive_file_cache_under_the_limit_counts_as_available(tmp_path: pathlib.Path, v1: bool) -> None:
    # 3/4 GiB "used", of which 1/2 GiB is a model file read once: the kernel gives that
    # back before the limit is hit, so 3/4 GiB is available, not 1/4 (the kubelet's working set).
    cgroups = tmp_path / "cgroup"
    used = str(3 * GiB // 4)
    if v1:
        stat = f"cache {GiB // 2}\ninactive_file 1\ntotal_inactive_file {GiB // 2}\ntotal_active_file 0"
        files(cgroups / "memory" / "pod", memory_limit_in_bytes=str(GiB), memory_usage_in_bytes=used, memory_stat=stat)
        cgroup = "4:memory:/pod\n"
    else:
        stat = f"anon {GiB // 4}\nfile {GiB // 2}\nactive_file 0\ninactive_file {GiB // 2}"
        files(cgroups, cgroup_controllers="cpu memory")
        files(cgroups / "pod", memory_max=str(GiB), memory_current=used, memory_stat=stat)
        cgroup = "0::/pod\n"
    measured = probe(fake_proc(tmp_path, cgroup), cgroups)
    assert measured.load().memory_available_bytes == min(HOST_AVAILABLE, GiB - GiB // 4)


def test_cgroup_v2_inside_a_namespace_reads_the_mount_root(tmp_path: pathlib.Path) -> None:
    cgroups = tmp_path / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory", cpu_max="150000 100000", memory_max=str(2 * GiB), memory_current="0")
    # the path names the cgroup on the host; inside the container only the root is mounted
    measured = probe(fake_proc(tmp_path, "0::/system.slice/edge.service\n"), cgroups).capacity()
    assert measured.cpu_cores == min(CORES, 2)
    assert measured.memory_total_bytes == 2 * GiB


def test_cgroup_v2_without_limits_reports_the_host(tmp_path: pathlib.Path) -> None:
    cgroups = tmp_path / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory", cpu_max="max 100000", memory_max="max", memory_current=str(GiB))
    measured = probe(fake_proc(tmp_path, "0::/\n"), cgroups)
    assert measured.capacity().cpu_cores == CORES
    assert measured.capacity().memory_total_bytes == HOST_MEMORY
    assert measured.load().memory_available_bytes == HOST_AVAILABLE


def test_cgroup_v1_limits(tmp_path: pathlib.Path) -> None:
    cgroups = tmp_path / "cgroup"
    files(cgroups / "cpu,cpuacct" / "docker" / "abc", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
    files(cgroups / "cpu" / "docker" / "abc", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
    files(cgroups / "memory" / "docker" / "abc", memory_limit_in_bytes=str(3 * GiB), memory_usage_in_bytes=str(GiB))
    cgroup = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"
    measured = probe(fake_proc(tmp_path, cgroup), cgroups)
    assert measured.capacity().cpu_cores == 1
    assert measured.capacity().memory_total_bytes == 3 * GiB
    assert measured.load().memory_available_bytes == 2 * GiB


def test_cgroup_v1_unlimited_is_a_huge_number_not_a_limit(tmp_path: pathlib.Path) -> None:
    cgroups = tmp_path / "cgroup"
    files(cgroups / "cpu", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    files(cgroups / "memory", memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes=str(GiB))
    measured = probe(fake_proc(tmp_path, "4:memory:/\n3:cpu:/\n"), cgroups)
    assert measured.capacity().cpu_cores == CORES
    assert measured.capacity().memory_total_bytes == HOST_MEMORY
    assert measured.load().memory_available_bytes == HOST_AVAILABLE


def test_cpu_load_is_the_busy_share_between_two_reports(tmp_path: pathlib.Path) -> None:
    proc = fake_proc(tmp_path, "")
    measured = probe(proc, tmp_path / "no-cgroups")
    # user nice system idle iowait irq softirq steal: +300 busy, +100 idle, +100 iowait
    write_stat(proc, (300, 0, 200, 900, 100, 0, 0, 0))
    assert measured.load().cpu_percent == 60.0
    assert measured.load().cpu_percent == 0.0  # nothing moved since


@pytest.mark.parametrize("broken", ["garbage", "", "max", "abc 100000", "5000 0"])
def test_unreadable_limit_files_mean_no_limit(tmp_path: pathlib.Path, broken: str) -> None:
    cgroups = tmp_path / "cgroup"
    files(cgroups, cgroup_controllers="cpu memory", cpu_max=broken, memory_max=broken)
    measured = probe(fake_proc(tmp_path, "0::/\n"), cgroups).capacity()
    assert (measured.cpu_cores, measured.memory_total_bytes) == (CORES, HOST_MEMORY)


def test_this_machine() -> None:
    measured = capacity.CapacityProbe(lambda: [], gpus=lambda: ())
    cap, load = measured.capacity(), measured.load()
    assert 1 <= cap.cpu_cores <= (psutil.cpu_count(logical=True) or 1)
    assert 0 < cap.memory_total_bytes <= psutil.virtual_memory().total
    assert 0 < load.memory_available_bytes <= cap.memory_total_bytes
    assert 0.0 <= load.cpu_percent <= 100.0
    assert math.isfinite(load.cpu_percent)


class _NVMLError(Exception):
    pass


def _nvml_with_a_lost_gpu() -> types.ModuleType:
    """pynvml as a machine with two GPUs shows it when the second fell off the bus (no GPU here)."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = _NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda handle: b"NVIDIA L4"  # type: ignore[attr-defined]

    def memory(handle: int) -> types.SimpleNamespace:
        if handle == 1:
            raise _NVMLError("GPU is lost")
        return types.SimpleNamespace(total=24 * GiB, free=20 * GiB)

    nvml.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    return nvml


def test_a_gpu_nvml_cannot_query_is_left_out_and_the_others_reported(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_with_a_lost_gpu())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    probe = capacity.CapacityProbe(lambda: ["CPUExecutionProvider"])  # the default GPU probe, as the agent runs it
    assert [(g.index, g.model, g.memory_total_bytes) for g in probe.capacity().gpus] == [(0, "NVIDIA L4", 24 * GiB)]
    assert probe.load().gpu_free_bytes == ((0, 20 * GiB),)
    probe.capacity()
    lost = [r for r in caplog.records if "GPU 1" in r.getMessage()]
    assert len(lost) == 1 and "GPU is lost" in lost[0].getMessage()  # once, not with every heartbeat


def _nvml_with_two_gpus() -> types.ModuleType:
    """pynvml as a host with an L4 and an A100 shows it, whatever this process may use."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = _NVMLError  # type: ignore[attr-defined]
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda handle: ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000"][handle]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda handle: [b"NVIDIA L4", b"NVIDIA A100"][handle]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=[24 * GiB, 80 * GiB][handle], free=[20 * GiB, 70 * GiB][handle])
    return nvml


@pytest.mark.parametrize(("visible", "expected"), [
    (None, ["NVIDIA L4", "NVIDIA A100"]),
    ("1", ["NVIDIA A100"]),
    ("1,0", ["NVIDIA A100", "NVIDIA L4"]),  # in CUDA's order: the A100 is device 0 to onnxruntime
    (" 0 , 1 ", ["NVIDIA L4", "NVIDIA A100"]),
    ("GPU-bbbb2222-0000", ["NVIDIA A100"]),
    ("GPU-bbbb", ["NVIDIA A100"]),  # a unique prefix, as CUDA takes it
    ("GPU-", []),  # matches both: CUDA takes neither
    ("", []),
    ("-1", []),
    ("NoDevFiles", []),
    ("0,-1,1", ["NVIDIA L4"]),  # CUDA reads up to the first entry that is not a device
    ("0,7,1", ["NVIDIA L4"]),
])
def test_only_the_gpus_cuda_may_use_are_reported(monkeypatch: pytest.MonkeyPatch, visible: str | None,
                                                 expected: list[str]) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_with_two_gpus())
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    probe = capacity.CapacityProbe(lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    gpus = probe.capacity().gpus
    assert [g.model for g in gpus] == expected
    assert [g.index for g in gpus] == list(range(len(expected)))  # numbered as CUDA numbers them
    assert [index for index, _ in probe.load().gpu_free_bytes] == list(range(len(expected)))

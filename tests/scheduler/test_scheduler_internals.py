"""The planner's fast paths agree with the plain numpy they replace."""

from __future__ import annotations

import gc
import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduler import gcpause
from orchestrator.scheduler.fleet import Fleet
from orchestrator.scheduler.planner import _smallest

small_ints = st.lists(st.integers(0, 40), max_size=60)


@settings(max_examples=200, deadline=None)
@given(st.lists(small_ints, min_size=1, max_size=4))
def test_union_matches_numpy(parts: list[list[int]]) -> None:
    arrays = [np.array(p, dtype=np.int64) for p in parts]
    expected = np.unique(np.concatenate(arrays))
    assert Fleet.union(*arrays).tolist() == expected.tolist()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([-3.0, -1.0, -1e-10, 0.0, 2.5, np.inf]), min_size=1, max_size=80), st.integers(1, 20))
def test_smallest_is_a_stable_argsort_prefix(values: list[float], k: int) -> None:
    array = np.array(values)
    assert _smallest(array, k) == np.argsort(array, kind="stable")[:k].tolist()


def test_gc_pause_nests_and_restores() -> None:
    assert gc.isenabled()
    with gcpause.paused():
        assert not gc.isenabled()
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()


def test_gc_pause_keeps_a_collector_that_was_off_off() -> None:
    gc.disable()
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_gc_pause_across_threads_resumes_after_the_last() -> None:
    inside = threading.Barrier(3)
    leave = threading.Event()

    def worker() -> None:
        with gcpause.paused():
            inside.wait(timeout=10)
            leave.wait(timeout=10)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(timeout=10)
    assert not gc.isenabled()
    leave.set()
    for t in threads:
        t.join(timeout=10)
    assert gc.isenabled()

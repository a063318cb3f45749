"""The planner's fast paths agree with the plain numpy they replace."""

from __future__ import annotations

import gc
import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduler import Variant, gcpause, geo
from orchestrator.scheduler.fleet import Fleet
from orchestrator.scheduler.outcome import _copies
from orchestrator.scheduler.relocation import _smallest
from scheduler_builders import CITIES, deployment, site

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


def _fleet(n: int = 60) -> Fleet:
    cities = sorted(CITIES)
    rng = np.random.default_rng(7)
    return Fleet(
        [
            site(f"s{i}", city=cities[i % len(cities)], tier="edge" if i % 3 else "datacenter", cpu=float(rng.choice([1, 4, 16])))
            for i in range(n)
        ]
    )


def test_nearest_for_many_points_at_once_is_the_same_as_one_at_a_time() -> None:
    points = [(48.9, 2.3), (40.0, -3.0), (51.5, 0.0), (38.0, -77.0)]
    one_by_one = Fleet(_fleet().sites)
    together = Fleet(_fleet().sites)
    together.prefetch_nearest(points + points[:1])
    for lat, lon in points:
        (order_a, rtt_a), (order_b, rtt_b) = one_by_one.nearest(lat, lon), together.nearest(lat, lon)
        assert order_a.tolist() == order_b.tolist()
        assert rtt_a.tolist() == rtt_b.tolist()  # bit for bit


def test_eligible_masks_with_equal_contents_are_one_array() -> None:
    fleet = _fleet()
    tiny = Variant("tiny", "onnx", cpu=0.5, memory_mib=256)
    small = Variant("small", "onnx", cpu=1, memory_mib=512)
    big = Variant("big", "onnx", cpu=8, memory_mib=512)
    a = fleet.eligible_masks(deployment("a", variants=(tiny,)))["tiny"]
    b = fleet.eligible_masks(deployment("b", variants=(small,)))["small"]
    c = fleet.eligible_masks(deployment("c", variants=(big,)))["big"]
    assert a is b  # every site holds either: one shared, read-only array
    assert not a.flags.writeable
    assert c is not a and c.sum() < a.sum()
    assert fleet.sites_of(a) is fleet.sites_of(b)


def test_spread_domains_per_shared_mask() -> None:
    fleet = _fleet()
    mask = fleet.eligible_masks(deployment(residency={"FR", "DE"}))["small"]
    regions = np.flatnonzero(np.bincount(fleet.region[mask], minlength=len(fleet.region_names)))
    assert fleet.domains_of(mask, "region").tolist() == regions.tolist()
    assert fleet.domains_of(mask, "region") is fleet.domains_of(mask, "region")
    assert fleet.domains_of(mask, "site").tolist() == np.flatnonzero(mask).tolist()
    writable = mask.copy()  # a caller's own mask is never cached
    assert fleet.domains_of(writable, "region").tolist() == regions.tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1.5, 1.5, allow_nan=False), min_size=1, max_size=30))
def test_rtt_from_dot_matches_the_clipped_formula(dots: list[float]) -> None:
    array = np.array(dots)
    expected = np.arccos(np.clip(array, -1.0, 1.0)) * (2.0 * geo.EARTH_RADIUS_KM / geo.FIBRE_KM_PER_MS) + geo.FIXED_RTT_MS
    assert geo.rtt_from_dot(array).tolist() == expected.tolist()
    assert array.tolist() == dots  # the argument is left alone


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 12), st.integers(0, 15))
def test_copies_are_runs_of_the_per_copy_keys(n: int, running: int) -> None:
    per_copy = [(copy < running, copy == 0) for copy in range(n)]
    expanded = [(kept, first) for kept, first, count in _copies(n, running) for _ in range(count)]
    assert expanded == per_copy

"""What the state store keeps through concurrency and crashes: sequences that only grow,
writers in threads that lose nothing, and a consistent store after kill -9 in the middle of
writing. A test that takes the ``store``, ``reopen`` or ``location`` fixture (conftest.py)
runs against both backends, an SQLite file and a real PostgreSQL server; they must behave
identically."""

from __future__ import annotations

import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable


from orchestrator.store import StateStore as Store
from orchestrator.store import open_store
from orchestrator.store.sqlite import Conflict, ObjectWrite

from .support import WHO, write


def test_sequences_only_grow_and_survive_reopen(reopen: Callable[..., Store]) -> None:
    s = reopen()
    assert [s.next_sequence("a"), s.next_sequence("a"), s.next_sequence("b")] == [1, 2, 1]
    assert s.next_sequences("a", 3) == range(3, 6)  # a block, taken at once
    assert s.next_sequence("a") == 6
    s.close()
    assert reopen().next_sequence("a") == 7
    assert reopen().next_sequences("c", 2) == range(1, 3)


def test_a_daily_limit_is_counted_in_the_store_and_survives_reopen(reopen: Callable[..., Store]) -> None:
    s = reopen()
    assert [s.take_daily("k", 10, 2, 5), s.take_daily("k", 10, 2, 5), s.take_daily("k", 10, 2, 5)] == [2, 2, 1]
    assert s.take_daily("other", 10, 3, 3) == 3  # a key of its own
    s.close()
    s = reopen()
    assert s.take_daily("k", 10, 1, 5) == 0  # used up that day, whoever asks
    assert s.take_daily("k", 10, 2, 7) == 2  # a limit raised that day grants what it adds
    assert s.take_daily("k", 11, 7, 5) == 5  # a new day
    assert s.take_daily("k", 10, 1, 5) == 0  # an earlier day (a clock behind) counts in the later one: used up
    assert s.take_daily("k", 12, 1, 5) == 1
    # what was taken, as GET /v1/cascades reads it: the day's, a later day's (a clock behind), none of an earlier one
    assert s.taken_daily(["k", "other", "never"], 12) == {"k": 1, "other": 0, "never": 0}
    assert s.taken_daily(["k"], 11) == {"k": 1} and s.taken_daily([], 12) == {}


def test_a_sequence_block_taken_above_values_handed_out_moves_the_counter_past_them(reopen: Callable[..., Store]) -> None:
    """A restored store's counter is below values already handed out: the caller that knows
    them takes its block above them, and the counter stays past them."""
    s = reopen()
    assert s.next_sequences("a", 2) == range(1, 3)
    assert s.next_sequences("a", 2, above=20) == range(21, 23)
    assert s.next_sequences("a", 1, above=5) == range(23, 24)  # a counter already past: as without
    assert s.next_sequences("new", 2, above=4) == range(5, 7)
    s.close()
    assert reopen().next_sequence("a") == 24


def test_concurrent_writers_in_threads_lose_nothing(store: Store) -> None:
    """Many threads doing read-modify-write with expected versions: every increment lands once."""
    store.apply([write("counter", {"n": 0})])
    done = {"ok": 0, "conflicts": 0}
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            for _attempt in range(1000):
                obj = store.get("Site", "counter")
                assert obj is not None
                try:
                    store.apply([write("counter", {"n": obj.spec["n"] + 1}, expected=obj.resource_version)])
                except Conflict:
                    with lock:
                        done["conflicts"] += 1
                    continue
                with lock:
                    done["ok"] += 1
                break

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert done["ok"] == 100
    obj = store.get("Site", "counter")
    assert obj is not None and obj.spec["n"] == 100 and obj.generation == 101


# --- crash consistency -------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from orchestrator.store import open_store
    from orchestrator.store.sqlite import Event, ObjectWrite, PlacementRow

    store = open_store(sys.argv[1])
    current = store.get("Site", "s0")
    i = current.spec["round"] if current else 0  # resume after the previous kill
    if current and {p.replicas for p in store.placements()} != {i}:  # killed between the two writes of a round
        store.replace_placements([PlacementRow("d", f"s{k}", "v", i) for k in range(3)],
                                 [Event("writer", "place", "ModelDeployment", "d", f"round {i}")])
    print("ready", flush=True)
    while True:
        i += 1
        blob = "x" * (i % 7 * 1000)  # uneven sizes so pages split at different points
        writes = [ObjectWrite("Site", f"s{k}", {"round": str(i)}, {"round": i, "blob": blob, "k": k}) for k in range(3)]
        store.apply(writes, Event("writer", "apply", "", "", f"round {i}"))
        store.replace_placements([PlacementRow("d", f"s{k}", "v", i) for k in range(3)],
                                 [Event("writer", "place", "ModelDeployment", "d", f"round {i}")])
        print(i, flush=True)
    """
)


def run_writer_and_kill(path: str, after_rounds: int) -> int:
    """Start the writer, let it commit ``after_rounds`` more rounds, SIGKILL it while it writes."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[2])
    last = 0
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        seen = 0
        while seen < after_rounds and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last, seen = int(line), seen + 1
        assert seen >= after_rounds, f"the writer stopped after {seen} rounds"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return last


def check_consistent(path: str, committed: int) -> int:
    """The invariants every prefix of the writer's history satisfies; returns the last round."""
    if not path.startswith("postgresql://"):
        db = sqlite3.connect(path)  # the raw file first: SQLite itself must find it sound
        try:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
    store = open_store(path)
    try:
        objs = store.list("Site")
        assert [o.name for o in objs] == ["s0", "s1", "s2"]
        rounds_seen = {o.spec["round"] for o in objs}
        assert len(rounds_seen) == 1, f"a transaction was torn: {rounds_seen}"  # all three come from one apply
        last = rounds_seen.pop()
        assert last >= committed  # every round reported as committed is there
        for o in objs:
            assert o.spec == {"round": last, "blob": "x" * (last % 7 * 1000), "k": int(o.name[1])}  # complete, not truncated
            assert dict(o.labels) == {"round": str(last)}
            assert o.generation == last  # one generation per round, none lost
        # counters agree with the objects and with the log
        assert store.resource_version() == max(o.resource_version for o in objs) == 3 * last
        events = store.events(limit=100_000)
        assert len([e for e in events if e.action in ("created", "configured")]) == 3 * last
        placed = [e for e in events if e.action == "place"]
        placements = store.placements()
        placed_rounds = {p.replicas for p in placements}
        assert len(placements) == 3 and len(placed_rounds) == 1
        assert placed_rounds.pop() == len(placed) and len(placed) in (last - 1, last)
        assert [e.id for e in events] == sorted({e.id for e in events})
        return last
    finally:
        store.close()


def test_kill_9_mid_write_leaves_the_store_consistent(location: str) -> None:
    path = location
    last = 0
    for after_rounds in (60, 1, 35):  # a long run, a kill right after start, another run
        committed = run_writer_and_kill(path, after_rounds)
        last = check_consistent(path, committed)
        assert last >= committed > 0
    store = open_store(path)  # and the store takes writes again
    try:
        store.apply([ObjectWrite("Site", "s0", {}, {"round": 0})], WHO)
        assert store.resource_version() == 3 * last + 1
    finally:
        store.close()


# --- the leader lease and fencing -------------------------------------------------------------

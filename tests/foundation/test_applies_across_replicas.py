"""Applies and deletes made through two control-plane replicas sharing one PostgreSQL store:
each is judged against what is stored (a deployment's Model exists, a Model being deleted is
no deployment's), and no write of the other replica lands between that judgement and its
write, so the store never holds what neither replica would have accepted.

Replica B is a process of its own, as it is in production: a lock inside one process cannot
keep it out. The test holds the store's write lock while both replicas reach it, so both are
under way at once, then lets them go."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psycopg

from orchestrator import catalog
from orchestrator.manifests import loader
from orchestrator.store import open_store
from orchestrator.store.postgres import WRITE_LOCK
from orchestrator.testing.postgres import PostgresServer

from . import support
from .support import doc

#: replica B: once told (a line on stdin), deletes Model ``argv[2]`` through the same code as
#: the API's DELETE, on its own store (opened first: opening writes the schema, under the lock)
DELETE_ON_REPLICA_B = textwrap.dedent("""
    import json, sys
    from orchestrator import catalog
    from orchestrator.store import open_store
    store = open_store(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        catalog.delete_object(store, "Model", sys.argv[2], actor="replica-b")
        print(json.dumps("deleted"))
    except catalog.InUse as exc:
        print(json.dumps(f"in use: {exc}"))
    finally:
        store.close()
""")


def waiting_for_the_write_lock(db: psycopg.Connection[Any]) -> int:
    """How many sessions of this database wait for an advisory lock (the store's write lock)."""
    row = db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                     " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()
    return int(row[0]) if row else 0


def wait_until_waiting(db: psycopg.Connection[Any], count: int, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while waiting_for_the_write_lock(db) < count:
        assert time.monotonic() < deadline, f"fewer than {count} writers reached the store's write lock within {within_s}s"
        time.sleep(0.05)  # another process's wait: nothing here to be told of it


def test_a_model_deleted_on_one_replica_while_another_applies_a_deployment_of_it_leaves_no_orphan(
        postgres: PostgresServer) -> None:
    url = postgres.create_database()
    store = open_store(url)
    holder = psycopg.connect(url, autocommit=True)
    try:
        catalog.apply_documents(store, loader.load_text(doc("Model", "m", support.model_spec())), actor="test")
        replica_b = subprocess.Popen([sys.executable, "-c", DELETE_ON_REPLICA_B, url, "m"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=support.REPO,
                                     env=support.clean_env())
        assert replica_b.stdout is not None and replica_b.stdin is not None
        assert replica_b.stdout.readline().strip() == "ready", replica_b.communicate(timeout=60)
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))  # every writer waits for this

        applied: dict[str, Any] = {}

        def apply_on_replica_a() -> None:
            try:
                applied["result"] = catalog.apply_documents(
                    store, loader.load_text(doc("ModelDeployment", "d", support.deployment_spec("m"))), actor="replica-a")
            except Exception as exc:  # judged refused: that is an answer too
                applied["error"] = exc

        replica_a = threading.Thread(target=apply_on_replica_a)
        replica_a.start()
        wait_until_waiting(holder, 1)
        replica_b.stdin.write("go\n")
        replica_b.stdin.flush()
        try:
            wait_until_waiting(holder, 2)
        finally:
            holder.execute("ROLLBACK")  # both go on
        out, err = replica_b.communicate(timeout=60)
        replica_a.join(60)
        assert replica_b.returncode == 0, err
        deleted = json.loads(out) == "deleted"

        model, deployment = store.get("Model", "m"), store.get("ModelDeployment", "d")
        assert not (deployment is not None and model is None), \
            f"replica A applied a deployment of Model m ({applied}) and replica B deleted m ({out.strip()}): the deployment names nothing"
        assert ("result" in applied) != deleted, f"exactly one of them goes through: A {applied}, B {out.strip()}"
    finally:
        holder.close()
        store.close()

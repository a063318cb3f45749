"""A local Ray start that fails before its head runs leaves nothing behind."""

from __future__ import annotations

import pathlib
import tempfile

import pytest

from orchestrator.adapters import local_ray


def test_a_start_that_cannot_write_its_record_leaves_no_folder_or_record(tmp_path: pathlib.Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The record (how a restarted owner finds a cluster it left running) is written before
    the head starts; when it cannot be (a full disk; here its folder is a file), the start
    fails and its temporary folder goes too, where every retry of the reconcile pass left
    one behind."""
    made: list[pathlib.Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def noted(*args: object, **kwargs: object) -> str:  # the real call; the test notes which folder it made
        made.append(pathlib.Path(real_mkdtemp(*args, **kwargs)))  # type: ignore[arg-type]
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", noted)
    blocker = tmp_path / "state"
    blocker.write_text("a file where the record's folder should be")
    cluster = local_ray.LocalRayCluster(record_file=blocker / "local-ray.json")
    for _ in range(2):  # as the reconcile loop retries
        with pytest.raises(OSError):
            cluster.start()
    assert len(made) == 2 and not any(p.exists() for p in made), made
    assert not cluster.running and cluster.leftover_pids() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]

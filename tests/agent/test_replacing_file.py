"""The agent's memory of a replacement under way (replaceWhenFull), ``replacing.json`` in its
data dir: read back whole after a write, and a file it cannot take (damaged, of another site,
of another format, a newer agent's) read as no replacement, without stopping the agent."""

from __future__ import annotations

import json
import pathlib

import pytest

from edge_agent import assignments, state

SITE = "edge-a"
OLD = assignments.Assignment("intent", "intent-fr", "distilled", "http://cp/v1/artifacts/" + "a" * 64, "a" * 64,
                             assignments.DesiredState.SERVING, replace_when_full=True)
KEPT = {"intent": assignments.Replacement("b" * 64, OLD)}


def test_a_replacement_saved_is_read_back_and_an_empty_memory_removes_the_file(tmp_path: pathlib.Path) -> None:
    store = state.StateStore(tmp_path)
    assert store.load_replacing(SITE) == {}
    store.save_replacing(SITE, KEPT)
    assert state.StateStore(tmp_path).load_replacing(SITE) == KEPT
    assert state.StateStore(tmp_path).load_replacing("edge-b") == {}  # another site's data dir
    store.save_replacing(SITE, {})
    assert not (tmp_path / "replacing.json").exists()


@pytest.mark.parametrize(("text", "set_aside"), [
    ("{not json", True),
    ('{"format": 1, "site": "edge-a"}', True),  # no models
    ('{"format": 1, "site": "edge-a", "models": {"intent": {"sha256": "b"}}}', True),  # no version replaced
    ('{"format": 1, "site": "edge-a", "models": ["intent"]}', True),
    ('{"site": "edge-a", "models": {}}', True),  # no format: not a state file of the agent's
    ('[1, 2]', True),
    ('{"format": 2, "site": "edge-a", "models": {}}', False),  # a newer agent's: left as it is
])
def test_a_file_that_does_not_read_is_no_replacement(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, text: str,
                                                     set_aside: bool) -> None:
    (tmp_path / "replacing.json").write_text(text)
    assert state.StateStore(tmp_path).load_replacing(SITE) == {}
    assert "replacing.json" in caplog.text
    assert (tmp_path / "replacing.json.unreadable").exists() is set_aside
    assert (tmp_path / "replacing.json").exists() is not set_aside


def test_the_file_holds_the_version_replaced_whole(tmp_path: pathlib.Path) -> None:
    state.StateStore(tmp_path).save_replacing(SITE, KEPT)
    doc = json.loads((tmp_path / "replacing.json").read_text())
    assert doc == {"format": 1, "site": SITE, "models": {"intent": {"sha256": "b" * 64, "replaced": OLD.to_json()}}}

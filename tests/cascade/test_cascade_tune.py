"""``cascade tune``'s sweep: a pure function of the replayed answers."""

from __future__ import annotations

import pytest

from orchestrator.cli.cascade import Replayed, sweep


def sample(confidence: float, first: int, last: int, label: int | None) -> Replayed:
    return Replayed(confidence, (first,), (last,), None if label is None else (label,), 2.0, 10.0, 0.1, 5.0)


SAMPLES = [sample(0.95, 1, 1, 1), sample(0.9, 2, 2, 2), sample(0.6, 0, 3, 3), sample(0.5, 1, 0, 1)]


def test_baselines_and_thresholds() -> None:
    rows = {r.name: r for r in sweep(SAMPLES, [0.55, 0.7, 1.0])}
    first, last = rows["first stage only"], rows["last stage only"]
    assert (first.firstStageShare, first.accuracy, first.agreement, first.meanMs, first.energyPerRequestJ) == (1.0, 0.75, 0.5, 2.0, 0.1)
    assert (last.firstStageShare, last.accuracy, last.agreement, last.meanMs, last.energyPerRequestJ) == (0.0, 0.75, 1.0, 10.0, 5.0)
    t = rows["cascade below 0.7"]  # the two unsure samples escalate and pay for both stages
    assert (t.firstStageShare, t.accuracy, t.agreement) == (0.5, 0.75, 1.0)
    assert t.meanMs == pytest.approx(2.0 + 0.5 * 10.0) and t.energyPerRequestJ == pytest.approx(0.1 + 0.5 * 5.0)
    low = rows["cascade below 0.55"]  # the 0.6 sample stays (wrong), the 0.5 one escalates to a wrong teacher
    assert (low.firstStageShare, low.accuracy, low.agreement) == (0.75, 0.5, 0.75)
    assert rows["cascade below 1"].firstStageShare == 0.0


def test_without_labels_accuracy_is_none() -> None:
    rows = sweep([sample(0.9, 1, 1, None)], [0.5])
    assert all(r.accuracy is None for r in rows) and rows[2].agreement == 1.0

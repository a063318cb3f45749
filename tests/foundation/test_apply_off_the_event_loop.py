"""An apply's work runs off the event loop the gateway, the agents' streams and every other
route share, and applies and deletes still check and write one at a time.

Each test holds one step of an apply at a gate (a wrapper that waits for the test to open
it) on a real in-process control plane, and looks at what else is answered meanwhile:
nothing is timed, so a loaded machine changes nothing but how long the tests take.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from orchestrator import catalog, views
from orchestrator.artifacts import signature
from orchestrator.manifests import loader

from . import support
from .support import doc, join

WAIT_S = 15.0  # how long a probe waits for its answer at most: only reached when the test fails


class Gate:
    """Wraps ``fn``: each call says it has entered, then waits for :meth:`open`."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.entered = threading.Event()
        self._open = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self._open.wait(WAIT_S * 4)  # longer than any probe waits: one held up behind the gate fails
        return self.fn(*args, **kwargs)

    def open(self) -> None:
        self._open.set()


class InBackground:
    """One request sent from a thread of its own; :attr:`response` once it is answered."""

    def __init__(self, url: str, method: str, path: str, **kwargs: Any) -> None:
        self.response: httpx.Response | None = None

        def send() -> None:
            with httpx.Client(base_url=url, timeout=WAIT_S * 5) as client:
                self.response = client.request(method, path, **kwargs)

        self.thread = threading.Thread(target=send, daemon=True)
        self.thread.start()

    def result(self) -> httpx.Response:
        self.thread.join(WAIT_S * 5)
        assert self.response is not None, "no answer"
        return self.response


@pytest.fixture
def api(control_plane: support.ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=control_plane.url, timeout=WAIT_S) as client:
        yield client


@pytest.mark.parametrize(("module", "name"), [(loader, "read_text"), (catalog, "apply_reading"), (views, "preview")],
                         ids=["reading", "judging-and-writing", "dry-run-schedule"])
def test_the_api_answers_while_an_apply_is_at_work(api: httpx.Client, control_plane: support.ServerThread,
                                                   monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
    gate = Gate(getattr(module, name))
    monkeypatch.setattr(module, name, gate)
    applying = InBackground(control_plane.url, "POST", "/v1/apply", params={"dryRun": "true"},
                            content=doc("Site", "held", support.edge_site_spec()))
    try:
        assert gate.entered.wait(WAIT_S), "the apply never reached the gate"
        # on the loop, these would wait for the gate, which waits for them
        assert api.get("/healthz").status_code == 200
        assert api.get("/v1/sites").status_code == 200
    finally:
        gate.open()
    r = applying.result()
    assert r.status_code == 200 and r.json()["dryRun"] is True, r.text


def test_a_delete_waits_for_an_apply_between_its_check_and_its_write(api: httpx.Client, control_plane: support.ServerThread,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting Model m while a deployment of m, judged already, is about to be written: the
    delete comes after the write, so it finds m in use (409), never a deployment left naming
    a Model deleted in between."""
    assert api.post("/v1/apply", content=doc("Model", "held-model", support.model_spec())).status_code == 200
    gate = Gate(catalog.writes_for)  # between the check and the write
    monkeypatch.setattr(catalog, "writes_for", gate)
    applying = InBackground(control_plane.url, "POST", "/v1/apply",
                            content=doc("ModelDeployment", "held-deployment", support.deployment_spec("held-model")))
    try:
        assert gate.entered.wait(WAIT_S), "the apply never reached the gate"
        deleting = InBackground(control_plane.url, "DELETE", "/v1/models/held-model")
        deleting.thread.join(1.0)  # room for a delete that does not wait to get in (and then it would be answered)
        assert api.get("/healthz").status_code == 200  # the delete waits off the loop
    finally:
        gate.open()
    assert applying.result().status_code == 200
    refused = deleting.result()
    assert refused.status_code == 409 and "held-deployment" in refused.json()["error"], refused.text
    cleanup = join(doc("ModelDeployment", "held-deployment", support.deployment_spec("held-model")),
                   doc("Model", "held-model", support.model_spec()))
    assert api.post("/v1/delete", content=cleanup).status_code == 200


def test_the_api_answers_while_a_describe_reads_a_models_artifact(api: httpx.Client, control_plane: support.ServerThread,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``describe model`` hashes the artifact and parses its graph, on every call when the
    Model's sha256 is not the file's (when an operator is most likely to run it): gigabytes read."""
    spec = {"variants": [{"name": "v", "runtime": "onnx", "artifact": {"uri": "artifacts/intent-distilled.onnx", "sha256": "1" * 64}}]}
    assert api.post("/v1/apply", content=doc("Model", "described", spec)).status_code == 200
    gate = Gate(signature.describe_variants)
    monkeypatch.setattr(signature, "describe_variants", gate)
    describing = InBackground(control_plane.url, "GET", "/v1/models/described", params={"describe": "true"})
    try:
        assert gate.entered.wait(WAIT_S), "the describe never reached the gate"
        assert api.get("/healthz").status_code == 200
    finally:
        gate.open()
    r = describing.result()
    assert r.status_code == 200, r.text
    assert "has sha256" in r.json()["variants"][0]["error"], r.text
    assert api.post("/v1/delete", content=doc("Model", "described", spec)).status_code == 200

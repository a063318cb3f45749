"""``edgeplane infer --data`` sends each input in the datatype the model takes.

JSON does not say whether ``[[0, 1, 0]]`` is FP32, INT32 or BOOL, and the agent takes a
tensor only in its input's own datatype: the CLI reads each input's datatype from the
model's v2 metadata, through the control plane acting as a gateway, in front of a real
agent serving models of FP32, FP16, INT32, UINT8 and BOOL inputs. A value the datatype
cannot hold is refused before anything is sent; metadata that cannot be read leaves the
datatype to the JSON, with a note; a v2 body goes out as written.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio


from orchestrator.cli import main as cli
from orchestrator.testing import loopback

from . import typed_fleet

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    async with typed_fleet.serving(tmp_path_factory.mktemp("cli-datatypes"), "intent") as url:
        yield url


async def infer(url: str, model: str, data: Any, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli.main, ["infer", model, "--server", url, "--data", json.dumps(data), "-o", "json"])
    out, err = capsys.readouterr()
    return code, out, err


async def test_whole_numbers_go_to_each_input_in_its_own_datatype(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Whole numbers were sent as INT64 whatever the model took, and refused by each input of another datatype."""
    data = {"f32": [[0, 1, 0]], "f16": [[0.5, 1, 2]], "i32": [[1, 2, -3]], "u8": [[0, 200, 255]], "flag": [[1, 0, 1]]}
    code, out, err = await infer(server, "typed", data, capsys)
    assert code == 0 and err == "", err
    outputs = {o["name"]: (o["datatype"], o["data"]) for o in json.loads(out)["outputs"]}
    assert outputs == {"f32_out": ("FP32", [0.0, 1.0, 0.0]), "f16_out": ("FP16", [0.5, 1.0, 2.0]), "i32_out": ("INT32", [1, 2, -3]),
                       "u8_out": ("UINT8", [0, 200, 255]), "flag_out": ("BOOL", [True, False, True])}, outputs
    # a bare array of whole numbers for a model of one FP32 input
    code, out, err = await infer(server, "intent", [[0, 1, 0]], capsys)
    assert code == 0 and err == "", err
    assert [o["datatype"] for o in json.loads(out)["outputs"]] == ["FP32"]


@pytest.mark.parametrize(("given", "error"), [
    ({"i32": [[1, 0.5, 2]]}, "error: --data: input 'i32': INT32 data must be whole numbers, got 0.5"),
    ({"u8": [[1, 256, 2]]}, "error: --data: input 'u8': data does not fit UINT8: values span 1..256"),
    ({"u8": [[-1, 0, 2]]}, "error: --data: input 'u8': data does not fit UINT8: values span -1..2"),
    ({"flag": [[1, 2, 0]]}, "error: --data: input 'flag': data does not fit BOOL: values span 0..2 (BOOL data are true and false, or 1 and 0)"),
    ({"f16": [[70000, 0, 0]]}, "error: --data: input 'f16': data does not fit FP16: 70000.0 is past ±65504.0, the most it holds"),
    ({"f32": [[True, False, True]]}, "error: --data: input 'f32': FP32 data must be numbers, not JSON booleans (true/false); "
                                     "send them as 1 and 0, or give the tensor datatype BOOL"),
    ({"f32": [["a", "b", "c"]]}, "error: --data: input 'f32': FP32 data must be numbers, got str"),
])
async def test_a_value_the_datatype_cannot_hold_is_refused_in_one_line(server: str, given: dict[str, Any], error: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = {"f32": [[0, 1, 0]], "f16": [[0, 1, 0]], "i32": [[0, 1, 0]], "u8": [[0, 1, 0]], "flag": [[0, 1, 0]], **given}
    code, out, err = await infer(server, "typed", data, capsys)  # -o json: the refusal is one object on stderr
    assert (code, out, json.loads(err)) == (1, "", {"error": error.removeprefix("error: "), "reason": "Invalid"})


class _Recorder(loopback.CannedHandler):
    """A gateway whose model metadata cannot be read (``metadata`` status), answering every
    inference with one output; each request is kept (method, path, body)."""

    seen: list[tuple[str, str, bytes]]
    metadata: int

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.seen.append(("GET", self.path, b""))
        self.reply(self.metadata, b"<html>Bad gateway</html>" if self.metadata >= 500 else b'{"name": "m", "inputs": "?"}',
                   {"content-type": "text/html" if self.metadata >= 500 else "application/json"})

    def do_POST(self) -> None:  # noqa: N802
        self.seen.append(("POST", self.path, self.rfile.read(int(self.headers["content-length"]))))
        self.reply(200, json.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode())


@pytest.fixture(params=[502, 200])
def recorder(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    seen: list[tuple[str, str, bytes]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen, "metadata": request.param})
    with loopback.http_server(handler) as url:
        yield url, seen


async def test_metadata_that_cannot_be_read_leaves_the_datatype_to_the_json_with_a_note(
        recorder: tuple[str, list[tuple[str, str, bytes]]], capsys: pytest.CaptureFixture[str]) -> None:
    url, seen = recorder
    code, out, err = await infer(url, "m", {"x": [[0, 1, 0]], "y": [[0.5]]}, capsys)
    assert code == 0, err
    assert len(err.splitlines()) == 1 and err.startswith("warning: cannot read the datatypes model 'm' takes ("), err
    assert "Traceback" not in err
    assert [(method, path) for method, path, _ in seen] == [("GET", "/v2/models/m"), ("POST", "/v2/models/m/infer")]
    sent = json.loads(seen[1][2])
    assert [(t["name"], t["datatype"]) for t in sent["inputs"]] == [("x", "INT64"), ("y", "FP32")]


async def test_a_v2_body_goes_out_as_written(recorder: tuple[str, list[tuple[str, str, bytes]]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    url, seen = recorder
    body = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [0, 1, 0]}], "parameters": {"p": 1}}
    code, out, err = await infer(url, "m", body, capsys)
    assert code == 0 and err == "", err
    assert [(method, path) for method, path, _ in seen] == [("POST", "/v2/models/m/infer")]
    assert json.loads(seen[0][2]) == body

"""Drive an agent's v2 gRPC service with tritonclient's gRPC client, in a process of its own.

tritonclient's generated protos and edgeplane's both define the ``inference`` package, and
one Python process cannot load the same message names twice (protobuf's descriptor pool
refuses duplicates), so the test suite runs this as a child process:

    python triton_grpc_probe.py HOST:PORT WORKDIR

It reads ``WORKDIR/x.npy`` (the MLP's input) and writes ``WORKDIR/out.npz`` (the outputs)
and ``WORKDIR/report.json`` (health, metadata and the errors the client raised)."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TYPED_INPUTS = {
    "ids": ("INT64", np.array([[1, -2, 2**40], [0, 7, -(2**50)]], dtype=np.int64)),
    "half": ("FP16", np.array([[0.5, -1.25], [3.0, 127.9375]], dtype=np.float16)),
    "text": ("BYTES", np.array(["héllo".encode(), b"two words"], dtype=np.object_)),
}


def refusal(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray) -> dict[str, Any]:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    try:
        client.infer(model, [inp])
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message(), "ready_after": client.is_model_ready("mlp")}
    return {"status": None, "message": "accepted", "ready_after": client.is_model_ready("mlp")}


def main(url: str, workdir: pathlib.Path) -> None:
    x = np.load(workdir / "x.npy")
    client = grpcclient.InferenceServerClient(url=url)
    try:
        report: dict[str, Any] = {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "mlp_ready": client.is_model_ready("mlp"),
            "unknown_ready": client.is_model_ready("no-such-model"),
            "metadata": client.get_model_metadata("mlp", as_json=True),
            "typed_metadata": client.get_model_metadata("typed", as_json=True),
        }
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("mlp", [inp], outputs=[grpcclient.InferRequestedOutput("output")], request_id="g-1")
        report["id"] = result.get_response().id
        outputs = {"output": result.as_numpy("output")}

        typed_inputs = []
        for name, (datatype, arr) in TYPED_INPUTS.items():
            typed_inputs.append(grpcclient.InferInput(name, list(arr.shape), datatype))
            typed_inputs[-1].set_data_from_numpy(arr)
        typed = client.infer("typed", typed_inputs, compression_algorithm="gzip")
        for name in ("ids_twice", "half_squared"):
            outputs[name] = typed.as_numpy(name)
        report["text_out"] = [bytes(v).decode() for v in typed.as_numpy("text_out")]

        report["unknown_model"] = refusal(client, "no-such-model", x)
        report["wrong_shape"] = refusal(client, "mlp", np.ones((2, 3), dtype=np.float32))
    finally:
        client.close()
    np.savez(workdir / "out.npz", **outputs)
    (workdir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], pathlib.Path(sys.argv[2]))

"""Model runtimes. ``onnx`` runs ONNX files with onnxruntime; the rest of the agent only
sees :class:`edge_agent.runtime.onnx.OnnxModel` and plain NumPy arrays. ``installed``
says which runtimes this machine can run, which the agent reports to the control plane."""

import importlib.util
import os
import pathlib

# onnxruntime's Linux builds (1.29 on) start a telemetry client when it is first imported,
# which reports sessions, models and their hashes to Microsoft unless this is set before;
# nothing edgeplane runs phones home (docs/security.md). An operator's own value is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

#: The runtimes an agent may run, by the names of a Model variant's ``runtime``.
ONNX = "onnx"
ONNX_GENAI = "onnx-genai"
KNOWN = (ONNX, ONNX_GENAI)
#: The C library of onnxruntime-genai that ``runtime.oga`` calls, in its package's folder.
GENAI_LIBRARIES = ("libonnxruntime-genai.so*", "libonnxruntime-genai*.dylib")


def installed() -> tuple[str, ...]:
    """The runtimes this machine runs: ``onnx`` (onnxruntime, without which the agent does
    not start) and ``onnx-genai`` where onnxruntime-genai is installed with its C library.
    Looked up, not imported: the import maps some 8 MB that an agent serving no generative
    model would hold for good."""
    found = [ONNX]
    spec = importlib.util.find_spec("onnxruntime_genai")
    folders = [pathlib.Path(f) for f in (spec.submodule_search_locations or ())] if spec is not None else []
    if any(next(folder.glob(pattern), None) is not None for folder in folders for pattern in GENAI_LIBRARIES):
        found.append(ONNX_GENAI)
    return tuple(found)

"""Model runtimes. ``onnx`` runs ONNX files with onnxruntime; the rest of the agent only
sees :class:`edge_agent.runtime.onnx.OnnxModel` and plain NumPy arrays."""

import os

# onnxruntime's Linux builds (1.29 on) start a telemetry client when it is first imported,
# which reports sessions, models and their hashes to Microsoft unless this is set before;
# nothing edgeplane runs phones home (docs/security.md). An operator's own value is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

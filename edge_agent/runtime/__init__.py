"""Model runtimes. ``onnx`` runs ONNX files with onnxruntime; the rest of the agent only
sees :class:`edge_agent.runtime.onnx.OnnxModel` and plain NumPy arrays."""

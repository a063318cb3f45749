"""The Open Inference Protocol's gRPC form (package ``inference``), one sub-package per version."""

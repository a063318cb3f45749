"""Code that runs inside Ray Serve replicas on data-centre sites.

Imported by Ray workers through the import path the data-centre actuator puts in the Serve
config, so it depends on Ray Serve, onnxruntime and the wire codec only - never on the rest
of the control plane.
"""

import os

# onnxruntime's Linux builds (1.29 on) start a telemetry client when it is first imported,
# which reports sessions, models and their hashes to Microsoft unless this is set before;
# nothing edgeplane runs phones home (docs/security.md). An operator's own value is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

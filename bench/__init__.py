"""Benchmarks: each prints a table with its baseline measured in the same run and writes
JSON under bench/results/."""

import os

# Before any benchmark imports onnxruntime: its telemetry stays off here too, as in every
# process edgeplane runs it (docs/security.md), so raw baselines and agents are alike.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

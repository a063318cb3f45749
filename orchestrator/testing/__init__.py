"""Harness shared by tests, benchmarks and the demo: models, control plane, agents."""

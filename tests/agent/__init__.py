"""Tests of the edge agent and the agent <-> control-plane protocol."""

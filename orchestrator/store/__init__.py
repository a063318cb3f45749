"""Durable control-plane state: objects, placement intent, the event log, credentials."""

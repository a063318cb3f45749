"""Converge what runs with what is wanted: snapshot, pure pass plan, executor, loop."""

"""Benchmarks: each prints a table with its baseline measured in the same run and writes
JSON under bench/results/."""

"""Benchmark harness of membench: fresh server processes under load, RSS sampled."""

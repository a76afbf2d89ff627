"""Benchmark harness of the membench suite: fresh server processes under load, RSS sampled."""

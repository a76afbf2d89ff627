"""The clinic API of the membench suite, each memory pattern in a naive and an
optimized form side by side."""

__version__ = "0.1.0"

"""Investigations behind the core benchmarks (where a step's time goes, kernel and matmul costs,
demo studies), each run as ``python -m bench.diagnostics.NAME``."""

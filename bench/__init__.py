"""The benchmarks a user or a reviewer reruns, each run as ``python -m bench.NAME`` (its module
docstring says what it measures and how; ``--csv PATH`` writes its rows for ``docs/benchmarks/``).
Investigations behind them are in :mod:`bench.diagnostics`; ``bench/gpu.sh`` is the run for a CUDA GPU."""

"""nern_fast benchmarks: decode backends and NeRN-style eager baselines, side by side.

Entry points: ``nern-fast bench [--quick] [--out DIR] [--device cpu|cuda] [--only OPS]`` (the whole
suite), ``python -m bench.<operation>`` (one operation), ``python -m bench.plot`` and
``python -m bench.report`` (PNG plots and the README table from the results file),
``pytest bench/ --benchmark-only`` (CPU microbenchmarks through pytest-benchmark).

Layers: ``harness`` (environment, timing, memory, FLOPs, CSV rows), ``workloads`` (layouts and
what each case needs), ``nern_style`` (NeRN's own eager decode, written from the spec),
``providers`` (who decodes), one module per operation, ``suite`` (plans and the runner).
"""

"""pytest-benchmark microbenchmarks (``pytest bench/ --benchmark-only``), CPU, threads fixed.

``make test`` runs ``pytest tests`` only, so nothing here is collected by the test suite."""
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BENCH_THREADS = int(os.environ.get("NERN_FAST_BENCH_THREADS", "2"))
torch.set_num_threads(BENCH_THREADS)

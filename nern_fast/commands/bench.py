"""``nern-fast bench``: run the benchmark suite of the source checkout (``bench/``).

The suite is not part of the installed package: it lives next to it in the repository, which an
editable install (``pip install -e .``) keeps reachable. Without a checkout this says so.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class BenchNotFound(RuntimeError):
    pass


def find_bench_dir() -> Path:
    """The repository's ``bench/`` next to the imported ``nern_fast`` package."""
    import nern_fast

    repo = Path(nern_fast.__file__).resolve().parent.parent
    bench = repo / "bench"
    if not (bench / "suite.py").is_file():
        raise BenchNotFound(
            f"no benchmark suite next to the installed nern_fast ({repo}/bench/suite.py is missing). "
            f"The suite ships with the source repository, not the package: clone the repository, "
            f"install it in editable mode (pip install -e .) and run `nern-fast bench` from it.")
    return bench


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``nern-fast bench`` and ``python -m bench.<operation>``."""
    p.add_argument("--quick", action="store_true",
                   help="a short plan (under 2 minutes on a 2-core CPU)")
    p.add_argument("--out", default=None,
                   help="directory for bench.csv (rows are appended) and bench.log "
                        "(default: bench/results of the checkout)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--only", default=None,
                   help="comma-separated operations: decode_forward, decode_backward, recon_step, "
                        "distill_step, inference_forward, permutations")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 on cpu, all cores with --device cuda)")
    p.add_argument("--budget", type=float, default=None,
                   help="soft wall-clock budget in seconds; cases after it are recorded as skipped "
                        "(default: the plan's; 0 = none)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip peak-memory measurements (on CPU each needs a fresh subprocess)")
    p.add_argument("--plan", default=None, choices=("cpu-quick", "cpu-full", "gpu", "gpu-quick", "selftest"),
                   help="pick a plan explicitly instead of from --device/--quick")
    p.add_argument("--plots", action="store_true", help="also write PNG plots next to bench.csv")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark the decode backends against NeRN-style eager",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        bench = find_bench_dir()
    except BenchNotFound as exc:
        print(f"nern-fast bench: {exc}", file=sys.stderr)
        return 2
    repo = str(bench.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    from bench import suite

    return suite.run(args)

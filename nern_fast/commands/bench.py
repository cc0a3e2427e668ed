"""``nern-fast bench``: run the benchmark suite of the source checkout (``bench/``).

The suite is not part of the installed package: it lives next to it in the repository, which an
editable install (``pip install -e .``) keeps reachable. Without a checkout this says so.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ._common import check_output_dir, fail, user_errors


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


def thread_count(text: str) -> int:
    """``--threads``: a whole number >= 1 (argparse reports the message)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads >= 1, got {text!r}")
    return value


def budget_seconds(text: str) -> float:
    """``--budget``: seconds >= 0 (0: none); a negative one would skip every case."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0 (0: no budget), got {text!r}")
    return value


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
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch CPU threads (default: 2 on cpu, all cores with --device cuda)")
    p.add_argument("--budget", type=budget_seconds, default=None,
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
        if args.out:
            check_output_dir(args.out)
    except (BenchNotFound, *user_errors()) as exc:
        return fail("bench", exc)
    repo = str(bench.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    from bench import suite

    try:
        return suite.run(args)
    except user_errors() as exc:  # set-up and result files; a failing measurement is a row
        return fail("bench", exc)

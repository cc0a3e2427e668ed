"""The csrc backend's CPU goals (issue #4), measured side by side in one run with the suite's harness.

1. ResNet-56 layout, H=280, 5 blocks, levels 40: decode forward and forward+backward (full
   gradient) at fp32 and bf16 for ``nern_eager`` (NeRN-style: precomputed encodings, chunks of
   4,096, fp32 — the baseline), ``eager`` (the reference) and ``csrc``, each with its peak memory
   (fresh-process RSS probe). Goals: forward x1.2 (fp32) and x2.5 (bf16) over NeRN-style,
   forward+backward x1.2 (fp32), decode peak memory <= 25% of the eager decoder's.
2. ResNet-18 ImageNet layout (1.22 M kernels), H=1256: one full-gradient step (decode of every
   kernel + backward into every parameter) with ``csrc`` in a fresh process: time and peak resident
   memory. Goal: within 4 GB.

Rows go to ``bench.csv`` in the output directory (default bench/results), like every suite run.
Run: ``python -m bench.csrc_cpu_check [--out DIR] [--skip-resnet18] [--resnet18-precision fp32]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import harness
from .plans import Entry, Plan
from .suite import DEFAULT_OUT, REPO, Log, Runner
from .workloads import NERN_HIDDEN, Case

PROVIDERS = ("nern_eager", "eager", "csrc")
FOUR_GB = 4 * 10**9
STEP_TIMEOUT_S = 3600


def resnet56_plan() -> Plan:
    h = NERN_HIDDEN["resnet56"]
    entries = [Entry("decode_forward", "resnet56", h, ("fp32", "bf16"), only=PROVIDERS),
               Entry("decode_backward", "resnet56", h, ("fp32", "bf16"), only=PROVIDERS)]
    timer = harness.TimerSettings(warmup=1, min_repeats=5, max_repeats=15, min_seconds=2.0, max_seconds=20.0)
    return Plan("csrc-cpu-check", entries, timer)


def full_gradient_step(precision: str) -> dict:
    """(In a fresh process) one ResNet-18 full-gradient step with csrc: seconds and memory."""
    from .registry import operation

    case = Case("decode_backward", "resnet18", NERN_HIDDEN["resnet18"])
    op = operation(case.operation)
    work = op.workload(case, torch.device("cpu"))
    provider = next(p for p in op.providers() if p.name == "csrc")
    op.case_inputs(case, work)
    harness.release_freed_memory()
    before = harness.rss_bytes()
    step = op.prepare(case, work, provider, precision)
    start = time.perf_counter()
    step.run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_before_bytes": before, "peak_rss_bytes": harness.rss_peak_bytes(),
            "kernels": work.layout.num_kernels, "grad_finite": all(bool(torch.isfinite(p.grad).all())
                                                                  for p in work.parameters)}


def measure_resnet18(runner: Runner, precision: str) -> None:
    spec = json.dumps({"precision": precision, "threads": torch.get_num_threads()})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    row = {**runner.env.row(), "operation": "decode_backward", "provider": "csrc", "variant": "one_step",
           "layout": "resnet18", "hidden": NERN_HIDDEN["resnet18"], "batch": None, "precision": precision}
    runner.log(f"ResNet-18 full-gradient step ({precision}, csrc) in a fresh process ...")
    try:
        done = subprocess.run([sys.executable, "-m", "bench.csrc_cpu_check", "--step", spec], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        runner._emit(row, "error", note=f"timed out after {STEP_TIMEOUT_S} s")
        return
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        runner._emit(row, "oom" if "memory" in tail.lower() else "error", note=tail[:300])
        return
    r = json.loads(lines[-1])
    flops = harness.decode_flops(r["kernels"], NERN_HIDDEN["resnet18"], backward=True)
    peak = r["peak_rss_bytes"]
    row.update(kernels=r["kernels"], median_s=r["seconds"], p20_s=r["seconds"], p80_s=r["seconds"], repeats=1,
               gflop=flops / 1e9, tflops=flops / r["seconds"] / 1e12,
               peak_mem_mb=(peak - r["rss_before_bytes"]) / 2**20, mem_kind="rss_peak_extra")
    verdict = "within" if peak <= FOUR_GB else "OVER"
    runner._emit(row, "ok", note=f"process peak RSS {peak / 1e9:.2f} GB ({verdict} the 4 GB goal, "
                                 f"torch and the case included); gradients finite: {r['grad_finite']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.csrc_cpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="directory of bench.csv / bench.log (default bench/results)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-resnet18", action="store_true")
    p.add_argument("--resnet18-precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--no-memory", action="store_true", help="skip the ResNet-56 peak-memory probes")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # the ResNet-18 child process
    args = p.parse_args(argv)
    if args.step:
        spec = json.loads(args.step)
        torch.set_num_threads(int(spec["threads"]))
        print(json.dumps(full_gradient_step(spec["precision"])))
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / harness.LOG_FILE)
    runner = Runner(resnet56_plan(), torch.device("cpu"), out, memory=not args.no_memory, log=log)
    rows = runner.run()
    if not args.skip_resnet18:
        measure_resnet18(runner, args.resnet18_precision)
    return 1 if any(r["status"] == "error" for r in rows + runner.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())

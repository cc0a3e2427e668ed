"""The runner: takes a plan, measures every (case, provider, precision), appends rows to bench.csv.

For each case the speed-up baseline (NeRN-style eager, or the NeRN loop for permutations) runs
first; every other provider's row then carries its speed-up over that baseline from the same run.
On the CPU the providers of a case are timed in alternating rounds, so that a machine shared with
other jobs loads them alike; on a GPU each runs alone. A provider that cannot run a case is a
``skipped`` row with the reason (the dispatcher's own sentence for backends); an out-of-memory is
an ``oom`` row; any other failure an ``error`` row with the message — the suite keeps going. Rows are appended as they are measured, so a run
cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from . import harness
from .harness import Environment, append_rows, time_call, time_interleaved
from .operation import Skip
from .plans import PLANS, Entry, Plan
from .registry import operation
from .workloads import Case

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"
ASSUMED_CPU_FLOPS = 5e10  # CPU time gate before this run has measured anything (2 cores, fp32)
MEMPROBE_TIMEOUT_S = 900


class Log:
    """Lines to stdout and to ``bench.log`` in the output directory."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Runner:
    def __init__(self, plan: Plan, device: torch.device, out_dir: Path, memory: bool = True,
                 budget_s: Optional[float] = None, log: Optional[Log] = None):
        self.plan = plan
        self.device = device
        self.out_dir = Path(out_dir)
        self.results = self.out_dir / harness.RESULTS_FILE
        self.memory = memory and plan.memory
        self.budget_s = plan.budget_s if budget_s is None else (budget_s or None)
        self.log = log or Log(None)
        self.env = Environment.capture(device, plan.name, REPO)
        self.baselines: dict = {}
        self.measured: set = set()
        self.cpu_flops = ASSUMED_CPU_FLOPS
        self.rows: list[dict] = []
        self._work_key = None
        self._work = None

    # ------------------------------------------------------------------ running
    def run(self, only: Optional[set] = None) -> list[dict]:
        self.log(f"plan {self.plan.name} on {self.env.device} ({self.device}); torch {self.env.torch}, "
                 f"triton {self.env.triton or '-'}, {self.env.threads} threads, commit {self.env.commit}, "
                 f"load average {harness.load_average()}; results -> {self.results}")
        for entry in self.plan.entries:
            if only and entry.operation not in only:
                continue
            self.run_entry(entry)
        self._drop_workload()
        self.log(f"done: {len(self.rows)} rows in {self.log.elapsed:.0f} s "
                 f"({sum(r['status'] == 'ok' for r in self.rows)} ok)")
        return self.rows

    def run_entry(self, entry: Entry) -> None:
        op = operation(entry.operation)
        case = Case(entry.operation, entry.layout, entry.hidden, entry.batch, entry.variant)
        try:
            work = self._workload(op, case)
        except Exception as exc:
            self.log(f"{case}: could not build the case: {short(exc)}")
            for provider in op.providers():
                self._emit(self._row(op, case, None, provider, provider.fixed_precision or entry.precisions[0]),
                           "error", note=f"building the case failed: {short(exc)}")
            return
        providers = op.providers()
        providers.sort(key=lambda p: p.name != op.baseline)  # baseline first (stable sort)
        combos = [(provider, precision) for provider in providers
                  if entry.only is None or provider.name in entry.only
                  for precision in ((provider.fixed_precision,) if provider.fixed_precision else entry.precisions)
                  if self._measure_key(case, provider.name, precision) not in self.measured]
        if self.device.type == "cuda":
            for provider, precision in combos:
                self.measure(op, case, work, provider, precision, entry)
        else:
            self.measure_interleaved(op, case, work, combos, entry)

    @staticmethod
    def _measure_key(case: Case, provider: str, precision: str) -> tuple:
        """A case, provider and precision are measured once per run (plans may list a case again
        with other precisions; the fp32-only baseline is not repeated)."""
        return (case.operation, case.layout, case.hidden, case.batch, case.variant, provider, precision)

    def _workload(self, op, case: Case):
        key = op.workload_key(case)
        if key != self._work_key:
            self._drop_workload()
            self._work = op.workload(case, self.device)
            self._work_key = key
        return self._work

    def _drop_workload(self) -> None:
        self._work, self._work_key = None, None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ one measurement
    def _row(self, op, case: Case, work, provider, precision: str) -> dict:
        kernels = None
        if work is not None:
            kernels = op.kernels(case, work)
        return {**self.env.row(), "operation": op.name, "provider": provider.name, "variant": case.variant,
                "layout": case.layout, "kernels": kernels, "hidden": case.hidden, "precision": precision,
                "batch": case.batch}

    def _skip_reason(self, op, case, work, provider, precision, left_out: Optional[str]) -> Optional[str]:
        if left_out:
            return left_out
        if self.budget_s is not None and self.log.elapsed > self.budget_s:
            return f"suite time budget of {self.budget_s:.0f} s used up before this case"
        try:
            reason = op.unavailable_reason(case, work, provider, precision)
        except Exception as exc:
            return f"availability check failed: {short(exc)}"
        if reason:
            return reason
        if self.device.type == "cpu" and self.plan.max_call_s:
            estimate = op.decode_flops_implied(case, work, provider) / self.cpu_flops
            if estimate > self.plan.max_call_s:
                return (f"estimated {estimate:.0f} s per call on this CPU (decode FLOPs at the best "
                        f"{self.cpu_flops / 1e9:.0f} GFLOP/s seen so far in this run) is over this "
                        f"plan's {self.plan.max_call_s:.0f} s limit")
        return None

    def _failure(self, exc: BaseException) -> tuple[str, str]:
        """(status, note) of a measurement that raised."""
        if is_oom(exc):
            reached = ""
            if self.device.type == "cuda":
                reached = (f"; {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated at the peak of "
                           f"{torch.cuda.get_device_properties(self.device).total_memory / 2**30:.0f} GiB")
            return "oom", f"out of memory{reached}"
        if self.log.path is not None:
            with self.log.path.open("a") as f:
                f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return "error", short(exc)

    def _record_timing(self, row: dict, op, case: Case, work, precision: str, timing) -> None:
        row.update(median_s=timing.median, p20_s=timing.p20, p80_s=timing.p80, repeats=timing.repeats)
        flops = op.flops(case, work)
        if not flops:
            return
        tflops = flops / timing.median / 1e12
        peak = harness.peak_tflops(self.env.device, precision) if self.device.type == "cuda" else None
        row.update(gflop=flops / 1e9, tflops=tflops, pct_peak=100 * tflops / peak if peak else None)
        if self.device.type == "cpu":  # the gate is optimistic on purpose: the best rate seen so far
            self.cpu_flops = max(self.cpu_flops, flops / timing.median)

    def _check(self, step, notes: list) -> None:
        if step.check is not None and self.plan.checks:
            try:
                notes.append(step.check())
            except Exception as exc:
                notes.append(f"check failed: {short(exc, 120)}")

    def _release(self, step, notes: list) -> None:
        if step is not None:
            try:
                step.release()
            except Exception as exc:
                notes.append(f"release failed: {short(exc, 120)}")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _probe_memory(self, row: dict, case: Case, provider, precision: str, entry: Entry, notes: list) -> None:
        """CPU: peak resident memory of one call in a fresh subprocess."""
        if not (self.memory and entry.memory):
            return
        peak, note = probe_cpu_memory(case, provider.name, precision)
        if peak is not None:
            row.update(peak_mem_mb=peak / 2**20, mem_kind="rss_peak_extra")
        if note:
            notes.append(note)

    def measure(self, op, case: Case, work, provider, precision: str, entry: Entry) -> dict:
        """One provider alone (GPU: the device is ours, and memory is measured in-process)."""
        row = self._row(op, case, work, provider, precision)
        reason = self._skip_reason(op, case, work, provider, precision, dict(entry.leave_out).get(provider.name))
        if reason:
            return self._emit(row, "skipped", note=reason)
        cuda = self.device.type == "cuda"
        step = None
        status, notes = "ok", []
        try:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            op.case_inputs(case, work)
            base_mem = torch.cuda.memory_allocated() if cuda else 0
            step = op.prepare(case, work, provider, precision)
            self._record_timing(row, op, case, work, precision, time_call(step.run, self.device, self.plan.timer))
            if cuda:  # before the check, which may keep reference outputs on the workload
                row.update(peak_mem_mb=harness.cuda_peak_extra_bytes(step.run, self.device, base_mem) / 2**20,
                           mem_kind="cuda_alloc_peak_extra")
            self._check(step, notes)
        except Skip as exc:
            status, notes = "skipped", [str(exc)]
        except Exception as exc:
            status, note = self._failure(exc)
            notes = [note]
        finally:
            self._release(step, notes)
            step = None
        if status == "ok" and not cuda:
            self._probe_memory(row, case, provider, precision, entry, notes)
        return self._emit(row, status, note="; ".join(n for n in notes if n))

    def measure_interleaved(self, op, case: Case, work, combos: list, entry: Entry) -> None:
        """CPU: prepare every runnable provider of the case, time them in alternating rounds
        (harness.time_interleaved), then check, release and probe memory one by one."""
        leave_out = dict(entry.leave_out)
        prepared = []
        for provider, precision in combos:
            row = self._row(op, case, work, provider, precision)
            reason = self._skip_reason(op, case, work, provider, precision, leave_out.get(provider.name))
            if reason:
                self._emit(row, "skipped", note=reason)
                continue
            try:
                op.case_inputs(case, work)
                prepared.append((row, provider, precision, op.prepare(case, work, provider, precision)))
            except Skip as exc:
                self._emit(row, "skipped", note=str(exc))
            except Exception as exc:
                status, note = self._failure(exc)
                self._emit(row, status, note=note)
        timings = time_interleaved([p[3].run for p in prepared], self.plan.timer)
        for i, timing in enumerate(timings):
            (row, provider, precision, step), prepared[i] = prepared[i], None  # free as we go
            notes = []
            if isinstance(timing, BaseException):
                status, note = self._failure(timing)
                notes.append(note)
            else:
                status = "ok"
                self._record_timing(row, op, case, work, precision, timing)
                self._check(step, notes)
            self._release(step, notes)
            if status == "ok":
                self._probe_memory(row, case, provider, precision, entry, notes)
            self._emit(row, status, note="; ".join(n for n in notes if n))

    def _emit(self, row: dict, status: str, note: str = "") -> dict:
        row.update(status=status, note=note)
        self.measured.add((row["operation"], row["layout"], row["hidden"], row["batch"], row["variant"],
                           row["provider"], row["precision"]))
        key = (row["operation"], row["layout"], row["hidden"], row["batch"], row["variant"])
        op = operation(row["operation"])
        if status == "ok":
            if row["provider"] == op.baseline:
                self.baselines[key] = row["median_s"]
            if key in self.baselines:
                row["speedup_vs_nern"] = self.baselines[key] / row["median_s"]
        append_rows(self.results, [row])
        self.rows.append(row)
        self.log(describe_row(row))
        return row


def describe_row(row: dict) -> str:
    what = (f"{row['operation']} {row['layout']}" + (f" H={row['hidden']}" if row["hidden"] else "")
            + (f" batch={row['batch']}" if row["batch"] else "") + (f" {row['variant']}" if row["variant"] else "")
            + f" {row['precision']} {row['provider']}")
    if row["status"] != "ok":
        return f"{what}: {row['status'].upper()} ({row['note']})"
    text = f"{what}: {row['median_s'] * 1e3:.2f} ms (p20 {row['p20_s'] * 1e3:.2f}, p80 {row['p80_s'] * 1e3:.2f}, n={row['repeats']})"
    if row.get("tflops"):
        text += f", {row['tflops']:.3g} TFLOP/s"
    if row.get("pct_peak"):
        text += f" ({row['pct_peak']:.0f}% of peak)"
    if row.get("peak_mem_mb") is not None:
        text += f", peak +{row['peak_mem_mb']:.0f} MB"
    if row.get("speedup_vs_nern"):
        text += f", x{row['speedup_vs_nern']:.2f} vs NeRN-style"
    if row["note"]:
        text += f" [{row['note']}]"
    return text


# ---------------------------------------------------------------------------------- CPU memory
def probe_cpu_memory(case: Case, provider: str, precision: str) -> tuple[Optional[int], str]:
    """Peak resident memory of one call, measured in a fresh subprocess (bench.memprobe)."""
    spec = {"case": case.describe(), "provider": provider, "precision": precision,
            "threads": torch.get_num_threads()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               # A fixed mmap threshold: every large block is mapped and unmapped on free, so the
               # resident size follows live memory (glibc's adaptive threshold keeps freed blocks).
               MALLOC_MMAP_THRESHOLD_="131072")
    try:
        done = subprocess.run([sys.executable, "-m", "bench.memprobe", json.dumps(spec)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=MEMPROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"memory probe timed out after {MEMPROBE_TIMEOUT_S} s"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"memory probe failed (exit {done.returncode}): {tail[:150]}"
    result = json.loads(lines[-1])
    note = "" if result["hwm_reset"] else "RSS peak includes set-up (clear_refs unavailable)"
    return result["peak_extra_bytes"], note


# ---------------------------------------------------------------------------------- CLI
def choose_plan(args, device: torch.device) -> Plan:
    if args.plan:
        return PLANS[args.plan]()
    if device.type == "cuda":
        return PLANS["gpu-quick" if args.quick else "gpu"]()
    return PLANS["cpu-quick" if args.quick else "cpu-full"]()


def run(args) -> int:
    """Run a plan from parsed ``nern-fast bench`` arguments (see nern_fast.commands.bench)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("nern-fast bench: --device cuda but torch sees no CUDA device here "
              f"(torch {torch.__version__}); run on a GPU machine or use --device cpu", file=sys.stderr)
        return 2
    only = None
    if args.only:
        only = {o.strip() for o in args.only.split(",") if o.strip()}
        for name in sorted(only):
            try:
                operation(name)  # an unknown name: the message lists the known ones
            except ValueError as exc:
                print(f"nern-fast bench: error: --only: {exc}", file=sys.stderr)
                return 2
    threads = args.threads or (min(2, os.cpu_count() or 1) if device.type == "cpu" else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    out = Path(args.out) if args.out else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    plan = choose_plan(args, device)
    log = Log(out / harness.LOG_FILE)
    runner = Runner(plan, device, out, memory=not args.no_memory, budget_s=args.budget, log=log)
    rows = runner.run(only)
    if getattr(args, "plots", False):
        from .plot import make_plots
        for path in make_plots(out / harness.RESULTS_FILE, out):
            log(f"plot: {path}")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        log(f"{len(errors)} measurement(s) failed with an error (see the note column and {log.path})")
    return 1 if errors else 0


def build_parser(prog: str) -> argparse.ArgumentParser:
    from nern_fast.commands.bench import add_arguments
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def main_for_operation(name: str, argv=None) -> int:
    """``python -m bench.<operation>``: the suite restricted to one operation."""
    args = build_parser(f"python -m bench.{name}").parse_args(argv)
    args.only = name
    return run(args)


if __name__ == "__main__":
    raise SystemExit(run(build_parser("python -m bench.suite").parse_args()))

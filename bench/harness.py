"""What every benchmark shares: the environment of a run, timing, memory, FLOPs, peaks, CSV rows.

Results live in ONE file per results directory, ``bench.csv``, one row per (run, operation,
provider, case); the ``operation`` column says which script measured it. One file keeps a GPU
session's output to two files (CSV + log) and lets plots and the README table read everything at
once. Rows are only ever appended.
"""
from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import collections
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS_FILE = "bench.csv"
LOG_FILE = "bench.log"

COLUMNS = (
    "date", "run_id", "suite", "commit", "device", "device_kind", "torch", "triton", "threads",
    "load_avg", "operation", "provider", "variant", "layout", "kernels", "hidden", "precision",
    "batch", "median_s", "p20_s", "p80_s", "repeats", "gflop", "tflops", "pct_peak", "peak_mem_mb",
    "mem_kind", "speedup_vs_nern", "status", "note",
)
STATUSES = ("ok", "skipped", "oom", "error")

# Dense peaks in TFLOP/s (NVIDIA data sheets, no sparsity). fp32 = IEEE fp32 on the CUDA cores;
# tf32 / bf16 = tensor cores. The H200 has the H100 SXM's compute. Unknown devices (every CPU):
# no peak, the pct_peak column stays blank.
PEAK_TFLOPS = {
    "H100 SXM": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
}


# ---------------------------------------------------------------------------------- FLOPs
def decode_flops(num_kernels: int, hidden: int, num_blocks: int = 5, levels: int = 40,
                 kernel_size: int = 3, backward: bool = False) -> float:
    """FLOPs of decoding ``num_kernels`` kernels (NERN_SPEC §10), optionally with the backward.

    Forward: 2·N·(6·levels·H + (num_blocks−2)·H² + H·k²). Backward: every linear layer needs its
    weight gradient (as many FLOPs as its forward) and every layer but the first its input
    gradient (the encodings need none), so forward + backward = 3·forward − 2·N·6·levels·H.
    """
    first = 6 * levels * hidden
    forward = 2.0 * num_kernels * (first + (num_blocks - 2) * hidden * hidden + hidden * kernel_size ** 2)
    if not backward:
        return forward
    return 3.0 * forward - 2.0 * num_kernels * first


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """The device's dense peak at ``precision`` or None when unknown."""
    name = device_name.upper()
    if "H200" in name:
        key = "H200"
    elif "H100" in name and "PCIE" in name:
        key = "H100 PCIe"
    elif "H100" in name and "NVL" not in name:
        key = "H100 SXM"
    else:
        return None
    return PEAK_TFLOPS[key].get(precision)


# ---------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    features = cpu_matrix_features()
    return f"{model} ({os.cpu_count()} cores{', ' + features if features else ''})"


def run_device_label(device, note: str = "") -> str:
    """The device a side benchmark's JSON rows name: the GPU, or the CPU (model, cores, widest GEMM
    instructions, as in bench.csv) with the torch threads the run used, then ``note``."""
    device = torch.device(device)
    if device.type == "cuda":
        label = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        label = f"{device_name(device)}, {threads} thread{'' if threads == 1 else 's'}"
    return f"{label}; {note}" if note else label


def cpu_matrix_features() -> str:
    """The widest vector / matrix instructions the CPU's GEMMs can use ("AMX", "AVX-512 BF16",
    "AVX-512", "AVX2"; Arm: "BF16", "NEON"): one CPU model name covers generations whose speeds,
    bf16's above all, differ several-fold (a Zen 3 and a Zen 4 EPYC are both "AMD EPYC")."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return ""
    caps = get()
    for name, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512_f", "AVX-512"),
                        ("avx2", "AVX2"), ("bf16", "BF16"), ("neon", "NEON")):
        if caps.get(name, False):
            return label
    return ""


REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO) -> str:
    """Short commit of ``repo`` (this repository by default), with ``+dirty`` when tracked files
    differ from it — results files under bench/results/ aside (a benchmark appending its rows
    must not mark the next one's code as changed)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # triton is optional (and can fail to import on odd platforms)
        return ""


@dataclass
class Environment:
    """Fields every row of one run shares."""

    date: str
    run_id: str
    suite: str
    commit: str
    device: str
    device_kind: str
    torch: str
    triton: str
    threads: int

    @classmethod
    def capture(cls, device: torch.device, suite: str, repo: Path) -> "Environment":
        now = datetime.datetime.now(datetime.timezone.utc)
        return cls(date=now.strftime("%Y-%m-%dT%H:%M:%SZ"), run_id=f"{now:%Y%m%d-%H%M%S}-{os.getpid()}",
                   suite=suite, commit=git_commit(repo), device=device_name(device),
                   device_kind=device.type, torch=torch.__version__, triton=triton_version(),
                   threads=torch.get_num_threads())

    def row(self) -> dict:
        # The load average is read per row: other jobs on a shared machine come and go.
        return {"date": self.date, "run_id": self.run_id, "suite": self.suite, "commit": self.commit,
                "device": self.device, "device_kind": self.device_kind, "torch": self.torch,
                "triton": self.triton, "threads": self.threads, "load_avg": load_average()}


# ---------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median: float
    p20: float
    p80: float
    samples: list

    @property
    def repeats(self) -> int:
        return len(self.samples)

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Timing":
        ordered = sorted(samples)
        return cls(statistics.median(ordered), quantile(ordered, 0.2), quantile(ordered, 0.8), list(samples))


def quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default)."""
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class TimerSettings:
    """How long to measure one (case, provider): at least ``min_repeats`` timed calls and
    ``min_seconds`` of them, at most ``max_repeats`` calls or ``max_seconds``."""

    warmup: int = 1
    min_repeats: int = 5
    max_repeats: int = 30
    min_seconds: float = 1.0
    max_seconds: float = 20.0


def time_cpu(fn: Callable[[], object], settings: TimerSettings) -> Timing:
    """Wall-clock time of repeated calls (perf_counter), after warm-up calls."""
    for _ in range(settings.warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        spent = time.perf_counter() - started
        if len(samples) >= settings.max_repeats or spent >= settings.max_seconds:
            break
        if len(samples) >= settings.min_repeats and spent >= settings.min_seconds:
            break
    return Timing.of(samples)


def time_cuda(fn: Callable[[], object], settings: TimerSettings) -> Timing:
    """GPU time of repeated calls between CUDA events, one event pair per call, after warm-up."""
    for _ in range(settings.warmup):
        fn()
    torch.cuda.synchronize()
    samples: list[float] = []
    started = time.perf_counter()
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
        spent = time.perf_counter() - started
        if len(samples) >= settings.max_repeats or spent >= settings.max_seconds:
            break
        if len(samples) >= settings.min_repeats and spent >= settings.min_seconds:
            break
    return Timing.of(samples)


def time_call(fn: Callable[[], object], device: torch.device, settings: TimerSettings) -> Timing:
    return time_cuda(fn, settings) if device.type == "cuda" else time_cpu(fn, settings)


def time_interleaved(fns: Sequence[Callable[[], object]], settings: TimerSettings) -> list:
    """Wall-clock times of several functions measured in rounds (one call of each per round).

    On a CPU shared with other jobs the load changes from second to second; timing the providers
    of a case in alternation exposes them all to the same load, so their ratios stay meaningful.
    Each function gets ``settings`` as if alone (the limits scale with their number). Returns one
    :class:`Timing` per function, or the exception that function raised (it is then dropped).
    """
    samples: list[list[float]] = [[] for _ in fns]
    failed: dict[int, BaseException] = {}

    def call(i: int, record: bool) -> None:
        t0 = time.perf_counter()
        try:
            fns[i]()
        except Exception as exc:  # one provider failing must not stop the others
            failed[i] = exc
            return
        if record:
            samples[i].append(time.perf_counter() - t0)

    for _ in range(settings.warmup):
        for i in range(len(fns)):
            if i not in failed:
                call(i, record=False)
    n = max(len(fns), 1)
    started = time.perf_counter()
    while True:
        active = [i for i in range(len(fns)) if i not in failed and len(samples[i]) < settings.max_repeats]
        if not active:
            break
        for i in active:
            call(i, record=True)
        spent = time.perf_counter() - started
        done = [i for i in range(len(fns)) if i not in failed]
        if spent >= settings.max_seconds * n:
            break
        if spent >= settings.min_seconds * n and all(len(samples[i]) >= settings.min_repeats for i in done):
            break
    return [failed[i] if i in failed else Timing.of(samples[i]) for i in range(len(fns))]


# ---------------------------------------------------------------------------------- memory
def gpu_activities(events) -> list:
    """The GPU work among torch.profiler events: kernels, copies and fills on the device, without
    the GPU-timeline ranges of ``record_function`` annotations (device events too, spanning a whole
    step: counted as busy, they hid the gaps between kernels)."""
    return [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (views included: they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


# Ops that return views or metadata, or allocate: no kernel on any device.
_NO_KERNEL_OPS = {"view", "_unsafe_view", "reshape", "select", "slice", "expand", "unsqueeze",
                  "squeeze", "t", "transpose", "permute", "as_strided", "detach", "alias", "unbind",
                  "split", "split_with_sizes", "empty", "empty_strided", "_local_scalar_dense"}


def count_ops(step, suffix: str = "_per_step") -> dict:
    """aten ops of one call of ``step``: all, those that launch work, the most frequent (each
    launching op is one or a few kernels on a GPU, and its dispatch is host time on every device)."""
    with _OpCounter() as counter:
        step()
    counts = counter.counts
    launching = sum(v for k, v in counts.items() if k not in _NO_KERNEL_OPS)
    return {f"aten_ops{suffix}": sum(counts.values()), f"launching_ops{suffix}": launching,
            "top_ops": dict(counts.most_common(15))}


def cuda_peak_extra_bytes(fn: Callable[[], object], device: torch.device, baseline: int) -> int:
    """Peak CUDA memory allocated during one call of ``fn`` above ``baseline`` bytes."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def release_freed_memory() -> None:
    """Return freed heap to the OS so the resident size reflects live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_rss_peak() -> bool:
    """Reset the kernel's resident-size high-water mark (Linux ≥ 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


# ---------------------------------------------------------------------------------- rows
def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append rows (missing fields blank); create the file with its header first if needed.

    A file whose header is not ours is never rewritten: the error says how to go on.
    """
    rows = list(rows)
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unknown = sorted({k for r in rows for k in r} - set(COLUMNS))
    if unknown:
        raise ValueError(f"row fields not in the results schema: {unknown}")
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path} has another header ({len(header)} columns) than this harness "
                             f"writes; move it aside or pass another --out directory")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: format_value(row.get(k)) for k in COLUMNS})


def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.6g}"
    return str(value)


def as_float(value) -> Optional[float]:
    """A CSV field as a float, None when blank or not a number."""
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None

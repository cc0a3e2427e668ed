"""Where the time of one decode goes: the host path (Python, checks, packing, launches) vs the GPU.

ResNet-20 decodes in well under a millisecond on a GPU, so a decoder's host path can decide its
speed there (the H200 run of issue #3 had the Triton backend at 0.69 ms on ResNet-20 against 0.87 ms
on ResNet-56, three times the kernels: a fixed cost). Per (layout, provider, precision) this records

  event_ms      CUDA events around one call, synchronised per call (what ``bench.suite`` records)
  host_ms       wall time of the call alone, not synchronised: what the host spends to enqueue it
  pipelined_ms  calls back to back with one synchronisation at the end, per call
                (about max(host, GPU): equal to host_ms when the host is the bound)
  kernel_ms     GPU time of the kernels per call (torch.profiler), and ``kernels`` launched per call
  graph_replay_ms  the call captured once in a CUDA graph and replayed: its time without the host
                path (``graph_error`` says why where the call cannot be captured)
  launching_ops_per_call  aten ops of one call that launch work (each one or a few kernels on a GPU,
                and host time everywhere); Triton's own launches are not aten ops (1-2 per call)

On a CPU (no GPU) ``host_ms`` is the whole call. ``--stub-triton`` also times the Triton backend's
host path under the interpreter with its kernel launches replaced by no-ops: the Python side of a
call before any launch (the same code runs on a GPU host, with the tf32/bf16 weight copies a GPU
call makes; triton's own launch overhead comes on top).

    python -m bench.decode_host_time [--device cuda] [--stub-triton] [--out FILE.jsonl]

Appends one JSON line per (layout, provider, precision).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

CASES = "resnet20:180,resnet56:280"  # layout:hidden pairs


def stub_triton_launches(launches: Optional[Counter] = None) -> None:
    """Kernel launches of the Triton backend's fused forward become no-ops (the interpreter must be
    on), counted per kernel in ``launches`` when given."""
    from nern_fast.kernels import decode_fwd

    class NoLaunch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if launches is not None:
                    launches[self.name] += 1
            return launch

    decode_fwd.decode_fwd_kernel = NoLaunch("decode_fwd_kernel")
    decode_fwd.first_layer_tables_kernel = NoLaunch("first_layer_tables_kernel")
    from nern_fast.ops import triton_inputs
    triton_inputs.CONVERT_ON_PACK = True  # pack as on a GPU (tf32 rounding, bf16 copies)


def _host_ms(fn, repeats: int, sync) -> float:
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    sync()
    return statistics.median(samples) * 1e3


def _cuda_split(fn, repeats: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .harness import TimerSettings, gpu_activities, time_cuda

    events = time_cuda(fn, TimerSettings(warmup=0, min_repeats=repeats, max_repeats=repeats,
                                         min_seconds=0.0, max_seconds=60.0))
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    pipelined = (time.perf_counter() - begin) / repeats
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    kernels = gpu_activities(prof.events())
    device_us = sum(e.time_range.end - e.time_range.start for e in kernels)
    return {"event_ms": events.median * 1e3, "pipelined_ms": pipelined * 1e3,
            "kernel_ms": device_us / repeats / 1e3, "kernels": len(kernels) / repeats,
            **_graph_replay(fn, repeats)}


def _graph_replay(fn, repeats: int) -> dict:
    """The same call captured once in a CUDA graph and replayed (events per replay): what the call
    costs without its host path — a measurement of where the time goes, not a provider."""
    import torch

    from .harness import TimerSettings, time_cuda

    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replay = time_cuda(graph.replay, TimerSettings(warmup=2, min_repeats=repeats, max_repeats=repeats,
                                                       min_seconds=0.0, max_seconds=60.0))
    except Exception as exc:  # a backend whose call cannot be captured (host syncs, checks)
        torch.cuda.synchronize()
        return {"graph_replay_ms": None, "graph_error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return {"graph_replay_ms": replay.median * 1e3}


def parse_cases(text: str) -> list[tuple[str, int]]:
    """"resnet20:180,resnet56:280" -> [("resnet20", 180), ("resnet56", 280)]."""
    cases = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        layout, _, hidden = item.partition(":")
        if not hidden.isdigit():
            raise ValueError(f"case '{item}' is not LAYOUT:HIDDEN (e.g. resnet20:180)")
        cases.append((layout, int(hidden)))
    return cases


def measure(device_name: str, cases: list, providers: list, precisions: list, repeats: int,
            stub_triton: bool) -> list:
    import torch

    from nern_fast import ops

    from .harness import count_ops
    from .providers import decode_providers
    from .workloads import Workload

    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    by_name = {p.name: p for p in decode_providers()}
    rows = []
    for layout, hidden in cases:
        work = Workload(layout, hidden, device)
        weights, biases = work.weights, work.biases
        for name in providers:
            fixed = getattr(by_name.get(name), "fixed_precision", None)  # NeRN's loop: fp32 only
            for precision in [fixed] if fixed else precisions:
                if name == "triton" and stub_triton:
                    def fn(p=precision):
                        return ops.decode(weights, biases, work.layout, work.encoding, None, p, "triton")
                    label = "triton (launches stubbed)"
                elif name in by_name:
                    provider = by_name[name]
                    reason = provider.unavailable_reason(work, precision, False, False)
                    if reason is not None:
                        print(f"{layout} {name} {precision}: skipped ({reason})", file=sys.stderr)
                        continue
                    fn = (lambda f: (lambda: f(weights, biases)))(provider.full(work, precision))
                    label = name
                else:
                    print(f"{name}: no such provider (one of {sorted(by_name)})", file=sys.stderr)
                    continue
                with torch.no_grad():
                    for _ in range(5):
                        fn()
                    ops_count = count_ops(fn, suffix="_per_call")
                    row = {"layout": layout, "kernels": work.layout.num_kernels, "hidden": hidden,
                           "provider": label, "precision": precision,
                           "host_ms": _host_ms(fn, repeats, sync),
                           "launching_ops_per_call": ops_count["launching_ops_per_call"],
                           "top_ops": ops_count["top_ops"]}
                    if device.type == "cuda":
                        row.update(_cuda_split(fn, repeats))
                    if name == "triton":  # the launch configurations the tuner chose (schedule, tiles)
                        from nern_fast.ops.triton_tuner import tuned_configs
                        row["triton_configs"] = sorted({f"{key[0]} H={key[2].hidden} {key[2].precision}: "
                                                        f"{config.describe()}"
                                                        for key, config in tuned_configs().items()})
                rows.append(row)
                print(json.dumps(row))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--cases", default=CASES, help=f"LAYOUT:HIDDEN pairs (default {CASES})")
    parser.add_argument("--providers", default="nern_eager,eager,triton,csrc")
    parser.add_argument("--precisions", default="fp32,tf32,bf16")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--stub-triton", action="store_true",
                        help="CPU: time the Triton host path with no-op launches (sets TRITON_INTERPRET=1)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    if args.stub_triton:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (nern_fast imports it)
    import torch

    if args.stub_triton:
        stub_triton_launches()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.stub_triton and device != "cpu":
        parser.error("--stub-triton runs on the CPU (the interpreter); leave --device out or use cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(device, cases, args.providers.split(","), args.precisions.split(","), args.repeats,
                   args.stub_triton)
    from .harness import git_commit, run_device_label
    commit = git_commit()
    name = run_device_label(device)
    common = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "device": name,
              "torch": torch.__version__}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for row in rows:
                f.write(json.dumps({**common, **row}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

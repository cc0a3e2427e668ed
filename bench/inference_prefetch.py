"""Latency and memory of an attached network's forward: materialized vs on_demand (prefetch off/on,
CUDA graphs off/on, decode groups or one call per layer, the decoder's scratch bounded or not) vs
cached, on CIFAR ResNets with NeRN's hidden sizes. Complements
``bench.inference_forward`` (which does not vary ``prefetch`` or ``graphs``). Appends one JSON line per measurement to ``--out`` and prints a table.

    python -m bench.inference_prefetch [--device cuda] [--nets resnet20,resnet56] [--batches 1,256]

Memory columns: ``resident_mb`` = allocated before the forward (model + predictor + stored weights),
``forward_peak_mb`` = the peak of what the forward allocates on top (decoded layers, prefetches,
activations). CUDA memory comes from the caching allocator; on CPU only the attachment's own
``peak_held_bytes`` (decoded weights it references) is reported.

On CUDA, materialized and on_demand (prefetch off) are also timed with the whole forward captured
in one CUDA graph (rows with ``whole_graph``; ``vs_materialized_whole_graph`` compares like with
like, ``graph_error`` says why a capture failed).

Per net it also times one decode of every represented layer in a row (``mode: decode_calls``),
through ``pred.decode_layer``, through the attachment's ``LayerDecoder`` and by decode groups
(``group_decoder_shared``: one call per group of consecutive layers, as attach decodes by default;
``calls`` says how many): ``host_us_per_layer``
is the time until the last call returned (launch and host overhead), ``us_per_layer`` the time
until the device finished. Equal values mean the per-layer decode is bound by the host, which no
prefetch can hide.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nern_fast import FastPredictor, ops
from nern_fast.inference import LayerDecoder, attachment
from nern_fast.inference_groups import groups_for
from nern_fast.models import cifar_resnet

from .harness import git_commit, run_device_label

NETS = {"resnet20": (20, 180), "resnet56": (56, 280)}  # depth, NeRN's hidden size


PER_LAYER = {"group_bytes": 0}  # one decode call per layer (before decode groups were the default)


def variants(largest_layer_bytes: int, predictor_bytes: int):
    # The decoder's scratch bounded like the held weights (largest layer + predictor per call).
    bounded = {"workspace_bytes": largest_layer_bytes + predictor_bytes}
    return [("materialized", {}), ("on_demand", {"prefetch": False}), ("on_demand", {"prefetch": True}),
            ("on_demand", {"prefetch": True, **PER_LAYER}), ("on_demand", {"prefetch": True, **bounded}),
            ("cached", {"cache_bytes": 4 * largest_layer_bytes, "prefetch": True}),
            ("on_demand", {"prefetch": False, "graphs": True}), ("on_demand", {"prefetch": True, "graphs": True}),
            ("on_demand", {"prefetch": True, "graphs": True, **PER_LAYER})]


# Variants also timed with the whole forward captured in one CUDA graph (the user's own capture, as
# ``torch.cuda.graph`` documents it): the on-demand decodes replay with the convs, no host path left.
WHOLE_GRAPH = (("materialized", {}), ("on_demand", {"prefetch": False}),
               ("on_demand", {"prefetch": False, **PER_LAYER}))


def whole_forward_graph(model, x: torch.Tensor):
    """A replay of ``model(x)`` captured whole in a CUDA graph (after warm-up on a side stream), or
    the capture's error as a string."""
    static_x = x.clone()
    try:
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            model(static_x)
    except Exception as exc:  # a host sync or an op the capture refuses: reported, not timed
        torch.cuda.synchronize(x.device)
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return graph.replay


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def decode_call_times(pred, device: torch.device, repeats: int) -> dict:
    """Per-layer time of decoding every layer once: host time (until the calls returned) and total
    (until the device finished), median over ``repeats``, for decode_layer and LayerDecoder (each
    call preparing for itself, and sharing one preparation per round as an on-demand forward does),
    and for the default decode groups (one call per group, sharing one preparation)."""
    decoder = LayerDecoder(pred)
    _, groups = groups_for([l.num_weights * 4 for l in pred.layout.layers],
                           sum(p.numel() * 4 for p in pred.parameters()))
    grouped = LayerDecoder(pred, groups)
    layers = range(pred.layout.num_layers)
    # name: (the LayerDecoder whose preparation is shared or not, the call, shared, call arguments)
    paths = {"decode_layer": (decoder, pred.decode_layer, False, layers),
             "layer_decoder": (decoder, decoder, False, layers),
             "layer_decoder_shared": (decoder, decoder, True, layers),
             "group_decoder_shared": (grouped, grouped.decode_group, True, range(len(groups)))}
    result = {}
    with torch.no_grad():
        for name, (owner, decode, shared, calls) in paths.items():
            host, total = [], []
            for repeat in range(repeats + 2):  # two warm-up rounds (tuning, compilation, caches)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                owner.share_preparation(shared)
                for i in calls:
                    decode(i)
                owner.share_preparation(False)
                returned = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                finished = time.perf_counter()
                if repeat >= 2:
                    host.append((returned - start) / len(layers) * 1e6)
                    total.append((finished - start) / len(layers) * 1e6)
            result[name] = {"host_us_per_layer": statistics.median(host),
                            "us_per_layer": statistics.median(total), "calls": len(calls)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nets", default="resnet20,resnet56")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--backend", default="auto", help="the predictor's decode backend (auto, triton, csrc, eager)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench/results/inference_prefetch.jsonl")
    args = parser.parse_args()
    device = torch.device(args.device)
    commit = git_commit()
    name = run_device_label(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'net':<9} {'batch':>5} {'mode':<40} {'median_ms':>10} {'vs_mat':>7} {'resident_mb':>11} "
          f"{'forward_peak_mb':>15} {'held_peak_mb':>12} {'prefetched':>10}")
    for net in args.nets.split(","):
        depth, hidden = NETS[net]
        torch.manual_seed(0)
        model = cifar_resnet(depth).eval().to(device)
        pred = FastPredictor.for_model(model, include="nern", hidden=hidden, precision=args.precision,
                                       backend=args.backend).to(device)
        layer = pred.layout.layers[-1]
        rows = torch.arange(layer.kernel_offset, layer.kernel_offset + layer.num_kernels, device=device)
        request = ops.make_request(pred.weights(), pred.layout, pred.encoding, rows, args.precision)
        backend = ops.select_backend(request, pred.backend).name
        largest = max(l.num_weights for l in pred.layout.layers) * 4
        calls = decode_call_times(pred, device, args.repeats)
        for path, times in calls.items():
            row = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "device": name,
                   "torch": torch.__version__, "net": net, "hidden": hidden, "precision": args.precision,
                   "backend": backend, "mode": "decode_calls", "path": path,
                   "layers": pred.layout.num_layers, **times}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{net:<9} decode every layer via {path:<13}: {times['host_us_per_layer']:8.1f} us/layer "
                  f"host, {times['us_per_layer']:8.1f} us/layer until done")
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, 32, 32, device=device)
            materialized_ms = whole_materialized_ms = None
            for mode, kw in variants(largest, sum(p.numel() * p.element_size() for p in pred.parameters())):
                pred.attach(model, mode=mode, **kw)
                state = attachment(model)

                def forward():
                    with torch.inference_mode():
                        model(x)
                timed(forward, device, 3)  # learns the conv order, fills caches, compiles kernels
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                    resident = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                state.reset_stats()
                seconds = timed(forward, device, args.repeats)
                peak = (torch.cuda.max_memory_allocated(device) - resident) if device.type == "cuda" else None
                median_ms = statistics.median(seconds) * 1e3
                if mode == "materialized":
                    materialized_ms = median_ms
                label = mode + ("" if "prefetch" not in kw else f" prefetch={'on' if kw['prefetch'] else 'off'}")
                label += " graphs" if kw.get("graphs") else ""
                label += " per-layer" if kw.get("group_bytes") == 0 else ""
                label += f" ws={kw['workspace_bytes'] / 2**20:.1f}MB" if "workspace_bytes" in kw else ""
                row = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit, "device": name,
                       "torch": torch.__version__, "net": net, "hidden": hidden, "precision": args.precision,
                       "backend": backend, "batch": batch, "mode": mode, **kw,
                       "prefetch_active": state.prefetch, "median_ms": median_ms,
                       "p20_ms": sorted(seconds)[len(seconds) // 5] * 1e3,
                       "vs_materialized": median_ms / materialized_ms,
                       "resident_mb": resident / 2**20 if device.type == "cuda" else None,
                       "forward_peak_mb": peak / 2**20 if peak is not None else None,
                       "held_peak_mb": state.stats["peak_held_bytes"] / 2**20,
                       "largest_layer_mb": largest / 2**20, "predictor_mb": state.predictor_bytes / 2**20,
                       "groups": len(state.groups), "largest_group_mb": state.largest_group_bytes / 2**20,
                       "decodes": state.stats["decodes"], "prefetched": state.stats["prefetched"],
                       "graph_replays": state.stats["graph_replays"], "graphs_disabled": state.graphs_disabled}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
                print(f"{net:<9} {batch:>5} {label:<40} {median_ms:>10.3f} {median_ms / materialized_ms:>7.2f} "
                      f"{fmt(row['resident_mb']):>11} {fmt(row['forward_peak_mb']):>15} "
                      f"{row['held_peak_mb']:>12.3f} {state.stats['prefetched']:>10}")
                if device.type == "cuda" and (mode, kw) in WHOLE_GRAPH:
                    replay = whole_forward_graph(model, x)
                    graph_row = {**row, "whole_graph": True, "graph_error": None if callable(replay) else replay}
                    if callable(replay):
                        seconds = timed(replay, device, args.repeats)
                        graph_row["median_ms"] = statistics.median(seconds) * 1e3
                        graph_row["p20_ms"] = sorted(seconds)[len(seconds) // 5] * 1e3
                        graph_row["vs_materialized"] = graph_row["median_ms"] / materialized_ms
                        if mode == "materialized":
                            whole_materialized_ms = graph_row["median_ms"]
                        graph_row["vs_materialized_whole_graph"] = (
                            graph_row["median_ms"] / whole_materialized_ms if whole_materialized_ms else None)
                        print(f"{net:<9} {batch:>5} {label + ' whole-graph':<40} {graph_row['median_ms']:>10.3f} "
                              f"{graph_row['vs_materialized']:>7.2f}   (vs materialized whole-graph "
                              f"{fmt(graph_row['vs_materialized_whole_graph'])})")
                    else:
                        print(f"{net:<9} {batch:>5} {label + ' whole-graph':<40} capture failed: {replay}")
                    with out.open("a") as f:
                        f.write(json.dumps(graph_row) + "\n")
                    del replay
                pred.detach(model)
        print(f"({net}: backend {backend}, largest layer {largest / 2**20:.3f} MB, predictor "
              f"{sum(p.numel() for p in pred.parameters()) * 4 / 2**20:.3f} MB, device {name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

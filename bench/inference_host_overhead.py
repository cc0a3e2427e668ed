"""Host time an on-demand forward with ``graphs=True`` adds per represented conv, measured on the CPU.

On a GPU, on-demand inference of a small network is bound by host time; with ``graphs=True`` what
is left per represented conv is the attachment's bookkeeping (hooks, slot views, events) plus a
graph replay. This times that bookkeeping without a GPU: ResNet-56 batch 1, one CPU thread, the
CUDA stream/event calls stubbed and each layer's "graph" a no-op replay (the layers were decoded
once at capture), against the materialized forward of the same model. The difference per conv is
the bookkeeping; a GPU adds the real event records (two per conv) and graph replays.

    python -m bench.inference_host_overhead [--out bench/results/inference_graph_host_overhead_cpu.jsonl]

Appends one JSON line per run (the shared 2-core CPU is noisy: compare several).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from nern_fast import FastPredictor
from nern_fast import inference_graphs
from nern_fast.inference import attachment
from nern_fast.models import cifar_resnet

from .harness import git_commit, run_device_label


class _Event:
    def record(self, stream=None):
        pass


class _Stream:
    def wait_event(self, event):
        pass


class _NoopGraph:
    def replay(self):
        pass


def _capture(self, i, weight):
    self._fill(i, weight)  # decoded once, as a real capture's eager first decode
    self.captures += 1
    return _NoopGraph()


def forward_ms(model, x, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/inference_graph_host_overhead_cpu.jsonl")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = cifar_resnet(56).eval()
    pred = FastPredictor.for_model(model, include="nern", hidden=32)
    x = torch.randn(1, 3, 32, 32)
    pred.attach(model, mode="materialized")
    forward_ms(model, x, 5)
    materialized = forward_ms(model, x, args.repeats)
    pred.detach(model)
    main_stream = _Stream()
    with mock.patch.object(torch.cuda, "current_stream", lambda device=None: main_stream), \
            mock.patch.object(torch.cuda, "Event", _Event), \
            mock.patch.object(torch.cuda, "synchronize", lambda device=None: None), \
            mock.patch.object(inference_graphs.GraphedDecodes, "_capture", _capture):
        pred.attach(model, mode="on_demand")
        state = attachment(model)
        state._graphed = inference_graphs.GraphedDecodes(
            state._decoder, pred.layout.layers, [d for d, _, _ in state._params], state.device)
        forward_ms(model, x, 3)  # captures
        state.reset_stats()
        graphed = forward_ms(model, x, args.repeats)
        replays = state.stats["graph_replays"]
        pred.detach(model)
    layers = pred.layout.num_layers
    commit = git_commit()
    row = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
           "device": run_device_label("cpu"),
           "torch": torch.__version__, "net": "resnet56", "batch": 1, "represented_convs": layers,
           "materialized_ms": materialized, "on_demand_graphs_stubbed_ms": graphed,
           "host_us_per_conv": (graphed - materialized) / layers * 1e3,
           "replays_per_forward": replays / args.repeats}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the csrc backend's CPU time goes on the ResNet-56 layout (H=280, fp32), as one JSON file.

The numbers the csrc README quotes about its CPU design choices, each measured in one process:

* forward+backward (full gradient) with the hidden activations recomputed in the backward
  (``NERN_FAST_CPU_SAVE_MB=0``), kept in a fresh buffer per call (``NERN_FAST_CPU_REUSE_SAVED=0``),
  and kept in the reused buffer (the default);
* the forward alone: without gradient, and with gradient (keeping activations) fresh vs reused;
* the cost of first-touching a buffer the size of the kept activations (page faults) vs refilling one;
* one layer's decode (on-demand inference) against the full decode: layer 0 and the sum over layers.

Run: ``python -m bench.csrc_cpu_breakdown [--out bench/results] [--threads 2]``; writes
``csrc_cpu_breakdown_<device>.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

from . import harness
from .results_view import slug
from .suite import DEFAULT_OUT, REPO

TIMER = harness.TimerSettings(warmup=1, min_repeats=5, max_repeats=9, min_seconds=2.0, max_seconds=30.0)


@contextlib.contextmanager
def env(**values):
    """Environment variables the extension reads on every call, set for the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def milliseconds(fn) -> float:
    return harness.time_cpu(fn, TIMER).median * 1e3


def measure() -> dict:
    from nern_fast import FastPredictor
    from nern_fast.models import cifar_resnet

    torch.manual_seed(0)
    pred = FastPredictor.for_model(cifar_resnet(56), include="nern", hidden=280, backend="csrc")
    grad = torch.randn(pred.layout.num_weights, generator=torch.Generator().manual_seed(1))

    def forward_backward():
        pred.decode_flat().backward(grad)

    def forward_with_grad():
        pred.decode_flat()  # the graph (and the kept activations) is freed on return

    kept_mb = (pred.num_blocks - 2) * pred.layout.num_kernels * pred.hidden * 4 / 2**20
    shape = (pred.num_blocks - 2, pred.layout.num_kernels, pred.hidden)
    refill = torch.empty(shape)
    result = {"layout": "resnet56", "hidden": pred.hidden, "precision": "fp32",
              "kernels": pred.layout.num_kernels, "kept_activations_mb": round(kept_mb, 1)}
    with env(NERN_FAST_CPU_SAVE_MB=0):
        result["fwd_bwd_recompute_ms"] = milliseconds(forward_backward)
    with env(NERN_FAST_CPU_REUSE_SAVED=0):
        result["fwd_bwd_kept_fresh_buffer_ms"] = milliseconds(forward_backward)
        result["fwd_with_grad_fresh_buffer_ms"] = milliseconds(forward_with_grad)
    result["fwd_bwd_kept_reused_buffer_ms"] = milliseconds(forward_backward)
    result["fwd_with_grad_reused_buffer_ms"] = milliseconds(forward_with_grad)
    with torch.no_grad():
        result["fwd_no_grad_ms"] = milliseconds(pred.decode_flat)
        result["first_touch_buffer_ms"] = milliseconds(lambda: torch.empty(shape).fill_(1.0))
        result["refill_buffer_ms"] = milliseconds(lambda: refill.fill_(1.0))
        layers = [milliseconds(lambda i=i: pred.decode_layer(i)) for i in range(len(pred.layout.layers))]
    result["decode_layer0_ms"] = layers[0]
    result["decode_every_layer_sum_ms"] = sum(layers)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.csrc_cpu_breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    environment = harness.Environment.capture(device, "csrc-cpu-breakdown", REPO)
    result = {**environment.row(), **measure()}
    out = Path(args.out) / f"csrc_cpu_breakdown_{slug(environment.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

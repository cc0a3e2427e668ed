"""Gradient accuracy of every Triton backward configuration against a float64 decode.

The tuner picks the fastest backward configuration and never looks at its numbers; the tests check
each candidate on small layouts. This runs each candidate (both schedules, operands as stored and
K-major, separable and direct first layer) on a random subset of a bench workload's rows (those away
from ReLU kinks: ``nern_fast.reference.well_conditioned_rows``) and records, per parameter
tensor, the error of its gradient against float64 eager, next to eager's own error at the same
precision (and in fp32). On a GPU (the interpreter is far too slow for these sizes).

    python -m bench.backward_accuracy [--layout resnet18] [--hidden 1256] [--precision tf32]
                                      [--rows 131072] [--out FILE.jsonl]

Errors: ``frob`` is |g - g64| / |g64| (Frobenius), ``max`` is max|g - g64| / max|g64| (the bench
suite's "max rel grad err"). One JSON line per configuration, eager's lines first.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from nern_fast import ops
from nern_fast.ops import triton_backend as tb
from nern_fast.reference import well_conditioned_rows

from .workloads import NERN_HIDDEN, Workload


def _errors(grads, exact) -> dict:
    frob = [((g.double() - r).norm() / r.norm().clamp_min(1e-300)).item() for g, r in zip(grads, exact)]
    top = [((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-300)).item() for g, r in zip(grads, exact)]
    return {"frob": frob, "max": top, "worst_frob": max(frob), "worst_max": max(top)}


def _eager_grads(work, rows, upstream, dtype, precision):
    weights = [w.detach().to(dtype).requires_grad_() for w in work.weights]
    biases = [b.detach().to(dtype).requires_grad_() for b in work.biases]
    out = ops.decode(weights, biases, work.layout, work.encoding, rows, precision, "eager")
    return torch.autograd.grad(out, weights + biases, upstream.to(dtype))


def _configs(shape) -> list:
    """Every backward candidate of both schedules, plus each with the direct first layer."""
    found = []
    for schedule in ("chunked", "fused"):
        for config in tb.candidate_configs("bwd", shape, "auto", schedule, True):
            for variant in (config, dataclasses.replace(config, separable=False)):
                if variant not in found:
                    found.append(variant)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="resnet18")
    parser.add_argument("--hidden", type=int, default=None, help="default: the NeRN size of the layout")
    parser.add_argument("--precision", default="tf32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--rows", type=int, default=1 << 17, help="random kernel rows decoded (subset)")
    parser.add_argument("--out", default=None, help="append JSON lines here (default: stdout only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("backward_accuracy: needs a CUDA device", file=sys.stderr)
        return 2
    # every candidate, the opt-in K-major backward ones included (what this check is to clear)
    os.environ.setdefault("NERN_FAST_TRITON_K_MAJOR", "1")
    device = torch.device("cuda")
    hidden = args.hidden or NERN_HIDDEN[args.layout]
    work = Workload(args.layout, hidden, device)
    # Rows away from ReLU kinks only: a mask flipped by rounding would move a whole row's gradient and
    # make the errors luck (with 96 rows of ResNet-18 at H = 1256, eager fp32 was 1e-3 off float64).
    rows = well_conditioned_rows(work.weights, work.biases, work.layout, work.encoding,
                                 work.subset_rows(args.rows))
    upstream = torch.randn((rows.numel(), work.layout.kernel_size ** 2),
                           generator=torch.Generator().manual_seed(1)).to(device)
    exact = _eager_grads(work, rows, upstream, torch.float64, "fp32")
    base = {"layout": args.layout, "hidden": hidden, "rows": int(rows.numel()), "precision": args.precision,
            "device": torch.cuda.get_device_name(device)}

    def emit(line: dict) -> None:  # as it comes: a run cut short keeps what it measured
        text = json.dumps(line)
        print(text if "worst_frob" not in line else
              f"{line['decoder']:90s} worst frob {line['worst_frob']:.2e}  worst max {line['worst_max']:.2e}",
              flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(text + "\n")

    for p in ("fp32", args.precision):
        emit({**base, "decoder": f"eager {p}", **_errors(_eager_grads(work, rows, upstream, torch.float32, p), exact)})
    weights = [w.detach() for w in work.weights]
    biases = [b.detach() for b in work.biases]
    tensors, static = ops.get_backend("triton")._layout_arguments(work.layout, work.encoding, device)
    inputs = tb.make_launch_inputs(weights, biases, rows, *tensors, *static, args.precision)
    for config in _configs(inputs.shape):
        name = f"triton {config.describe()}"
        try:
            flat = tb._run_backward(inputs, upstream, config, False, 1 << 30)
        except Exception as exc:  # a candidate this device cannot build: say so, go on
            emit({**base, "decoder": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        grads_w, grads_b = tb.unpack_gradients(flat, weights)
        emit({**base, "decoder": name, **_errors(grads_w + grads_b, exact)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

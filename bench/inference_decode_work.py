"""Work an on-demand forward launches for its decodes: decode groups vs one call per layer, the
preparation shared per forward vs per layer.

Every layer decode of an on-demand forward on the Triton backend needs the predictor packed as the
kernels read it (tf32: rounded copies; bf16: bf16 copies) and the separable first-layer tables of
the whole layout. ``LayerDecoder`` makes that once per forward (``TritonBackend.prepare``); before,
every layer's decode made it again. On a GPU each launching op is a kernel (or a few) and host
time; this counts them without a GPU: ResNet-56 (or ``--net``), batch 1, the Triton backend under
the interpreter with its kernel launches replaced by counted no-ops (``bench.decode_host_time``'s
stub; the packing makes the tf32/bf16 copies a GPU call makes). Per precision it measures the
default (decode groups: one call per group of consecutive layers, ``nern_fast.inference_groups``),
one call per layer (``group_bytes=0``), and one call per layer with the preparation made by every
call (sharing turned off, as the code was before session 9), and records

  launching_ops_per_forward  aten ops that launch work in one on-demand forward (convs, BN, ... too)
  triton_launches_per_forward  decode and table kernels launched (no-ops here)
  host_ms                    wall time of the forward (convs on garbage weights included)

and the same counts for the materialized forward (what the convs and the rest launch by themselves).

    python -m bench.inference_decode_work [--net resnet56] [--hidden 280] [--out FILE.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from unittest import mock


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="resnet56", help="a CIFAR ResNet: resnet20, resnet56, ...")
    parser.add_argument("--hidden", type=int, default=280)
    parser.add_argument("--precisions", default="fp32,tf32,bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/inference_decode_work_cpu.jsonl")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (nern_fast imports it)
    import torch

    from nern_fast import FastPredictor
    from nern_fast.inference import LayerDecoder
    from nern_fast.models import cifar_resnet
    from nern_fast.ops import triton_inputs

    from .decode_host_time import stub_triton_launches
    from .harness import count_ops, git_commit, run_device_label

    launches: Counter = Counter()
    stub_triton_launches(launches)
    triton_inputs.CONVERT_ON_PACK = True
    torch.set_num_threads(1)
    torch.manual_seed(0)
    depth = int(args.net.removeprefix("resnet"))
    model = cifar_resnet(depth).eval()
    pred = FastPredictor.for_model(model, include="nern", hidden=args.hidden, backend="triton")
    x = torch.randn(1, 3, 32, 32)

    def measure(label: str, precision: str) -> dict:
        def forward():
            with torch.inference_mode():
                model(x)
        for _ in range(2):
            forward()
        launches.clear()
        ops = count_ops(forward, suffix="_per_forward")
        triton = sum(launches.values())
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
        return {"net": args.net, "hidden": args.hidden, "represented_convs": pred.layout.num_layers,
                "precision": precision, "mode": label,
                "launching_ops_per_forward": ops["launching_ops_per_forward"],
                "triton_launches_per_forward": triton, "host_ms": statistics.median(times) * 1e3,
                "top_ops": ops["top_ops"]}

    rows = []
    for precision in args.precisions.split(","):
        pred.precision = precision
        pred.attach(model, mode="materialized")
        rows.append(measure("materialized", precision))
        pred.detach(model)
        pred.attach(model, mode="on_demand")
        rows.append(measure("on_demand, decode groups, prepared per_forward", precision))
        pred.detach(model)
        pred.attach(model, mode="on_demand", group_bytes=0)
        rows.append(measure("on_demand, per layer, prepared per_forward", precision))
        share = LayerDecoder.share_preparation
        with mock.patch.object(LayerDecoder, "share_preparation", lambda self, on: share(self, False)):
            rows.append(measure("on_demand, per layer, prepared per_layer", precision))
        pred.detach(model)
    common = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
              "device": run_device_label("cpu", "Triton launches stubbed"), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps({**common, **row}) + "\n")
    for row in rows:
        print(f"{row['precision']:5s} {row['mode']:48s} launching ops {row['launching_ops_per_forward']:5d}  "
              f"triton launches {row['triton_launches_per_forward']:4d}  host {row['host_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

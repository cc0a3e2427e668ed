"""``nern-fast demo``: build a CIFAR ResNet, decode its layout with a fresh predictor, print the table."""
from __future__ import annotations

import time


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the embedded default job")
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--hidden", type=int, default=280)
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from nern_fast import FastPredictor
    from nern_fast.models import cifar_resnet

    model = cifar_resnet(args.depth)
    pred = FastPredictor.for_model(model, include="nern", hidden=args.hidden)
    print(pred.layout.table())
    start = time.perf_counter()
    with torch.no_grad():
        weights = pred()
    seconds = time.perf_counter() - start
    print(f"\nResNet-{args.depth}: {pred.layout.num_layers} represented layers, "
          f"{pred.layout.num_kernels} kernels, {pred.represented_parameters} weights")
    print(f"predictor H={args.hidden}: {pred.num_parameters} parameters, compression ratio "
          f"{pred.compression_ratio:.4f}")
    print(f"decoded {len(weights)} layers in {seconds:.3f} s on cpu")
    return 0

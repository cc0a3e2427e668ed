"""Profile training steps on the ResNet-56 CIFAR layout and report how busy the GPU is.

A distillation step (NeRN's joint recipe by default: decode every kernel, gradients through a
sampled subset, CNN forward with the decoded weights, feature-map + logit distillation, Ranger)
runs on synthetic CIFAR-shaped data under ``torch.profiler``. The summary written to ``--out``
(JSON, plus a Markdown table beside it) gives the step wall time, the GPU busy fraction (union of
kernel intervals / wall time of the profiled steps), kernels per step and the top kernels.

    python bench/profile_distill_step.py --out bench/results/profile_distill_step.json
    python bench/profile_distill_step.py --recipe decoupled --cuda-graphs --out ...
    python bench/profile_distill_step.py --recipe reconstruct --cuda-graphs --out ...

``--recipe``: joint (recon + 1e-5 fmd + 1e-5 KD, sampled gradients), decoupled (stage 2: KD only,
full gradients), reconstruct (stage 1: subset decode only, no CNN). On a machine without CUDA it
runs on the CPU and reports CPU timings only (the GPU fraction is then not defined).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import count_ops, gpu_activities  # noqa: E402
from nern_fast.config import OptimConfig, StageConfig  # noqa: E402
from nern_fast.models import cifar_resnet  # noqa: E402
from nern_fast.predictor import FastPredictor  # noqa: E402
from nern_fast.train.fit import backend_name  # noqa: E402
from nern_fast.train.graphs import graphed_distillation, maybe_graphed  # noqa: E402
from nern_fast.train.losses import feature_module_names  # noqa: E402
from nern_fast.train.objectives import DistillationObjective, ReconstructionObjective  # noqa: E402
from nern_fast.train.optim import build_optimizer  # noqa: E402
from nern_fast.train.samplers import KernelSampler, kernel_norms  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="summary JSON file (a .md table is written beside it)")
    p.add_argument("--recipe", choices=("joint", "decoupled", "reconstruct"), default="joint")
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--hidden", type=int, default=280)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weights-batch-size", type=int, default=4096)
    p.add_argument("--gradients", choices=("sampled", "full"), default=None,
                   help="default: sampled for joint, full for decoupled")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32")
    p.add_argument("--backend", default="auto")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark, as the recipes set it (config cudnn_benchmark)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--trace", help="also write a chrome trace here")
    p.add_argument("--count-ops", action="store_true",
                   help="also count the aten ops one step dispatches, by name (any device: each "
                        "non-view op is a kernel launch on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def build_step(args, device):
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    model = cifar_resnet(args.depth, args.num_classes).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pred = FastPredictor.for_model(model, include="nern", hidden=args.hidden, backend=args.backend,
                                   precision=args.precision).to(device)
    target = pred.layout.flatten(model).to(device).float()
    gradients = args.gradients or ("full" if args.recipe == "decoupled" else "sampled")
    stage = StageConfig(type="reconstruct" if args.recipe == "reconstruct" else "distill",
                        steps=1, gradients=gradients, autocast=args.autocast,
                        weights_batch_size=args.weights_batch_size, cuda_graphs=args.cuda_graphs,
                        optim=OptimConfig(name="ranger"))
    if args.recipe == "joint":
        stage.reconstruction_weight, stage.fmd_weight, stage.kd_weight = 1.0, 1e-5, 1e-5
    elif args.recipe == "decoupled":
        stage.reconstruction_weight, stage.kd_weight = 0.0, 1.0
    optimizer = build_optimizer(pred.parameters(), stage.optim)
    sampler = KernelSampler(pred.layout, args.weights_batch_size, "random_weighted_batch", device,
                            0, kernel_norms(pred.layout, target))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device, generator=g)  # synthetic CIFAR batch
    with warnings.catch_warnings(record=True) as caught:  # a refused capture warns: record it
        warnings.simplefilter("always")
        if args.recipe == "reconstruct":
            objective = ReconstructionObjective(pred, target)
            compute = maybe_graphed(objective, (sampler.sample(),), args.cuda_graphs, "profile")
            forward = lambda: compute(sampler.sample())
        else:
            names = feature_module_names(model, "bn+blocks") if stage.fmd_weight > 0 else []
            objective = DistillationObjective(pred, target, model, None, stage, names)
            rows0 = sampler.sample() if gradients == "sampled" else torch.zeros(1, dtype=torch.long,
                                                                                 device=device)
            compute = graphed_distillation(objective, (x, rows0), args.cuda_graphs, "profile")
            forward = lambda: compute(x.normal_(generator=g),
                                      sampler.sample() if gradients == "sampled" else rows0)
    refused = [str(w.message) for w in caught if "runs eagerly" in str(w.message)]
    for message in refused:
        print(f"warning: {message}", file=sys.stderr)
    graphs = {"cuda_graphs_captured": bool(args.cuda_graphs and not refused),
              "cuda_graphs_note": refused[0] if refused else None}

    def step():
        loss, parts = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return parts

    return pred, step, gradients, graphs


def merged_busy(intervals, lo, hi):
    """Total length of the union of [start, end) intervals clipped to [lo, hi)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted((max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    pred, step, gradients, graphs = build_step(args, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    # Plain timing (no profiler overhead).
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    plain = (time.perf_counter() - t0) / args.steps

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            with torch.profiler.record_function("train_step"):
                step()
        sync()
    events = prof.events()
    steps = [e for e in events if e.name == "train_step"]
    lo = min(e.time_range.start for e in steps)
    kernels = gpu_activities(events)
    hi = max([e.time_range.end for e in steps] + [e.time_range.end for e in kernels])
    wall_us = hi - lo
    busy_us = merged_busy([(e.time_range.start, e.time_range.end) for e in kernels], lo, hi)
    by_name: dict = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    summary = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "recipe": args.recipe, "gradients": gradients,
        "depth": args.depth, "hidden": args.hidden, "batch_size": args.batch_size,
        "weights_batch_size": args.weights_batch_size, "kernels": pred.layout.num_kernels,
        "backend": backend_name(pred), "precision": args.precision, "autocast": args.autocast,
        "cuda_graphs": args.cuda_graphs, **graphs, "cudnn_benchmark": args.cudnn_benchmark,
        "profiled_steps": args.steps,
        "step_ms": plain * 1e3, "step_ms_profiled": wall_us / 1e3 / args.steps,
        "gpu_busy_fraction": (busy_us / wall_us) if cuda and wall_us > 0 else None,
        "kernels_per_step": len(kernels) / args.steps if cuda else None,
        "top_kernels_ms_per_step": {k: v / 1e3 / args.steps for k, v in top},
    }
    if args.count_ops:
        summary.update(count_ops(step))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    busy = summary["gpu_busy_fraction"]
    lines = [f"# profile_distill_step: {args.recipe} on ResNet-{args.depth} ({summary['device']})", "",
             "| metric | value |", "|---|---|"]
    for key in ("backend", "gradients", "hidden", "batch_size", "weights_batch_size", "precision",
                "autocast", "cuda_graphs", "cuda_graphs_captured", "cudnn_benchmark", "step_ms",
                "step_ms_profiled", "kernels_per_step",
                "aten_ops_per_step", "launching_ops_per_step"):
        value = summary.get(key)
        if value is None and key.endswith("ops_per_step"):
            continue
        lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines.append(f"| GPU busy % of step wall time | {'-' if busy is None else f'{100 * busy:.1f}'} |")
    lines += ["", "| top kernels | ms / step |", "|---|---|"]
    lines += [f"| {k[:90]} | {v:.3f} |" for k, v in summary["top_kernels_ms_per_step"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

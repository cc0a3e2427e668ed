"""File size and accuracy cost of the compressed model file's predictor storage (fp32/fp16/bf16/int8).

Until the recipes' trained demo model exists this measures its own stand-in, a CIFAR ResNet-20
(1 input channel) on scikit-learn's 8×8 digits: the network is trained normally; a predictor is
fitted to its block convs by weight reconstruction only (no data, NeRN's "L2Loss"; ``--steps``),
optionally followed by logit distillation (``--kd-steps``). A brief reconstruction leaves the
reconstructed network at chance accuracy, so ``--calibrate-epochs`` then trains only what the
predictor does not represent (stem, BN, classifier; the decoded block convs fixed) on the digits
training images: the compressed fp32 file then holds a working network whose block convs are exactly
the predictor's decode.

For every storage dtype it saves the compressed file, loads it back and reports: file size vs the
plain state dict, the weight error (vs the original weights and vs the fp32 predictor's decode),
digits test accuracy, and output agreement with the fp32-predictor model on test digits and on
uniform-noise inputs (data-free). Results: one JSON file (``--out``).

    python -m bench.compressed_storage [--epochs 15] [--steps 1500] [--calibrate-epochs 10]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nern_fast import FastPredictor, load_compressed, save_compressed
from nern_fast.compressed import PREDICTOR_DTYPES, state_dict_bytes
from nern_fast.models import cifar_resnet


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return (x[train], y[train]), (x[test], y[test])


def train_base(train, epochs: int, seed: int = 0, model=None):
    torch.manual_seed(seed)
    model = model if model is not None else cifar_resnet(20, num_classes=10, in_channels=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(train[1]) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(train[1]))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def fit_predictor(model, hidden: int, steps: int, batch: int = 4096, seed: int = 0):
    """Reconstruction-only fit on random kernel subsets (NeRN's L2Loss), Adam with cosine decay."""
    torch.manual_seed(seed)
    pred = FastPredictor.for_model(model, include="nern", hidden=hidden)
    layout = pred.layout
    target = layout.flatten(model).detach()
    opt = torch.optim.Adam(pred.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
    for _ in range(steps):
        rows = torch.randint(layout.num_kernels, (batch,))
        loss = (pred.decode_kernels(rows) - layout.kernel_rows(target, rows)).square().mean().sqrt()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return pred


def distill(pred, model, train, steps: int, batch: int = 128, seed: int = 0):
    """Logit distillation (KL(teacher || student), batchmean) of the reconstructed network into the
    original one, every step decoding all represented weights with gradients."""
    torch.manual_seed(seed)
    names = [f"{l.name}.weight" for l in pred.layout.layers]
    opt = torch.optim.Adam(pred.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
    for _ in range(steps):
        idx = torch.randint(len(train[1]), (batch,))
        x = train[0][idx]
        with torch.no_grad():
            teacher = model(x)
        student = torch.func.functional_call(model, dict(zip(names, pred())), (x,))
        loss = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return pred


def calibrate(model, pred, train, epochs: int, seed: int = 0):
    """Train the unrepresented parameters (and BN statistics) of ``model`` with the predictor's
    decoded block convs written in and frozen."""
    torch.manual_seed(seed)
    pred.load_into(model)
    represented = {f"{l.name}.weight" for l in pred.layout.layers}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in represented)
    train_base(train, epochs, seed, model=model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean().sqrt())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--kd-steps", type=int, default=0)
    parser.add_argument("--calibrate-epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=180)
    parser.add_argument("--noise-samples", type=int, default=512)
    parser.add_argument("--out", default="bench/results/compressed_storage.json")
    args = parser.parse_args()

    started = time.time()
    train, test = digits()
    base = train_base(train, args.epochs)
    pred = fit_predictor(base, args.hidden, args.steps)
    if args.kd_steps:
        pred = distill(pred, base, train, args.kd_steps)
    with torch.no_grad():
        reconstructed_only = copy.deepcopy(base)
        pred.load_into(reconstructed_only)
        reconstructed_only_accuracy = float((reconstructed_only(test[0]).argmax(1) == test[1]).float().mean())
    stored = calibrate(copy.deepcopy(base), pred, train, args.calibrate_epochs) if args.calibrate_epochs else base
    layout = pred.layout
    original = layout.flatten(base).detach()
    noise = torch.rand(args.noise_samples, 1, 8, 8) * 2 * test[0].abs().max() - test[0].abs().max()

    with torch.no_grad():
        base_test = base(test[0])
        base_noise = base(noise)
    plain_bytes = state_dict_bytes(stored)
    rows = []
    reference = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in PREDICTOR_DTYPES:
            path = save_compressed(stored, pred, Path(tmp) / f"resnet20_{dtype}.nfz", predictor_dtype=dtype)
            model, loaded = load_compressed(path)
            with torch.no_grad():
                decoded = layout.flatten(model)
                logits_test, logits_noise = model(test[0]), model(noise)
            if dtype == "fp32":
                reference = {"decoded": decoded, "test": logits_test, "noise": logits_noise}
            rows.append({
                "predictor_dtype": dtype,
                "file_bytes": path.stat().st_size,
                "plain_state_dict_bytes": plain_bytes,
                "ratio": path.stat().st_size / plain_bytes,
                "weight_rmse_vs_original": rmse(decoded, original),
                "weight_rmse_vs_fp32_predictor": rmse(decoded, reference["decoded"]),
                "test_accuracy": float((logits_test.argmax(1) == test[1]).float().mean()),
                "test_top1_agreement_vs_fp32_predictor": float(
                    (logits_test.argmax(1) == reference["test"].argmax(1)).float().mean()),
                "test_max_abs_logit_diff_vs_fp32_predictor": float((logits_test - reference["test"]).abs().max()),
                "noise_top1_agreement_vs_fp32_predictor": float(
                    (logits_noise.argmax(1) == reference["noise"].argmax(1)).float().mean()),
                "noise_top1_agreement_vs_original": float(
                    (logits_noise.argmax(1) == base_noise.argmax(1)).float().mean()),
            })
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "what": "ResNet-20 (1 input channel) trained on sklearn digits 8x8; predictor fitted by weight "
                "reconstruction; unrepresented parameters calibrated on digits with the decoded block "
                "convs fixed; compressed file per predictor storage dtype",
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "epochs": args.epochs, "fit_steps": args.steps, "kd_steps": args.kd_steps,
        "calibrate_epochs": args.calibrate_epochs,
        "reconstructed_before_calibration_test_accuracy": reconstructed_only_accuracy, "hidden": args.hidden,
        "predictor_parameters": pred.num_parameters, "represented_weights": pred.represented_parameters,
        "compression_ratio": pred.compression_ratio,
        "original_test_accuracy": float((base_test.argmax(1) == test[1]).float().mean()),
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

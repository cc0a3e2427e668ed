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

With ``--run DIR`` it measures a real run of ``nern-fast fit`` instead (e.g. ``make demo``'s
``runs/demo``): for each ``--stage NAME`` (the predictor file ``DIR/stages/*-NAME.pt``, or ``final``
for ``DIR/predictor.pt``) the original network (``DIR/base/model.pt`` when the recorded checkpoint
path does not exist from here) is saved as a compressed file per storage dtype, loaded back with
``load_compressed`` (no model_fn: rebuilt from the file's model spec) and evaluated on the run's own
test split with the recipes' data and evaluation code (``nern_fast.data``,
``nern_fast.train.evaluation.accuracy``), in "parameters" mode and attached on demand::

    python -m bench.compressed_storage --run runs/demo --stage distill --stage progressive2
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nern_fast import FastPredictor, load_compressed, save_compressed
from nern_fast.compressed import PREDICTOR_DTYPES, state_dict_bytes
from nern_fast.models import cifar_resnet

from .harness import git_commit, run_device_label


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


def stage_file(run_dir: Path, stage: str) -> Path:
    """The predictor file of stage ``stage`` of a fit run (``final``: the run's predictor.pt)."""
    if stage == "final":
        path = run_dir / "predictor.pt"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (is {run_dir} the output folder of nern-fast fit?)")
        return path
    matches = sorted((run_dir / "stages").glob(f"*-{stage}.pt"))
    if len(matches) != 1:
        known = sorted(p.stem.split("-", 1)[-1] for p in (run_dir / "stages").glob("*.pt"))
        raise SystemExit(f"{run_dir}/stages has {len(matches)} files for stage '{stage}'; stages "
                         f"there: {known or 'none'}")
    return matches[0]


def run_config(run_dir: Path, recorded: dict):
    """The network and data config recorded in a predictor file, its checkpoint found in the run."""
    from nern_fast.config import load_config
    model_cfg = dict(recorded.get("model") or {})
    checkpoint = model_cfg.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        model_cfg["checkpoint"] = str(run_dir / "base" / "model.pt")
    return load_config(data={"model": model_cfg, "data": recorded.get("data") or {}})


def measure_stage(run_dir: Path, stage: str, tmp: Path) -> dict:
    """Every predictor storage dtype of one stage: file size, weight error and test accuracy."""
    from nern_fast.io import safe_load
    from nern_fast.predictor import FILE_FORMAT
    from nern_fast.train import setup
    from nern_fast.train.evaluation import accuracy
    from nern_fast.train.fit import RUN_KEY

    path = stage_file(run_dir, stage)
    data = safe_load(path, FILE_FORMAT, map_location="cpu")
    if not data.get(RUN_KEY):
        raise SystemExit(f"{path} records no network and data (not written by nern-fast fit)")
    cfg = run_config(run_dir, data[RUN_KEY])
    device = torch.device("cpu")
    task = setup.load_data(cfg)
    model = setup.frozen(setup.make_network(cfg.model, task), device)
    pred = FastPredictor.from_file_dict(data, model, str(path)).to(device).eval()
    layout = pred.layout

    def test():
        return task.test_batches(cfg.data.eval_batch_size, device)

    def logits(net):
        with torch.no_grad():
            return torch.cat([net(x) for x, _ in test()])

    labels = torch.cat([y for _, y in test()])
    original = layout.flatten(model).detach()
    with torch.no_grad():
        fp32_decode = pred.decode_flat().detach()
    original_accuracy = accuracy(model, test())
    plain_bytes = state_dict_bytes(model)
    checkpoint_bytes = Path(cfg.model.checkpoint).stat().st_size
    rows, reference_logits = [], None
    for dtype in PREDICTOR_DTYPES:
        file = save_compressed(model, pred, tmp / f"{stage}_{dtype}.nfz", predictor_dtype=dtype)
        loaded_model, loaded_pred = load_compressed(file)  # rebuilt from the recorded model spec
        decoded = layout.flatten(loaded_model).detach()
        out = logits(loaded_model)
        if dtype == "fp32":
            reference_logits = out
        on_demand_model, _ = load_compressed(file, mode="on_demand")
        rows.append({
            "predictor_dtype": dtype,
            "file_bytes": file.stat().st_size,
            "ratio_vs_plain_state_dict": file.stat().st_size / plain_bytes,
            "test_accuracy": accuracy(loaded_model, test()),
            "test_accuracy_on_demand": accuracy(on_demand_model, test()),
            "accuracy_drop_vs_fp32_predictor": None,  # filled below
            "weight_rmse_vs_fp32_predictor": rmse(decoded, fp32_decode),
            "weight_rmse_vs_original": rmse(decoded, original),
            "predictor_parameter_rmse_vs_fp32": rmse(
                torch.cat([p.detach().flatten() for p in loaded_pred.parameters()]),
                torch.cat([p.detach().flatten() for p in pred.parameters()])),
            "test_top1_agreement_vs_fp32_predictor": float(
                (out.argmax(1) == reference_logits.argmax(1)).float().mean()),
            "test_max_abs_logit_diff_vs_fp32_predictor": float((out - reference_logits).abs().max()),
        })
    for row in rows:
        row["accuracy_drop_vs_fp32_predictor"] = rows[0]["test_accuracy"] - row["test_accuracy"]
    return {
        "stage": stage, "predictor_file": str(path), "model": cfg.model.arch,
        "dataset": cfg.data.dataset, "test_images": int(labels.numel()),
        "hidden": pred.hidden, "predictor_parameters": pred.num_parameters,
        "represented_weights": pred.represented_parameters, "compression_ratio": pred.compression_ratio,
        "recorded_stage_accuracy": (data[RUN_KEY].get("accuracy")),
        "original_test_accuracy": original_accuracy,
        "plain_state_dict_bytes": plain_bytes, "original_checkpoint_file_bytes": checkpoint_bytes,
        "fp32_predictor_weight_rmse_vs_original": rmse(fp32_decode, original),
        "rows": rows,
    }


def main_run(args) -> int:
    started = time.time()
    run_dir = Path(args.run)
    stages = args.stage or ["final"]
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure_stage(run_dir, stage, Path(tmp)) for stage in stages]
    result = {
        "what": f"compressed model files of the predictor stages of the fit run {run_dir} "
                f"(predictor storage fp32/fp16/bf16/int8), reloaded with load_compressed and "
                f"evaluated on the run's test split",
        "device": run_device_label("cpu"),
        "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.time() - started, 1), "stages": results,
    }
    out = Path(args.out or "bench/results/compressed_storage_demo.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in results:
        print(f"{r['stage']}: {r['model']} on {r['dataset']} ({r['test_images']} test images), CR "
              f"{r['compression_ratio']:.4f}, original {r['original_test_accuracy']:.2f} %, plain "
              f"state dict {r['plain_state_dict_bytes']:,} B")
        for row in r["rows"]:
            print(f"  {row['predictor_dtype']:<5} {row['file_bytes']:>9,} B "
                  f"({row['ratio_vs_plain_state_dict']:.3f}x)"
                  f"  acc {row['test_accuracy']:.2f} % (on demand {row['test_accuracy_on_demand']:.2f} %)"
                  f"  drop {row['accuracy_drop_vs_fp32_predictor']:+.2f}"
                  f"  weight RMSE vs fp32 {row['weight_rmse_vs_fp32_predictor']:.2e}"
                  f"  top1 agreement {row['test_top1_agreement_vs_fp32_predictor']:.4f}")
    print(f"wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="output folder of a nern-fast fit run (measures its stages "
                                      "instead of the stand-in)")
    parser.add_argument("--stage", action="append", help="with --run: stage name (repeatable; "
                                                         "default: final)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--kd-steps", type=int, default=0)
    parser.add_argument("--calibrate-epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=180)
    parser.add_argument("--noise-samples", type=int, default=512)
    parser.add_argument("--out", help="JSON results (default: bench/results/compressed_storage.json, "
                                      "with --run compressed_storage_demo.json)")
    args = parser.parse_args()
    if args.run:
        return main_run(args)
    args.out = args.out or "bench/results/compressed_storage.json"

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
    commit = git_commit()
    result = {
        "what": "ResNet-20 (1 input channel) trained on sklearn digits 8x8; predictor fitted by weight "
                "reconstruction; unrepresented parameters calibrated on digits with the decoded block "
                "convs fixed; compressed file per predictor storage dtype",
        "device": run_device_label("cpu"),
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

"""``nern-fast demo`` (``make demo``): the embedded default job, end to end on a CPU.

Trains ResNet-20 on scikit-learn's digits (``OUT/base/model.pt``), fits a predictor with the
decoupled recipe at compression ratio <= 0.5, then runs two progressive reconstruction rounds
with a larger predictor, and prints the table (``OUT/report.md``, ``OUT/metrics.json``,
``OUT/accuracy.png``). The settings are ``configs/demo.yaml``; ``--quick`` shrinks every stage to
a few steps (a smoke test, not a result).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ._common import fail, user_errors

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

# --quick: the same pipeline, tiny: a few steps per stage and a small predictor.
QUICK = ["train_base.epochs=1", "predictor.hidden=24", "predictor.levels=6",
         "data.max_eval_batches=1", "logging.log_every=2", "logging.checkpoint_every=1000"]


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the embedded default job: ResNet-20 on digits, "
                                           "decoupled + progressive", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--config", default=None, help=f"demo config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry (repeatable)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the demo run already in --out (make demo passes it)")
    p.set_defaults(func=run)


def quick_overrides(raw: dict) -> list:
    out = list(QUICK)
    for i, stage in enumerate(raw.get("stages") or []):
        out += [f"stages.{i}.steps=3", f"stages.{i}.weights_batch_size=256"]
        if isinstance(stage, dict) and stage.get("epochs") is not None:
            out.append(f"stages.{i}.epochs=null")
        if isinstance(stage, dict) and stage.get("hidden") is not None:
            out.append(f"stages.{i}.hidden=32")
        if isinstance(stage, dict) and stage.get("loss_warmup_steps"):
            out.append(f"stages.{i}.loss_warmup_steps=1")  # below the 3 steps (validation)
        if isinstance(stage, dict) and isinstance(stage.get("optim"), dict) and stage["optim"].get("warmup_steps"):
            out.append(f"stages.{i}.optim.warmup_steps=1")
    return out


def _resume_command(out: Path) -> str:
    """The demo's fit stages resume as any fit run: from the config the demo wrote in ``out``."""
    return f"nern-fast fit --config {out / 'config.yaml'} --out {out} --resume"


def run(args) -> int:
    from nern_fast.config import ConfigError, load_config, read_yaml
    from nern_fast.train.base import MODEL_FILE, train_base
    from nern_fast.train.fit import FitRun, StageInterrupted
    from nern_fast.train.report import stage_table

    from nern_fast.train.errors import TrainingDiverged

    started = time.perf_counter()
    out = Path(args.out)
    try:
        if not args.overwrite and not (out / "metrics.json").exists() and (out / "checkpoint.pt").exists():
            raise FileExistsError(f"{out} holds an unfinished demo run; continue it with `{_resume_command(out)}`, "
                                  f"replace it with --overwrite, or choose another --out")
        if not args.overwrite and ((out / "base" / MODEL_FILE).exists() or (out / "metrics.json").exists()
                                   or (out / "checkpoint.pt").exists()):
            raise FileExistsError(f"{out} already holds a demo run; replace it with --overwrite or "
                                  f"choose another --out")
        path = Path(args.config) if args.config else DEFAULT_CONFIG
        if not path.exists():
            raise ConfigError(f"the demo config {path} is missing; pass --config (the repository's "
                              f"configs/demo.yaml)")
        raw = read_yaml(path)
        overrides = (quick_overrides(raw) if args.quick else []) + list(args.overrides)
        cfg = load_config(data=raw, overrides=overrides)
        print(f"[demo] 1/2 train-base: {cfg.model.arch} on {cfg.data.dataset} -> {out / 'base'}")
        base = train_base(cfg, out / "base", overwrite=args.overwrite)
        fit_cfg = load_config(data=raw, overrides=overrides + [
            f"model.checkpoint={out / 'base' / MODEL_FILE}"])
        print(f"[demo] 2/2 fit: {cfg.recipe} ({len(fit_cfg.stages)} stages) -> {out}")
        metrics = FitRun(fit_cfg, out, overwrite=args.overwrite,
                         resume_command=f"`{_resume_command(out)}`").run()
    except user_errors() as exc:
        return fail("demo", exc)
    except TrainingDiverged as exc:
        return fail("demo", exc, 1)
    except StageInterrupted as exc:  # (its message names the fit command that continues the run)
        print(f"nern-fast demo: {exc}", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - started
    print()
    print(stage_table(metrics))
    print(f"\n[demo] {cfg.model.arch} on {cfg.data.dataset}: original {metrics['original_accuracy']:.2f} %, "
          f"final {metrics['final_accuracy']:.2f} % at compression ratio "
          f"{metrics['compression_ratio']:.4f}; train-base {base['seconds']:.0f} s, total "
          f"{seconds:.0f} s on {metrics['device']} (decode backend {metrics['backend']})")
    print(f"[demo] wrote {out}/report.md, metrics.json, accuracy.png, predictor.pt", file=sys.stderr)
    return 0

"""``nern-fast fit``: run a recipe (the config's stages) and write metrics, report and predictor."""
from __future__ import annotations

import sys

from ._common import add_config_args, check_output_dir, fail, user_errors


def register(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a predictor with a recipe (joint, decoupled, "
                                          "progressive, data-free)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="output folder (checkpoint, logs, metrics, report)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    existing.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from nern_fast.config import load_config
    from nern_fast.train.fit import FitRun, StageInterrupted, TrainingDiverged
    from nern_fast.train.report import stage_table
    try:
        check_output_dir(args.out)
        cfg = load_config(args.config, args.overrides)
        metrics = FitRun(cfg, args.out, resume=args.resume, overwrite=args.overwrite).run()
    except user_errors() as exc:
        return fail("fit", exc)
    except TrainingDiverged as exc:
        return fail("fit", exc, 1)
    except StageInterrupted as exc:
        print(f"nern-fast fit: {exc}", file=sys.stderr)
        return 130
    print()
    print(stage_table(metrics))
    print(f"\nwrote {args.out}/metrics.json, report.md, accuracy.png, predictor.pt")
    return 0

"""``nern-fast train-base``: train the network to be represented and save ``OUT/model.pt``."""
from __future__ import annotations

import sys

from ._common import add_config_args, check_output_dir, fail, user_errors


def register(subparsers) -> None:
    p = subparsers.add_parser("train-base", help="train the network to represent (OUT/model.pt)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from nern_fast.config import load_config
    from nern_fast.train.base import train_base
    from nern_fast.train.errors import TrainingDiverged
    try:
        check_output_dir(args.out)
        cfg = load_config(args.config, args.overrides)
        train_base(cfg, args.out, overwrite=args.overwrite)
    except user_errors() as exc:
        return fail("train-base", exc)
    except TrainingDiverged as exc:
        return fail("train-base", exc, 1)
    except KeyboardInterrupt:  # the model is written at the end only: say what that means
        print("nern-fast train-base: interrupted; no new model was saved (train-base writes "
              "OUT/model.pt when it finishes and keeps no checkpoint in between; a model already "
              "there is kept as it was): run it again", file=sys.stderr)
        return 130
    return 0

"""``nern-fast train-base``: train the network to be represented and save ``OUT/model.pt``."""
from __future__ import annotations

from ._common import add_config_args, fail, user_errors


def register(subparsers) -> None:
    p = subparsers.add_parser("train-base", help="train the network to represent (OUT/model.pt)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from nern_fast.config import load_config
    from nern_fast.train.base import train_base
    try:
        cfg = load_config(args.config, args.overrides)
        train_base(cfg, args.out)
    except user_errors() as exc:
        return fail("train-base", exc)
    return 0

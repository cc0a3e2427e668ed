"""Argument helpers shared by the training subcommands."""
from __future__ import annotations

import sys


def add_config_args(p, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set stages.0.steps=200 (repeatable)")


def fail(command: str, exc: BaseException, code: int = 2) -> int:
    print(f"nern-fast {command}: error: {exc}", file=sys.stderr)
    return code


# What a user can get wrong (config, files, data): reported as one line, no traceback.
def user_errors() -> tuple:
    from nern_fast.config import ConfigError
    from nern_fast.data import DataError
    from nern_fast.io import FileFormatError
    from nern_fast.layout import LayoutError
    from nern_fast.ops import BackendUnavailable
    return (ConfigError, DataError, FileFormatError, LayoutError, BackendUnavailable,
            FileNotFoundError, FileExistsError, ImportError)

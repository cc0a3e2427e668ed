"""Argument helpers shared by the subcommands: config options, output checks, one-line errors."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def add_config_args(p, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. --set seed=1 or --set data.batch_size=64 (repeatable)")


def fail(command: str, exc: BaseException, code: int = 2) -> int:
    print(f"nern-fast {command}: error: {exc}", file=sys.stderr)
    return code


# What a user can get wrong (config, files, data, the machine): reported as one line, no traceback.
def user_errors() -> tuple:
    from nern_fast.config import ConfigError
    from nern_fast.data import DataError
    from nern_fast.io import FileFormatError
    from nern_fast.layout import LayoutError
    from nern_fast.ops import BackendUnavailable
    return (ConfigError, DataError, FileFormatError, LayoutError, BackendUnavailable, OSError, ImportError)


# ---------------------------------------------------------------------- outputs, checked up front
# Before any work: a run that can only fail at its end, when it writes, wastes all of it.
def _check_can_create_in(folder: Path, option: str, given: Path) -> None:
    """``folder`` is a writable directory, or can be made in its nearest existing ancestor."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{option} {given}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {given}: {existing} is not writable; choose another place")


def check_output_dir(path, option: str = "--out") -> Path:
    """An output folder that exists or can be made, and can be written to."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path} is a file, not a directory; give a folder")
    _check_can_create_in(path, option, path)
    return path


def check_output_file(path, option: str) -> Path:
    """An output file that can be (re)written: not a directory, in a folder that can be written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{option} {path}: the file is not writable; choose another file")
    _check_can_create_in(path.resolve().parent, option, path)
    return path

"""The ``nern-fast`` command (also ``python -m nern_fast``).

Each subcommand lives in its own module under ``nern_fast.commands`` with ``register(subparsers)``
adding its parser and setting ``func``; this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Optional, Sequence

# Modules of nern_fast.commands, in the order their subcommands are listed by --help.
COMMAND_MODULES = ("demo", "train_base", "fit", "evaluate", "export", "bench", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nern-fast", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"nern_fast.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"nern_fast.commands.{name}":
                continue  # not part of this build yet
            raise
        module.register(subparsers)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for a command's user: the library's messages say what happened and
    what to do; the file, line and source line of the warn() call inside nern_fast do not."""
    return f"nern-fast: {category.__name__}: {message}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    sys.exit(main())

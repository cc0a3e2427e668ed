"""Subcommands of ``nern-fast``: one module each, with ``register(subparsers)``."""

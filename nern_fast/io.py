"""Files: atomic writes and safe, checked reads (shared by predictors, checkpoints, model files)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]


class FileFormatError(ValueError):
    """A file that is missing, truncated, corrupt, or not of the expected kind."""


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A crash or Ctrl-C midway leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets open()'s mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_torch_file(path: PathLike, what: str = "file", map_location="cpu") -> Any:
    """``torch.load(weights_only=True)`` of ``path`` with errors that name ``what`` it should be, the
    file and the problem (missing, empty, truncated, corrupt, not a torch file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file")
    if path.stat().st_size == 0:
        raise FileFormatError(f"{what} {path}: the file is empty (an interrupted write?); re-create it")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many kinds for a damaged or foreign file
        raise FileFormatError(f"{what} {path} cannot be read: it is truncated, corrupt or not a torch "
                              f"file ({type(exc).__name__}: {str(exc)[:200]})") from exc


def safe_load(path: PathLike, kind: str, map_location=None) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and the problem.

    ``kind`` is the expected ``format`` entry of the file (e.g. ``"nern_fast.predictor"``).
    """
    data = load_torch_file(path, f"{kind} file", map_location)
    if not isinstance(data, dict) or data.get("format") != kind:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FileFormatError(f"{path}: expected a {kind} file, found {found!r}")
    return data

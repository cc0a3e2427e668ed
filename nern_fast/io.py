"""Files: atomic writes and safe, checked reads (shared by predictors, checkpoints, model files)."""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Union

import torch

from .config import ConfigError, usable_device

PathLike = Union[str, os.PathLike]

# The start of torch.load's message for a file holding CUDA tensors read where that device is
# missing (torch has no dedicated exception class for it).
_CUDA_DESERIALIZE_MESSAGE = "Attempting to deserialize object on"


class FileFormatError(ValueError):
    """A file that is missing, truncated, corrupt, or not of the expected kind."""


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temp file in the same folder, fsynced and
    renamed over ``path`` when the block ends without an exception.

    A crash, exception or Ctrl-C midway leaves the previous file intact. A symlink is written
    through (its target is replaced, the link kept) and a replaced file keeps its permissions.
    A device or FIFO (``/dev/null``) is written to directly: renaming over it would replace the
    device node with a plain file.
    """
    if isinstance(path, str) and path.endswith(("/", os.sep)):  # Path() would drop the slash
        raise IsADirectoryError(f"{path} names a folder (it ends with a slash); give a file name to save to")
    path = Path(path)
    target = path.resolve()  # through symlinks: replacing the link itself would cut it
    if target.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name to save to")
    if target.exists() and not target.is_file():
        with open(target, "wb") as f:
            yield f
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; a new file gets open()'s mode
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        torch.save(obj, f)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``text`` (UTF-8) written through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))
    return Path(path)


def _check_zip_crcs(path: Path, what: str) -> None:
    """torch.load does not check the CRC-32 of a torch file's zip members: damaged tensor bytes
    would load as garbage values. Members stored with CRC 0 (torch's save option
    ``compute_crc32=False``) and legacy (non-zip) files have no checksum to check."""
    if not zipfile.is_zipfile(path):
        return  # torch.load says what is wrong with a truncated or foreign file
    advice = "re-create or re-export it, or use a backup"
    member = None
    try:
        with zipfile.ZipFile(path) as archive:
            for member in (m for m in archive.infolist() if m.CRC):
                with archive.open(member) as f:  # reading to the end checks the CRC-32
                    while f.read(1 << 22):
                        pass
    except MemoryError:
        raise
    except zipfile.BadZipFile as exc:
        if member is not None and "CRC" in str(exc):
            raise FileFormatError(f"{what} {path} is damaged: its member {member.filename} fails its "
                                  f"CRC-32 check (the bytes changed after it was written); {advice}") from exc
        raise FileFormatError(f"{what} {path} is damaged ({exc}); {advice}") from exc
    except Exception as exc:  # zipfile raises many kinds for damaged headers (OSError: bad offsets)
        raise FileFormatError(f"{what} {path} is damaged ({type(exc).__name__}: {str(exc)[:200]}); "
                              f"{advice}") from exc


def load_torch_file(path: PathLike, what: str = "file", map_location="cpu") -> Any:
    """``torch.load(weights_only=True)`` of ``path`` with errors that name ``what`` it should be, the
    file and the problem (missing, empty, damaged, truncated, not a torch file, device missing)."""
    path = Path(path)
    if isinstance(map_location, (str, torch.device)):
        usable_device(map_location, "map_location")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file")
    with open(path, "rb"):  # not readable (permissions, a folder): the OSError says so, not "damaged"
        pass
    if path.stat().st_size == 0:
        raise FileFormatError(f"{what} {path}: the file is empty (an interrupted write?); re-create it")
    _check_zip_crcs(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # torch.load raises many kinds for a damaged or foreign file (OSError too)
        if isinstance(exc, RuntimeError) and str(exc).startswith(_CUDA_DESERIALIZE_MESSAGE):
            raise ConfigError(f"{what} {path} holds CUDA tensors, but that CUDA device is not "
                              f"available here; load it with map_location='cpu'") from exc
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and pickled:
            # torch's message advises weights_only=False, which this library never does: say what
            # the file holds and how to write one that loads.
            raise FileFormatError(
                f"{what} {path} holds a pickled {pickled.group(1)} (e.g. a whole nn.Module saved by "
                f"torch.save(model)); nern_fast loads with weights_only=True, which does not run such "
                f"pickles: save tensors instead, e.g. torch.save(model.state_dict(), path)") from exc
        raise FileFormatError(f"{what} {path} cannot be read: it is truncated, corrupt or not a torch "
                              f"file ({type(exc).__name__}: {str(exc)[:200]})") from exc


def safe_load(path: PathLike, kind: str, map_location=None) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and the problem.

    ``kind`` is the expected ``format`` entry of the file (e.g. ``"nern_fast.predictor"``).
    """
    data = load_torch_file(path, f"{kind} file", map_location)
    if not isinstance(data, dict) or data.get("format") != kind:
        raise FileFormatError(f"{path}: expected a {kind} file, found {describe_contents(data)}")
    return data


# The files nern_fast writes, by their "format" entry: what a wrong one is, said in its words.
_KNOWN_FORMATS = {
    "nern_fast.predictor": "a predictor file (FastPredictor.save, fit's predictor.pt)",
    "nern_fast.model": "a network file (train-base's model.pt)",
    "nern_fast.compressed_model": "a compressed model file (save_compressed, export --format "
                                  "compressed: read it with nern_fast.load_compressed)",
    "nern_fast.fit_checkpoint": "a fit checkpoint (checkpoint.pt)",
    "nern_fast.permutations": "a permutation cache",
}


def describe_contents(data: Any) -> str:
    """What a file that is not of the expected kind holds, for an error message."""
    if not isinstance(data, dict):
        return f"a {type(data).__name__}"
    found = data.get("format")
    if found is not None:
        return _KNOWN_FORMATS.get(found, repr(found)) if isinstance(found, str) else repr(found)
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return ("a plain state dict (a network's weights, such as `export --format state_dict` "
                "writes)")
    return f"a dict without a 'format' entry (keys {list(data)[:6]})"

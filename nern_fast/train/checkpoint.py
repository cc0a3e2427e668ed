"""Run checkpoints: everything needed to continue a fit exactly where it stopped.

One file, ``OUT/checkpoint.pt``, written atomically (temp file + rename) every N steps, at each
stage end and on Ctrl-C: config, stage and step, predictor, optimiser, scheduler, sampler and
data-stream state, RNG states, results of finished stages and the previous stage's output.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from ..io import PathLike, atomic_save, safe_load

CHECKPOINT_FORMAT = "nern_fast.fit_checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: PathLike, **content) -> Path:
    return atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                        "rng": rng_state(), **content}, path)


def load_checkpoint(path: PathLike, map_location=None) -> dict:
    data = safe_load(path, CHECKPOINT_FORMAT, map_location=map_location)
    if data.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: written by a newer nern_fast (version {data['version']})")
    return data


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += config_differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += config_differences(x, y, f"{prefix}{i}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def find_checkpoint(out_dir: PathLike) -> Optional[Path]:
    path = Path(out_dir) / CHECKPOINT_NAME
    return path if path.exists() else None


def file_digest(path: PathLike) -> str:
    """SHA-256 of a file's bytes (a run's checkpoint records its network file's: a resume checks
    that the network is the one the run started from, not a file trained again under its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

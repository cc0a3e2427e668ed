"""Progress bars and logs of the step loops.

Per step only device tensors are accumulated (no host sync); every ``log_every`` steps the
running means are read once, shown on the tqdm bar (live loss, tqdm's own rate), appended to
``OUT/log.jsonl`` and, when asked for and installed, written to TensorBoard.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

PART_NAMES = ("loss", "reconstruction", "feature_maps", "logits")


class RunLog:
    """``OUT/log.jsonl`` (one JSON object per line) and optional TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = False):
        self.path = Path(out_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError as exc:
                raise RuntimeError("logging.tensorboard is on but tensorboard is not installed: "
                                   "pip install tensorboard, or turn it off") from exc

    def write(self, record: dict, global_step: Optional[int] = None) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and global_step is not None:
            stage = record.get("stage", "run")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step"):
                    self.writer.add_scalar(f"{stage}/{key}", value, global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepMeter:
    """Device-side running sums of a step's loss parts, read at the logging interval."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(PART_NAMES), device=self.device, dtype=torch.float64)
        self.count = 0
        self.nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)
        self.started = time.perf_counter()

    def add(self, parts: torch.Tensor) -> None:
        self.sums += parts.to(torch.float64)
        self.nonfinite |= ~torch.isfinite(parts[0])
        self.count += 1

    def state_dict(self) -> dict:
        """The running sums since the last read (a checkpoint keeps them: a resumed run logs the
        same means, and records the same final loss, as an uninterrupted one)."""
        return {"sums": self.sums.detach().cpu(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"].to(device=self.device, dtype=torch.float64).clone()
        self.count = int(state["count"])

    def read(self, parameters: Sequence[torch.Tensor] = ()) -> tuple[dict, bool]:
        """(means of the parts since the last read, whether a loss — or one of ``parameters`` — was
        not finite), in one sync. The parameters are checked because a decode may hide their NaN:
        a ReLU that maps NaN to 0 (cuBLASLt's epilogue) leaves the loss finite while the predictor is
        gone (and its checkpoint would be written)."""
        nonfinite = self.nonfinite
        if parameters:
            nonfinite = nonfinite | ~torch.stack([torch.isfinite(p).all() for p in parameters]).all()
        values = torch.cat([self.sums, nonfinite.to(torch.float64)[None]]).tolist()
        bad = bool(values[-1])
        n = max(self.count, 1)
        seconds = time.perf_counter() - self.started
        means = {name: v / n for name, v in zip(PART_NAMES, values[:-1])}
        means["steps_per_second"] = self.count / seconds if seconds > 0 else math.nan
        return means, bad


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm
    # disable=None: tqdm shows the bar only on a terminal (no carriage-return noise in CI logs)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=None if enabled else True,
                dynamic_ncols=True, leave=True)

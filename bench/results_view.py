"""Reading results back: which rows belong together (one run of one device), headline cases."""
from __future__ import annotations

import re
from typing import Iterable, Optional

from .harness import as_float
from .workloads import NERN_HIDDEN

# A run of a plan that is not a real measurement of the project (the harness's own test).
IGNORED_SUITES = ("selftest",)
# Preferred plan when a device has several runs: the fullest one, newest first among equals.
SUITE_RANK = {"cpu-full": 0, "gpu": 0, "gpu-quick": 1, "cpu-quick": 1}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def devices(rows: Iterable[dict]) -> list[tuple[str, str]]:
    """(device_kind, device) pairs in first-seen order, CPU first."""
    seen: list[tuple[str, str]] = []
    for r in rows:
        key = (r["device_kind"], r["device"])
        if key not in seen and r["suite"] not in IGNORED_SUITES:
            seen.append(key)
    return sorted(seen, key=lambda k: k[0] != "cpu")


def runs_of(rows: Iterable[dict], device: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in rows:
        if r["device"] == device and r["suite"] not in IGNORED_SUITES:
            runs.setdefault(r["run_id"], []).append(r)
    return runs


def best_run(rows: Iterable[dict], device: str, predicate=None) -> Optional[list[dict]]:
    """The newest run of the fullest plan on ``device`` (optionally: having a row matching
    ``predicate``)."""
    runs = runs_of(rows, device)
    candidates = [(SUITE_RANK.get(rs[0]["suite"], 2), rs[0]["date"], run_id) for run_id, rs in runs.items()
                  if predicate is None or any(predicate(r) for r in rs)]
    if not candidates:
        return None
    best = min(candidates, key=lambda c: (c[0], _negate(c[1])))
    return runs[best[2]]


CASE_KEY = ("operation", "layout", "hidden", "batch", "variant", "provider", "precision")


def newest_per_case(rows: Iterable[dict], device: str, predicate) -> list[list[dict]]:
    """Per case (operation, layout, H, batch, variant, provider, precision) matching ``predicate``,
    the row of the newest run that measured it (``ok`` rows win over failures; among runs of the
    same date the fuller plan wins), grouped by run, newest run first. A single-operation run then
    updates its rows without hiding the rest of an older full run."""
    runs = runs_of(rows, device)
    order = {run_id: (rs[0]["date"], -SUITE_RANK.get(rs[0]["suite"], 2)) for run_id, rs in runs.items()}
    chosen: dict[tuple, dict] = {}
    for run_id, rs in runs.items():
        for r in rs:
            if not predicate(r):
                continue
            key = tuple(r[k] for k in CASE_KEY)
            held = chosen.get(key)
            rank = (ok(r), order[run_id])
            if held is None or rank > (ok(held), order[held["run_id"]]):
                chosen[key] = r
    grouped: dict[str, list[dict]] = {}
    for r in chosen.values():
        grouped.setdefault(r["run_id"], []).append(r)
    return [grouped[run_id] for run_id in sorted(grouped, key=lambda i: order[i], reverse=True)]


def _negate(date: str) -> tuple:
    return tuple(-ord(ch) for ch in date)


def is_headline(row: dict) -> bool:
    """NeRN's published configurations (NERN_SPEC §9) and the permutation benchmark; not sweeps."""
    if row["operation"] == "permutations":
        return True
    return NERN_HIDDEN.get(row["layout"]) is not None and as_float(row["hidden"]) == NERN_HIDDEN[row["layout"]]


def ok(row: dict) -> bool:
    return row["status"] == "ok" and as_float(row["median_s"]) is not None

"""Per-layout constant arguments of a backend, built once and kept while the layout lives.

Layouts are immutable, so what a backend derives from one (metadata tensors on a device, the
arguments of a decode group's layer range) can be kept under a key that starts with ``id(layout)``;
a weak reference tells a reused id from the same layout. Bounded: a per-layer attachment of a deep
network keeps one entry per layer range, far below the cap; past it everything is dropped and
rebuilt on demand.
"""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch

from ..layout import WeightLayout

T = TypeVar("T")


class LayoutCache:
    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: dict = {}

    def get(self, layout: WeightLayout, key: tuple, build: Callable[[], T]) -> T:
        """``build()``, kept under ``key`` while ``layout`` lives; not kept while torch.compile
        traces (a traced graph must not hold tensors made during tracing)."""
        if torch.compiler.is_compiling():
            return build()
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is layout:
            return entry[1]
        value = build()
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (weakref.ref(layout), value)
        return value

    def __len__(self) -> int:
        return len(self._entries)

"""Per-layout constant arguments of a backend, built once and kept while the layout lives.

Layouts are immutable, so what a backend derives from one (metadata tensors on a device, the
arguments of a decode group's layer range) can be kept under a key that starts with ``id(layout)``;
a weak reference tells a reused id from the same layout. Bounded: a per-layer attachment of a deep
network keeps one entry per layer range, far below the cap. Past it, the entries of layouts that no
longer exist go first, then the least recently used one: never everything at once (a dropped device
tensor goes back to the allocator of the stream it was made on, while kernels queued on another
stream may still read it; an entry in use is a recently used one).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, TypeVar

import torch

from ..layout import WeightLayout

T = TypeVar("T")


class LayoutCache:
    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()  # least recently used first

    def get(self, layout: WeightLayout, key: tuple, build: Callable[[], T]) -> T:
        """``build()``, kept under ``key`` while ``layout`` lives; not kept while torch.compile
        traces (a traced graph must not hold tensors made during tracing)."""
        if torch.compiler.is_compiling():
            return build()
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is layout:
            self._entries.move_to_end(key)
            return entry[1]
        value = build()
        self._entries.pop(key, None)  # a stale entry (another layout under a reused id) goes
        if len(self._entries) >= self.max_entries:
            self._evict()
        self._entries[key] = (weakref.ref(layout), value)
        return value

    def _evict(self) -> None:
        dead = [k for k, (ref, _) in self._entries.items() if ref() is None]
        for k in dead:
            del self._entries[k]
        if not dead:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

"""The eager backend: the reference decoder behind the dispatcher (any device, any float dtype)."""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import reference_decode
from .dispatch import DecodeRequest


class EagerBackend:
    name = "eager"

    def __init__(self, chunk_size: Optional[int] = None):
        self.chunk_size = chunk_size

    def unavailable_reason(self, request: DecodeRequest) -> Optional[str]:
        if not request.dtype.is_floating_point:
            return f"parameters must be floating point, got {request.dtype}"
        return None

    def decode(self, weights, biases, layout, encoding, rows, precision) -> torch.Tensor:
        return reference_decode(weights, biases, layout, encoding, rows, precision, self.chunk_size)

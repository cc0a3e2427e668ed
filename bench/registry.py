"""Every benchmarked operation by name (one module each)."""
from __future__ import annotations

from . import decode_backward, decode_forward, distill_step, inference_forward, permutations, recon_step

OPERATIONS = {m.OPERATION.name: m.OPERATION for m in (
    decode_forward, decode_backward, recon_step, distill_step, inference_forward, permutations)}


def operation(name: str):
    if name not in OPERATIONS:
        raise ValueError(f"unknown benchmark operation '{name}'; known: {list(OPERATIONS)}")
    return OPERATIONS[name]

"""Which kernels get gradients each step (NeRN's ``weights_batch_method``), drawn on the device.

* ``uniform``: a random subset of ``batch_size`` kernels without replacement (NeRN random_batch);
* ``random_weighted_batch`` (NeRN's choice): with probability 0.8 a uniform subset, otherwise
  ``batch_size`` kernels drawn with replacement with probability ∝ the target kernel's L2 norm;
* ``all``: every kernel, every step.

No host synchronisation: the 0.8 coin is a device tensor and both candidate subsets are drawn
every step, one selected with ``torch.where``; the generator lives on the device and its state
is saved in checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layout import WeightLayout

SAMPLERS = ("uniform", "random_weighted_batch", "all")
UNIFORM_PROBABILITY = 0.8  # NeRN's random_weighted_batch


def kernel_norms(layout: WeightLayout, flat: torch.Tensor) -> torch.Tensor:
    """L2 norm of every kernel of a flat weight buffer, in flat kernel order."""
    rows = torch.arange(layout.num_kernels, device=flat.device)
    return torch.linalg.vector_norm(layout.kernel_rows(flat.detach().float(), rows), dim=1)


class KernelSampler:
    def __init__(self, layout: WeightLayout, batch_size: int, kind: str = "random_weighted_batch",
                 device="cpu", seed: int = 0, norms: Optional[torch.Tensor] = None):
        if kind not in SAMPLERS:
            raise ValueError(f"sampler '{kind}' is not one of {SAMPLERS}")
        if batch_size < 1:
            raise ValueError(f"weights_batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.num_kernels = layout.num_kernels
        self.kind = kind
        self.batch_size = self.num_kernels if kind == "all" else min(batch_size, self.num_kernels)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._all = torch.arange(self.num_kernels, device=self.device)
        self.weights = None
        if kind == "random_weighted_batch":
            if norms is None:
                raise ValueError("the random_weighted_batch sampler needs the target kernel norms")
            norms = norms.detach().float().to(self.device)
            # All-zero targets (or NaN) leave nothing to weight by: fall back to uniform.
            self.weights = torch.where(torch.isfinite(norms) & (norms > 0), norms,
                                       torch.zeros_like(norms)) + 1e-12

    def sample(self) -> torch.Tensor:
        """Flat kernel indices ``(batch_size,)`` on the device."""
        if self.kind == "all":
            return self._all
        g = self.generator
        uniform = torch.randperm(self.num_kernels, generator=g, device=self.device)[:self.batch_size]
        if self.kind == "uniform":
            return uniform
        weighted = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        coin = torch.rand((), generator=g, device=self.device) < UNIFORM_PROBABILITY
        return torch.where(coin, uniform, weighted)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

"""Positional encodings of kernel coordinates (NERN_SPEC §4), computed the way NeRN does.

``basic``: x_ij = p_i · base^j · π, e[i·2L + 2j] = sin(x_ij), e[i·2L + 2j + 1] = cos(x_ij).
``ffn``:   x = (2π·p) @ Bᵀ with B = randn(3L, 3) (seed 0) · gauss_scale, e[2m] = sin, e[2m+1] = cos.

Only ``basic`` is separable per index (the first linear layer splits into a layer, a filter and a
channel term); ``ffn`` mixes the three indices inside every sine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

ENCODINGS = ("basic", "ffn")
NUM_INDICES = 3  # (layer, filter, channel)
# The largest basic frequency base^(levels-1) (log10): times π and positions of up to ~10^4 (no
# normalisation) it stays below float32's 3.4e38.
_MAX_FREQUENCY_LOG10 = 33

_DEVICE_CONSTANTS: dict = {}


def _constant_on(device, key: tuple, make) -> torch.Tensor:
    """A constant table, made on the CPU, then kept per device (the one cache of every decoder's
    tables): a copy from host memory at every call synchronises a GPU stream with the host, and
    cannot be captured in a CUDA graph. Read-only for callers. Made outside inference mode (an
    inference tensor cannot be saved for backward); not kept while torch.compile traces (the table
    would be a fake tensor)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        return make().to(device)
    table = _DEVICE_CONSTANTS.get((key, device))
    if table is None:
        with torch.inference_mode(False):
            table = _DEVICE_CONSTANTS[(key, device)] = make().to(device)
    return table


@dataclass(frozen=True)
class EncodingSpec:
    kind: str = "basic"
    levels: int = 40
    base: float = 0.76
    gauss_scale: tuple = field(default=(1.0, 0.1, 0.1))

    def __post_init__(self):
        if self.kind not in ENCODINGS:
            raise ValueError(f"encoding '{self.kind}' is not one of {ENCODINGS}")
        if not isinstance(self.levels, int) or not 1 <= self.levels <= 64:
            raise ValueError(f"levels must be an integer in 1..64, got {self.levels!r}")
        if not (isinstance(self.base, (int, float)) and math.isfinite(self.base) and self.base > 0):
            raise ValueError(f"base must be a positive finite number, got {self.base!r}")
        if self.kind == "basic" and (self.levels - 1) * math.log10(self.base) > _MAX_FREQUENCY_LOG10:
            # x = p · base^j · π in float32 would overflow to inf for some positions: NaN weights
            raise ValueError(f"base {self.base} with levels {self.levels} gives frequencies up to "
                             f"base^{self.levels - 1} = 10^{(self.levels - 1) * math.log10(self.base):.1f}, "
                             f"above 1e{_MAX_FREQUENCY_LOG10}: times π and a position its encodings can overflow "
                             f"float32 (inf, then NaN weights); lower base or levels")
        scale = tuple(float(s) for s in self.gauss_scale)
        if len(scale) != NUM_INDICES:
            raise ValueError(f"gauss_scale needs {NUM_INDICES} values (layer, filter, channel), "
                             f"got {self.gauss_scale!r}")
        object.__setattr__(self, "gauss_scale", scale)
        object.__setattr__(self, "base", float(self.base))

    @property
    def size(self) -> int:
        """Length of one encoding: 6·levels."""
        return 2 * NUM_INDICES * self.levels

    @property
    def separable(self) -> bool:
        return self.kind == "basic"

    def frequencies(self, device=None) -> torch.Tensor:
        """basic: base^j for j < levels, float32, as NeRN computes it (float32 pow on the CPU)."""
        return _constant_on(device, ("frequencies", self), lambda: (
            self.base ** torch.arange(self.levels)).to(torch.float32))

    def ffn_matrix(self, device=None) -> torch.Tensor:
        """ffn: B of shape (3·levels, 3), drawn with torch's generator seeded 0, column-scaled."""
        def draw():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                b = torch.randn(self.levels * NUM_INDICES, NUM_INDICES)
            return (b * torch.tensor(self.gauss_scale)).to(torch.float32)
        return _constant_on(device, ("ffn", self), draw)

    def kernel_table(self, device=None) -> torch.Tensor:
        """What the compiled decoders take: basic, the frequencies (levels,); ffn, B (3·levels, 3)."""
        return self.frequencies(device) if self.kind == "basic" else self.ffn_matrix(device)

    def encode(self, positions: torch.Tensor) -> torch.Tensor:
        """Encodings of normalised positions ``(N, 3)`` -> ``(N, 6·levels)`` in the positions' dtype."""
        p = positions
        if self.kind == "basic":
            x = p.unsqueeze(-1) * self.frequencies(p.device).to(p.dtype) * math.pi  # (N, 3, L)
        else:
            x = (p * 2 * math.pi) @ self.ffn_matrix(p.device).to(p.dtype).T  # (N, 3L)
        return torch.stack([torch.sin(x), torch.cos(x)], dim=-1).reshape(p.shape[0], self.size)

    def encode_index(self, values: torch.Tensor, index: int) -> torch.Tensor:
        """basic only: the 2·levels block of one index for positions ``values`` (N,) -> (N, 2L)."""
        if not self.separable:
            raise ValueError("only the basic encoding is separable per index")
        x = values.unsqueeze(-1) * self.frequencies(values.device).to(values.dtype) * math.pi
        return torch.stack([torch.sin(x), torch.cos(x)], dim=-1).reshape(values.shape[0], -1)

    def describe(self) -> dict:
        return {"kind": self.kind, "levels": self.levels, "base": self.base,
                "gauss_scale": list(self.gauss_scale)}

    @classmethod
    def from_description(cls, d: dict) -> "EncodingSpec":
        return cls(d["kind"], int(d["levels"]), float(d["base"]), tuple(d["gauss_scale"]))


def first_layer_blocks(weight: torch.Tensor, spec: EncodingSpec) -> Sequence[torch.Tensor]:
    """Split W1 (H, 6L) into the (H, 2L) blocks acting on the layer, filter and channel encodings."""
    step = 2 * spec.levels
    return [weight[:, i * step:(i + 1) * step] for i in range(NUM_INDICES)]

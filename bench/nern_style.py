"""NeRN's own way of computing things, written from NERN_SPEC, as the baselines to beat.

* :class:`NernStyleDecoder`: the encodings of every kernel are computed once and kept (NeRN stores
  one tensor per layer); a decode runs the MLP layer by layer in chunks of ``weights_batch_size``
  = 4,096 rows with a Python loop, always in fp32, and stacks the chunks.
* :func:`crossfilter_loop` / :func:`infilter_loop`: NeRN's greedy nearest-neighbour chains, a
  Python loop over a list of remaining indices (3×3 kernels; NeRN has another rule for 1×1).

Only the building blocks of ``nern_fast.reference`` are used (positions, encodings, MLP, crop), so
the numbers it decodes are the reference's; what differs is the shape of the computation.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nern_fast.encoding import EncodingSpec
from nern_fast.layout import CROP_MODES, WeightLayout
from nern_fast.reference import crop_kernels, kernel_positions, mlp_forward

NERN_CHUNK = 4096


class NernStyleDecoder:
    """Precomputed encodings + per-layer chunk loop, fp32 (NeRN's ``predict_all``)."""

    def __init__(self, layout: WeightLayout, encoding: EncodingSpec, device: torch.device,
                 chunk_size: int = NERN_CHUNK):
        self.layout = layout
        self.chunk_size = chunk_size
        rows = torch.arange(layout.num_kernels, device=device)
        positions, _ = kernel_positions(layout, rows, torch.float32)
        # One stacked tensor (NeRN vstacks its per-layer list for random batches); per-layer views.
        self.encodings = encoding.encode(positions)
        self.layer_encodings = [self.encodings[l.kernel_offset:l.kernel_offset + l.num_kernels]
                                for l in layout.layers]

    @property
    def state_bytes(self) -> int:
        return self.encodings.numel() * self.encodings.element_size()

    def _predict(self, encodings: torch.Tensor, weights, biases) -> torch.Tensor:
        chunks = [mlp_forward(encodings[i:i + self.chunk_size], weights, biases, "fp32")
                  for i in range(0, encodings.shape[0], self.chunk_size)]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def _flatten(self, raw_per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
        k = self.layout.kernel_size
        return torch.cat([crop_kernels(raw.view(-1, k, k), l.size, l.crop).reshape(-1)
                          for raw, l in zip(raw_per_layer, self.layout.layers)])

    def decode(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
        """All conv weights as one flat buffer (the reference's format)."""
        return self._flatten([self._predict(e, weights, biases) for e in self.layer_encodings])

    def decode_rows(self, weights, biases, rows: torch.Tensor) -> torch.Tensor:
        """Flat kernel indices -> ``(len(rows), k·k)`` rows, cropped kernels zero-padded."""
        out = self._predict(self.encodings[rows], weights, biases)
        return pad_cropped_rows(out, self.layout, rows)

    def joint_decode(self, weights, biases, rows_with_grad: torch.Tensor) -> torch.Tensor:
        """NeRN's training-step decode: every kernel, but gradients only through ``rows_with_grad``.

        The sampled rows are decoded with autograd, all the others in chunks under ``no_grad``
        (NeRN's ``random_batch`` path), then scattered into one buffer.
        """
        n = self.layout.num_kernels
        k2 = self.layout.kernel_size ** 2
        with_grad = self._predict(self.encodings[rows_with_grad], weights, biases)
        keep = torch.ones(n, dtype=torch.bool, device=rows_with_grad.device)
        keep[rows_with_grad] = False
        others = keep.nonzero().squeeze(1)
        predicted = torch.zeros(n, k2, device=with_grad.device, dtype=with_grad.dtype)
        predicted = predicted.index_put((rows_with_grad,), with_grad)
        if others.numel():
            with torch.no_grad():
                rest = self._predict(self.encodings[others], weights, biases)
            predicted = predicted.index_put((others,), rest)
        return self._flatten([predicted[l.kernel_offset:l.kernel_offset + l.num_kernels]
                              for l in self.layout.layers])


def pad_cropped_rows(out: torch.Tensor, layout: WeightLayout, rows: torch.Tensor) -> torch.Tensor:
    """Subset format of the reference: an s×s layer's row holds its crop first, zeros after."""
    k = layout.kernel_size
    t = layout.tensors(rows.device)
    layer = t.layer_of(rows)
    size, crop = t.size[layer], t.crop[layer]
    if bool((size == k).all()):
        return out
    result = torch.zeros_like(out)
    for s in sorted(set(size.tolist())):
        for mode_id in sorted(set(crop[size == s].tolist())):
            mask = (size == s) & (crop == mode_id)
            cropped = crop_kernels(out[mask].view(-1, k, k), s, CROP_MODES[mode_id])
            result[mask] = F.pad(cropped.reshape(-1, s * s), (0, k * k - s * s))
    return result


# ---------------------------------------------------------------------------------- permutations
def _normalised(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def greedy_chain_loop(n: int, similarity_to: Callable[[int, list], np.ndarray]) -> list[int]:
    """NeRN's greedy chain over ``n`` cities: start at 0, repeatedly jump to the most similar city
    not yet visited (``np.argmax``: the first maximum, i.e. the lowest index). A Python loop over a
    list of the remaining cities; ``similarity_to(current, remaining)`` gives their similarities."""
    order = [0]
    remaining = list(range(1, n))
    current = 0
    for _ in range(n - 1):
        best = remaining[int(np.argmax(similarity_to(current, remaining)))]
        order.append(best)
        remaining.remove(best)
        current = best
    return order


def _chain_with_matrix(similarity: np.ndarray) -> list[int]:
    return greedy_chain_loop(similarity.shape[0], lambda cur, rest: similarity[cur, rest])


def crossfilter_loop(weight: torch.Tensor) -> list[int]:
    """Crossfilter chain order of a 3×3 conv weight: every kernel is a city. As NeRN's crossfilter
    does, each step normalises the remaining kernels and takes their cosine with the current one
    (no N×N matrix is stored)."""
    w = weight.detach().cpu().numpy()
    kernels = w.reshape(w.shape[0] * w.shape[1], -1)
    return greedy_chain_loop(kernels.shape[0],
                             lambda cur, rest: _normalised(kernels[rest]) @ _normalised(kernels[cur]))


def infilter_loop(weight: torch.Tensor) -> tuple[list[int], list[list[int]]]:
    """Infilter orders of a 3×3 conv weight, with NeRN's precomputed similarity matrices: per filter
    the chain of its channels (kernel cosines), then the chain of the filters with their channels
    reordered, a filter's similarity being the sum of its normalised kernels' dot products (NeRN
    normalises per kernel, then flattens). Returns (filter order, per-filter channel orders)."""
    w = weight.detach().cpu().numpy()
    c_out, c_in = w.shape[0], w.shape[1]
    kernels = _normalised(w.reshape(c_out, c_in, -1))
    channel_orders = [_chain_with_matrix(kernels[f] @ kernels[f].T) for f in range(c_out)]
    filters = np.stack([kernels[f][channel_orders[f]].reshape(-1) for f in range(c_out)])
    return _chain_with_matrix(filters @ filters.T), channel_orders


def same_chain(candidate, chain: Sequence[int]) -> Optional[bool]:
    """Whether ``candidate`` (a chain order or its inverse, the coordinate ranks) equals ``chain``;
    None when its shape says it is neither."""
    try:
        c = torch.as_tensor(candidate).reshape(-1).long().cpu()
    except (TypeError, ValueError, RuntimeError):
        return None
    ref = torch.as_tensor(chain).long()
    if c.numel() != ref.numel():
        return None
    return bool(torch.equal(c, ref) or torch.equal(c, torch.argsort(ref)))

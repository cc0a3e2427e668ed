"""Shared test layouts and predictors (used by the reference, Triton and csrc tests)."""
from __future__ import annotations

import torch

from nern_fast import FastPredictor, WeightLayout, ops, reference


def mixed_layout(kernel_size: int = 3, normalization: str = "local", crop: str = "center",
                 permuted: bool = False) -> WeightLayout:
    """4 layers: 8×8 and 16×8 and 16×16 k×k kernels plus a 1×1 layer (cropped)."""
    k = kernel_size
    shapes = [(8, 8, k, k), (16, 8, k, k), (16, 16, k, k), (8, 16, 1, 1)]
    layout = WeightLayout.from_shapes(shapes, kernel_size=k, normalization=normalization, crop=crop)
    if permuted:
        g = torch.Generator().manual_seed(1)
        perms = [torch.randperm(l.num_kernels, generator=g) for l in layout.layers]
        perms[1] = None
        perms[2] = (torch.randperm(16, generator=g),
                    torch.stack([torch.randperm(16, generator=g) for _ in range(16)]))
        layout = layout.with_permutations(perms)
    return layout


def random_predictor(layout: WeightLayout, hidden: int = 24, num_blocks: int = 4, levels: int = 6,
                     encoding: str = "basic", seed: int = 0, dtype=torch.float32, **kw) -> FastPredictor:
    """A predictor with non-trivial biases (zero biases would hide bias bugs)."""
    torch.manual_seed(seed)
    pred = FastPredictor(layout, hidden=hidden, num_blocks=num_blocks, levels=levels, encoding=encoding,
                         **kw)
    with torch.no_grad():
        for b in pred.biases():
            b.uniform_(-0.3, 0.3)
    return pred.to(dtype)


def well_conditioned_rows(pred: FastPredictor, margin: float = 2e-5) -> torch.Tensor:
    """The predictor's kernel rows away from ReLU kinks and max-crop ties
    (:func:`nern_fast.reference.well_conditioned_rows`)."""
    return reference.well_conditioned_rows(pred.weights(), pred.biases(), pred.layout, pred.encoding,
                                           margin=margin)


def all_rows(layout: WeightLayout) -> torch.Tensor:
    return torch.arange(layout.num_kernels)


def nan_patterns(pred: FastPredictor, backend: str, precision: str, layer: int) -> tuple:
    """Decode (and differentiate) with one NaN weight in MLP layer ``layer``: which outputs are NaN,
    and which parameter gradients hold a NaN."""
    with torch.no_grad():
        pred.weights()[layer][1, 2] = float("nan")
    weights, biases = pred.weights(), pred.biases()
    out = ops.decode(weights, biases, pred.layout, pred.encoding, None, precision, backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * g.to(out.device, out.dtype)).sum(), weights + biases)
    return torch.isnan(out), [bool(torch.isnan(x).any()) for x in grads]


def assert_nan_like_eager(pred: FastPredictor, backend: str, precision: str, layer: int) -> None:
    """A NaN weight (a diverged predictor) shows in ``backend``'s decoded weights and gradients as
    it does in eager's (ReLU and the max crop keep NaN)."""
    ours, ours_grads = nan_patterns(pred, backend, precision, layer)
    eager, eager_grads = nan_patterns(pred, "eager", precision, layer)
    assert bool(eager.any())  # the case means something: eager propagates the NaN
    assert torch.equal(ours, eager), f"NaN pattern differs: {int(ours.sum())} vs eager {int(eager.sum())}"
    assert ours_grads == eager_grads

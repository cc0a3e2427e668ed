"""The eager reference against an independent float64 re-derivation written with plain loops."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import mixed_layout, random_predictor
from nern_fast import WeightLayout, reference_decode
from nern_fast.layout import crop_window


def rederive(pred, layout):
    """Loop over every kernel slot: coordinates, permutation, encoding, MLP, crop -- float64."""
    spec = pred.encoding
    W = [w.detach().double() for w in pred.weights()]
    B = [b.detach().double() for b in pred.biases()]
    k = layout.kernel_size
    freqs = (spec.base ** torch.arange(spec.levels)).double()  # float32 pow, as NeRN
    ffn = spec.ffn_matrix().double()
    L = layout.num_layers
    out = []
    for li, layer in enumerate(layout.layers):
        rows = layout.layer_coord_rows(li)
        for q in range(layer.num_kernels):
            coord = int(rows[q]) if rows is not None else q
            f, c = divmod(coord, layer.c_in)
            if layout.normalization == "local":
                den = (L, layer.c_out, layer.c_in)
            elif layout.normalization == "global":
                den = (layout.max_dim,) * 3
            else:
                den = (1, 1, 1)
            p = torch.tensor([np.float32(li / den[0]), np.float32(f / den[1]), np.float32(c / den[2])],
                             dtype=torch.float64)
            if spec.kind == "basic":
                x = (p[:, None] * freqs[None, :] * math.pi).reshape(-1)
            else:
                x = (p * 2 * math.pi) @ ffn.T
            e = torch.stack([torch.sin(x), torch.cos(x)], -1).reshape(-1)
            h = e
            for i, (w, b) in enumerate(zip(W, B)):
                h = w @ h + b
                if i < len(W) - 1:
                    h = torch.clamp(h, min=0)
            kern = h.reshape(k, k)
            s = layer.size
            if s < k:
                if layer.crop == "center":
                    lo, hi = crop_window(k, s)
                    kern = kern[lo:hi, lo:hi]
                else:
                    win = k - s + 1
                    kern = torch.stack([torch.stack([
                        (kern[i:i + win, j:j + win].mean() if layer.crop == "average"
                         else kern[i:i + win, j:j + win].max()) for j in range(s)]) for i in range(s)])
            out.append(kern.reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("normalization", ["local", "global", "none"])
@pytest.mark.parametrize("crop", ["center", "average", "max"])
@pytest.mark.parametrize("encoding", ["basic", "ffn"])
def test_reference_matches_float64_rederivation(normalization, crop, encoding):
    layout = mixed_layout(normalization=normalization, crop=crop, permuted=True)
    pred = random_predictor(layout, encoding=encoding, dtype=torch.float64)
    expected = rederive(pred, layout)
    got = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_fp32_reference_close_to_float64():
    layout = mixed_layout(kernel_size=5)
    pred = random_predictor(layout, hidden=40)
    got = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding)
    exact = reference_decode([w.double() for w in pred.weights()], [b.double() for b in pred.biases()],
                             layout, pred.encoding)
    assert torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_hand_computed_tiny_case():
    """One 1×1-input layer, identity-like MLP: the output is an affine map of the encoding."""
    layout = WeightLayout.from_shapes([(1, 1, 1, 1)], kernel_size=1)
    pred = random_predictor(layout, hidden=2, num_blocks=2, levels=1)
    with torch.no_grad():
        pred.layers[0].weight.zero_()
        pred.layers[0].weight[0, 1] = 1.0  # cos(0 * pi) = 1 from the layer index block
        pred.layers[0].bias.fill_(0.5)
        pred.final_linear_layer.weight.fill_(2.0)
        pred.final_linear_layer.bias.fill_(-1.0)
    # h = relu([1 + 0.5, 0.5]) = [1.5, 0.5]; out = 2 * 2.0 - 1 = 3
    assert pred.decode_flat().tolist() == [3.0]


def test_subset_equals_full_rows_and_chunking_changes_nothing():
    layout = mixed_layout(permuted=True)
    pred = random_predictor(layout)
    flat = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding)
    rows = torch.randperm(layout.num_kernels)[:57]
    subset = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding, rows)
    assert torch.allclose(subset, layout.kernel_rows(flat, rows), atol=1e-6)
    chunked = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding, chunk_size=7)
    assert torch.allclose(chunked, flat, atol=1e-6)


def test_permutation_moves_kernels_between_slots():
    plain = mixed_layout()
    permuted = mixed_layout(permuted=True)
    pred = random_predictor(plain)
    a = plain.split(reference_decode(pred.weights(), pred.biases(), plain, pred.encoding))
    b = permuted.split(reference_decode(pred.weights(), pred.biases(), permuted, pred.encoding))
    rows = permuted.layer_coord_rows(0)
    assert torch.equal(b[0].reshape(-1, 9), a[0].reshape(-1, 9)[rows])
    assert torch.equal(b[1], a[1])  # layer 1 is left unpermuted


def test_gradients_flow_to_every_parameter():
    layout = mixed_layout(crop="max")
    pred = random_predictor(layout)
    out = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding)
    (out ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pred.parameters())


def test_float64_gradcheck_tiny():
    layout = WeightLayout.from_shapes([(2, 3), (3, 2, 1, 1)])
    pred = random_predictor(layout, hidden=5, num_blocks=3, levels=2, dtype=torch.float64)
    params = pred.weights() + pred.biases()
    n = len(pred.weights())

    def fn(*ps):
        return reference_decode(list(ps[:n]), list(ps[n:]), layout, pred.encoding)

    assert torch.autograd.gradcheck(fn, [p.detach().requires_grad_() for p in params])


def test_bf16_error_is_bounded():
    layout = mixed_layout()
    pred = random_predictor(layout, hidden=64)
    exact = reference_decode([w.double() for w in pred.weights()], [b.double() for b in pred.biases()],
                             layout, pred.encoding)
    bf16 = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding, precision="bf16")
    err = (bf16.double() - exact).abs().max() / exact.abs().max()
    assert 1e-5 < err < 5e-2  # bf16 really is used, and stays within bf16's few-digit accuracy


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_layouts_subset_and_rederivation(data):
    k = data.draw(st.sampled_from([1, 3, 5]))
    n_layers = data.draw(st.integers(1, 3))
    shapes = []
    for _ in range(n_layers):
        s = data.draw(st.integers(1, k))
        shapes.append((data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5)), s, s))
    layout = WeightLayout.from_shapes(shapes, kernel_size=k,
                                      normalization=data.draw(st.sampled_from(["local", "global", "none"])),
                                      crop=data.draw(st.sampled_from(["center", "average", "max"])))
    if data.draw(st.booleans()):
        seed = data.draw(st.integers(0, 100))
        g = torch.Generator().manual_seed(seed)
        layout = layout.with_permutations([torch.randperm(l.num_kernels, generator=g) for l in layout.layers])
    pred = random_predictor(layout, hidden=data.draw(st.integers(1, 9)), num_blocks=data.draw(st.integers(2, 4)),
                            levels=data.draw(st.integers(1, 4)),
                            encoding=data.draw(st.sampled_from(["basic", "ffn"])), dtype=torch.float64)
    flat = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding)
    assert torch.allclose(flat, rederive(pred, layout), rtol=1e-10, atol=1e-12)
    rows = torch.tensor(data.draw(st.lists(st.integers(0, layout.num_kernels - 1), min_size=1, max_size=10)))
    sub = reference_decode(pred.weights(), pred.biases(), layout, pred.encoding, rows)
    assert torch.allclose(sub, layout.kernel_rows(flat, rows), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_precision_linear_function_matches_f_linear(precision):
    """The CUDA path of ``linear`` (backward at the forward's precision), checked on CPU where the
    precision switch is a no-op: values and all three gradients equal plain F.linear."""
    from nern_fast.reference import _CudaLinearAtPrecision
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _CudaLinearAtPrecision.apply(*a, precision), (x, w, b))
    out = _CudaLinearAtPrecision.apply(x, w, b, precision)
    assert torch.allclose(out, torch.nn.functional.linear(x, w, b))


def test_well_conditioned_rows_leave_out_relu_kinks_and_max_crop_ties():
    from nern_fast.reference import kernel_positions, well_conditioned_rows
    layout = mixed_layout(kernel_size=5, crop="max")  # its 1×1 layer is a max crop of the whole 5×5
    pred = random_predictor(layout, hidden=30, num_blocks=3, levels=6)
    args = (pred.weights(), pred.biases(), layout, pred.encoding)
    kept = well_conditioned_rows(*args)
    assert kept.numel() > 0.9 * layout.num_kernels and kept.dtype == torch.long
    # a pre-activation exactly at the kink (row 7, first layer, unit 3) leaves row 7 out
    positions, _ = kernel_positions(layout, torch.tensor([7]), torch.float64)
    z = pred.encoding.encode(positions) @ pred.weights()[0].double().t() + pred.biases()[0].double()
    with torch.no_grad():
        pred.biases()[0][3] -= float(z[0, 3])
    kept = well_conditioned_rows(*args)
    assert 7 not in kept.tolist() and kept.numel() > 0.9 * layout.num_kernels
    # equal outputs at every kernel position: every max window ties, the other crops are unaffected
    with torch.no_grad():
        pred.weights()[-1].copy_(pred.weights()[-1][:1].expand_as(pred.weights()[-1]))
        pred.biases()[-1].fill_(0.1)
    kept = set(well_conditioned_rows(*args).tolist())
    cropped = layout.layers[3]
    assert cropped.size == 1 and cropped.crop == "max"
    assert not kept & set(range(cropped.kernel_offset, cropped.kernel_offset + cropped.num_kernels))
    assert len(kept) > 0.9 * (layout.num_kernels - cropped.num_kernels)
    # only rows of those given are returned
    subset = torch.tensor([0, 5, 600 % layout.num_kernels, 9])
    assert set(well_conditioned_rows(*args, rows=subset).tolist()) <= set(subset.tolist())


@pytest.mark.parametrize("backend", ["eager", "csrc"])
@pytest.mark.parametrize("encoding", ["basic", "ffn"])
def test_no_rows_decode_to_an_empty_output_with_zero_gradients(backend, encoding):
    """decode_kernels([]) (a list: torch.as_tensor would make it float32) gives (0, k²) whose
    backward leaves zeros in every gradient — the eager reference too (its output had no graph)."""
    from nern_fast import FastPredictor
    from nern_fast.ops import BackendUnavailable
    layout = WeightLayout.from_shapes([(4, 4), (8, 4)], kernel_size=3)
    pred = FastPredictor(layout, hidden=8, levels=2, backend=backend, encoding=encoding)
    try:
        out = pred.decode_kernels([])
    except BackendUnavailable:
        pytest.skip(f"backend {backend} is not built here")
    assert out.shape == (0, 9)
    out.sum().backward()
    for name, p in pred.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def test_rows_of_the_wrong_kind_are_named():
    from nern_fast import FastPredictor
    layout = WeightLayout.from_shapes([(4, 4), (8, 4)], kernel_size=3)
    pred = FastPredictor(layout, hidden=8, levels=2, backend="eager")
    with pytest.raises(ValueError, match="rows is a meta tensor"):
        pred.decode_kernels(torch.zeros(3, dtype=torch.long, device="meta"))
    with pytest.raises(TypeError, match="rows must be flat kernel indices.*got str"):
        pred.decode_kernels("abc")

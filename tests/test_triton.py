"""The Triton decoder (fused and chunked schedules) against the eager reference.

On a machine without a GPU these run on CPU under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported); with a GPU they run on CUDA, plus larger layouts and
a torch.compile test. Shapes are tiny on CPU: the interpreter executes every tile in numpy. The
chunked schedule (the large-H default) is forced with small chunks, so several chunks per call and
a partial last one are exercised on tiny layouts.

Tolerances:
* fp32: outputs and every parameter gradient within 1e-5 of the reference, relative to the largest
  magnitude of the tensor compared.
* tf32 / bf16: "no worse than 2× the eager decoder's own error at that precision", both measured
  against a float64 eager decode of the same parameters (relative to the largest magnitude), with the
  fp32 tolerance as a floor (on CPU the eager tf32 path is plain fp32, and under the interpreter
  our tf32 dots are fp32 too: both errors are then rounding noise).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from helpers import assert_nan_like_eager, mixed_layout, random_predictor, well_conditioned_rows
from nern_fast import BackendUnavailable, WeightLayout, ops
from nern_fast.ops import DecodeRequest

tb = pytest.importorskip("nern_fast.ops.triton_backend", reason="triton is not installed")
tt = pytest.importorskip("nern_fast.ops.triton_tuner", reason="triton is not installed")

pytestmark = pytest.mark.triton

FP32_TOL = 1e-5
HAS_CUDA = torch.cuda.is_available()


def _device_params():
    params = [pytest.param("cpu", marks=[
        pytest.mark.skipif(not tb.INTERPRETED, reason="CPU runs need the Triton interpreter (TRITON_INTERPRET=1)"),
        pytest.mark.skipif(tb.INTERPRETER_PROBLEM is not None, reason=str(tb.INTERPRETER_PROBLEM))])]
    params.append(pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="no CUDA device")]))
    return params


DEVICES = _device_params()
# Tests that run the kernels under the interpreter on CPU outside the DEVICES parametrisation.
needs_working_interpreter = pytest.mark.skipif(
    tb.INTERPRETED and tb.INTERPRETER_PROBLEM is not None, reason=str(tb.INTERPRETER_PROBLEM))


@pytest.fixture(autouse=True)
def _default_configs(monkeypatch):
    """Take each call's first candidate configuration: timing every candidate would compile each
    of them for every test shape (minutes on a GPU). The tuner has its own tests below."""
    monkeypatch.setenv("NERN_FAST_TRITON_AUTOTUNE", "0")
    yield
    tt._candidate_configs.cache_clear()  # lists made while a test patched the tuner's constants


@pytest.fixture
def first_layer(monkeypatch):
    def set_mode(mode: str):
        monkeypatch.setenv("NERN_FAST_TRITON_FIRST_LAYER", mode)
    return set_mode


@pytest.fixture
def chunked(monkeypatch):
    """Force the chunked schedule with small chunks: several per call, the last one partial
    (the mixed layout has 576 kernels: 3 chunks of 160 rows and one of 96)."""
    def force(rows: int = 160):
        monkeypatch.setenv("NERN_FAST_TRITON_SCHEDULE", "chunked")
        monkeypatch.setenv("NERN_FAST_TRITON_CHUNK_ROWS", str(rows))
    return force


@pytest.fixture(autouse=True)
def _no_tuning_cache(monkeypatch, tmp_path):
    """Tuning decisions of the tests go to a temporary file, never the user's cache."""
    monkeypatch.setenv("NERN_FAST_TRITON_TUNE_CACHE", str(tmp_path / "tune.json"))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_same_decode(got: torch.Tensor, want: torch.Tensor, what=None) -> None:
    """Bit for bit on a GPU. Under the interpreter a tile's ``tl.dot`` is numpy's sgemm, whose
    rounding on some CPUs (OpenBLAS's Haswell kernels; not its AVX-512 ones) depends on a row's
    place in the tile: first-layer tables built for another range of rows may then differ in the
    last bits. There: equal to a few float32 ulps."""
    if got.device.type == "cuda":
        assert torch.equal(got, want), what
    else:
        scale = max(want.abs().max().item(), 1e-30)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


def decode_and_grads(pred, backend, rows=None, grad_seed=1, precision=None):
    """Output of one decode and the gradients of <output, G> for a fixed random G."""
    weights, biases = pred.weights(), pred.biases()
    out = ops.decode(weights, biases, pred.layout, pred.encoding, rows, precision or pred.precision, backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad((out * g).sum(), weights + biases)
    return out, grads


# (id, kernel_size, hidden, num_blocks, levels, encoding, normalization, crop, permuted, first_layer)
CASES = [
    ("k3-h24-basic-separable", 3, 24, 4, 6, "basic", "local", "center", False, "separable"),
    ("k3-h40-direct-global-average-permuted", 3, 40, 3, 6, "basic", "global", "average", True, "direct"),
    ("k5-h24-ffn-max-permuted", 5, 24, 5, 4, "ffn", "local", "max", True, "auto"),
    ("k1-h24-nb2-none", 1, 24, 2, 3, "basic", "none", "center", False, "separable"),
    ("k3-h180-levels40-max", 3, 180, 3, 40, "basic", "local", "max", False, "separable"),
    ("k3-h360-levels40-average-permuted", 3, 360, 3, 40, "basic", "global", "average", True, "direct"),
]


def _check_fp32_case(case, device):
    _, k, hidden, num_blocks, levels, encoding, normalization, crop, permuted, _ = case
    layout = mixed_layout(k, normalization, crop, permuted)
    pred = random_predictor(layout, hidden=hidden, num_blocks=num_blocks, levels=levels,
                            encoding=encoding).to(device)
    out, grads = decode_and_grads(pred, "triton")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert out.shape == (layout.num_weights,)
    assert rel_err(out, ref) <= FP32_TOL
    names = [f"weight {i}" for i in range(num_blocks)] + [f"bias {i}" for i in range(num_blocks)]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.shape == r.shape, name
        assert rel_err(g, r) <= FP32_TOL, f"{name}: relative error {rel_err(g, r):.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_outputs_and_gradients_match_reference(case, device, first_layer):
    first_layer(case[-1])
    _check_fp32_case(case, device)


# The chunked schedule (large-H default) on the same layouts, forced, with small chunks.
CHUNKED_CASES = [
    ("k3-h24-separable", 3, 24, 4, 6, "basic", "local", "center", False, "separable"),
    ("k3-h33-direct-average-permuted", 3, 33, 3, 6, "basic", "global", "average", True, "direct"),
    ("k5-h24-nb4-ffn-max-permuted", 5, 24, 4, 4, "ffn", "global", "max", True, "auto"),
    ("k1-h24-nb2-none", 1, 24, 2, 3, "basic", "none", "center", False, "separable"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CHUNKED_CASES, ids=[c[0] for c in CHUNKED_CASES])
def test_chunked_schedule_matches_reference(case, device, first_layer, chunked):
    first_layer(case[-1])
    chunked()
    _check_fp32_case(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@pytest.mark.parametrize("modes", [("max", "center"), ("max", "average"), ("average", "max")])
def test_crop_modes_mixed_across_layers(modes, schedule, device, chunked):
    """Full-size layers whose crop mode differs from the cropped layers' (a k×k layer set to "max"
    is not cropped): the backward took a full-size "max" row for a max crop, which the kernels
    skip when no cropped layer uses max — its gradients came out 0."""
    if schedule == "chunked":
        chunked()
    full_mode, cropped_mode = modes
    layout = WeightLayout([("full", (8, 8, 3, 3), full_mode), ("also_full", (16, 8, 3, 3), cropped_mode),
                           ("cropped", (8, 16, 2, 2), cropped_mode),
                           ("pointwise", (8, 8, 1, 1), cropped_mode)], kernel_size=3)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=4).to(device)
    rows = torch.arange(0, layout.num_kernels, 7, device=device)
    for subset in (None, rows):
        out, grads = decode_and_grads(pred, "triton", subset)
        ref, ref_grads = decode_and_grads(pred, "eager", subset)
        assert rel_err(out, ref) <= FP32_TOL
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert rel_err(g, r) <= FP32_TOL, f"gradient {i}: relative error {rel_err(g, r):.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
def test_subset_equals_full_and_its_gradients_match(schedule, device, chunked):
    if schedule == "chunked":
        chunked(64)  # interpreter: 152 rows in chunks of 64, 64 and 24
    layout = mixed_layout(3, "local", "max", permuted=True)
    pred = random_predictor(layout, hidden=40, num_blocks=4, levels=6).to(device)
    g = torch.Generator().manual_seed(3)
    # unsorted, with repeats; on a GPU, whose chunks are multiples of 256 rows, 602 rows: 3 chunks
    count = 150 if device == "cpu" else 600
    rows = torch.randint(0, layout.num_kernels, (count,), generator=g)
    rows = torch.cat([rows, torch.tensor([0, layout.num_kernels - 1])]).to(device)
    full = ops.decode(pred.weights(), pred.biases(), layout, pred.encoding, backend="triton")
    sub, grads = decode_and_grads(pred, "triton", rows)
    assert sub.shape == (rows.numel(), 9)
    assert rel_err(sub, layout.kernel_rows(full, rows)) <= 1e-6
    ref, ref_grads = decode_and_grads(pred, "eager", rows)
    assert rel_err(sub, ref) <= FP32_TOL
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= FP32_TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_no_worse_than_twice_eager(precision, schedule, device, chunked):
    if schedule == "chunked":
        chunked()
    layout = mixed_layout(3, "local", "average", permuted=True)
    pred = random_predictor(layout, hidden=40, num_blocks=4, levels=6).to(device)
    exact, exact_grads = decode_and_grads(pred.double(), "eager", precision="fp32")
    pred = pred.float()
    ours, ours_grads = decode_and_grads(pred, "triton", precision=precision)
    eager, eager_grads = decode_and_grads(pred, "eager", precision=precision)
    triples = [("output", ours, eager, exact)] + [
        (f"gradient {i}", *g) for i, g in enumerate(zip(ours_grads, eager_grads, exact_grads))]
    for what, x, e, r in triples:
        bound = max(2 * rel_err(e, r), FP32_TOL)
        assert rel_err(x, r) <= bound, f"{precision} {what}: {rel_err(x, r):.2e} > {bound:.2e}"
    if precision == "bf16":  # the test must be able to tell bf16 from fp32
        assert rel_err(ours, exact) > 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_atomic_gradients_equal_deterministic_and_deterministic_repeats(device, monkeypatch):
    layout = mixed_layout(3, "local", "center", permuted=True)
    pred = random_predictor(layout, hidden=40, num_blocks=4, levels=6).to(device)
    _, first = decode_and_grads(pred, "triton")
    _, again = decode_and_grads(pred, "triton")
    for a, b in zip(first, again):
        assert torch.equal(a, b)  # deterministic reduction: bitwise repeatable
    monkeypatch.setenv("NERN_FAST_TRITON_ATOMICS", "1")
    _, atomic = decode_and_grads(pred, "triton")
    for a, b in zip(first, atomic):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_backward_programs_respect_memory_budget(device, monkeypatch):
    layout = mixed_layout(3)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=2).to(device)
    _, reference_grads = decode_and_grads(pred, "triton")
    monkeypatch.setenv("NERN_FAST_TRITON_BWD_MEMORY_MB", "0")  # one program, one slot, no reduction
    _, one_program = decode_and_grads(pred, "triton")
    for a, b in zip(reference_grads, one_program):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_gradients_are_repeatable_and_independent_of_chunking(device, chunked, monkeypatch):
    """Deterministic by construction: bitwise repeatable; other chunk sizes and row segments (the
    memory budget decides both) change only the summation order."""
    layout = mixed_layout(3, "local", "center", permuted=True)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=4).to(device)
    chunked(160)
    _, first = decode_and_grads(pred, "triton")
    _, again = decode_and_grads(pred, "triton")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    monkeypatch.delenv("NERN_FAST_TRITON_CHUNK_ROWS")
    monkeypatch.setenv("NERN_FAST_TRITON_BWD_MEMORY_MB", "1")  # budget-sized chunks, fewer segments
    _, budgeted = decode_and_grads(pred, "triton")
    for a, b in zip(first, budgeted):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_forward_keeps_to_a_call_workspace(device, monkeypatch):
    """decode(..., workspace_bytes=N) sizes the chunked forward's activation buffers from N (one
    chunk quantum at least) instead of NERN_FAST_TRITON_FWD_MEMORY_MB; the values do not change."""
    from nern_fast.ops import triton_chunked as tc
    layout = mixed_layout(3, "local", "center", permuted=True)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=4).to(device)
    monkeypatch.setenv("NERN_FAST_TRITON_SCHEDULE", "chunked")
    plans = []  # (budget, bytes per row, rows per chunk) of each chunked forward
    chunk_rows = tc._chunk_rows

    def spy(shape, config, row_bytes, budget):
        rows = chunk_rows(shape, config, row_bytes, budget)
        plans.append((budget, row_bytes, rows))
        return rows
    monkeypatch.setattr(tc, "_chunk_rows", spy)
    backend = ops.get_backend("triton")
    args = (pred.weights(), pred.biases(), pred.layout, pred.encoding, None, pred.precision)
    with torch.no_grad():
        default = backend.decode(*args)
        budget, row_bytes, rows = plans[-1]
        assert budget == 256 << 20 and rows >= pred.layout.num_kernels  # one chunk: all 576 rows
        # 300 rows' worth: above one chunk quantum on a GPU (256 rows) and under the interpreter
        # (32), below the layout's 576 rows
        small = backend.decode(*args, workspace_bytes=300 * row_bytes)
    budget, _, rows = plans[-1]
    assert budget == 300 * row_bytes and rows < pred.layout.num_kernels and rows * row_bytes <= budget
    assert rel_err(small, default) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_tiles_wider_than_the_hidden_size(device):
    """GPU-sized tiles (BM = 64 > H_S = 48, not a power of two) on a small H: every tile size the
    launcher derives must stay a power of two and every mask right."""
    layout = mixed_layout(3, "local", "max", permuted=True)
    pred = random_predictor(layout, hidden=40, num_blocks=3, levels=4).to(device)
    ref, ref_grads = decode_and_grads(pred, "eager")
    weights, biases = [w.detach() for w in pred.weights()], [b.detach() for b in pred.biases()]
    tensors, static = ops.get_backend("triton")._layout_arguments(layout, pred.encoding, weights[0].device)
    inputs = tb.make_launch_inputs(weights, biases, None, *tensors, *static, "fp32")
    config = tb.LaunchConfig(64, 64, 32, 4, 1, 1, True, "chunked")
    out = torch.empty(layout.num_weights, device=device)
    tb._run_forward(inputs, config, out, 1 << 16)  # 64 KiB: chunks of one quantum
    assert rel_err(out, ref) <= FP32_TOL
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)  # as decode_and_grads
    grads_w, grads_b = tb.unpack_gradients(tb._run_backward(inputs, grad, config, False, 1 << 20), weights)
    for g, r in zip(grads_w + grads_b, ref_grads):
        assert rel_err(g, r) <= FP32_TOL


# (id, kernel_size, hidden, num_blocks, crop, permuted, subset rows, encoding); ffn: direct first layer
K_MAJOR_CASES = [
    ("k3-h40-nb4-max-permuted", 3, 40, 4, "max", True, None, "basic"),
    ("k3-h33-nb3-average-subset", 3, 33, 3, "average", False, 7, "basic"),
    ("k5-h24-nb3-ffn-max", 5, 24, 3, "max", False, None, "ffn"),
    ("k1-h24-nb2", 1, 24, 2, "center", False, None, "basic"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@pytest.mark.parametrize("k_major", [True, False], ids=["k-major", "as-stored"])
@pytest.mark.parametrize("case", K_MAJOR_CASES, ids=[c[0] for c in K_MAJOR_CASES])
def test_tf32_backward_in_both_operand_orders(case, k_major, schedule, device, monkeypatch):
    """The tf32 backward with K-major operands (transposed weights; chunked: dzᵀ, xᵀ and gᵀ by the
    transpose kernel; fused: transposed copies of the program's scratch) and with the operands as
    stored (the tuner times both where K-major is enabled) give the eager
    decoder's gradients: to fp32 accuracy under the interpreter (whose tf32 dots are fp32), within
    twice eager tf32's own error on a GPU; chunked: several chunks of 64 rows, the last one partial."""
    _, k, hidden, num_blocks, crop, permuted, every, encoding = case
    if device == "cuda" and case != K_MAJOR_CASES[0]:
        pytest.skip("on a GPU the first case only: kernel compiles dominate the GPU check's time")
    monkeypatch.setenv("NERN_FAST_TRITON_CHUNK_ROWS", "64")
    layout = mixed_layout(k, "local", crop, permuted)
    pred = random_predictor(layout, hidden=hidden, num_blocks=num_blocks, levels=4, encoding=encoding).to(device)
    rows = None if every is None else torch.arange(0, layout.num_kernels, every, device=device)
    ref, ref_grads = decode_and_grads(pred, "eager", rows, precision="fp32")
    if HAS_CUDA and device == "cuda":  # the rule of the reduced-precision test: float64 is the truth
        eager_tf32 = decode_and_grads(pred, "eager", rows, precision="tf32")[1]
        ref_grads = decode_and_grads(copy.deepcopy(pred).double(), "eager", rows, precision="fp32")[1]
        bounds = [max(2 * rel_err(e, r), FP32_TOL) for e, r in zip(eager_tf32, ref_grads)]
    else:
        bounds = [FP32_TOL] * len(ref_grads)
    weights, biases = [w.detach() for w in pred.weights()], [b.detach() for b in pred.biases()]
    tensors, static = ops.get_backend("triton")._layout_arguments(layout, pred.encoding, weights[0].device)
    inputs = tb.make_launch_inputs(weights, biases, rows, *tensors, *static, "tf32")
    config = dataclasses.replace(tb.candidate_configs("bwd", inputs.shape, "auto", schedule)[0], k_major=k_major)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref)  # as decode_and_grads
    grads_w, grads_b = tb.unpack_gradients(tb._run_backward(inputs, grad, config, False, 1 << 20), weights)
    assert len(grads_w + grads_b) == len(ref_grads)
    for i, (g, r, bound) in enumerate(zip(grads_w + grads_b, ref_grads, bounds)):
        assert rel_err(g, r) <= bound, f"gradient {i}: relative error {rel_err(g, r):.2e} > {bound:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("first_layer_mode", ["separable", "direct"])
def test_chunked_forward_through_tma_descriptors(first_layer_mode, precision, device, monkeypatch):
    """The chunked forward's GEMMs through TMA descriptors (a tuner candidate on Hopper) decode what the
    pointer GEMMs decode: zero-filled loads and clipped stores past the buffers' shapes replace the
    masks (H = 40: partial weight tiles; several chunks of 64 rows, the last one partial)."""
    monkeypatch.setenv("NERN_FAST_TRITON_CHUNK_ROWS", "64")
    layout = mixed_layout(3, "local", "max", permuted=True)
    pred = random_predictor(layout, hidden=40, num_blocks=4, levels=4).to(device)
    weights, biases = [w.detach() for w in pred.weights()], [b.detach() for b in pred.biases()]
    tensors, static = ops.get_backend("triton")._layout_arguments(layout, pred.encoding, weights[0].device)
    inputs = tb.make_launch_inputs(weights, biases, None, *tensors, *static, precision)
    pointers = tb.candidate_configs("fwd", inputs.shape, first_layer_mode, "chunked")[0]
    assert not pointers.tma
    outs = []
    for config in (pointers, dataclasses.replace(pointers, tma=True)):
        out = torch.empty(layout.num_weights, device=device)
        tb._run_forward(inputs, config, out, 1 << 20)
        outs.append(out)
    ref, _ = decode_and_grads(pred, "eager", precision="fp32")
    if device == "cpu":  # the same products (the interpreter's tf32 is fp32; bf16 emulated alike)
        assert rel_err(outs[1], outs[0]) <= 1e-6
        assert rel_err(outs[1], ref) <= (FP32_TOL if precision == "tf32" else 2e-2)
    else:  # rounding of activations between layers may differ: no worse than twice the pointer GEMMs
        assert rel_err(outs[1], ref) <= max(2 * rel_err(outs[0], ref), FP32_TOL)


def test_tf32_backward_candidates_try_k_major_operands_where_enabled(monkeypatch):
    """K-major operands are opt-in (NERN_FAST_TRITON_K_MAJOR=1) until a GPU clears their accuracy at
    scale; enabled, the tf32 backward of both schedules tries them after the operands as stored."""
    shape = tb.DecodeShape(rows=1_220_608, subset=False, hidden=1256, num_hidden=3, enc_size=240, levels=40,
                           kernel_size=3, ffn=False, permuted=False, crop=False, has_max=False,
                           precision="tf32", f64=False, num_layers=16, num_filters=4800, num_channels=4800)
    monkeypatch.delenv("NERN_FAST_TRITON_K_MAJOR", raising=False)
    for schedule in ("chunked", "fused"):
        assert not any(c.k_major for c in tb.candidate_configs("bwd", shape, "auto", schedule, True))
    monkeypatch.setenv("NERN_FAST_TRITON_K_MAJOR", "1")
    for schedule in ("chunked", "fused"):
        bwd = tb.candidate_configs("bwd", shape, "auto", schedule)
        assert not bwd[0].k_major and any(c.k_major for c in bwd)  # as stored: the untuned default
        assert "k_major" in [c for c in bwd if c.k_major][0].describe()
        for kind, precision in (("fwd", "tf32"), ("bwd", "bf16"), ("bwd", "fp32")):
            other = dataclasses.replace(shape, precision=precision)
            assert not any(c.k_major for c in tb.candidate_configs(kind, other, "auto", schedule))


def test_tma_candidates_only_for_the_chunked_forward_on_hopper(monkeypatch):
    """The chunked tf32/bf16 forward also tries its GEMMs through TMA descriptors where the device has
    a TMA (Hopper): after the pointer version, which stays the untuned default."""
    shape = tb.DecodeShape(rows=1_220_608, subset=False, hidden=1256, num_hidden=3, enc_size=240, levels=40,
                           kernel_size=3, ffn=False, permuted=False, crop=False, has_max=False,
                           precision="bf16", f64=False, num_layers=16, num_filters=4800, num_channels=4800)
    tt._candidate_configs.cache_clear()
    try:
        assert not any(c.tma for c in tt.candidate_configs("fwd", shape, "auto", "chunked"))  # no TMA here
        monkeypatch.setattr(tt, "_tma_supported", lambda: True)
        tt._candidate_configs.cache_clear()
        for precision in ("bf16", "tf32"):
            fwd = tt.candidate_configs("fwd", dataclasses.replace(shape, precision=precision), "auto", "chunked")
            assert not fwd[0].tma and any(c.tma for c in fwd) and "tma" in [c for c in fwd if c.tma][0].describe()
        assert not any(c.tma for c in tt.candidate_configs("bwd", shape, "auto", "chunked"))
        assert not any(c.tma for c in tt.candidate_configs("fwd", shape, "auto", "fused"))
        fp32 = dataclasses.replace(shape, precision="fp32")
        assert not any(c.tma for c in tt.candidate_configs("fwd", fp32, "auto", "chunked"))
    finally:
        tt._candidate_configs.cache_clear()


def test_small_fused_forwards_also_try_narrow_row_tiles(monkeypatch):
    """A tuned fused forward of at most SMALL_CALL_ROWS rows (an on-demand layer decode) also times
    32- and 16-row tiles, after the usual ones; larger calls, backwards and untuned calls do not."""
    monkeypatch.setattr(tt, "INTERPRETED", False)  # the GPU tile lists
    tt._candidate_configs.cache_clear()
    for precision in ("fp32", "tf32", "bf16"):
        layer = _shape(280, rows=4096, num_hidden=3, precision=precision)
        tuned = tt.candidate_configs("fwd", layer, tuning=True)
        assert tuned[0] == tt.candidate_configs("fwd", layer)[0]  # the untuned default stays
        fused = [c for c in tuned if c.schedule == "fused"]
        assert [(c.bm, c.num_warps, c.programs_per_sm) for c in fused[-2:]] == [(32, 4, 2), (16, 4, 2)]
        assert fused[-1].bn == fused[0].bn and fused[-1].bk == fused[0].bk
        large = _shape(280, rows=tt.SMALL_CALL_ROWS * 2, num_hidden=3, precision=precision)
        assert tt.candidate_configs("fwd", large, tuning=True) == tuple(c for c in tuned if c not in fused[-2:])
        assert tt.candidate_configs("bwd", layer, tuning=True) == tt.candidate_configs("bwd", large, tuning=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bm", [16, 32])
def test_narrow_row_tiles_decode_like_eager(bm, device, monkeypatch):
    """The fused forward with 16- and 32-row tiles (what small calls may be tuned to; the backward
    keeps its own tiles), full and subset, outputs and gradients."""
    tiles = tt._fused_tiles
    monkeypatch.setattr(tt, "_fused_tiles",
                        lambda kind, shape: [(bm, 32, 32, 4, 1, 2)] if kind == "fwd" else tiles(kind, shape))
    tt._candidate_configs.cache_clear()
    layout = mixed_layout(3, crop="max", permuted=True)
    pred = random_predictor(layout, hidden=40, num_blocks=4, levels=4).to(device)
    rows = torch.arange(8, 8 + 128 + 5, device=device)  # two layers, a partial last tile
    for subset in (None, rows):
        out, grads = decode_and_grads(pred, "triton", rows=subset)
        ref, ref_grads = decode_and_grads(pred, "eager", rows=subset)
        assert rel_err(out, ref) <= FP32_TOL
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) <= FP32_TOL
    assert tt.candidate_configs("fwd", _shape(40))[0].bm == bm  # what ran


def test_chunk_plans_follow_the_memory_budget():
    from nern_fast.ops import triton_chunked as tc
    shape = tb.DecodeShape(rows=1_220_608, subset=False, hidden=1256, num_hidden=3, enc_size=240, levels=40,
                           kernel_size=3, ffn=False, permuted=False, crop=False, has_max=False,
                           precision="bf16", f64=False, num_layers=16, num_filters=4800, num_channels=4800)
    config = tb.LaunchConfig(128, 128, 32, 8, 3, 1, True, "chunked")
    for budget_mb in (64, 1024):
        plan = tc.backward_plan(shape, config, torch.device("cpu"), budget_mb << 20)
        used = plan.rows * tc.backward_row_bytes(shape) + (plan.segments + 1) * shape.slot_size * 4
        assert plan.rows % tc.chunk_quantum(config) == 0 and plan.segments >= 1
        assert used <= budget_mb << 20, (budget_mb, plan)
    assert tc.backward_plan(shape, config, torch.device("cpu"), 64 << 20).rows < plan.rows
    forward_rows = tc._chunk_rows(shape, config, tc.forward_row_bytes(shape, config), 256 << 20)
    assert forward_rows * tc.forward_row_bytes(shape, config) <= 256 << 20
    assert forward_rows <= tc.MAX_CHUNK_ROWS


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reuse", ["per-call", "cross-call"])
def test_parameter_changes_are_seen_between_calls(reuse, device, monkeypatch):
    """Packed parameters and first-layer tables are reused only while the parameters are unchanged
    (across calls only when asked: writes through .data escape version counters)."""
    monkeypatch.setenv("NERN_FAST_TRITON_PARAM_CACHE", "1" if reuse == "cross-call" else "0")
    layout = mixed_layout(3)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=4).to(device)
    w, b = pred.weights(), pred.biases()

    def check():
        ours = ops.decode(w, b, layout, pred.encoding, backend="triton")
        ref = ops.decode(w, b, layout, pred.encoding, backend="eager")
        assert rel_err(ours, ref) <= FP32_TOL
        return ours

    with torch.no_grad():
        first = check()
        assert torch.equal(first, check())
        w[1].mul_(1.5)  # in place: version counters move
        b[0].add_(0.25)  # b1 is folded into the separable tables
        check()
        w = [t.clone() for t in w]  # new tensors
        check()
        w[0].data.mul_(2)  # .data bypasses version counters
        if reuse == "cross-call":
            tb.clear_parameter_cache()  # the documented way to make such a write visible
        check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prepared_parameters_serve_several_calls(precision, schedule, device, chunked, monkeypatch):
    """A prepared set (packing made once, first-layer tables kept for the calls of one layer range)
    gives every per-layer subset decode and its gradients exactly what a call packing for itself
    gives, with the whole network's tables or only the layer's (``layers=``: see
    assert_same_decode); a set made for other tensors or another precision is refused."""
    if schedule == "chunked":
        chunked(rows=40)
    monkeypatch.setenv("NERN_FAST_TRITON_FIRST_LAYER", "separable")
    from nern_fast.ops import triton_fused, triton_inputs
    layout = mixed_layout(3, permuted=True)
    pred = random_predictor(layout, hidden=24, num_blocks=4, levels=4).to(device)
    w, b = pred.weights(), pred.biases()
    backend = ops.get_backend("triton")
    packs, tables = [], []
    monkeypatch.setattr(triton_inputs, "pack_parameters",
                        lambda *a, _f=triton_inputs.pack_parameters, **k: packs.append(1) or _f(*a, **k))
    monkeypatch.setattr(triton_fused, "_build_tables",
                        lambda *a, _f=triton_fused._build_tables: tables.append(1) or _f(*a))
    with torch.no_grad():
        prepared = backend.prepare(w, b, layout, pred.encoding, precision)
    assert len(packs) == 1 and len(tables) == 0  # tables: built by the first call that needs them
    with torch.no_grad():
        backend.decode(w, b, layout, pred.encoding, None, precision, prepared=prepared)
        backend.decode(w, b, layout, pred.encoding, None, precision, prepared=prepared)
    assert len(packs) == 1 and len(tables) == 1  # kept for the next call of the same range
    for i, layer in enumerate(layout.layers):
        rows = torch.arange(layer.kernel_offset, layer.kernel_offset + layer.num_kernels, device=device)
        g = torch.randn((len(rows), layout.kernel_size ** 2), device=device)
        results = []
        for extra in ({}, {"prepared": prepared}, {"layers": range(i, i + 1)},
                      {"prepared": prepared, "layers": range(i, i + 1)}):
            out = backend.decode(w, b, layout, pred.encoding, rows, precision, **extra)
            results.append((out, torch.autograd.grad((out * g).sum(), w + b)))
        (plain, plain_grads), *others = results
        for k, (out, grads) in enumerate(others):
            for got, want in zip((out, *grads), (plain, *plain_grads)):
                if k == 0:  # the whole network's tables, as the plain call's
                    assert torch.equal(got, want), (layer.name, k)
                else:  # the layer's own tables
                    assert_same_decode(got, want, (layer.name, k))
    assert len(packs) == 1 + 2 * len(layout.layers)  # the calls without a prepared set
    other = [t.detach().clone() for t in w]
    with pytest.raises(ValueError, match="prepare"):
        backend.decode(other, b, layout, pred.encoding, None, precision, prepared=prepared)
    with pytest.raises(ValueError, match="prepare"):
        backend.decode(w, b, layout, pred.encoding, None, "tf32" if precision == "fp32" else "fp32",
                       prepared=prepared)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
def test_layer_range_tables_hold_those_layers_only(schedule, device, chunked, monkeypatch):
    """decode(rows, layers=range(a, b)): the first-layer tables have L + Σ C_out + Σ C_in rows of
    layers a..b-1 (the filter and channel offsets rebased to them), the values are those of the
    whole network's tables (see assert_same_decode); an empty or out-of-layout range, or a full decode with one, is refused."""
    if schedule == "chunked":
        chunked(rows=40)
    monkeypatch.setenv("NERN_FAST_TRITON_FIRST_LAYER", "separable")
    from nern_fast.ops import triton_fused
    layout = mixed_layout(3, "local", "max", permuted=True)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=4).to(device)
    w, b = pred.weights(), pred.biases()
    backend = ops.get_backend("triton")
    table_rows = []
    monkeypatch.setattr(triton_fused, "_build_tables", lambda inputs, w1, _f=triton_fused._build_tables: (
        table_rows.append(inputs.shape.table_rows) or _f(inputs, w1)))
    specs = layout.layers
    for layers in (range(1, 3), range(0, 1), range(3, 4), range(0, len(specs))):
        first, last = specs[layers.start], specs[layers.stop - 1]
        rows = torch.arange(first.kernel_offset, last.kernel_offset + last.num_kernels, device=device)
        with torch.no_grad():
            whole = backend.decode(w, b, layout, pred.encoding, rows, pred.precision)
            ranged = backend.decode(w, b, layout, pred.encoding, rows, pred.precision, layers=layers)
        assert_same_decode(ranged, whole, layers)
        expected = len(specs) + sum(specs[i].c_out + specs[i].c_in for i in layers)
        assert table_rows[-2:] == [len(specs) + sum(l.c_out + l.c_in for l in specs), expected], layers
    for bad in (range(2, 2), range(0, len(specs) + 1), range(0, 4, 2)):
        with pytest.raises(ValueError, match="layers must be a non-empty range"):
            backend.decode(w, b, layout, pred.encoding, rows, pred.precision, layers=bad)
    with pytest.raises(ValueError, match="is for subset calls"):
        backend.decode(w, b, layout, pred.encoding, None, pred.precision, layers=range(0, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@pytest.mark.parametrize("first_layer", ["separable", "direct"])
def test_layer_range_row_outside_reads_no_further_than_the_range(first_layer, schedule, device, chunked,
                                                                 monkeypatch):
    """A row outside decode(layers=...)'s layers: refused for CPU rows (as by csrc); where it is not
    checked (rows on a GPU: checking would read them back) the kernels read it from the range's
    first table rows and positions — finite values, nothing past the range's tables or position
    slices (those layers' offsets are marked -1) — and the other rows of the call are unchanged,
    forward and backward."""
    if schedule == "chunked":
        chunked(rows=40)
    monkeypatch.setenv("NERN_FAST_TRITON_FIRST_LAYER", first_layer)
    layout = mixed_layout(3, "local", "max", permuted=True)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=4).to(device)
    backend = ops.get_backend("triton")
    first, third = layout.layers[1].kernel_offset, layout.layers[3].kernel_offset
    rows = torch.tensor([first, first + 5, third - 1, first - 1, third + 3, layout.num_kernels - 1])
    layers = range(1, 3)
    with pytest.raises(ValueError, match="rows must lie in layers 1..2"):
        backend.decode(pred.weights(), pred.biases(), layout, pred.encoding, rows, pred.precision,
                       layers=layers)
    # What a GPU call sees: no check. The rows outside are the last three: layers 0 and 3, whose
    # offsets point before and past the range's. The range's position slices lie inside NaN: a read
    # past them shows in the output or the gradients (the backward reads positions in both modes).
    monkeypatch.setattr(tb, "call_layer_range", lambda layout, layers, rows: layout.layer_range(layers))
    build = tb.TritonBackend._build_range_arguments

    def in_nan(t: torch.Tensor) -> torch.Tensor:
        padded = torch.full((t.numel() + 2 * 4096,), float("nan"), dtype=t.dtype, device=t.device)
        padded[4096:4096 + t.numel()] = t
        return padded[4096:4096 + t.numel()]

    def poisoned(tensors, static, span):
        (koff, woff, meta, coord, pos_l, pos_f, pos_c, table), static = build(tensors, static, span)
        return (koff, woff, meta, coord, pos_l, in_nan(pos_f), in_nan(pos_c), table), static
    monkeypatch.setattr(tb.TritonBackend, "_build_range_arguments", staticmethod(poisoned))
    rows = rows.to(device)
    whole = backend.decode(pred.weights(), pred.biases(), layout, pred.encoding, rows[:3], pred.precision)
    out = backend.decode(pred.weights(), pred.biases(), layout, pred.encoding, rows, pred.precision,
                         layers=layers)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:3], whole, rtol=1e-5, atol=1e-6)
    grad = torch.zeros_like(out)
    grad[:3] = torch.randn_like(whole)
    expected = torch.autograd.grad((whole * grad[:3]).sum(), pred.parameters())
    got = torch.autograd.grad((out * grad).sum(), pred.parameters())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@pytest.mark.parametrize("layer", [0, 1, 3])
def test_nan_propagates_like_eager(layer, schedule, device, monkeypatch):
    """A NaN weight (a diverged predictor) shows in the decoded weights as in eager: the ReLUs and
    the max crop keep NaN (triton's tl.maximum drops a NaN operand by default, and so does a GPU's
    max instruction: a diverged predictor decoded to finite weights)."""
    monkeypatch.setenv("NERN_FAST_TRITON_SCHEDULE", schedule)
    monkeypatch.setenv("NERN_FAST_TRITON_CHUNK_ROWS", "160")
    pred = random_predictor(mixed_layout(crop="max"), hidden=24, num_blocks=4, levels=4).to(device)
    assert_nan_like_eager(pred, "triton", "fp32", layer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first", ["separable", "direct"])
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
def test_padding_rows_add_no_nan_to_the_gradients(schedule, first, device, first_layer, monkeypatch):
    """One row decoded (the rest of its tile is padding, recomputed from position 0 with gradient
    0) and a NaN in the output layer's column of a unit that row's ReLU leaves dead: eager's
    gradients of the other layers stay finite (ReLU's backward selects 0), and so must the
    kernels' (the fused backward's padding rows added 0 · NaN = NaN to every weight gradient)."""
    from nern_fast.reference import kernel_positions
    first_layer(first)
    monkeypatch.setenv("NERN_FAST_TRITON_SCHEDULE", schedule)
    layout = WeightLayout.from_shapes([(4, 3, 3, 3)], kernel_size=3)
    pred = random_predictor(layout, hidden=16, num_blocks=3, levels=4).to(device)
    w, b = pred.weights(), pred.biases()
    with torch.no_grad():
        for bias in b:
            bias.uniform_(-0.3, 0.3)  # units alive for some rows, dead for others
        positions = kernel_positions(layout, torch.arange(layout.num_kernels))[0].to(device)
        x = pred.encoding.encode(torch.cat([positions, torch.zeros_like(positions[:1])]))
        for wi, bi in zip(w[:-1], b[:-1]):
            x = torch.relu(x @ wi.T + bi)
    # Units dead for a row and alive for a padding row (the kernels load its positions as 0).
    dead = ((x[:-1] == 0) & (x[-1:] > 0)).nonzero().tolist()
    assert dead, "no dead unit to put the NaN behind"
    g = torch.randn(1, 9, generator=torch.Generator().manual_seed(1)).to(device)
    for r, n in dead[:4]:
        rows = torch.tensor([r], device=device)
        with torch.no_grad():
            kept, w[-1][0, n] = w[-1][0, n].item(), float("nan")
        patterns = {}
        for backend in ("triton", "eager"):
            out = ops.decode(w, b, layout, pred.encoding, rows, "fp32", backend)
            grads = torch.autograd.grad((out * g).sum(), w + b)
            patterns[backend] = [bool(t.isnan().any()) for t in grads]
        with torch.no_grad():
            w[-1][0, n] = kept
        assert patterns["eager"][0] is False, "the case means something: eager's W0 gradient is finite"
        assert patterns["triton"] == patterns["eager"], (r, n)


def padded_tiles_layout(permuted: bool) -> WeightLayout:
    """110 kernels (not a multiple of any tile or chunk: the last one is partly padding), every
    crop size, permutations on two layers if ``permuted``."""
    layout = WeightLayout.from_shapes([(5, 3, 3, 3), (7, 5, 3, 3), (6, 7, 2, 2), (3, 6, 1, 1)],
                                      kernel_size=3, crop="max")
    if not permuted:
        return layout
    g = torch.Generator().manual_seed(4)
    return layout.with_permutations([torch.randperm(l.num_kernels, generator=g) if i % 2 == 0 else None
                                     for i, l in enumerate(layout.layers)])


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("first", ["separable", "direct"])
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@needs_working_interpreter
def test_kernels_read_nothing_outside_their_arguments(schedule, first, subset, permuted, first_layer,
                                                      monkeypatch):
    """Every float tensor of every launch sits between guards of +inf (then NaN) (tests/oob_guards.py):
    a read past any of them would reach the outputs or the gradients (the padding rows of the last
    tile once read the first-layer tables far past their end: these cases fail with that bug put
    back: the fused schedule's unpermuted full decode with the separable first layer)."""
    if not tb.INTERPRETED:
        pytest.skip("the guards wrap the interpreter's launches")
    from oob_guards import oob_guards

    first_layer(first)
    monkeypatch.setenv("NERN_FAST_TRITON_SCHEDULE", schedule)
    monkeypatch.setenv("NERN_FAST_TRITON_CHUNK_ROWS", "48")
    layout = padded_tiles_layout(permuted)
    pred = random_predictor(layout, hidden=24, num_blocks=4, levels=5)
    rows = torch.randint(0, layout.num_kernels, (45,), generator=torch.Generator().manual_seed(5)) \
        if subset else None
    ref, ref_grads = decode_and_grads(pred, "eager", rows)
    for fill in (float("inf"), float("nan")):
        with oob_guards(fill):
            out, grads = decode_and_grads(pred, "triton", rows)
        for name, x, r in zip(["output"] + [f"gradient {i}" for i in range(len(grads))], [out] + list(grads),
                              [ref] + list(ref_grads)):
            assert bool(torch.isfinite(x).all()), f"{name}: non-finite values with {fill} guards"
            assert rel_err(x, r) <= FP32_TOL, f"{name}: relative error {rel_err(x, r):.2e} ({fill} guards)"


@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@needs_working_interpreter
def test_float64_gradcheck_under_interpreter(schedule):
    if not tb.INTERPRETED:
        pytest.skip("float64 runs only under the Triton interpreter (the GPU kernels are float32)")
    layout = WeightLayout.from_shapes([(2, 3, 3, 3), (3, 2, 1, 1)], kernel_size=3, crop="average")
    pred = random_predictor(layout, hidden=16, num_blocks=3, levels=1).double()
    t = layout.tensors("cpu")
    table = pred.encoding.kernel_table("cpu")
    n = pred.num_blocks

    def decode(*params):
        return tb.triton_decode(list(params[:n]), list(params[n:]), None, t.kernel_offsets, t.weight_offsets,
                                t.meta, t.coord_rows, t.pos_layer, t.pos_filter, t.pos_channel, table,
                                layout.kernel_size, layout.num_kernels, layout.num_weights,
                                tb.crop_flags(layout), False, "fp32", "auto", schedule, False, 1 << 30,
                                1 << 20)

    params = tuple(p.detach().requires_grad_() for p in pred.weights() + pred.biases())
    assert torch.autograd.gradcheck(decode, params, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    layout = mixed_layout(3, "local", "center", permuted=True)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=4, backend="triton").to(device)
    eager_out = pred.decode_flat()
    compiled = torch.compile(lambda: pred.decode_flat(), fullgraph=True,
                             backend="inductor" if device == "cuda" else "aot_eager")
    out = compiled()
    assert rel_err(out, eager_out) <= 1e-6
    grads = torch.autograd.grad(out.square().sum(), pred.weights())
    ref = torch.autograd.grad(eager_out.square().sum(), pred.weights())
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= 1e-5


# ----------------------------------------------------------------------------- tuner


def _shape(hidden: int = 24, **kw) -> "tb.DecodeShape":
    base = dict(rows=576, subset=False, hidden=hidden, num_hidden=1, enc_size=36, levels=6, kernel_size=3,
                ffn=False, permuted=False, crop=True, has_max=False, precision="fp32", f64=False,
                num_layers=4, num_filters=48, num_channels=48)
    base.update(kw)
    return tb.DecodeShape(**base)


class FakeTimer:
    """Times configurations by a table instead of running kernels; records what was run."""

    def __init__(self, times):
        self.times, self.ran = times, []

    def run(self, config):
        self.ran.append(config)
        if self.times(config) is None:
            raise RuntimeError("out of resources")  # a candidate the device cannot run

    def __call__(self, fn):
        fn()
        return self.times(self.ran[-1])


def test_candidates_default_first_and_schedules_by_hidden_size():
    small, large = _shape(24), _shape(600)
    assert tb.candidate_configs("fwd", small)[0].schedule == "fused"
    assert tb.candidate_configs("fwd", large)[0].schedule == "chunked"  # the untuned large-H default
    assert {c.schedule for c in tb.candidate_configs("fwd", large, tuning=True)} == {"fused", "chunked"}
    assert {c.schedule for c in tb.candidate_configs("fwd", small, tuning=True)} == {"fused"}
    assert all(c.schedule == "fused" for c in tb.candidate_configs("bwd", large, schedule="fused"))
    assert not tb.candidate_configs("fwd", small, first_layer="direct")[0].separable
    assert not tb.candidate_configs("fwd", _shape(ffn=True))[0].separable  # ffn is never separable
    with pytest.raises(ValueError, match="not separable"):
        tb.candidate_configs("fwd", _shape(ffn=True), "separable")
    with pytest.raises(ValueError, match="schedule"):
        tb.candidate_configs("fwd", small, schedule="tiled")


def test_tuner_times_tiles_then_the_direct_first_layer_skips_failures_and_remembers(monkeypatch):
    monkeypatch.setattr(tt, "_TUNED", {})
    shape = _shape(600)
    candidates = tb.candidate_configs("fwd", shape, "auto", "auto", True)
    assert len(candidates) >= 2 and all(c.separable for c in candidates)
    failing, fastest = candidates[0], candidates[-1]
    direct = dataclasses.replace(fastest, separable=False)
    timer = FakeTimer(lambda c: None if c == failing else (0.5 if c == direct else
                                                            (1.0 if c == fastest else 2.0)))
    cpu = torch.device("cpu")
    assert tb.choose_config("fwd", shape, cpu, "auto", timer.run, tune=True, timer=timer) == direct
    assert timer.ran == list(candidates) + [direct]  # tiles first, then the winner's direct form
    assert tb.choose_config("fwd", shape, cpu, "auto", timer.run, tune=True, timer=timer) == direct
    assert len(timer.ran) == len(candidates) + 1  # remembered: nothing timed again
    assert list(tb.tuned_configs().values()) == [direct]
    assert tb.choose_config("fwd", shape, cpu, "auto", timer.run, tune=False) == candidates[0]
    nothing_runs = FakeTimer(lambda c: None)
    with pytest.raises(RuntimeError, match="no Triton launch configuration"):
        tb.choose_config("bwd", shape, cpu, "direct", nothing_runs.run, tune=True, timer=nothing_runs)


def test_a_k_major_decision_is_dropped_when_k_major_is_turned_off(monkeypatch):
    monkeypatch.setattr(tt, "_TUNED", {})
    monkeypatch.setenv("NERN_FAST_TRITON_TUNE_CACHE", "0")
    monkeypatch.setenv("NERN_FAST_TRITON_K_MAJOR", "1")
    shape, cpu = _shape(600, precision="tf32"), torch.device("cpu")
    timer = FakeTimer(lambda c: 1.0 if c.k_major else 2.0)
    chosen = tb.choose_config("bwd", shape, cpu, "separable", timer.run, tune=True, timer=timer)
    assert chosen.k_major
    monkeypatch.delenv("NERN_FAST_TRITON_K_MAJOR")
    again = tb.choose_config("bwd", shape, cpu, "separable", timer.run, tune=True, timer=timer)
    assert not again.k_major and again in tb.candidate_configs("bwd", shape, "separable", "auto", True)


def test_tuning_decisions_are_kept_on_disk(monkeypatch, tmp_path):
    path = tmp_path / "cache" / "tune.json"
    monkeypatch.setenv("NERN_FAST_TRITON_TUNE_CACHE", str(path))
    monkeypatch.setattr(tt, "_TUNED", {})
    shape, cpu = _shape(600), torch.device("cpu")
    candidates = tb.candidate_configs("fwd", shape, "auto", "chunked", True)
    timer = FakeTimer(lambda c: 1.0 if c.separable else 3.0)
    chosen = tb.choose_config("fwd", shape, cpu, "auto", timer.run, tune=True, timer=timer,
                              schedule="chunked")
    assert chosen in candidates and path.exists()
    monkeypatch.setattr(tt, "_TUNED", {})  # a new process: only the file remembers

    def must_not_run(config):
        raise AssertionError("re-tuned although the decision is on disk")

    again = tb.choose_config("fwd", shape, cpu, "auto", must_not_run, tune=True, timer=timer,
                             schedule="chunked")
    assert again == chosen
    # Another row bucket, another key: tuned and added to the same file.
    other = dataclasses.replace(shape, rows=1 << 20)
    tb.choose_config("fwd", other, cpu, "auto", timer.run, tune=True, timer=timer, schedule="chunked")
    assert len(tt._read_disk(path)) == 2
    # Changed kernels (another code hash) never reuse a decision; a corrupt file is ignored.
    monkeypatch.setattr(tt, "_TUNED", {})
    monkeypatch.setattr(tt, "code_hash", lambda: "other-code")
    before = len(timer.ran)
    tb.choose_config("fwd", shape, cpu, "auto", timer.run, tune=True, timer=timer, schedule="chunked")
    assert len(timer.ran) > before
    path.write_text("{not json")
    monkeypatch.setattr(tt, "_TUNED", {})
    assert tb.choose_config("fwd", shape, cpu, "auto", timer.run, tune=True, timer=timer,
                            schedule="chunked") == chosen
    # Disabled: nothing read or written.
    path.unlink()
    monkeypatch.setenv("NERN_FAST_TRITON_TUNE_CACHE", "0")
    assert tt.cache_path() is None
    monkeypatch.setattr(tt, "_TUNED", {})
    tb.choose_config("fwd", shape, cpu, "auto", timer.run, tune=True, timer=timer, schedule="chunked")
    assert not path.exists()


@needs_working_interpreter
def test_tuning_runs_candidates_on_a_prefix_and_then_the_whole_call(monkeypatch):
    """The CUDA tuning path, end to end on CPU: candidates timed on the first TUNE_ROWS rows (each
    paying for its own first-layer tables), the winner run on every row."""
    monkeypatch.setattr(tb, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(tb, "TUNE_ROWS", 100)
    monkeypatch.setattr(tt, "_TUNED", {})
    monkeypatch.setattr(tt, "_time_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(tt, "SMALL_CALL_ROWS", 0)  # one tile candidate: the test is about the prefix
    tt._candidate_configs.cache_clear()
    runs, run_forward = [], tb._run_forward

    def spy(inputs, config, out, budget):
        runs.append((inputs.shape.rows, config.separable, inputs.packed().tables is None))
        return run_forward(inputs, config, out, budget)

    monkeypatch.setattr(tb, "_run_forward", spy)
    layout = mixed_layout(3)
    pred = random_predictor(layout, hidden=24, num_blocks=3, levels=4)
    with torch.no_grad():
        out = ops.decode(pred.weights(), pred.biases(), layout, pred.encoding, backend="triton")
        ref = ops.decode(pred.weights(), pred.biases(), layout, pred.encoding, backend="eager")
    assert rel_err(out, ref) <= FP32_TOL
    assert runs[:2] == [(100, True, True), (100, False, True)]  # separable, then its direct form
    assert runs[-1][0] == layout.num_kernels and len(runs) == 3
    assert [key[0] for key in tb.tuned_configs()] == ["fwd"]


def test_a_configuration_that_does_not_compile_falls_back_to_the_next(monkeypatch):
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(tb, "_FALLBACK", {})
    candidates = tb.candidate_configs("fwd", _shape(600), "auto", "auto", True)
    ran = []

    def run(config):
        ran.append(config)
        if config == candidates[0]:
            raise OutOfResources(300000, 232448, "shared memory")
        return "ok"

    assert tb._run_with_fallback(candidates[0], candidates, run) == "ok"
    assert ran == [candidates[0], candidates[1]]
    assert tb._run_with_fallback(candidates[0], candidates, run) == "ok"  # remembered
    assert ran[-1] == candidates[1] and len(ran) == 3
    with pytest.raises(ValueError):  # anything else is a real error, not a fallback
        tb._run_with_fallback(candidates[1], candidates, lambda c: (_ for _ in ()).throw(ValueError("bug")))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_tuner_on_gpu(monkeypatch, capfd):
    monkeypatch.setenv("NERN_FAST_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("NERN_FAST_TRITON_TUNE_LOG", "1")
    monkeypatch.setattr(tt, "_TUNED", {})
    layout = mixed_layout(3, "local", "center", permuted=True)
    pred = random_predictor(layout, hidden=288, num_blocks=4, levels=6).cuda()  # both schedules timed
    out, grads = decode_and_grads(pred, "triton")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert rel_err(out, ref) <= FP32_TOL
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= FP32_TOL
    kinds = sorted(key[0] for key in tb.tuned_configs())
    assert kinds == ["bwd", "fwd"]
    err = capfd.readouterr().err
    assert "[nern_fast.triton] fwd" in err and " chunked " in err and " fused " in err


# ----------------------------------------------------------------------------- backend selection
def _request(**kw) -> DecodeRequest:
    base = dict(device=torch.device("cpu"), dtype=torch.float32, precision="fp32", hidden=24, num_blocks=4,
                kernel_size=3, encoding="basic", levels=6, subset=False, needs_grad=False)
    base.update(kw)
    return DecodeRequest(**base)


def test_auto_on_cpu_never_picks_the_interpreter():
    backend = ops.get_backend("triton")
    reason = backend.unavailable_reason(_request())
    assert reason is not None and ("explicitly" in reason or "interpreter" in reason)
    assert ops.select_backend(_request()).name != "triton"


def test_refusals_name_the_problem():
    backend = ops.get_backend("triton")
    cuda = torch.device("cuda", 0)
    assert backend.unavailable_reason(_request(device=cuda)) is None
    assert "float32" in backend.unavailable_reason(_request(device=cuda, dtype=torch.float64))
    assert "2048" in backend.unavailable_reason(_request(device=cuda, hidden=4096))
    assert "kernel size" in backend.unavailable_reason(_request(device=cuda, kernel_size=9))
    assert "not supported" in backend.unavailable_reason(_request(device=torch.device("meta")))
    if tb.INTERPRETED and tb.INTERPRETER_PROBLEM is not None:
        assert backend.unavailable_reason(_request(explicit=True)) == tb.INTERPRETER_PROBLEM
    elif tb.INTERPRETED:
        assert backend.unavailable_reason(_request(explicit=True)) is None
        pred = random_predictor(mixed_layout(), hidden=24).double()
        with pytest.raises(BackendUnavailable, match="float32"):
            ops.decode(pred.weights(), pred.biases(), pred.layout, pred.encoding, backend="triton")
    else:
        assert "TRITON_INTERPRET" in backend.unavailable_reason(_request(explicit=True))


@pytest.mark.parametrize("device", DEVICES)
def test_launch_inputs_are_checked(device):
    layout = mixed_layout(3)
    pred = random_predictor(layout, hidden=24, num_blocks=4, levels=6).to(device)
    w, b = pred.weights(), pred.biases()
    strided = w[1].detach().t().contiguous().t()  # same shape, not contiguous
    with pytest.raises(ValueError, match="not contiguous"):
        ops.decode(w[:1] + [strided] + w[2:], b, layout, pred.encoding, backend="triton")
    t = layout.tensors(device)
    table = pred.encoding.kernel_table(device)
    args = [w, b, None, t.kernel_offsets, t.weight_offsets, t.meta, t.coord_rows, t.pos_layer,
            t.pos_filter, t.pos_channel, table, 3, layout.num_kernels, layout.num_weights, 0, False, "fp32",
            "auto", "auto", False, 1 << 30, 1 << 28]
    bad = list(args)
    bad[5] = t.meta.long()
    with pytest.raises(ValueError, match="meta must be torch.int32"):
        tb.triton_decode(*bad)
    bad = list(args)
    bad[10] = table[:-1]  # the encoding table disagrees with W1's width
    with pytest.raises(ValueError, match="MLP layer 0"):
        tb.triton_decode(*bad)
    bad = list(args)
    bad[0], bad[1], bad[16] = [x.double() for x in w], [x.double() for x in b], "tf32"
    with pytest.raises(ValueError, match="float64 parameters decode in fp32 mode only" if device == "cpu"
                       else "needs float32 parameters"):
        tb.triton_decode(*bad)


# ----------------------------------------------------------------------------- larger layouts (GPU)
def _resnet18_shapes():
    shapes = [(64, 64)] * 4
    for c_in, c_out in ((64, 128), (128, 256), (256, 512)):
        shapes += [(c_out, c_in)] + [(c_out, c_out)] * 3
    return shapes


def _cifar_layout(depth: int) -> WeightLayout:
    from nern_fast.models import cifar_resnet
    return WeightLayout.from_model(cifar_resnet(depth, 10), include="nern")


GPU_CASES = [
    ("resnet20-h180-fp32", lambda: _cifar_layout(20), 180, "fp32"),
    ("resnet56-h280-fp32", lambda: _cifar_layout(56), 280, "fp32"),
    ("resnet18slice-h1256-tf32", lambda: WeightLayout.from_shapes(_resnet18_shapes()[:6]), 1256, "tf32"),
    ("resnet18slice-h1256-bf16", lambda: WeightLayout.from_shapes(_resnet18_shapes()[:6]), 1256, "bf16"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_fp32_mode_with_tf32x3_dots_keeps_fp32_tolerance(monkeypatch):
    """Opt-in NERN_FAST_TRITON_FP32_DOT=tf32x3: the fp32 mode on tensor cores must stay within the
    fp32 tolerance of the IEEE eager decoder, or it is of no use."""
    monkeypatch.setenv("NERN_FAST_TRITON_FP32_DOT", "tf32x3")
    pred = random_predictor(_cifar_layout(20), hidden=180, num_blocks=5, levels=40).cuda()
    ours, ours_grads = decode_and_grads(pred, "triton")
    eager, eager_grads = decode_and_grads(pred, "eager")
    assert rel_err(ours, eager) <= FP32_TOL
    for g, r in zip(ours_grads, eager_grads):
        assert rel_err(g, r) <= FP32_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("schedule", ["fused", "chunked"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_large_layouts_on_gpu(case, schedule, monkeypatch):
    _, make_layout, hidden, precision = case
    monkeypatch.setenv("NERN_FAST_TRITON_SCHEDULE", schedule)
    if schedule == "chunked":  # several chunks, the last one partial
        monkeypatch.setenv("NERN_FAST_TRITON_CHUNK_ROWS", "4096")
    layout = make_layout()
    pred = random_predictor(layout, hidden=hidden, num_blocks=5, levels=40).cuda()
    # fp32: only the rows away from ReLU kinks (a mask flipped by rounding moves a whole row's
    # gradient: on ResNet-56 eager's own fp32 gradients were 1.2e-3 off Triton's over all rows)
    rows = well_conditioned_rows(pred) if precision == "fp32" else None
    ours, ours_grads = decode_and_grads(pred, "triton", rows=rows, precision=precision)
    eager, eager_grads = decode_and_grads(pred, "eager", rows=rows, precision=precision)
    exact, exact_grads = decode_and_grads(copy.deepcopy(pred).double(), "eager", rows=rows, precision="fp32")
    for x, e, r in [(ours, eager, exact)] + list(zip(ours_grads, eager_grads, exact_grads)):
        assert rel_err(x, r) <= max(2 * rel_err(e, r), FP32_TOL)


BUG_FACTOR = 3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_every_tuner_candidate_is_correct_on_gpu(precision, monkeypatch):
    """The tuner may pick any candidate, not only the defaults the tests above run: each other one
    (both schedules, H = 1256) must decode and differentiate correctly. A wrong tile shows as errors of
    order 1; the bound here (3× the eager decoder's own error) leaves room for the rounding of one
    tile shape against another (the reduced-precision rule itself is tested above). The opt-in
    K-major backward candidates included."""
    monkeypatch.setenv("NERN_FAST_TRITON_K_MAJOR", "1")
    layout = WeightLayout.from_shapes([(64, 64, 3, 3), (128, 64, 3, 3)])
    pred = random_predictor(layout, hidden=1256, num_blocks=5, levels=40).cuda()
    exact, exact_grads = decode_and_grads(pred.double(), "eager", precision="fp32")
    pred = pred.float()
    eager, eager_grads = decode_and_grads(pred, "eager", precision=precision)
    # the G of decode_and_grads
    grad = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1)).to(eager)
    weights, biases = [w.detach() for w in pred.weights()], [b.detach() for b in pred.biases()]
    tensors, static = ops.get_backend("triton")._layout_arguments(layout, pred.encoding, weights[0].device)
    inputs = tb.make_launch_inputs(weights, biases, None, *tensors, *static, precision)
    def others(kind, schedule):  # the defaults run in test_large_layouts_on_gpu
        return list(tb.candidate_configs(kind, inputs.shape, "auto", schedule, True))[1:]

    chunked_default = tb.candidate_configs("fwd", inputs.shape, "auto", "chunked", True)[0]
    forward_configs = (others("fwd", "fused") + others("fwd", "chunked")
                       + [dataclasses.replace(chunked_default, separable=False)])
    for config in forward_configs:
        out = torch.empty(layout.num_weights, device="cuda")
        tb._run_forward(inputs, config, out, 64 << 20)  # 64 MB: several chunks
        assert rel_err(out, exact) <= max(BUG_FACTOR * rel_err(eager, exact), FP32_TOL), config.describe()
    backward_configs = others("bwd", "fused") + others("bwd", "chunked")
    assert forward_configs and backward_configs
    for config in backward_configs:
        flat = tb._run_backward(inputs, grad, config, False, 256 << 20)
        grads_w, grads_b = tb.unpack_gradients(flat, weights)
        for g, e, r in zip(grads_w + grads_b, eager_grads, exact_grads):
            assert rel_err(g, r) <= max(BUG_FACTOR * rel_err(e, r), FP32_TOL), config.describe()


import triton  # noqa: E402  (after the importorskip above)
import triton.language as tl  # noqa: E402

from nern_fast.kernels.common import kernel_coords, layer_of, tile_rows  # noqa: E402


@triton.jit
def _coords_kernel(out_ptr, R, koff_ptr, meta_ptr, coord_ptr, num_layers, search_steps,
                   PERMUTED: tl.constexpr, BM: tl.constexpr):
    """Per row of every tile: its layer, filter table row and channel table row."""
    idx, row, valid = tile_rows(tl.program_id(0), R, koff_ptr, False, BM)
    layer = layer_of(row, valid, koff_ptr, num_layers, search_steps)
    _, f_row, c_row, _, _ = kernel_coords(row, valid, layer, koff_ptr, meta_ptr, coord_ptr, PERMUTED)
    tl.store(out_ptr + idx * 3 + 0, layer)
    tl.store(out_ptr + idx * 3 + 1, f_row)
    tl.store(out_ptr + idx * 3 + 2, c_row)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("permuted", [False, True])
def test_padding_rows_of_a_tile_point_inside_the_tables(device, permuted):
    """The rows past the end of a call (a tile's padding) must get valid table rows: the separable
    first layer reads T[f_row] / T[c_row] without a row mask, and a pointer far past the tables
    read garbage whose NaN/inf reached the weight gradients through 0 × garbage (seen as NaN float64
    gradients on triton 3.6's interpreter)."""
    layout = mixed_layout(3, "local", "center", permuted=permuted)
    t = layout.tensors(device)
    bm, tiles = 64, -(-layout.num_kernels // 64) + 1  # a whole tile of padding rows too
    out = torch.full((tiles * bm, 3), -1, dtype=torch.int64, device=device)
    steps = max(1, (layout.num_layers - 1).bit_length())
    coord = t.coord_rows if t.coord_rows is not None else t.kernel_offsets
    _coords_kernel[(tiles,)](out, layout.num_kernels, t.kernel_offsets, t.meta, coord, layout.num_layers,
                            steps, PERMUTED=t.coord_rows is not None, BM=bm)
    out = out.cpu()
    table_rows = layout.num_layers + t.pos_filter.shape[0] + t.pos_channel.shape[0]
    padding = out[layout.num_kernels:]
    assert (padding[:, 0] >= 0).all() and (padding[:, 0] < layout.num_layers).all()
    assert (padding[:, 1:] == 0).all()
    valid = out[:layout.num_kernels]
    assert (valid[:, 1:] >= 0).all() and (valid[:, 1:] < table_rows).all()


from nern_fast.kernels.common import round_to_bf16, round_to_tf32  # noqa: E402
from nern_fast.ops.triton_inputs import _round_to_tf32, pack_parameters  # noqa: E402

# NaN bit patterns: torch's, CUDA's canonical one (full mantissa), negative ones, a signalling one.
NAN_BITS = [0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFC00000, 0x7F800001]


def _floats_with_nans() -> torch.Tensor:
    bits = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in NAN_BITS], dtype=torch.int32)
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1 + 2 ** -11, -(1 + 2 ** -11),
                            1 + 2 ** -8 + 2 ** -9, 3.4e38])
    ordinary = torch.randn(64, generator=torch.Generator().manual_seed(7)) * 100
    return torch.cat([bits.view(torch.float32), special, ordinary])


@triton.jit
def _rounding_kernel(x_ptr, tf32_ptr, bf16_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < N)
    tl.store(tf32_ptr + i, round_to_tf32(x), mask=i < N)
    tl.store(bf16_ptr + i, round_to_bf16(x), mask=i < N)


def _assert_nearest_tf32(rounded: torch.Tensor, x: torch.Tensor) -> None:
    nan = torch.isnan(x)
    assert torch.isnan(rounded[nan]).all(), "a NaN was rounded to a number"
    r, v = rounded[~nan], x[~nan]
    assert ((r.view(torch.int32) & 8191) == 0).all()  # 10 mantissa bits left
    finite = torch.isfinite(v) & (v.abs() < 3e38)
    err = (r[finite].double() - v[finite].double()).abs()
    assert (err <= v[finite].double().abs() * 2.0 ** -11 + 1e-45).all()  # within half a tf32 ulp
    assert torch.equal(r[torch.isinf(v)], v[torch.isinf(v)])
    ties = v == 1 + 2 ** -11  # halfway between 1 and 1 + 2⁻¹⁰: away from zero
    assert (r[ties] == 1 + 2 ** -10).all() and (r[v == -(1 + 2 ** -11)] == -(1 + 2 ** -10)).all()


def test_tf32_rounding_of_the_launcher_keeps_nan():
    """The launcher's tf32 copies of the weights (tf32 mode on a GPU): nearest tf32 value, ties away
    from zero (cvt.rna), and NaN stays NaN (CUDA's 0x7FFFFFFF came out as -0.0, 0xFFFFFFFF as +0.0)."""
    x = _floats_with_nans()
    _assert_nearest_tf32(_round_to_tf32(x), x)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_rounding_helpers_keep_nan(device):
    """round_to_tf32 (tf32 operands on a GPU) and round_to_bf16 (bf16 emulation under the
    interpreter): nearest value, NaN stays NaN whatever its bits."""
    x = _floats_with_nans().to(device)
    tf32, bf16 = torch.empty_like(x), torch.empty_like(x)
    _rounding_kernel[(1,)](x, tf32, bf16, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    x, tf32, bf16 = x.cpu(), tf32.cpu(), bf16.cpu()
    _assert_nearest_tf32(tf32, x)
    torch.testing.assert_close(tf32, _round_to_tf32(x), rtol=0, atol=0, equal_nan=True)
    # bf16: torch's own rounding (nearest, ties to even) as the reference
    expected = x.to(torch.bfloat16).float()
    torch.testing.assert_close(bf16, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("hidden,levels,num_blocks,k", [(180, 40, 5, 3), (37, 3, 3, 1), (24, 8, 2, 5),
                                                         (280, 1, 8, 7)])
@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16"])
def test_parameter_packing_matches_per_matrix_construction(hidden, levels, num_blocks, k, mode):
    """pack_parameters (one concatenation, one rounding pass, one padding) against packing each
    matrix on its own, in every mode a GPU call uses: the tf32 rounding and bf16 copies run only on
    accelerators, so the interpreter tests never reach them. NaN weights stay NaN."""
    gen = torch.Generator().manual_seed(hidden + num_blocks)
    shapes = ([(hidden, 6 * levels)] + [(hidden, hidden)] * (num_blocks - 2) + [(k * k, hidden)])
    weights = [torch.randn(s, generator=gen) for s in shapes]
    weights[-1][0, 1] = float("nan")
    biases = [torch.randn(s[0], generator=gen) for s in shapes]
    e_s, h_s = -(-6 * levels // 16) * 16, -(-hidden // 16) * 16
    packed = pack_parameters(weights, biases, e_s, h_s, round_tf32=mode == "tf32", bf16_hidden=mode == "bf16")

    def expected(w, width):
        w = torch.nn.functional.pad(w, (0, width - w.shape[1]))
        return _round_to_tf32(w) if mode == "tf32" else w
    want_w1, want_wl = expected(weights[0], e_s), expected(weights[-1], h_s)
    w1, b1, wh, bh, wl, bl = packed
    for got, want in ((w1, want_w1), (wl, want_wl), (b1, biases[0]), (bl, biases[-1])):
        assert got.is_contiguous() and got.dtype is want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(wl[0, 1])
    if num_blocks > 2:
        want_wh = torch.stack([expected(w, h_s) for w in weights[1:-1]])
        want_wh = want_wh.to(torch.bfloat16) if mode == "bf16" else want_wh
        assert wh.is_contiguous() and wh.shape == (num_blocks - 2, hidden, h_s)
        torch.testing.assert_close(wh, want_wh, rtol=0, atol=0)
        torch.testing.assert_close(bh, torch.stack(biases[1:-1]), rtol=0, atol=0)
    for t in packed:  # 16-value aligned starts: the kernels' vectorised loads
        assert t.data_ptr() % 64 == 0

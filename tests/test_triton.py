"""The fused Triton decoder against the eager reference.

On a machine without a GPU these run on CPU under the Triton interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported); with a GPU they run on CUDA, plus larger layouts and
a torch.compile test. Shapes are tiny on CPU: the interpreter executes every tile in numpy.

Tolerances:
* fp32: outputs and every parameter gradient within 1e-5 of the reference, relative to the largest
  magnitude of the tensor compared.
* tf32 / bf16: "no worse than 2× the eager decoder's own error at that precision", both measured
  against a float64 eager decode of the same parameters (relative to the largest magnitude), with the
  fp32 tolerance as a floor (on CPU the eager tf32 path is plain fp32, and under the interpreter
  our tf32 dots are fp32 too: both errors are then rounding noise).
"""
from __future__ import annotations

import pytest
import torch

from helpers import mixed_layout, random_predictor
from nern_fast import BackendUnavailable, WeightLayout, ops
from nern_fast.ops import DecodeRequest
from nern_fast.reference import reference_decode

tb = pytest.importorskip("nern_fast.ops.triton_backend", reason="triton is not installed")

pytestmark = pytest.mark.triton

FP32_TOL = 1e-5
HAS_CUDA = torch.cuda.is_available()


def _device_params():
    params = [pytest.param("cpu", marks=pytest.mark.skipif(
        not tb.INTERPRETED, reason="CPU runs need the Triton interpreter (TRITON_INTERPRET=1)"))]
    params.append(pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="no CUDA device")]))
    return params


DEVICES = _device_params()


@pytest.fixture(autouse=True)
def _default_configs(monkeypatch):
    """Take each call's first candidate configuration: timing every candidate would compile each
    of them for every test shape (minutes on a GPU). The tuner has its own tests below."""
    monkeypatch.setenv("NERN_FAST_TRITON_AUTOTUNE", "0")


@pytest.fixture
def first_layer(monkeypatch):
    def set_mode(mode: str):
        monkeypatch.setenv("NERN_FAST_TRITON_FIRST_LAYER", mode)
    return set_mode


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


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
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_outputs_and_gradients_match_reference(case, device, first_layer):
    _, k, hidden, num_blocks, levels, encoding, normalization, crop, permuted, mode = case
    first_layer(mode)
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
def test_subset_equals_full_and_its_gradients_match(device):
    layout = mixed_layout(3, "local", "max", permuted=True)
    pred = random_predictor(layout, hidden=40, num_blocks=4, levels=6).to(device)
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, layout.num_kernels, (150,), generator=g)  # unsorted, with repeats
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
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_no_worse_than_twice_eager(precision, device):
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


def test_float64_gradcheck_under_interpreter():
    if not tb.INTERPRETED:
        pytest.skip("float64 runs only under the Triton interpreter (the GPU kernels are float32)")
    layout = WeightLayout.from_shapes([(2, 3, 3, 3), (3, 2, 1, 1)], kernel_size=3, crop="average")
    pred = random_predictor(layout, hidden=16, num_blocks=3, levels=1).double()
    t = layout.tensors("cpu")
    table = tb.encoding_table(pred.encoding, torch.device("cpu"))
    n = pred.num_blocks

    def decode(*params):
        return tb.triton_decode(list(params[:n]), list(params[n:]), None, t.kernel_offsets, t.weight_offsets,
                                t.meta, t.coord_rows, t.pos_layer, t.pos_filter, t.pos_channel, table,
                                layout.kernel_size, layout.num_kernels, layout.num_weights,
                                tb.crop_flags(layout), False, "fp32", "auto", False, 1 << 30)

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
def test_tuner_keeps_the_fastest_runnable_candidate_and_remembers_it(monkeypatch):
    layout = mixed_layout(3)
    shape = tb.DecodeShape(rows=layout.num_kernels, subset=False, hidden=24, num_hidden=1, enc_size=36,
                           levels=6, kernel_size=3, ffn=False, permuted=False, crop=True, has_max=False,
                           precision="fp32", f64=False, num_layers=4, num_filters=48, num_channels=48)
    candidates = tb.candidate_configs("fwd", shape, "auto")
    assert {c.separable for c in candidates} == {True, False}  # both first-layer forms are timed
    ran, fastest = [], candidates[-1]

    def run(config):
        ran.append(config)
        if config == candidates[0]:
            raise RuntimeError("out of resources")  # a candidate the device cannot run

    def timer(fn):
        fn()
        return 1.0 if ran[-1] == fastest else 2.0

    monkeypatch.setattr(tb, "_TUNED", {})
    cpu = torch.device("cpu")
    assert tb.choose_config("fwd", shape, cpu, "auto", run, tune=True, timer=timer) == fastest
    assert ran == candidates
    assert tb.choose_config("fwd", shape, cpu, "auto", run, tune=True, timer=timer) == fastest
    assert len(ran) == len(candidates)  # remembered: nothing timed again
    assert list(tb.tuned_configs().values()) == [fastest]
    assert tb.choose_config("fwd", shape, cpu, "auto", run, tune=False) == candidates[0]
    with pytest.raises(ValueError, match="not separable"):
        tb.candidate_configs("fwd", tb.DecodeShape(**{**shape.__dict__, "ffn": True}), "separable")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_tuner_on_gpu(monkeypatch, capfd):
    monkeypatch.setenv("NERN_FAST_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("NERN_FAST_TRITON_TUNE_LOG", "1")
    monkeypatch.setattr(tb, "_TUNED", {})
    layout = mixed_layout(3, "local", "center", permuted=True)
    pred = random_predictor(layout, hidden=48, num_blocks=4, levels=6).cuda()
    out, grads = decode_and_grads(pred, "triton")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert rel_err(out, ref) <= FP32_TOL
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= FP32_TOL
    kinds = sorted(key[0] for key in tb.tuned_configs())
    assert kinds == ["bwd", "fwd"]
    assert "[nern_fast.triton] fwd" in capfd.readouterr().err


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
    if tb.INTERPRETED:
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
    table = tb.encoding_table(pred.encoding, torch.device(device))
    args = [w, b, None, t.kernel_offsets, t.weight_offsets, t.meta, t.coord_rows, t.pos_layer,
            t.pos_filter, t.pos_channel, table, 3, layout.num_kernels, layout.num_weights, 0, False, "fp32",
            "auto", False, 1 << 30]
    bad = list(args)
    bad[5] = t.meta.long()
    with pytest.raises(ValueError, match="meta must be torch.int32"):
        tb.triton_decode(*bad)
    bad = list(args)
    bad[10] = table[:-1]  # the encoding table disagrees with W1's width
    with pytest.raises(ValueError, match="MLP layer 0"):
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
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_large_layouts_on_gpu(case):
    _, make_layout, hidden, precision = case
    layout = make_layout()
    pred = random_predictor(layout, hidden=hidden, num_blocks=5, levels=40).cuda()
    ours, ours_grads = decode_and_grads(pred, "triton", precision=precision)
    eager, eager_grads = decode_and_grads(pred, "eager", precision=precision)
    if precision == "fp32":
        assert rel_err(ours, eager) <= FP32_TOL
        for g, r in zip(ours_grads, eager_grads):
            assert rel_err(g, r) <= FP32_TOL
        return
    exact, exact_grads = decode_and_grads(pred.double(), "eager", precision="fp32")
    for x, e, r in [(ours, eager, exact)] + list(zip(ours_grads, eager_grads, exact_grads)):
        assert rel_err(x, r) <= max(2 * rel_err(e, r), FP32_TOL)

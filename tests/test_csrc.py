"""The compiled extension nern_fast._C (backend "csrc") against the eager reference.

Forward output and every gradient, odd sizes, both encodings, all normalisations, crops,
permutations, subsets, kernel sizes 1..7; bf16 bounded against fp64; errors at the C++ boundary;
the backend's selection; torch.library registrations. CUDA tests run where a GPU is visible.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import mixed_layout, random_predictor
from nern_fast import BackendUnavailable, WeightLayout, ops, reference_decode
from nern_fast.ops import csrc_backend

BUILD = csrc_backend.build_info()
pytestmark = [pytest.mark.csrc,
              pytest.mark.skipif(not BUILD["built"], reason=f"extension not built: {BUILD.get('reason')}")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = Path(__file__).resolve().parent.parent


def params(pred):
    return pred.weights(), pred.biases()


def decode_and_grads(pred, backend, rows=None, precision="fp32", seed=1):
    """Output and the gradients of a fixed random projection of it w.r.t. every weight and bias."""
    w, b = params(pred)
    out = ops.decode(w, b, pred.layout, pred.encoding, rows, precision, backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((out * g.to(out.device, out.dtype)).sum(), w + b)
    return out.detach(), [x.detach() for x in grads]


def assert_matches(out, ref, grads, ref_grads, rtol=1e-5, grad_rtol=2e-5):
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=rtol * scale)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g, r, rtol=grad_rtol, atol=grad_rtol * max(r.abs().max().item(), 1e-12),
                                   msg=lambda m, i=i: f"gradient {i}: {m}")


def odd_layout(kernel_size, normalization="local"):
    """Layers of every size from k down to 1, one crop mode each, a permutation on one of them."""
    k = kernel_size
    layers = [(f"l{s}_{crop}", (3 + s, 2 + (s % 3), s, s), crop)
              for s in range(k, 0, -1) for crop in ("center", "average", "max") if s < k or crop == "center"]
    layout = WeightLayout(layers, kernel_size=k, normalization=normalization)
    g = torch.Generator().manual_seed(3)
    return layout.with_permutations([torch.randperm(l.num_kernels, generator=g) if i % 2 else None
                                     for i, l in enumerate(layout.layers)])


# ----------------------------------------------------------------------------------------- build
def test_cpu_ops_registered():
    for op in ("decode_forward", "decode_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nern_fast_C::{op}", "CPU")


def test_cuda_part_compiled_when_requested():
    """The build asked for CUDA ops (torch with CUDA + nvcc found): they must be in the library."""
    if not BUILD.get("cuda_requested"):
        pytest.skip(f"the build did not ask for CUDA ops: {BUILD.get('cuda_note')}")
    assert BUILD["cuda_built"], f"CUDA ops requested but not built: {BUILD['cuda_note']}"
    assert BUILD["with_cuda"]
    for op in ("decode_forward", "decode_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nern_fast_C::{op}", "CUDA")


# ------------------------------------------------------------------------------ CPU vs reference
@pytest.mark.parametrize("encoding", ["basic", "ffn"])
@pytest.mark.parametrize("crop", ["center", "average", "max"])
@pytest.mark.parametrize("normalization", ["local", "global", "none"])
@pytest.mark.parametrize("permuted", [False, True])
def test_full_decode_matches_reference(encoding, crop, normalization, permuted):
    layout = mixed_layout(crop=crop, normalization=normalization, permuted=permuted)
    pred = random_predictor(layout, hidden=24, num_blocks=4, levels=6, encoding=encoding)
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    # ffn with un-normalised integer positions feeds sines arguments in the hundreds: one ulp of
    # the argument is ~1e-5 there, so both decoders legitimately differ a little more.
    loose = encoding == "ffn" and normalization == "none"
    assert_matches(out, ref, grads, ref_grads, rtol=1e-4 if loose else 1e-5,
                   grad_rtol=1e-4 if loose else 2e-5)


@pytest.mark.parametrize("hidden,num_blocks", [(24, 2), (180, 3), (280, 5)])
@pytest.mark.parametrize("encoding", ["basic", "ffn"])
def test_hidden_sizes_and_depths(hidden, num_blocks, encoding):
    layout = mixed_layout(crop="max", permuted=True)
    pred = random_predictor(layout, hidden=hidden, num_blocks=num_blocks, levels=40, encoding=encoding)
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert_matches(out, ref, grads, ref_grads)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
def test_kernel_sizes(kernel_size):
    layout = odd_layout(kernel_size)
    pred = random_predictor(layout, hidden=33, num_blocks=3, levels=5)
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert_matches(out, ref, grads, ref_grads)


@pytest.mark.parametrize("levels", [1, 64])
def test_levels_extremes(levels):
    pred = random_predictor(mixed_layout(), hidden=20, num_blocks=3, levels=levels)
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert_matches(out, ref, grads, ref_grads)


@pytest.mark.parametrize("encoding", ["basic", "ffn"])
def test_subset_rows_equal_full_rows_and_gradients(encoding):
    layout = odd_layout(5)
    pred = random_predictor(layout, hidden=40, num_blocks=4, levels=8, encoding=encoding)
    g = torch.Generator().manual_seed(5)
    rows = torch.cat([torch.randint(0, layout.num_kernels, (300,), generator=g),
                      torch.tensor([0, 0, layout.num_kernels - 1])])  # repeated rows accumulate
    w, b = params(pred)
    with torch.no_grad():
        full = ops.decode(w, b, layout, pred.encoding, None, "fp32", "csrc")
    out, grads = decode_and_grads(pred, "csrc", rows)
    torch.testing.assert_close(out, layout.kernel_rows(full, rows), rtol=1e-6, atol=1e-7)
    ref, ref_grads = decode_and_grads(pred, "eager", rows)
    assert_matches(out, ref, grads, ref_grads)
    empty = ops.decode(w, b, layout, pred.encoding, rows[:0], "fp32", "csrc")
    assert empty.shape == (0, 25)


def test_float64_matches_reference_tightly_and_gradcheck():
    pred = random_predictor(mixed_layout(crop="average", permuted=True), hidden=24, num_blocks=3,
                            levels=4, dtype=torch.float64)
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert_matches(out, ref, grads, ref_grads, rtol=1e-12, grad_rtol=1e-11)

    tiny = WeightLayout([("a", (2, 3, 3, 3), "center"), ("b", (3, 2, 2, 2), "max"),
                         ("c", (2, 2, 1, 1), "average")], kernel_size=3)
    small = random_predictor(tiny, hidden=5, num_blocks=3, levels=2, dtype=torch.float64)
    w, b = params(small)
    rows = torch.tensor([0, 7, 8, 12, 15, 15])

    def full(*p):
        return ops.decode(list(p[:3]), list(p[3:]), tiny, small.encoding, None, "fp32", "csrc")

    def subset(*p):
        return ops.decode(list(p[:3]), list(p[3:]), tiny, small.encoding, rows, "fp32", "csrc")

    assert torch.autograd.gradcheck(full, tuple(w + b))
    assert torch.autograd.gradcheck(subset, tuple(w + b))


def test_backward_is_deterministic():
    pred = random_predictor(mixed_layout(permuted=True), hidden=64, num_blocks=4, levels=10)
    _, first = decode_and_grads(pred, "csrc")
    _, second = decode_and_grads(pred, "csrc")
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("tile", ["7", "64"])
def test_tiles_smaller_than_a_layer(tile, monkeypatch):
    """Tiles that cut through layers (and leave a ragged last tile) decode the same values."""
    monkeypatch.setenv("NERN_FAST_CPU_TILE", tile)
    pred = random_predictor(mixed_layout(crop="max", permuted=True), hidden=24, num_blocks=4, levels=6)
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert_matches(out, ref, grads, ref_grads)


# ------------------------------------------------------------------------------------------ bf16
def bf16_errors(pred, backend, rows=None):
    """Max error of the output and of every gradient against the float64 reference."""
    exact = random_predictor(pred.layout, hidden=pred.hidden, num_blocks=pred.num_blocks,
                             levels=pred.encoding.levels, encoding=pred.encoding.kind, dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in pred.state_dict().items()})
    ref, ref_grads = decode_and_grads(exact, "eager", rows)
    out, grads = decode_and_grads(pred, backend, rows, precision="bf16")
    errors = [(out.double() - ref).abs().max().item()]
    errors += [(g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads)]
    scales = [r.abs().max().item() for r in [ref] + ref_grads]
    return errors, scales


@pytest.mark.parametrize("encoding", ["basic", "ffn"])
@pytest.mark.parametrize("subset", [False, True])
def test_bf16_error_bounded_by_eager_bf16(encoding, subset):
    layout = mixed_layout(crop="average", permuted=True)
    pred = random_predictor(layout, hidden=180, num_blocks=5, levels=40, encoding=encoding)
    rows = torch.randint(0, layout.num_kernels, (200,), generator=torch.Generator().manual_seed(2)) \
        if subset else None
    ours, scales = bf16_errors(pred, "csrc", rows)
    eager, _ = bf16_errors(pred, "eager", rows)
    # The floor is fp32 round-off (a sum over hundreds of rows), not bf16 error: the last bias's
    # gradient never meets a bf16 operand.
    for i, (a, e, scale) in enumerate(zip(ours, eager, scales)):
        assert a <= 2 * e + 1e-5 * scale, \
            f"{'output' if i == 0 else f'gradient {i - 1}'}: {a:.3e} vs eager {e:.3e}"


def test_bf16_portable_passes_match_avx512(tmp_path):
    """The scalar fallback of the elementwise passes gives the AVX-512 results (run in a child
    process: the choice is made once per process)."""
    script = (
        "import sys, torch; sys.path.insert(0, 'tests')\n"
        "from helpers import mixed_layout, random_predictor\n"
        "from nern_fast import ops\n"
        "pred = random_predictor(mixed_layout(crop='max', permuted=True), hidden=40, num_blocks=4, levels=8)\n"
        "w, b = pred.weights(), pred.biases()\n"
        "out = ops.decode(w, b, pred.layout, pred.encoding, None, 'bf16', 'csrc')\n"
        "grads = torch.autograd.grad(out.square().sum(), w + b)\n"
        "torch.save([out.detach()] + list(grads), sys.argv[1])\n")
    results = []
    for isa in ("native", "scalar"):
        path = tmp_path / f"{isa}.pt"
        env = {**os.environ, "NERN_FAST_CPU_ISA": isa}
        subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, env=env, check=True,
                       timeout=300)
        results.append(torch.load(path))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# -------------------------------------------------------------------------------- boundary checks
def raw_args(pred, **override):
    layout, enc = pred.layout, pred.encoding
    t = layout.tensors("cpu")
    args = dict(weights=[w.detach() for w in pred.weights()], biases=[b.detach() for b in pred.biases()],
                meta=t.meta, pos_layer=t.pos_layer, pos_filter=t.pos_filter, pos_channel=t.pos_channel,
                coord_rows=t.coord_rows, rows=None, table=enc.frequencies(), encoding=0,
                kernel_size=layout.kernel_size, num_kernels=layout.num_kernels,
                num_weights=layout.num_weights, precision="fp32")
    args.update(override)
    return list(args.values())


@pytest.mark.parametrize("override,message", [
    (dict(meta="float"), "meta must be a contiguous CPU int32"),
    (dict(weights="bad shape"), "MLP layer 1: expected weight"),
    (dict(weights="noncontiguous"), "must be contiguous"),
    (dict(weights="float16"), "float32 or float64"),
    (dict(precision="fp8"), "precision 'fp8'"),
    (dict(num_weights=5), "not a valid layout"),
    (dict(num_weights=4161), "describes"),
    (dict(rows=torch.tensor([0, 10_000])), "out of range"),
    (dict(rows=torch.tensor([[0]])), "1-D int64"),
    (dict(pos_filter=torch.zeros(3)), "pos_filter must have shape"),
    (dict(kernel_size=9), "outside 1..7"),
])
def test_boundary_errors_are_clear(override, message):
    pred = random_predictor(mixed_layout(), hidden=16, num_blocks=3, levels=4)
    w = [x.detach() for x in pred.weights()]
    if override.get("meta") == "float":
        override["meta"] = pred.layout.tensors("cpu").meta.float()
    if override.get("weights") == "bad shape":
        override["weights"] = [w[0], w[1][:, :5].contiguous(), w[2]]
    elif override.get("weights") == "noncontiguous":
        override["weights"] = [w[0], w[1].t(), w[2]]
    elif override.get("weights") == "float16":
        override["weights"] = [x.half() for x in w]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.nern_fast_C.decode_forward(*raw_args(pred, **override))


def test_backward_rejects_wrong_gradient_shape():
    pred = random_predictor(mixed_layout(), hidden=16, num_blocks=3, levels=4)
    with pytest.raises(RuntimeError, match="output gradient must have shape"):
        torch.ops.nern_fast_C.decode_backward(torch.zeros(3), *raw_args(pred))


def test_backend_reasons_and_selection(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    pred = random_predictor(mixed_layout(), hidden=16, num_blocks=3, levels=4)
    w = pred.weights()
    request = ops.make_request(w, pred.layout, pred.encoding, None, "fp32")
    assert ops.select_backend(request).name == "csrc"  # chosen automatically on CPU
    half = ops.make_request([x.half() for x in w], pred.layout, pred.encoding, None, "fp32")
    assert "float32 or float64" in ops.availability(half)["csrc"]
    bf16_double = ops.make_request([x.double() for x in w], pred.layout, pred.encoding, None, "bf16")
    assert "needs float32" in ops.availability(bf16_double)["csrc"]
    with pytest.raises(BackendUnavailable, match="float32 or float64"):
        ops.decode([x.half() for x in w], [x.half() for x in pred.biases()], pred.layout, pred.encoding,
                   backend="csrc")
    if not BUILD["with_cuda"]:
        cuda = ops.DecodeRequest(**{**request.__dict__, "device": torch.device("cuda", 0)})
        assert "without its CUDA ops" in csrc_backend.CsrcBackend().unavailable_reason(cuda)


def test_predictor_uses_csrc_by_default_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    calls = []
    original = csrc_backend.CsrcBackend.decode
    monkeypatch.setattr(csrc_backend.CsrcBackend, "decode",
                        lambda self, *a: calls.append(1) or original(self, *a))
    pred = random_predictor(mixed_layout(crop="max"), hidden=32, num_blocks=4, levels=6)
    flat = torch.cat([x.reshape(-1) for x in pred()])
    assert calls == [1]
    ref = reference_decode(pred.weights(), pred.biases(), pred.layout, pred.encoding)
    torch.testing.assert_close(flat, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ torch.library / compile
def test_opcheck_registrations():
    pred = random_predictor(mixed_layout(crop="average", permuted=True), hidden=8, num_blocks=3, levels=2)
    args = raw_args(pred)
    args[0] = [w.requires_grad_() for w in args[0]]
    args[1] = [b.requires_grad_() for b in args[1]]
    torch.library.opcheck(torch.ops.nern_fast_C.decode_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    rows = torch.tensor([1, 5, 200, 5])
    args[7] = rows
    torch.library.opcheck(torch.ops.nern_fast_C.decode_forward, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_traces_under_torch_compile():
    pred = random_predictor(mixed_layout(crop="max", permuted=True), hidden=16, num_blocks=3, levels=4,
                            backend="csrc")
    compiled = torch.compile(lambda: pred.decode_flat(), backend="aot_eager", fullgraph=False)
    out = compiled()
    ref = reference_decode(pred.weights(), pred.biases(), pred.layout, pred.encoding)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert all(w.grad is not None for w in pred.weights())


# ------------------------------------------------------------------------------------------ CUDA
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("encoding", ["basic", "ffn"])
@pytest.mark.parametrize("crop", ["center", "average", "max"])
@pytest.mark.parametrize("permuted", [False, True])
def test_cuda_matches_reference(encoding, crop, permuted):
    layout = mixed_layout(crop=crop, permuted=permuted)
    pred = random_predictor(layout, hidden=180, num_blocks=5, levels=40, encoding=encoding).cuda()
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert_matches(out, ref, grads, ref_grads, rtol=2e-5, grad_rtol=1e-4)
    rows = torch.randint(0, layout.num_kernels, (333,), device="cuda")
    out, grads = decode_and_grads(pred, "csrc", rows)
    ref, ref_grads = decode_and_grads(pred, "eager", rows)
    assert_matches(out, ref, grads, ref_grads, rtol=2e-5, grad_rtol=1e-4)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kernel_size", [1, 5, 7])
def test_cuda_kernel_sizes(kernel_size):
    pred = random_predictor(odd_layout(kernel_size, "global"), hidden=24, num_blocks=3, levels=5).cuda()
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert_matches(out, ref, grads, ref_grads, rtol=2e-5, grad_rtol=1e-4)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("encoding", ["basic", "ffn"])
def test_cuda_reduced_precision_bounded(precision, encoding):
    layout = mixed_layout(crop="average", permuted=True)
    pred = random_predictor(layout, hidden=280, num_blocks=5, levels=40, encoding=encoding).cuda()
    exact = random_predictor(layout, hidden=280, num_blocks=5, levels=40, encoding=encoding,
                             dtype=torch.float64).cuda()
    exact.load_state_dict({k: v.double() for k, v in pred.state_dict().items()})
    ref, ref_grads = decode_and_grads(exact, "eager")
    ours, our_grads = decode_and_grads(pred, "csrc", precision=precision)
    eager, eager_grads = decode_and_grads(pred, "eager", precision=precision)
    for a, e, r in zip([ours] + our_grads, [eager] + eager_grads, [ref] + ref_grads):
        assert (a.double() - r).abs().max() <= 2 * (e.double() - r).abs().max() + 1e-6 * r.abs().max()


@needs_cuda
@pytest.mark.gpu
def test_cuda_fp32_ignores_global_tf32_switch():
    pred = random_predictor(mixed_layout(), hidden=280, num_blocks=5, levels=40).cuda()
    ref, _ = decode_and_grads(pred, "eager")
    matmul = torch.backends.cuda.matmul  # the switch the reference uses, new API where there is one
    name, on = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    previous = getattr(matmul, name)
    setattr(matmul, name, on)
    try:
        out = ops.decode(pred.weights(), pred.biases(), pred.layout, pred.encoding, None, "fp32",
                         "csrc").detach()
    finally:
        setattr(matmul, name, previous)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


@needs_cuda
@pytest.mark.gpu
def test_cuda_backend_available_and_large_layout():
    from nern_fast.models.cifar_resnet import cifar_resnet
    layout = WeightLayout.from_model(cifar_resnet(20, 10), include="nern")
    pred = random_predictor(layout, hidden=180, num_blocks=5, levels=40).cuda()
    request = ops.make_request(pred.weights(), layout, pred.encoding, None, "fp32")
    assert ops.availability(request)["csrc"] is None
    out, grads = decode_and_grads(pred, "csrc")
    ref, ref_grads = decode_and_grads(pred, "eager")
    assert_matches(out, ref, grads, ref_grads, rtol=2e-5, grad_rtol=2e-4)

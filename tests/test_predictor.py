import os

import pytest
import torch

from helpers import mixed_layout, random_predictor
from nern_fast import FastPredictor, FileFormatError, LayoutError
from nern_fast.models import cifar_resnet


def test_parameter_count_matches_spec_formula():
    pred = FastPredictor.for_model(cifar_resnet(56), include="nern", hidden=280)
    assert pred.num_parameters == 3 * 280 ** 2 + 253 * 280 + 9
    assert pred.represented_parameters == 94208 * 9
    assert pred.compression_ratio == pytest.approx(pred.num_parameters / (94208 * 9))
    names = set(dict(pred.named_parameters()))
    assert {"layers.0.weight", "layers.3.bias", "final_linear_layer.weight"} <= names


def test_fmod_init_bounds_matrices_and_default_init_differs():
    layout = mixed_layout()
    torch.manual_seed(0)
    fmod = FastPredictor(layout, hidden=16, levels=3)
    torch.manual_seed(0)
    default = FastPredictor(layout, hidden=16, levels=3, init="default")
    for a, b in zip(fmod.parameters(), default.parameters()):
        if a.dim() >= 2:
            assert torch.equal(a, torch.fmod(b, 2))
        else:
            assert torch.equal(a, b)


def test_forward_views_decode_layer_and_kernels_agree():
    layout = mixed_layout(permuted=True)
    pred = random_predictor(layout)
    weights = pred()
    flat = pred.decode_flat()
    assert [tuple(w.shape) for w in weights] == [l.shape for l in layout.layers]
    for i, w in enumerate(weights):
        assert torch.allclose(pred.decode_layer(i), w, atol=1e-6)
    rows = torch.tensor([0, 70, layout.num_kernels - 1])
    assert torch.allclose(pred.decode_kernels(rows), layout.kernel_rows(flat, rows), atol=1e-6)
    assert torch.allclose(pred.decode_layer(layout.names[2]), weights[2], atol=1e-6)


def test_load_into_writes_model_weights():
    model = cifar_resnet(20)
    pred = FastPredictor.for_model(model, include="nern", hidden=16, levels=4)
    stem = model.conv1.weight.clone()
    pred.load_into(model)
    assert torch.equal(model.layer2[1].conv2.weight,
                       pred()[pred.layout.names.index("layer2.1.conv2")].detach())
    assert torch.equal(model.conv1.weight, stem)  # not represented: untouched


def test_save_load_round_trip(tmp_path):
    model = cifar_resnet(20)
    pred = FastPredictor.for_model(model, include="nern", hidden=20, levels=5, encoding="ffn",
                                   precision="bf16", normalization="global")
    path = tmp_path / "p.pt"
    pred.save(path)
    again = FastPredictor.load(path, model=model)
    assert again.config == pred.config and again.layout == pred.layout
    assert torch.equal(again.decode_flat(), pred.decode_flat())
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    old = os.umask(0o022)
    try:
        pred.save(path)  # the atomic write's temp file is 0600: the saved file has open()'s mode
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_load_rejects_truncated_corrupt_and_mismatched(tmp_path):
    model = cifar_resnet(20)
    pred = FastPredictor.for_model(model, include="nern", hidden=12, levels=2)
    path = tmp_path / "p.pt"
    pred.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated"):
        FastPredictor.load(tmp_path / "trunc.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(FileFormatError, match="empty"):
        FastPredictor.load(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all" * 10)
    with pytest.raises(FileFormatError, match="corrupt"):
        FastPredictor.load(tmp_path / "junk.pt")
    torch.save({"format": "something.else"}, tmp_path / "other.pt")
    with pytest.raises(FileFormatError, match="expected a nern_fast.predictor"):
        FastPredictor.load(tmp_path / "other.pt")
    with pytest.raises(LayoutError, match="another architecture"):
        FastPredictor.load(path, model=cifar_resnet(32))
    with pytest.raises(FileNotFoundError):
        FastPredictor.load(tmp_path / "missing.pt")
    bad = pred.to_file_dict()
    bad["state_dict"]["layers.0.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(FileFormatError, match="do not match"):
        FastPredictor.load(tmp_path / "bad.pt")


def test_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    pred = random_predictor(mixed_layout())
    path = tmp_path / "p.pt"
    pred.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        pred.save(path)
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("kw, error, message", [
    (dict(hidden=0), ValueError, "hidden"),
    (dict(num_blocks=1), ValueError, "num_blocks"),
    (dict(precision="fp8"), ValueError, "precision"),
    (dict(init="xavier"), ValueError, "init"),
    (dict(encoding="sine"), ValueError, "encoding"),
    # bools are ints to Python, but never a width or a count here
    (dict(hidden=True), ValueError, r"hidden \(the MLP width\) must be an integer >= 1, got True \(bool\)"),
    (dict(num_blocks=True), ValueError, r"num_blocks .* must be an integer >= 2, got True \(bool\)"),
    (dict(levels=True), ValueError, r"levels .* must be an integer >= 1, got True \(bool\)"),
    (dict(hidden=16.0), ValueError, r"hidden .* got 16.0 \(float\)"),
])
def test_constructor_errors(kw, error, message):
    with pytest.raises(error, match=message):
        FastPredictor(mixed_layout(), **kw)
    with pytest.raises(TypeError, match="WeightLayout"):
        FastPredictor(cifar_resnet(20))


def test_precision_modes_on_eager():
    layout = mixed_layout()
    pred = random_predictor(layout, hidden=32)
    fp32 = pred.decode_flat()
    pred.precision = "tf32"  # on CPU tf32 is fp32
    assert torch.equal(pred.decode_flat(), fp32)
    pred.precision = "bf16"
    bf = pred.decode_flat()
    assert not torch.equal(bf, fp32) and torch.allclose(bf, fp32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kernel_size", [0, -1, 2.5])
def test_for_model_refuses_a_bad_kernel_size(kernel_size):
    with pytest.raises(LayoutError, match=f"kernel_size .* must be an integer >= 1, got {kernel_size}"):
        FastPredictor.for_model(cifar_resnet(20), kernel_size=kernel_size)


def test_decode_layer_index_errors():
    """Negative indices count from the end, as for a list; outside the layers: the index and count."""
    pred = random_predictor(mixed_layout())
    assert torch.equal(pred.decode_layer(-1), pred.decode_layer(3))
    for bad in (4, 99, -5):
        with pytest.raises(IndexError, match=rf"layer index {bad} is out of range: the layout has 4 layers "
                                             rf"\(indices 0..3, or -4..-1 from the end\)"):
            pred.decode_layer(bad)


def test_backend_stored_in_a_file_yields_to_one_given_now_and_to_the_variable(tmp_path, monkeypatch):
    """A predictor saved with "triton" (on a GPU machine) decodes on a CPU with the backend named
    when loading, or with NERN_FAST_BACKEND; an argument given now beats the variable."""
    monkeypatch.delenv("NERN_FAST_BACKEND", raising=False)
    pred = random_predictor(mixed_layout(), backend="eager")
    data = pred.to_file_dict()
    data["config"]["backend"] = "triton"
    torch.save(data, tmp_path / "triton.pt")
    assert FastPredictor.load(tmp_path / "triton.pt").backend == "triton"  # no other choice: the file's
    expected = pred.decode_flat()
    loaded = FastPredictor.load(tmp_path / "triton.pt", backend="eager")
    assert loaded.backend == "eager" and torch.equal(loaded.decode_flat(), expected)
    monkeypatch.setenv("NERN_FAST_BACKEND", "eager")
    from_env = FastPredictor.load(tmp_path / "triton.pt")
    assert from_env.backend == "eager" and torch.equal(from_env.decode_flat(), expected)
    assert from_env.config["backend"] == "triton"  # saved again, the file keeps its name, not the variable's
    monkeypatch.setenv("NERN_FAST_BACKEND", "triton")
    assert FastPredictor.load(tmp_path / "triton.pt", backend="eager").backend == "eager"
    from_env.backend = "eager"  # set now: beats the variable as well
    assert from_env.backend == "eager" and from_env.config["backend"] == "eager"


def test_decode_kernels_index_errors():
    pred = random_predictor(mixed_layout())
    with pytest.raises(IndexError, match="out of range"):
        pred.decode_kernels(torch.tensor([pred.layout.num_kernels]))
    with pytest.raises(ValueError, match="int32/int64"):
        pred.decode_kernels(torch.tensor([0.5]))


def test_compile_fullgraph_on_cpu_eager_backend():
    layout = mixed_layout()
    pred = random_predictor(layout, backend="eager")
    target = torch.randn(layout.num_weights)

    def step():
        return ((pred.decode_flat() - target) ** 2).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled()
    loss.backward()
    grads = [p.grad.clone() for p in pred.parameters()]
    pred.zero_grad()
    step().backward()
    assert torch.allclose(loss, step())
    for g, p in zip(grads, pred.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_save_load_keeps_the_dtype(tmp_path, dtype):
    """A predictor loads in the dtype it was saved in: a float64 one is not rounded through fp32."""
    model = cifar_resnet(8, width=4)
    pred = FastPredictor.for_model(model, include="nern", hidden=8, levels=2, backend="eager").to(dtype)
    with torch.no_grad():
        for p in pred.parameters():
            p.add_(torch.randn_like(p) * 1e-12)  # float64 values that fp32 cannot hold
    pred.save(tmp_path / "p.pt")
    again = FastPredictor.load(tmp_path / "p.pt", model=model)
    for (name, a), b in zip(again.state_dict().items(), pred.state_dict().values()):
        assert a.dtype == dtype and torch.equal(a, b), name
    assert torch.equal(again.decode_flat(), pred.decode_flat())

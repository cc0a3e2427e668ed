"""The compressed model file (nern_fast.compressed) and ``nern-fast export``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import random_predictor
from nern_fast import FastPredictor, FileFormatError, WeightLayout, load_compressed, save_compressed
from nern_fast.cli import main
from nern_fast.compressed import (PREDICTOR_DTYPES, ArchitectureMismatch, ModelSpec, dequantize_int8,
                                  predictor_as_stored, quantize_int8, read_compressed, state_dict_bytes)
from nern_fast.inference import attachment
from nern_fast.models import cifar_resnet

TOLERANCE = {"fp32": 0.0, "fp16": 2 ** -10, "bf16": 2 ** -7, "int8": 1 / 127}


def trained_like(depth=8, width=4, hidden=24, num_classes=10):
    """A CIFAR ResNet with non-default BN statistics and a predictor for its block convs."""
    torch.manual_seed(0)
    model = cifar_resnet(depth, num_classes=num_classes, width=width).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    pred = random_predictor(WeightLayout.from_model(model, include="nern"), hidden=hidden, backend="eager")
    return model, pred


def unrepresented(model, pred):
    represented = {f"{l.name}.weight" for l in pred.layout.layers}
    return {k: v for k, v in model.state_dict().items() if k not in represented}


@pytest.mark.parametrize("predictor_dtype", PREDICTOR_DTYPES)
def test_round_trip(tmp_path, predictor_dtype):
    model, pred = trained_like()
    path = save_compressed(model, pred, tmp_path / "model.nfz", predictor_dtype=predictor_dtype)
    loaded_model, loaded_pred = load_compressed(path)  # the architecture comes from the file's spec
    assert type(loaded_model) is type(model) and loaded_pred.layout == pred.layout
    assert loaded_pred.config == pred.config
    # The unrepresented parameters and buffers come back exactly.
    expected = unrepresented(model, pred)
    got = unrepresented(loaded_model, loaded_pred)
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # The predictor comes back with exactly the values of its stored form, close to the original.
    stored = predictor_as_stored(pred, predictor_dtype)
    for (name, a), b, c in zip(loaded_pred.state_dict().items(), stored.state_dict().values(),
                               pred.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
        bound = TOLERANCE[predictor_dtype] * c.abs().max()
        assert (a - c).abs().max() <= bound, name
    if predictor_dtype == "fp32":
        assert all(torch.equal(a, b) for a, b in zip(loaded_pred.state_dict().values(),
                                                     pred.state_dict().values()))
    # The loaded model is the base model with the stored predictor's weights decoded into it.
    reference = cifar_resnet(8, width=4).eval()
    reference.load_state_dict(model.state_dict())
    stored.load_into(reference)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded_model(x), reference(x))


def test_load_attached_and_sizes(tmp_path):
    model, pred = trained_like(depth=14, width=8, hidden=64)
    sizes = {}
    for dtype in PREDICTOR_DTYPES:
        sizes[dtype] = save_compressed(model, pred, tmp_path / f"{dtype}.nfz", predictor_dtype=dtype).stat().st_size
    assert sizes["int8"] < sizes["fp16"] == sizes["bf16"] < sizes["fp32"] < state_dict_bytes(model)
    plain, _ = load_compressed(tmp_path / "fp32.nfz")
    attached, attached_pred = load_compressed(tmp_path / "fp32.nfz", mode="on_demand")
    assert attachment(attached).mode == "on_demand" and attachment(attached).pred is attached_pred
    assert not any(n.endswith("conv1.weight") and "layer" in n for n, _ in attached.named_parameters())
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(attached(x), plain(x), rtol=1e-5, atol=1e-6)
    assert len(attachment(attached).groups) < attached_pred.layout.num_layers  # decode groups
    per_layer, _ = load_compressed(tmp_path / "fp32.nfz", mode="on_demand", group_bytes=0)
    assert len(attachment(per_layer).groups) == attached_pred.layout.num_layers
    with torch.inference_mode():
        torch.testing.assert_close(per_layer(x), plain(x), rtol=1e-5, atol=1e-6)


def test_backend_stored_in_the_file_can_be_replaced(tmp_path, monkeypatch):
    """A file saved with backend "triton" (on a GPU machine) loads and decodes on a CPU with
    backend= or NERN_FAST_BACKEND; backend= beats the variable."""
    monkeypatch.delenv("NERN_FAST_BACKEND", raising=False)
    model, pred = trained_like()
    path = save_compressed(model, pred, tmp_path / "model.nfz")
    data = torch.load(path, weights_only=True)
    data["predictor"]["config"]["backend"] = "triton"
    torch.save(data, path)
    expected, _ = load_compressed(path, backend="eager")
    reference = cifar_resnet(8, width=4).eval()
    reference.load_state_dict(model.state_dict())
    pred.load_into(reference)
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(),
                                                 reference.state_dict().values()))
    monkeypatch.setenv("NERN_FAST_BACKEND", "eager")
    from_env, from_env_pred = load_compressed(path, mode="on_demand")
    assert from_env_pred.backend == "eager"
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(from_env(x), expected(x))
    monkeypatch.setenv("NERN_FAST_BACKEND", "triton")
    _, given = load_compressed(path, mode="on_demand", backend="eager")
    assert given.backend == "eager"


@pytest.mark.parametrize("options", [dict(cache_bytes=10), dict(group_bytes=-5), dict(workspace_bytes=0),
                                     dict(prefetch="no"), dict(prefetch=False)])
def test_options_of_attached_modes_are_refused_in_parameters_mode(tmp_path, options):
    model, pred = trained_like()
    path = save_compressed(model, pred, tmp_path / "model.nfz")
    with pytest.raises(ValueError, match=rf"mode='parameters' would ignore {next(iter(options))}: they "
                                         rf"apply to an attached model only"):
        load_compressed(path, **options)


def test_bad_options_of_attached_modes_are_refused(tmp_path):
    model, pred = trained_like()
    path = save_compressed(model, pred, tmp_path / "model.nfz")
    with pytest.raises(TypeError, match="prefetch must be True or False, got 'no'"):
        load_compressed(path, mode="on_demand", prefetch="no")
    with pytest.raises(ValueError, match="group_bytes must be a non-negative integer"):
        load_compressed(path, mode="on_demand", group_bytes=-5)
    with pytest.raises(ValueError, match="cache_bytes applies to mode='cached' only"):
        load_compressed(path, mode="on_demand", cache_bytes=10)
    with pytest.raises(ValueError, match="mode must be 'parameters' or one of"):
        load_compressed(path, mode="lazy")


def test_saving_an_attached_model_stores_the_same(tmp_path):
    model, pred = trained_like()
    save_compressed(model, pred, tmp_path / "plain.nfz")
    pred.attach(model, mode="on_demand")
    save_compressed(model, pred, tmp_path / "attached.nfz")
    a, b = read_compressed(tmp_path / "plain.nfz"), read_compressed(tmp_path / "attached.nfz")
    assert a.architecture == b.architecture
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert attachment(model).stats["decodes"] == 0  # saving decoded nothing


@pytest.mark.parametrize("other, message", [
    (lambda: cifar_resnet(14, width=4), "conv 'layer1.1.conv1'"),
    (lambda: cifar_resnet(8, num_classes=100, width=4), "'linear.weight' has shape"),
    (lambda: cifar_resnet(8, width=8), "conv 'conv1' is"),
])
def test_another_architecture_is_rejected(tmp_path, other, message):
    model, pred = trained_like()
    path = save_compressed(model, pred, tmp_path / "model.nfz")
    with pytest.raises(ArchitectureMismatch, match="another architecture") as info:
        load_compressed(path, model_fn=other)
    assert message in str(info.value)


def test_model_fn_and_model_instance(tmp_path):
    model, pred = trained_like()
    path = save_compressed(model, pred, tmp_path / "model.nfz", model_spec=None)
    with pytest.raises(ValueError, match="model_fn"):
        load_compressed(path)
    a, _ = load_compressed(path, model_fn=lambda: cifar_resnet(8, width=4))
    target = cifar_resnet(8, width=4)
    b, _ = load_compressed(path, model_fn=target)
    assert b is target
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(TypeError, match="nn.Module"):
        load_compressed(path, model_fn=lambda: "not a model")


def test_custom_model_needs_model_fn(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.b(self.a(x)).mean((2, 3)))

    torch.manual_seed(0)
    net = Net()
    pred = random_predictor(WeightLayout.from_model(net, include=["b"]), backend="eager")
    path = save_compressed(net, pred, tmp_path / "net.nfz")
    assert read_compressed(path).model_spec is None
    with pytest.raises(ValueError, match="pass model_fn"):
        load_compressed(path)
    loaded, _ = load_compressed(path, model_fn=Net)
    assert torch.equal(loaded.a.weight, net.a.weight)


class _Pooled(nn.Module):
    """Two convs with a pooling layer (or another module in its place) between them."""

    def __init__(self, pool=None, stride=1):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2) if pool is None else pool
        self.b = nn.Conv2d(8, 8, 3, padding=1, stride=stride)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.b(self.pool(torch.relu(self.a(x)))).mean((2, 3)))


def test_model_fn_building_another_module_tree_is_warned_about(tmp_path):
    """Same convs and state-dict entries, another network (the pooling layer replaced, a stride
    changed): model_fn loaded it without a word, and its outputs were not the saved model's."""
    import warnings
    from nern_fast.compressed import ArchitectureWarning
    torch.manual_seed(0)
    saved = _Pooled(pool=nn.Identity())
    pred = random_predictor(WeightLayout.from_model(saved, include=["b"]), backend="eager")
    path = save_compressed(saved, pred, tmp_path / "net.nfz")
    assert len(read_compressed(path).architecture["structure_digest"]) == 16
    x = torch.randn(1, 3, 8, 8)
    for other in (_Pooled, lambda: _Pooled(pool=nn.Identity(), stride=2)):
        with pytest.warns(ArchitectureWarning, match="not the network the file was saved from.*stride"):
            loaded, _ = load_compressed(path, model_fn=other)
        with torch.no_grad():
            assert loaded(x).shape == (1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same network: no warning, the saved model's outputs
        loaded, _ = load_compressed(path, model_fn=lambda: _Pooled(pool=nn.Identity()))
        pred.load_into(saved)
        with torch.no_grad():
            assert torch.equal(loaded(x), saved(x))
        # A file without the digest (written before it was recorded) loads as before.
        data = torch.load(path, weights_only=True)
        del data["architecture"]["structure_digest"]
        torch.save(data, tmp_path / "old.nfz")
        load_compressed(tmp_path / "old.nfz", model_fn=_Pooled)


@pytest.mark.parametrize("keep", [0.0, 0.02, 0.3, 0.6, 0.95, 0.999])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
    model, pred = trained_like()
    path = save_compressed(model, pred, tmp_path / "model.nfz")
    data = path.read_bytes()
    cut = tmp_path / "cut.nfz"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(FileFormatError, match="cut.nfz"):
        load_compressed(cut)


def test_wrong_kind_of_file(tmp_path):
    model, pred = trained_like()
    pred.save(tmp_path / "pred.pt")
    with pytest.raises(FileFormatError, match="expected a nern_fast.compressed_model file"):
        load_compressed(tmp_path / "pred.pt")
    torch.save({"format": "nern_fast.compressed_model", "version": 1}, tmp_path / "empty.nfz")
    with pytest.raises(FileFormatError, match="incomplete"):
        load_compressed(tmp_path / "empty.nfz")
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "missing.nfz")
    with pytest.raises(ValueError, match="predictor_dtype"):
        save_compressed(model, pred, tmp_path / "x.nfz", predictor_dtype="int4")


def test_file_loads_with_weights_only(tmp_path):
    model, pred = trained_like()
    path = save_compressed(model, pred, tmp_path / "model.nfz", predictor_dtype="int8")
    data = torch.load(path, weights_only=True)
    assert data["format"] == "nern_fast.compressed_model"
    assert data["predictor"]["state"]["layers.0.weight"]["int8"].dtype == torch.int8


def test_int8_quantisation():
    torch.manual_seed(0)
    w = torch.randn(7, 13) * torch.logspace(-3, 1, 7)[:, None]
    w[3] = 0.0
    entry = quantize_int8(w)
    assert entry["int8"].dtype == torch.int8 and entry["scale"].shape == (7,)
    back = dequantize_int8(entry)
    assert torch.equal(back[3], torch.zeros(13))
    assert ((back - w).abs() <= entry["scale"][:, None] / 2 + 1e-12).all()
    assert torch.equal(entry["int8"].abs().amax(1)[[0, 1, 2, 4, 5, 6]], torch.full((6,), 127, dtype=torch.int8))


def test_lossy_storage_refuses_values_it_cannot_hold(tmp_path):
    """int8 has no NaN/inf (they would become arbitrary integers); fp16 overflows to inf beyond
    65504. Both are clear errors before anything is written; fp32 keeps such values as they are."""
    model, pred = trained_like()
    with torch.no_grad():
        pred.weights()[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'layers.1.weight' holds 1 NaN/inf values.*predictor_dtype='fp32'"):
        save_compressed(model, pred, tmp_path / "nan.nfz", predictor_dtype="int8")
    assert not (tmp_path / "nan.nfz").exists()
    save_compressed(model, pred, tmp_path / "nan32.nfz", predictor_dtype="fp32")  # stored as it is
    with torch.no_grad():
        pred.weights()[1][0, 0] = 7e4
    with pytest.raises(ValueError, match=r"beyond fp16's range.*'bf16' or 'fp32'"):
        save_compressed(model, pred, tmp_path / "big.nfz", predictor_dtype="fp16")
    assert not (tmp_path / "big.nfz").exists()
    save_compressed(model, pred, tmp_path / "big_bf16.nfz", predictor_dtype="bf16")


def test_model_spec():
    assert ModelSpec.parse("resnet56") == ModelSpec("cifar_resnet", {"depth": 56})
    assert ModelSpec.parse("cifar_resnet:depth=20,num_classes=100") == ModelSpec(
        "cifar_resnet", {"depth": 20, "num_classes": 100})
    assert ModelSpec.parse("torchvision:resnet18,num_classes=10") == ModelSpec(
        "torchvision", {"name": "resnet18", "num_classes": 10})
    for bad in ("vgg", "cifar_resnet:", "torchvision:num_classes=3", "keras:resnet"):
        with pytest.raises(ValueError):
            ModelSpec.parse(bad)
    model = cifar_resnet(14, num_classes=7, in_channels=1, width=8)
    spec = ModelSpec.infer(model)
    assert spec == ModelSpec("cifar_resnet", {"depth": 14, "num_classes": 7, "in_channels": 1, "width": 8})
    assert ModelSpec.from_description(spec.describe()) == spec
    assert ModelSpec.infer(nn.Sequential(nn.Conv2d(3, 3, 3))) is None


def test_torchvision_spec(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        meta = torchvision.models.resnet18(num_classes=10)
    assert ModelSpec.infer(meta) == ModelSpec("torchvision", {"name": "resnet18", "num_classes": 10})
    # Saved and rebuilt without a model_fn (no decode: the file is read and the model checked).
    model = torchvision.models.resnet18(num_classes=10)
    pred = FastPredictor.for_model(model, include="nern", hidden=8, levels=2, backend="eager")
    path = save_compressed(model, pred, tmp_path / "r18.nfz")
    loaded = read_compressed(path)
    rebuilt = loaded.build_model()
    assert type(rebuilt) is type(model)
    assert torch.equal(rebuilt.fc.weight, model.fc.weight)
    with pytest.raises(ArchitectureMismatch):
        loaded.build_model(lambda: torchvision.models.resnet34(num_classes=10))


def test_torchvision_spec_of_a_class_not_named_like_its_builder():
    """Inception3 (inception_v3) and SwinTransformer (swin_t) got no spec: candidates were the
    builders whose names start with the class's name; now also those defined in its module."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        inception = torchvision.models.inception_v3(num_classes=10, init_weights=False)
        swin = torchvision.models.swin_t(num_classes=10)
        other = torchvision.models.inception_v3(num_classes=10, init_weights=False, aux_logits=False)
    assert ModelSpec.infer(inception) == ModelSpec("torchvision", {"name": "inception_v3", "num_classes": 10})
    assert ModelSpec.infer(swin) == ModelSpec("torchvision", {"name": "swin_t", "num_classes": 10})
    assert ModelSpec.infer(other) is None  # not what the builder makes (no aux logits): model_fn


# ---------------------------------------------------------------------- nern-fast export
def export_inputs(tmp_path, model, pred):
    """base.pt (the network with its spec) and pred.pt in tmp_path; the export's output path."""
    torch.save({"model_state_dict": model.state_dict(),
                "model_spec": {"kind": "cifar_resnet", "args": {"depth": 8, "width": 4}}},
               tmp_path / "base.pt")
    pred.save(tmp_path / "pred.pt")
    return tmp_path / "model.nfz"


def test_export_command(tmp_path, capsys):
    model, pred = trained_like()
    out = export_inputs(tmp_path, model, pred)
    assert main(["export", "--predictor", str(tmp_path / "pred.pt"), "--base", str(tmp_path / "base.pt"),
                 "--predictor-dtype", "fp16", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "plain state dict" in report and "ratio" in report
    assert read_compressed(out).storage == "fp16"
    sd = tmp_path / "model.pt"
    assert main(["export", "--compressed", str(out), "--format", "state_dict", "--out", str(sd)]) == 0
    plain = cifar_resnet(8, width=4).eval()
    plain.load_state_dict(torch.load(sd, weights_only=True))
    loaded, _ = load_compressed(out)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), loaded(x))
    # --model names the network when the checkpoint does not; a wrong one is a clear error.
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert main(["export", "--predictor", str(tmp_path / "pred.pt"), "--base", str(tmp_path / "bare.pt"),
                 "--out", str(out), "--overwrite"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["export", "--predictor", str(tmp_path / "pred.pt"), "--base", str(tmp_path / "bare.pt"),
                 "--model", "cifar_resnet:depth=8,width=4", "--format", "state_dict",
                 "--out", str(sd), "--overwrite"]) == 0
    assert main(["export", "--predictor", str(tmp_path / "pred.pt"), "--base", str(tmp_path / "bare.pt"),
                 "--model", "resnet8", "--out", str(out), "--overwrite"]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_export_keeps_existing_files_and_its_own_inputs(tmp_path, capsys):
    """An existing --out is replaced only with --overwrite, and never when it is a file the export
    reads (the predictor, the network checkpoint or the compressed file): a slip of --out used to
    replace a trained predictor or the original network with the export, silently."""
    model, pred = trained_like()
    out = export_inputs(tmp_path, model, pred)
    pred_file, base_file = tmp_path / "pred.pt", tmp_path / "base.pt"
    source = ["export", "--predictor", str(pred_file), "--base", str(base_file)]
    kept = {p: p.read_bytes() for p in (pred_file, base_file)}
    for target in (pred_file, base_file):
        for extra in ([], ["--overwrite"]):
            assert main(source + ["--format", "state_dict", "--out", str(target)] + extra) == 2
            err = capsys.readouterr().err
            assert "this export reads" in err and len(err.strip().splitlines()) == 1, err
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert main(source + ["--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(source + ["--predictor-dtype", "int8", "--out", str(out)]) == 2
    assert "already exists; replace it with --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == first
    for extra in ([], ["--overwrite"]):
        assert main(["export", "--compressed", str(out), "--out", str(out)] + extra) == 2
        assert "is the --compressed file this export reads" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert main(source + ["--predictor-dtype", "int8", "--out", str(out), "--overwrite"]) == 0
    assert read_compressed(out).storage == "int8"


def test_export_refuses_a_predictor_dtype_it_would_ignore(tmp_path, capsys):
    """--predictor-dtype with --format state_dict did nothing (the fp32 predictor's weights were
    written, as if int8 had been honoured); now it is refused with the way to get those weights."""
    model, pred = trained_like()
    export_inputs(tmp_path, model, pred)
    sd = tmp_path / "sd.pt"
    source = ["export", "--predictor", str(tmp_path / "pred.pt"), "--base", str(tmp_path / "base.pt")]
    assert main(source + ["--format", "state_dict", "--predictor-dtype", "int8", "--out", str(sd)]) == 2
    err = capsys.readouterr().err
    assert "--predictor-dtype applies to --format compressed only" in err and len(err.strip().splitlines()) == 1
    assert not sd.exists()
    int8 = tmp_path / "int8.nfz"
    assert main(source + ["--predictor-dtype", "int8", "--out", str(int8)]) == 0
    assert main(["export", "--compressed", str(int8), "--format", "state_dict", "--out", str(sd)]) == 0
    assert main(source + ["--format", "state_dict", "--out", str(tmp_path / "fp32.pt")]) == 0
    a, b = torch.load(sd, weights_only=True), torch.load(tmp_path / "fp32.pt", weights_only=True)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # int8's weights are not fp32's
    assert main(source + ["--out", str(tmp_path / "default.nfz")]) == 0
    assert read_compressed(tmp_path / "default.nfz").storage == "fp32"


def test_export_names_predictor_dtype_only_for_storage_errors(tmp_path, capsys):
    """A predictor int8 cannot hold is the --predictor-dtype's problem; another value error of
    save_compressed is reported in its own words, not blamed on that option."""
    from nern_fast.commands.export import _option_error
    from nern_fast.compressed import StorageDtypeError
    from nern_fast.config import ConfigError
    model, pred = trained_like()
    with torch.no_grad():
        pred.weights()[1][0, 0] = float("nan")
    out = export_inputs(tmp_path, model, pred)
    assert main(["export", "--predictor", str(tmp_path / "pred.pt"), "--base", str(tmp_path / "base.pt"),
                 "--predictor-dtype", "int8", "--out", str(out)]) == 2
    assert "--predictor-dtype: predictor tensor 'layers.1.weight' holds 1 NaN/inf" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"^--predictor-dtype: bad storage$"):
        with _option_error("--predictor-dtype", caused_by=(StorageDtypeError,)):
            raise StorageDtypeError("bad storage")
    with pytest.raises(ConfigError, match=r"^the model is attached elsewhere$"):
        with _option_error("--predictor-dtype", caused_by=(StorageDtypeError,)):
            raise ValueError("the model is attached elsewhere")


def test_export_from_a_train_base_model_file(tmp_path, capsys):
    """`nern-fast train-base` writes {"format": "nern_fast.model", "arch", "num_classes", ...}."""
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=7).eval()
    torch.save({"format": "nern_fast.model", "version": 1, "arch": "cifar_resnet8", "num_classes": 7,
                "in_channels": 3, "image_size": 32, "state_dict": model.state_dict()}, tmp_path / "model.pt")
    pred = FastPredictor.for_model(model, include="nern", hidden=8, levels=2, backend="eager")
    pred.save(tmp_path / "pred.pt")
    out = tmp_path / "model.nfz"
    assert main(["export", "--predictor", str(tmp_path / "pred.pt"), "--base", str(tmp_path / "model.pt"),
                 "--out", str(out)]) == 0
    loaded = read_compressed(out)
    assert loaded.model_spec == ModelSpec("cifar_resnet", {"depth": 8, "num_classes": 7, "in_channels": 3})
    assert torch.equal(loaded.build_model().linear.weight, model.linear.weight)


def test_registry_spec(tmp_path):
    from nern_fast import models
    if not hasattr(models, "build_model"):
        pytest.skip("no model registry in this build")
    pytest.importorskip("torchvision")
    spec = ModelSpec("registry", {"arch": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 32})
    model = spec.build()  # torchvision ResNet-18 with the small-input stem: no torchvision spec fits
    assert ModelSpec.infer(model) is None
    pred = FastPredictor.for_model(model, include="nern", hidden=8, levels=2, backend="eager")
    path = save_compressed(model, pred, tmp_path / "r18.nfz", model_spec=spec)
    assert read_compressed(path).model_spec == spec
    assert torch.equal(read_compressed(path).build_model().conv1.weight, model.conv1.weight)
    with pytest.raises(ValueError, match="model_fn"):
        ModelSpec("registry", {"arch": "my.package:net"})
    with pytest.raises(ArchitectureMismatch, match="another architecture"):
        save_compressed(model, pred, tmp_path / "x.nfz", model_spec="torchvision:resnet18,num_classes=10")


def test_a_modified_torchvision_model_gets_no_spec(tmp_path):
    """Same convs and state-dict entries as the stock resnet18, another network (maxpool removed, a
    stride changed): no spec is inferred, so loading asks for model_fn instead of rebuilding the
    stock model; an explicit spec names the difference."""
    torchvision = pytest.importorskip("torchvision")

    def modified():
        net = torchvision.models.resnet18(num_classes=10)
        net.maxpool = nn.Identity()
        net.layer2[0].conv1.stride = (1, 1)
        net.layer2[0].downsample[0].stride = (1, 1)
        return net.eval()

    torch.manual_seed(0)
    model = modified()
    assert ModelSpec.infer(model) is None
    strided = torchvision.models.resnet18(num_classes=10)
    strided.layer2[0].conv1.stride = (1, 1)  # a hyperparameter only (extra_repr)
    assert ModelSpec.infer(strided) is None
    assert ModelSpec.infer(torchvision.models.resnet18(num_classes=10)) is not None  # stock: still inferred
    pred = FastPredictor.for_model(model, include="nern", hidden=8, levels=2, backend="eager")
    with pytest.raises(ArchitectureMismatch, match=r"'maxpool' is Identity, expected MaxPool2d"):
        save_compressed(model, pred, tmp_path / "x.nfz", model_spec="torchvision:resnet18,num_classes=10")
    path = save_compressed(model, pred, tmp_path / "r18.nfz", predictor_dtype="fp16")
    assert read_compressed(path).model_spec is None
    with pytest.raises(ValueError, match="pass model_fn"):
        load_compressed(path)
    loaded, _ = load_compressed(path, model_fn=modified)
    reference = modified()
    reference.load_state_dict(model.state_dict())
    predictor_as_stored(pred, "fp16").load_into(reference)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


class _Aliased(nn.Module):
    """One conv registered under two names (``self.b = self.a``)."""

    def __init__(self, alias=True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = self.a if alias else nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.stem(x)))))


class _Tied(_Aliased):
    """Another conv whose weight is the represented conv's Parameter."""

    def __init__(self, tie=True):
        super().__init__(alias=False)
        if tie:
            self.b.weight = self.a.weight


@pytest.mark.parametrize("build", [_Aliased, _Tied])
def test_a_represented_weight_under_two_names_is_stored_by_neither(tmp_path, build):
    torch.manual_seed(0)
    model = build().eval()
    pred = random_predictor(WeightLayout.from_model(model, include=["stem", "a"]), hidden=8, backend="eager")
    x = torch.randn(1, 3, 6, 6)
    reference = build().eval()
    reference.load_state_dict(model.state_dict())
    pred.load_into(reference)
    attached = build().eval()
    attached.load_state_dict(model.state_dict())
    pred.attach(attached, mode="on_demand")
    with torch.no_grad():
        assert build is _Tied or torch.equal(attached(x), reference(x))
    # (attach leaves a tied Parameter to the other module, with its own values: only the alias)
    sources = [("plain", model)] + ([("attached", attached)] if build is _Aliased else [])
    for name, source in sources:
        path = save_compressed(source, pred, tmp_path / f"{name}.nfz")
        loaded = read_compressed(path)
        assert sorted(loaded.state_dict) == ["a.bias", "b.bias", "stem.bias"], name
        assert sorted(loaded.architecture["represented"]) == ["a.weight", "b.weight", "stem.weight"]
        for mode in ("parameters", "on_demand"):
            rebuilt, _ = load_compressed(path, model_fn=build, mode=mode)
            assert rebuilt.b.weight is rebuilt.a.weight or mode != "parameters"
            with torch.no_grad():
                assert torch.equal(rebuilt(x), reference(x)), (name, mode)
    # A model that does not share the weight would leave 'b.weight' as built: refused.
    with pytest.raises(ArchitectureMismatch, match=r"\['b.weight'\] is not stored.*shares those weights"
                       if build is _Tied else "has conv 'b', not expected"):
        load_compressed(tmp_path / "plain.nfz", model_fn=lambda: build(False))


def test_the_predictor_comes_back_in_its_dtype(tmp_path):
    """The file records the predictor's dtype: a float64 predictor stored exactly (fp32 storage of
    fp32-representable values) or rounded (fp16/bf16/int8) comes back float64; a file without the
    record (none was written so) loads as float32."""
    model, pred = trained_like()
    pred = pred.double()
    for predictor_dtype in PREDICTOR_DTYPES:
        path = save_compressed(model, pred, tmp_path / f"{predictor_dtype}.nfz", predictor_dtype=predictor_dtype)
        _, loaded = load_compressed(path)
        stored = predictor_as_stored(pred, predictor_dtype)
        for (name, a), b in zip(loaded.state_dict().items(), stored.state_dict().values()):
            assert a.dtype == torch.float64 and torch.equal(a, b), (predictor_dtype, name)
    data = torch.load(tmp_path / "fp32.nfz", weights_only=True)
    del data["predictor"]["dtype"]
    torch.save(data, tmp_path / "old.nfz")
    _, old = load_compressed(tmp_path / "old.nfz")
    assert all(t.dtype == torch.float32 for t in old.state_dict().values())


def test_a_compressed_file_read_as_a_predictor_says_how_to_read_it(tmp_path):
    """FastPredictor.load / from_file_dict of a compressed model file: the error names the file's
    kind and load_compressed (it said "predictor file is incomplete ('layout')")."""
    model, pred = trained_like()
    path = tmp_path / "m.nfc"
    save_compressed(model, pred, path)
    with pytest.raises(FileFormatError, match="found a compressed model file .* nern_fast.load_compressed"):
        FastPredictor.load(path)
    with pytest.raises(FileFormatError, match="expected a predictor file, found a compressed model file"):
        FastPredictor.from_file_dict(torch.load(path, weights_only=True))

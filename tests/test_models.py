"""Models: the CIFAR ResNets, torchvision ResNets, user models, and model files."""
import sys
import textwrap

import pytest
import torch

from nern_fast import WeightLayout
from nern_fast.io import FileFormatError
from nern_fast.models import (ARCHS, build_model, cifar_resnet, import_callable, load_weights,
                              read_model_metadata, save_model_file)


@pytest.mark.parametrize("arch,layers", [("cifar_resnet20", 18), ("cifar_resnet56", 54),
                                         ("resnet18", 16), ("resnet34", 32), ("resnet50", 16)])
def test_nern_layers_of_each_arch(arch, layers):
    model = build_model(arch, 10, 3, image_size=32)
    layout = WeightLayout.from_model(model, include="nern")
    assert layout.num_layers == layers
    assert all(l.shape[2:] == (3, 3) for l in layout.layers)


def test_cifar_resnet_api_is_kept():
    m = cifar_resnet(20, 10, in_channels=1, width=8)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert set(ARCHS) >= {"cifar_resnet20", "cifar_resnet110", "resnet50"}


def test_torchvision_small_input_stem():
    small = build_model("resnet18", 7, 1, image_size=16)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.in_channels == 1
    assert small(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    big = build_model("resnet18", 7, 3, image_size=224)
    assert big.conv1.kernel_size == (7, 7)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn
        def tiny(num_classes=10, in_channels=3, width=4):
            return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(width, num_classes))
        def fixed():
            return nn.Linear(2, 2)
        def not_a_module(**kw):
            return 3
        value = 5
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    sys.modules.pop("my_nets", None)


def test_user_model(user_module):
    m = build_model(f"{user_module}:tiny", 5, 1, kwargs={"width": 6})
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    assert build_model(f"{user_module}:fixed", 5, 1).out_features == 2  # no num_classes parameter
    with pytest.raises(TypeError, match="not an nn.Module"):
        build_model(f"{user_module}:not_a_module", 5, 1)
    with pytest.raises(TypeError, match="not callable"):
        import_callable(f"{user_module}:value")
    with pytest.raises(AttributeError, match="has no 'nothing'"):
        import_callable(f"{user_module}:nothing")
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg_xyz.mod'"):
        import_callable("no_such_pkg_xyz.mod:f")
    with pytest.raises(ValueError, match="expected 'package.module:callable'"):
        import_callable("justaname:")
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", 10, 3)


def test_model_files(tmp_path):
    m = cifar_resnet(8, 10, in_channels=1, width=4)
    path = save_model_file(m, tmp_path / "m.pt", "cifar_resnet8", accuracy=97.5)
    other = cifar_resnet(8, 10, in_channels=1, width=4)
    meta = load_weights(other, path)
    assert meta["accuracy"] == 97.5 and meta["arch"] == "cifar_resnet8"
    assert read_model_metadata(path)["accuracy"] == 97.5
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))
    # a plain state_dict (with DataParallel's prefix) loads too
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "p.pt")
    load_weights(cifar_resnet(8, 10, in_channels=1, width=4), tmp_path / "p.pt")
    assert read_model_metadata(tmp_path / "p.pt") == {}
    with pytest.raises(FileFormatError, match="holds a 'cifar_resnet8' network.*missing keys"):
        load_weights(cifar_resnet(14, 10, in_channels=1, width=4), path)
    with pytest.raises(FileFormatError, match="has shape"):
        load_weights(cifar_resnet(8, 5, in_channels=1, width=4), path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_weights(m, tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(FileFormatError, match="cannot be read"):
        load_weights(m, tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(FileFormatError, match="not a model file or state_dict"):
        load_weights(m, tmp_path / "list.pt")


def test_other_files_given_as_a_network_say_what_they_hold(tmp_path):
    """A predictor file, or a whole pickled module, given where a network's weights belong: the
    error says what the file is (it reported "216 missing keys" for a predictor, and for a pickled
    module torch's advice to load with weights_only=False, which nern_fast never does)."""
    from helpers import random_predictor
    from nern_fast import WeightLayout
    m = cifar_resnet(8, 10, in_channels=1, width=4)
    random_predictor(WeightLayout.from_model(m), backend="eager").save(tmp_path / "pred.pt")
    with pytest.raises(FileFormatError, match=r"expected a network's weights .* found a predictor file"):
        load_weights(m, tmp_path / "pred.pt")
    torch.save(m, tmp_path / "whole.pt")
    with pytest.raises(FileFormatError, match=r"holds a pickled nern_fast\.models\..* torch\.save\(model\.state_dict\(\)"):
        load_weights(m, tmp_path / "whole.pt")

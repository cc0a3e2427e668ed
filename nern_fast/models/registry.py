"""Building networks by name (config ``model.arch``) and reading / writing their weight files.

Names: ``cifar_resnet20/32/44/56/110`` (option-A CIFAR ResNets), ``resnet18/34/50`` (torchvision),
or any user model as ``package.module:callable`` (called with the config's ``kwargs``, plus
``num_classes`` / ``in_channels`` when its signature takes them).

Model files written by ``nern-fast train-base`` hold the architecture and the weights; a plain
``state_dict`` (or a dict with a ``state_dict`` / ``model`` entry) from elsewhere loads too.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..io import FileFormatError, PathLike, atomic_save, describe_contents, load_torch_file
from .cifar_resnet import DEPTHS, cifar_resnet
from .torchvision_resnet import TORCHVISION_RESNETS, torchvision_resnet

MODEL_FORMAT = "nern_fast.model"
MODEL_VERSION = 1
CIFAR_ARCHS = tuple(f"cifar_resnet{d}" for d in DEPTHS)
ARCHS = CIFAR_ARCHS + TORCHVISION_RESNETS


def import_callable(spec: str):
    """``package.module:callable`` -> the callable (clear errors for each way it can fail)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"user model '{spec}': expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"user model '{spec}': cannot import module '{module_name}' ({exc}); is "
                          f"it installed or on PYTHONPATH?") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"user model '{spec}': module '{module_name}' has no '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"user model '{spec}': '{attr}' is not callable")
    return obj


def build_model(arch: str, num_classes: int, in_channels: int, image_size: Optional[int] = None,
                small_input: Optional[bool] = None, kwargs: Optional[dict] = None) -> nn.Module:
    """A freshly initialised network by name (see the module docstring)."""
    kwargs = dict(kwargs or {})
    if arch.startswith("cifar_resnet") and arch[len("cifar_resnet"):].isdigit():
        return cifar_resnet(int(arch[len("cifar_resnet"):]), num_classes, in_channels=in_channels,
                            **kwargs)
    if arch in TORCHVISION_RESNETS:
        if small_input is None:
            small_input = image_size is not None and image_size < 64
        return torchvision_resnet(arch, num_classes, in_channels, small_input, **kwargs)
    if ":" in arch:
        factory = import_callable(arch)
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if (name in params or accepts_any) and name not in kwargs:
                kwargs[name] = value
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"user model '{arch}' returned a {type(model).__name__}, not an "
                            f"nn.Module")
        return model
    raise ValueError(f"unknown model '{arch}'; choose one of {', '.join(ARCHS)} or give "
                     f"'package.module:callable'")


def _state_dict_of(data: Any, path: Path) -> dict:
    if isinstance(data, dict) and data.get("format") == MODEL_FORMAT:
        return data["state_dict"]
    if isinstance(data, dict) and isinstance(data.get("format"), str):  # another file of ours
        raise FileFormatError(f"{path}: expected a network's weights (train-base's model.pt or a "
                              f"state dict), found {describe_contents(data)}")
    if isinstance(data, nn.Module):
        return data.state_dict()
    if isinstance(data, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
        if all(isinstance(v, torch.Tensor) for v in data.values()):
            return {k[len("module."):] if k.startswith("module.") else k: v for k, v in data.items()}
    raise FileFormatError(f"{path}: not a model file or state_dict (found {type(data).__name__}"
                          f"{' with keys ' + str(sorted(data)[:5]) if isinstance(data, dict) else ''})")


def read_model_file(path: PathLike) -> dict:
    """The raw content of a model file (ours or a plain state_dict), weights only."""
    return load_torch_file(path, "model checkpoint")


def load_weights(model: nn.Module, path: PathLike) -> dict:
    """Load a checkpoint into ``model`` (strict); returns the file's metadata (may be empty)."""
    path = Path(path)
    data = read_model_file(path)
    state = _state_dict_of(data, path)
    missing, unexpected = [], []
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        recorded = data.get("arch") if isinstance(data, dict) and data.get("format") == MODEL_FORMAT else None
        holds = f" (the file holds a {recorded!r} network)" if recorded else ""
        raise FileFormatError(f"{path} does not fit the model {type(model).__name__}{holds}: "
                              f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} "
                              f"unexpected keys {unexpected[:3]}; check model.arch and its kwargs")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        k, theirs, mine = bad[0]
        raise FileFormatError(f"{path} does not fit the model: '{k}' has shape {theirs} in the file "
                              f"and {mine} in the model ({len(bad)} such entries); check "
                              f"num_classes / in_channels / arch")
    model.load_state_dict(state)
    return {k: v for k, v in data.items() if k != "state_dict"} if isinstance(data, dict) and \
        data.get("format") == MODEL_FORMAT else {}


def save_model_file(model: nn.Module, path: PathLike, arch: str, **metadata) -> Path:
    """Architecture + weights (+ metadata such as accuracy), written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_save({"format": MODEL_FORMAT, "version": MODEL_VERSION, "arch": arch,
                        "state_dict": state, **metadata}, path)


def read_model_metadata(path: PathLike) -> dict:
    """Metadata of a nern_fast model file (empty for plain state_dicts)."""
    data = read_model_file(path)
    if isinstance(data, dict) and data.get("format") == MODEL_FORMAT:
        return {k: v for k, v in data.items() if k != "state_dict"}
    return {}

"""Reading what the official NeRN code (maorash/NeRN) writes: its YAML config, predictor
checkpoint and permutation cache, so a NeRN-trained predictor decodes the same weights here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .io import FileFormatError, PathLike, load_torch_file
from .layout import LayoutError, WeightLayout

_NORMALIZATION_MODES = ("local", "global", "None", "none", None)  # accepted, then ignored as NeRN does


def read_nern_config(config: Union[PathLike, Mapping]) -> dict:
    """The ``nern:`` section of a NeRN config (a YAML path or a dict; a bare section is accepted)."""
    if isinstance(config, (str, os.PathLike)):
        import yaml
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(f"NeRN config {path}: no such file")
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    if not isinstance(config, Mapping):
        raise ValueError(f"a NeRN config must be a mapping, got {type(config).__name__}")
    section = config.get("nern", config)
    if not isinstance(section, Mapping):
        raise ValueError("the 'nern' entry of the config must be a mapping")
    return dict(section)


def nern_settings(section: Mapping) -> tuple[dict, dict, Optional[str]]:
    """(predictor keywords, layout keywords, permute_mode) from a ``nern:`` config section."""
    method = section.get("method", "kxk")
    if method != "kxk":
        raise ValueError(f"NeRN predictor method '{method}' is not supported; only 'kxk' is")
    act = section.get("act_layer", "relu")
    if act != "relu":
        raise ValueError(f"NeRN act_layer '{act}' is not supported; only 'relu' is")
    emb = section.get("embeddings", {}) or {}
    if not isinstance(emb, Mapping):
        raise ValueError(f"NeRN config: embeddings must be a mapping, got {type(emb).__name__}")
    if emb.get("fusion_mode", "concat") != "concat":
        raise ValueError(f"NeRN embeddings.fusion_mode '{emb.get('fusion_mode')}' is not supported; "
                         f"only 'concat' is")
    kind = emb.get("type", "basic")
    if kind not in ("basic", "ffn"):
        raise ValueError(f"NeRN embeddings.type '{kind}' is not supported; use 'basic' or 'ffn'")
    if int(emb.get("num_idxs", 3)) != 3:
        raise ValueError("NeRN embeddings.num_idxs must be 3 (layer, filter, channel)")
    norm = emb.get("normalization_mode", "local")
    if norm not in _NORMALIZATION_MODES:
        raise ValueError(f"NeRN normalization_mode '{norm}' is not one of local/global/None")
    # NeRN's code computes the normalised indices (ReconstructedModel._get_tensor_indices keeps them
    # in .normalized_indices) but encodes the raw ones (self.indices) whatever normalization_mode
    # says: its predictors were trained on raw (layer, filter, channel) integers.
    # Defaults are those of NeRN's options.py where a field is absent.
    predictor = {"hidden": _number(section, "hidden_layer_size", 30, int),
                 "num_blocks": _number(section, "num_blocks", 3, int),
                 "levels": _number(emb, "enc_levels", 20, int, "embeddings."),
                 "base": _number(emb, "base", 1.25, float, "embeddings."),
                 "encoding": kind,
                 "gauss_scale": _numbers(emb, "gauss_scale", (1, 0.1, 0.1))}
    layout = {"kernel_size": _number(section, "output_size", 3, int),
              "normalization": "none",
              "crop": section.get("sampling_mode", "center")}
    permute_mode = (emb.get("permutations") or {}).get("permute_mode")
    return predictor, layout, permute_mode


def _number(section: Mapping, key: str, default, kind, prefix: str = ""):
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and value != int(value)):
        raise ValueError(f"NeRN config: {prefix}{key} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}")
    return kind(value)


def _numbers(section: Mapping, key: str, default) -> tuple:
    values = section.get(key, default)
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"NeRN config: embeddings.{key} must be a list of numbers, got {values!r}")
    return tuple(float(v) for v in values)


def read_nern_checkpoint(checkpoint: Union[PathLike, Mapping]) -> dict:
    """NeRN predictor state dict (path or dict); strips DataParallel's ``module.`` prefix."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_torch_file(checkpoint, "NeRN checkpoint")
    if not isinstance(checkpoint, Mapping):
        raise FileFormatError(f"a NeRN checkpoint must be a state dict, got {type(checkpoint).__name__}")
    for key in ("state_dict", "predictor", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise FileFormatError(f"not a NeRN predictor state dict: entries {odd[:3]} are not tensors")
    if "final_linear_layer.weight" not in state or "layers.0.weight" not in state:
        raise FileFormatError("not a NeRN kxk predictor checkpoint: expected keys 'layers.{i}.weight' "
                              f"and 'final_linear_layer.weight', found {sorted(state)[:6]}")
    return state


def read_nern_permutations(permutations: Any, num_layers: int) -> list:
    """Per-layer permutations from NeRN's cache folder (``layer_{i}.pt``) or a list."""
    if isinstance(permutations, (str, os.PathLike)):
        folder = Path(permutations)
        files = [folder / f"layer_{i}.pt" for i in range(num_layers)]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"NeRN permutation cache {folder} lacks {missing[:3]} "
                                    f"({len(missing)} of {num_layers} files missing)")
        return [load_torch_file(f, "NeRN permutation file") for f in files]
    permutations = list(permutations)
    if len(permutations) != num_layers:
        raise LayoutError(f"got {len(permutations)} NeRN permutations for {num_layers} layers")
    return permutations


def _check_permutation_form(per_layer: list, permute_mode: str) -> None:
    """A crossfilter cache holds one chain per layer, an infilter one a (filter_order,
    channel_orders) pair: the other form would decode as the wrong permutation."""
    for i, perm in enumerate(per_layer):
        pair = isinstance(perm, (tuple, list)) and len(perm) == 2 and all(
            isinstance(p, (tuple, list, torch.Tensor)) or hasattr(p, "shape") for p in perm)
        if (permute_mode == "infilter") != pair:
            want = ("an infilter (filter_order, channel_orders) pair" if permute_mode == "infilter"
                    else "a crossfilter chain (one list of kernel indices)")
            raise LayoutError(f"NeRN permutation of layer {i} is not {want}, which the config's "
                              f"permute_mode '{permute_mode}' needs: the cache was made for another mode")


def nern_layer_set(model: nn.Module):
    """The ``include`` that selects the convs NeRN's own code represents in ``model``
    (``get_learnable_weights`` of maorash/NeRN's tasks): a model that has that method (NeRN's own
    model classes) is asked, in its order; its CIFAR ResNets list the stem conv, then every block's
    convs (option-A shortcuts have none: here, every conv of a CifarResNet); its ImageNet ResNet-18
    the blocks' 3×3 convs (stem left out): the ``"nern"`` preset, which is the default for other
    models too."""
    from .models.cifar_resnet import CifarResNet
    if callable(getattr(model, "get_learnable_weights", None)):
        return _learnable_weight_names(model)
    return None if isinstance(model, CifarResNet) else "nern"


def _learnable_weight_names(model: nn.Module) -> list[str]:
    """The conv module names of ``model.get_learnable_weights()`` (NeRN's layer list), which must
    come in module order (layers here are numbered in that order, NeRN's in its list's)."""
    convs = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    names = []
    for i, weight in enumerate(model.get_learnable_weights()):
        if id(weight) not in convs:
            raise LayoutError(f"{type(model).__name__}.get_learnable_weights()[{i}] is not the weight of "
                              f"an nn.Conv2d of the model; pass include= (the conv module names)")
        names.append(convs[id(weight)])
    order = {n: i for i, n in enumerate(convs.values())}
    if names != sorted(names, key=order.__getitem__) or len(set(names)) != len(names):
        raise LayoutError(f"{type(model).__name__}.get_learnable_weights() lists its convs in another "
                          f"order than the model's modules (or twice): NeRN numbers layers in the "
                          f"list's order, this library in module order; not supported")
    return names


def predictor_from_nern(cls, checkpoint, model: nn.Module, config, permutations=None, include="auto",
                        **kwargs):
    section = read_nern_config(config)
    predictor_kw, layout_kw, permute_mode = nern_settings(section)
    layout_kw.update({k: kwargs.pop(k) for k in ("kernel_size", "normalization", "crop") if k in kwargs})
    if isinstance(include, str) and include == "auto":
        include = nern_layer_set(model)
    layout = WeightLayout.from_model(model, include=include, **layout_kw)
    if permute_mode and permutations is None:
        raise LayoutError(f"the NeRN config uses '{permute_mode}' permutations: pass permutations= "
                          f"(NeRN's permutation cache folder with layer_{{i}}.pt files, or a list)")
    if permutations is not None:
        if permute_mode not in ("crossfilter", "infilter"):  # NeRN reads no cache then
            raise LayoutError(f"permutations= was given, but the NeRN config's permute_mode is "
                              f"{permute_mode!r}: NeRN's code applies none then; drop permutations= "
                              f"or use the config the predictor was trained with")
        per_layer = read_nern_permutations(permutations, layout.num_layers)
        _check_permutation_form(per_layer, permute_mode)
        layout = layout.with_permutations(per_layer)
    state = read_nern_checkpoint(checkpoint)
    predictor = cls(layout, init="default", **{**predictor_kw, **kwargs})
    expected = {k: tuple(v.shape) for k, v in predictor.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise FileFormatError(f"the NeRN checkpoint does not match its config and the model's layout "
                              f"(hidden={predictor_kw['hidden']}, num_blocks={predictor_kw['num_blocks']}, "
                              f"levels={predictor_kw['levels']}); differing entries: {diff}")
    predictor.load_state_dict(state)
    return predictor

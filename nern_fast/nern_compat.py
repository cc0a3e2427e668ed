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

_NORMALIZATION = {"local": "local", "global": "global", "None": "none", "none": "none", None: "none"}


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
    emb = dict(section.get("embeddings", {}) or {})
    if emb.get("fusion_mode", "concat") != "concat":
        raise ValueError(f"NeRN embeddings.fusion_mode '{emb.get('fusion_mode')}' is not supported; "
                         f"only 'concat' is")
    kind = emb.get("type", "basic")
    if kind not in ("basic", "ffn"):
        raise ValueError(f"NeRN embeddings.type '{kind}' is not supported; use 'basic' or 'ffn'")
    if int(emb.get("num_idxs", 3)) != 3:
        raise ValueError("NeRN embeddings.num_idxs must be 3 (layer, filter, channel)")
    norm = emb.get("normalization_mode", "local")
    if norm not in _NORMALIZATION:
        raise ValueError(f"NeRN normalization_mode '{norm}' is not one of local/global/None")
    # Defaults are those of NeRN's options.py where a field is absent.
    predictor = {"hidden": int(section.get("hidden_layer_size", 30)),
                 "num_blocks": int(section.get("num_blocks", 3)),
                 "levels": int(emb.get("enc_levels", 20)),
                 "base": float(emb.get("base", 1.25)),
                 "encoding": kind,
                 "gauss_scale": tuple(float(x) for x in emb.get("gauss_scale", (1, 0.1, 0.1)))}
    layout = {"kernel_size": int(section.get("output_size", 3)),
              "normalization": _NORMALIZATION[norm],
              "crop": section.get("sampling_mode", "center")}
    permute_mode = (emb.get("permutations") or {}).get("permute_mode")
    return predictor, layout, permute_mode


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


def nern_layer_set(model: nn.Module):
    """The ``include`` that selects the convs NeRN's own code represents in ``model``
    (``get_learnable_weights`` of maorash/NeRN's tasks): its CIFAR ResNets list the stem conv, then
    every block's convs (option-A shortcuts have none: here, every conv of a CifarResNet); its
    ImageNet ResNet-18 the blocks' 3×3 convs (stem left out): the ``"nern"`` preset, which is the
    default for other models too."""
    from .models.cifar_resnet import CifarResNet
    return None if isinstance(model, CifarResNet) else "nern"


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
        layout = layout.with_permutations(read_nern_permutations(permutations, layout.num_layers))
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

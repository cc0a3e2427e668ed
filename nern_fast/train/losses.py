"""Losses of NeRN (NERN_SPEC §7), written to run without host synchronisation.

* Reconstruction: ``l2`` (NeRN's L2Loss, sqrt(Σ(w-ŵ)² / number of weights)) and ``mse`` (NeRN's
  MSELoss, mean over layers of the per-layer MSE), on a full flat weight buffer or on sampled
  kernel rows in subset format (padding entries of cropped layers excluded from the counts).
* Logit distillation: ``kl`` (KL(softmax(t) ‖ softmax(s)), batchmean), ``stable_kl`` (NeRN's
  StableKLDivLoss: log(softmax(s) + 1e-4)), ``temp_stable_kl`` (both at temperature T, × T²).
* Feature-map distillation (NeRN's L2BatchedAttentionLoss): Σ over maps of
  ‖m_t/(‖m_t‖+ε) − m_s/(‖m_s‖+ε)‖² per sample (norm over C·H·W), / batch size, ε = 1e-3;
  maps are captured with forward hooks (:class:`FeatureMaps`), no model rewriting.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import WeightLayout

RECONSTRUCTION_LOSSES = ("l2", "mse")
KD_LOSSES = ("kl", "stable_kl", "temp_stable_kl")


# ------------------------------------------------------------------------------ reconstruction
def layer_ids_of_weights(layout: WeightLayout, device) -> torch.Tensor:
    """For every entry of the flat weight buffer, its layer index (no host sync)."""
    t = layout.tensors(device)
    sizes = t.weight_offsets[1:] - t.weight_offsets[:-1]
    return torch.repeat_interleave(torch.arange(layout.num_layers, device=t.device), sizes,
                                   output_size=layout.num_weights)


def reconstruction_loss(decoded: torch.Tensor, target: torch.Tensor, layout: WeightLayout,
                        kind: str = "l2") -> torch.Tensor:
    """Loss between two full flat weight buffers (``layout.num_weights`` values each)."""
    diff2 = (decoded - target).square()
    if kind == "l2":
        return torch.sqrt(diff2.sum() / layout.num_weights)
    if kind == "mse":
        ids = layer_ids_of_weights(layout, decoded.device)
        per_layer = torch.zeros(layout.num_layers, device=decoded.device, dtype=diff2.dtype)
        per_layer = per_layer.index_add(0, ids, diff2)
        counts = layout.tensors(decoded.device).weight_offsets.diff().to(diff2.dtype)
        return (per_layer / counts).mean()
    raise ValueError(f"reconstruction loss '{kind}' is not one of {RECONSTRUCTION_LOSSES}")


def row_loss(decoded_rows: torch.Tensor, target_rows: torch.Tensor, rows: torch.Tensor,
             layout: WeightLayout, kind: str = "l2") -> torch.Tensor:
    """Reconstruction loss on sampled kernels (subset format, ``(B, k·k)``).

    ``l2``: sqrt(Σ (w − ŵ)² / number of sampled weights); ``mse``: mean over the layers present in
    the sample of their MSE. Padding entries (cropped layers) are 0 in both and not counted.
    """
    t = layout.tensors(decoded_rows.device)
    layer = t.layer_of(rows)
    valid = (t.size[layer] ** 2).to(decoded_rows.dtype)  # weights per sampled kernel
    row_sse = (decoded_rows - target_rows).square().sum(dim=1)
    if kind == "l2":
        return torch.sqrt(row_sse.sum() / valid.sum())
    if kind == "mse":
        zeros = torch.zeros(layout.num_layers, device=row_sse.device, dtype=row_sse.dtype)
        sse = zeros.index_add(0, layer, row_sse)
        count = zeros.index_add(0, layer, valid)
        present = (count > 0).to(sse.dtype)
        return (sse / count.clamp_min(1)).sum() / present.sum()
    raise ValueError(f"reconstruction loss '{kind}' is not one of {RECONSTRUCTION_LOSSES}")


def per_layer_rmse(decoded: torch.Tensor, target: torch.Tensor, layout: WeightLayout) -> list[float]:
    """RMSE of every layer (host values: for reports, not for training steps)."""
    diff2 = (decoded.detach().float() - target.detach().float()).square()
    ids = layer_ids_of_weights(layout, diff2.device)
    sse = torch.zeros(layout.num_layers, device=diff2.device).index_add(0, ids, diff2)
    counts = layout.tensors(diff2.device).weight_offsets.diff().float()
    return torch.sqrt(sse / counts).tolist()


def rmse(decoded: torch.Tensor, target: torch.Tensor) -> float:
    return float(torch.sqrt((decoded.detach().float() - target.detach().float()).square().mean()))


# ------------------------------------------------------------------------------ distillation
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "stable_kl",
            temperature: float = 2.0) -> torch.Tensor:
    """NeRN's logit distillation losses (KL(teacher ‖ student), batchmean)."""
    s, t = student_logits.float(), teacher_logits.float()
    if kind == "kl":
        return F.kl_div(F.log_softmax(s, dim=1), F.softmax(t, dim=1), reduction="batchmean")
    if kind == "stable_kl":
        return F.kl_div(torch.log(F.softmax(s, dim=1) + 1e-4), F.softmax(t, dim=1),
                        reduction="batchmean")
    if kind == "temp_stable_kl":
        s, t = s / temperature, t / temperature
        return F.kl_div(torch.log(F.softmax(s, dim=1) + 1e-4), F.softmax(t, dim=1),
                        reduction="batchmean") * temperature ** 2
    raise ValueError(f"distillation loss '{kind}' is not one of {KD_LOSSES}")


# On CUDA, maps of one shape are stacked and normalised together up to this many bytes per stacked
# tensor: a ResNet-56 step has ~80 maps, each costing ~20 small kernel launches (forward and
# backward) on its own. Not on the CPU, where launches cost nothing and the large temporaries of a
# stack made a batch-256 ResNet-56 step 2.6x slower (fresh pages for every big buffer).
FMD_GROUP_BYTES = 256 << 20
ENV_FMD_GROUP_MB = "NERN_FAST_FMD_GROUP_MB"  # overrides the default on every device (0: map by map)


def default_group_bytes(device: torch.device) -> int:
    value = os.environ.get(ENV_FMD_GROUP_MB, "").strip()
    if value:
        try:
            mb = int(value)
        except ValueError:
            mb = -1
        if mb < 0:
            raise ValueError(f"{ENV_FMD_GROUP_MB}='{value}' is not a whole number of megabytes >= 0")
        return mb << 20
    return FMD_GROUP_BYTES if device.type == "cuda" else 0


def _normalise_maps(m: torch.Tensor, eps: float, lead: int) -> torch.Tensor:
    """m / (‖m‖ + eps), the norm over every dimension after the first ``lead`` (per sample)."""
    norm = torch.linalg.vector_norm(m.reshape(*m.shape[:lead], -1), dim=-1)
    return m / (norm.reshape(*norm.shape, *([1] * (m.dim() - lead))) + eps)


def _map_groups(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
                group_bytes: int) -> list[list[int]]:
    """Indices of the map pairs, grouped by shape (and dtype, device), each group's stacked float32
    copy at most ``group_bytes`` (a map larger than that is a group of its own)."""
    groups: dict = {}
    for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        if s.shape != t.shape:
            raise ValueError(f"feature map {i}: student shape {tuple(s.shape)} differs from the "
                             f"teacher's {tuple(t.shape)}")
        groups.setdefault((tuple(s.shape), s.dtype, t.dtype, s.device), []).append(i)
    chunks = []
    for indices in groups.values():
        per_map = max(1, student_maps[indices[0]].numel() * 4)
        size = max(1, group_bytes // per_map)
        chunks += [indices[j:j + size] for j in range(0, len(indices), size)]
    return chunks


def feature_map_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
                     eps: float = 1e-3, group_bytes: Optional[int] = None) -> torch.Tensor:
    """NeRN's L2BatchedAttentionLoss over paired feature maps.

    Maps of the same shape are stacked (up to ``group_bytes`` per stack) and computed together:
    the same value up to float rounding, with a few kernels per group instead of per map (the
    stacked student copy is kept for the backward: memory for fewer launches). ``group_bytes``
    None: ``NERN_FAST_FMD_GROUP_MB`` if set, else :data:`FMD_GROUP_BYTES` on CUDA and 0 (map by
    map) elsewhere.
    """
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(f"feature-map distillation needs paired maps, got {len(student_maps)} "
                         f"student and {len(teacher_maps)} teacher maps")
    if group_bytes is None:
        group_bytes = default_group_bytes(student_maps[0].device)
    batch = teacher_maps[0].shape[0]
    terms = []
    for group in _map_groups(student_maps, teacher_maps, group_bytes):
        if len(group) == 1:
            s, t, lead = student_maps[group[0]].float(), teacher_maps[group[0]].float(), 1
        else:
            s = torch.stack([student_maps[i].float() for i in group])
            t = torch.stack([teacher_maps[i].float() for i in group])
            lead = 2
        terms.append((_normalise_maps(t, eps, lead) - _normalise_maps(s, eps, lead)).square().sum())
    total = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
    return total / batch


# ------------------------------------------------------------------------------ hooks
def _is_block(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Block") or name.endswith("Bottleneck")


def _on_shortcut(name: str) -> bool:
    return any(part in ("downsample", "shortcut") for part in name.split("."))


def _nern_feature_maps(model: nn.Module) -> list[str]:
    """The maps NeRN's ``get_feature_maps`` yields. Its CIFAR ResNets: the stem's BatchNorm output
    and per block bn1's (both before the ReLU), then bn2's, which its in-place ``out +=
    shortcut(x)`` turns into the post-add, pre-ReLU map, listed again as the block's output:
    here ``residual`` twice. Other networks (its ImageNet ResNet-18, whose in-place ReLUs and add
    the hooks see the same way): ``bn+blocks``."""
    from ..models.cifar_resnet import BasicBlock, CifarResNet
    if not isinstance(model, CifarResNet):
        return feature_module_names(model, "bn+blocks")
    names = ["bn1"]
    for n, m in model.named_modules():
        if isinstance(m, BasicBlock):
            names += [f"{n}.bn1", f"{n}.residual", f"{n}.residual"]
    return names


def feature_module_names(model: nn.Module, spec: Union[str, Sequence[str]]) -> list[str]:
    """Modules whose outputs are distilled: ``bn`` (every BatchNorm2d but those on a shortcut
    path, ``downsample``/``shortcut``, which NeRN's ``get_feature_maps`` never lists), ``blocks``
    (every residual block's output), ``bn+blocks``, or explicit names. On torchvision's ResNet-18
    ``bn+blocks`` records NeRN's 25 maps exactly (its in-place ReLU and residual add make the
    stored BatchNorm outputs the post-ReLU maps, as in NeRN); ``nern`` gives NeRN's maps on this
    library's CIFAR ResNets too (see ``_nern_feature_maps``)."""
    named = dict(model.named_modules())
    if spec == "nern":
        return _nern_feature_maps(model)
    if isinstance(spec, str):
        if spec not in ("bn", "blocks", "bn+blocks"):
            raise ValueError(f"feature_maps '{spec}' is not bn, blocks, bn+blocks or nern (or a list "
                             f"of module names)")
        parts = spec.split("+")
        names = [n for n, m in named.items() if n and (
            ("bn" in parts and isinstance(m, nn.BatchNorm2d) and not _on_shortcut(n))
            or ("blocks" in parts and _is_block(m)))]
        if not names:
            raise ValueError(f"feature_maps '{spec}': the model {type(model).__name__} has no such "
                             f"modules; list module names instead")
        return names
    missing = [n for n in spec if n not in named]
    if missing:
        raise ValueError(f"feature_maps names modules the model lacks: {missing[:4]}")
    return list(spec)


class FeatureMaps:
    """Records the outputs of named modules during a forward pass (forward hooks).

    Use as a context manager around the forward; ``maps`` then holds the outputs in module
    order. Works with ``torch.func.functional_call`` (hooks fire on the real modules).
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = list(names)
        self.maps: list[Optional[torch.Tensor]] = []
        self._handles = []

    def __enter__(self) -> "FeatureMaps":
        modules = dict(self.model.named_modules())
        self.maps = [None] * len(self.names)
        for i, name in enumerate(self.names):
            self._handles.append(modules[name].register_forward_hook(self._hook(i)))
        return self

    def _hook(self, index: int):
        def record(module, inputs, output):
            self.maps[index] = output
        return record

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

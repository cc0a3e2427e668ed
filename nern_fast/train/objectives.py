"""What one training step computes, as modules (so a step can be captured in a CUDA graph).

* :class:`ReconstructionObjective`: decode only the sampled kernels (subset decode, never the
  whole network) and compare them with the target's — decoupled stage 1, progressive rounds.
* :class:`DistillationObjective`: decode the network (NeRN's way: every kernel without
  gradients, the sampled kernels again with gradients written over them; or every kernel with
  gradients), run the CNN with those weights, and combine reconstruction, feature-map and logit
  distillation terms — NeRN's joint recipe, decoupled stage 2, data-free distillation.

``forward`` returns ``(loss, parts)`` where ``parts`` is a detached device tensor
``[loss, reconstruction, feature maps, logits]`` for logging without a host sync.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..layout import WeightLayout
from .evaluation import autocast_context, forward_with_weights
from .losses import FeatureMaps, feature_map_loss, kd_loss, reconstruction_loss, row_loss


def scatter_rows(layout: WeightLayout, flat: torch.Tensor, rows: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
    """``flat`` with the kernels ``rows`` replaced by ``values`` (subset format), out of place.

    Static shapes (no host sync): the padding entries of cropped layers go to a scratch slot.
    """
    t = layout.tensors(flat.device)
    k2 = layout.kernel_size ** 2
    layer = t.layer_of(rows)
    size2 = t.size[layer] ** 2
    start = t.weight_offsets[layer] + (rows - t.kernel_offsets[layer]) * size2
    col = torch.arange(k2, device=flat.device)
    index = torch.where(col[None, :] < size2[:, None], start[:, None] + col[None, :],
                        torch.full_like(start, layout.num_weights)[:, None])
    padded = torch.cat([flat, flat.new_zeros(1)])
    return padded.index_put((index.reshape(-1),), values.reshape(-1).to(flat.dtype))[:-1]


class ReconstructionObjective(nn.Module):
    def __init__(self, predictor: nn.Module, target: torch.Tensor, kind: str = "l2"):
        super().__init__()
        self.predictor = predictor
        self.layout = predictor.layout
        self.register_buffer("target", target.detach(), persistent=False)
        self.kind = kind

    def forward(self, rows: torch.Tensor):
        decoded = self.predictor.decode_kernels(rows)
        loss = row_loss(decoded, self.layout.kernel_rows(self.target, rows), rows, self.layout,
                        self.kind)
        zero = loss.detach() * 0
        return loss, torch.stack([loss.detach(), loss.detach(), zero, zero])


class DistillationObjective(nn.Module):
    """recon_weight·recon + fmd_weight·fmd + kd_weight·kd (NERN_SPEC §7/§8)."""

    def __init__(self, predictor: nn.Module, target: torch.Tensor, model: nn.Module,
                 teacher: Optional[nn.Module], stage, feature_names: Sequence[str] = ()):
        super().__init__()
        self.predictor = predictor
        self.layout: WeightLayout = predictor.layout
        self.register_buffer("target", target.detach(), persistent=False)
        # The frozen networks are not submodules: their parameters must not be trained or graphed.
        self.__dict__["model"] = model
        self.__dict__["teacher"] = teacher
        self.stage = stage
        self.feature_names = list(feature_names)

    def decode(self, rows: Optional[torch.Tensor]) -> torch.Tensor:
        if self.stage.gradients == "full" or rows is None:
            return self.predictor.decode_flat()
        with torch.no_grad():
            base = self.predictor.decode_flat()
        return scatter_rows(self.layout, base, rows, self.predictor.decode_kernels(rows))

    def forward(self, x: torch.Tensor, rows: Optional[torch.Tensor], warm: bool = False):
        s = self.stage
        flat = self.decode(rows)
        zero = flat.new_zeros(())
        recon = (reconstruction_loss(flat, self.target, self.layout, s.reconstruction_loss)
                 if s.reconstruction_weight > 0 or warm else zero)
        fmd, kd = zero, zero
        loss = s.reconstruction_weight * recon if s.reconstruction_weight > 0 else zero
        if not warm and (s.fmd_weight > 0 or s.kd_weight > 0):
            use_fmd = s.fmd_weight > 0
            with autocast_context(x.device, s.autocast):
                with FeatureMaps(self.model, self.feature_names if use_fmd else []) as student:
                    student_logits = forward_with_weights(self.model, self.layout, flat, x)
                with torch.no_grad():
                    with FeatureMaps(self.model, self.feature_names if use_fmd else []) as original:
                        original_logits = self.model(x) if (use_fmd or self.teacher is None) else None
                    teacher_logits = (self.teacher(x) if self.teacher is not None
                                      else original_logits)
            if use_fmd:
                fmd = feature_map_loss(student.maps, original.maps)
                loss = loss + s.fmd_weight * fmd
            if s.kd_weight > 0:
                kd = kd_loss(student_logits, teacher_logits, s.kd_loss, s.temperature)
                loss = loss + s.kd_weight * kd
        if warm and s.reconstruction_weight == 0:
            loss = recon  # warm-up: only the reconstruction term counts
        return loss, torch.stack([loss.detach(), recon.detach(), fmd.detach(), kd.detach()])

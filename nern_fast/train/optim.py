"""Optimisers and learning-rate schedules of the recipes.

``Ranger`` (NeRN's optimiser, gradient centralisation off as in NeRN's configs) is RAdam +
Lookahead built from torch.optim pieces: ``torch.optim.RAdam`` with decoupled weight decay
(Ranger's ``p -= lr·wd·p``) and rectification threshold 5, then every ``k`` steps the slow
weights move ``alpha`` of the way to the fast ones and the fast weights restart from there. The
slow weights live in the optimiser state, so ``state_dict()`` resumes exactly.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


class Ranger(torch.optim.RAdam):
    """RAdam + Lookahead (NeRN's Ranger without gradient centralisation)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.95, 0.999), eps: float = 1e-5,
                 weight_decay: float = 0.0, k: int = 6, alpha: float = 0.5, foreach=None):
        if k < 1:
            raise ValueError(f"lookahead k must be >= 1, got {k}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"lookahead alpha must be in [0, 1], got {alpha}")
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=True, foreach=foreach)
        for group in self.param_groups:
            group.setdefault("lookahead_k", k)
            group.setdefault("lookahead_alpha", alpha)
            group.setdefault("lookahead_step", 0)

    @torch.no_grad()
    def step(self, closure=None):
        # Ranger starts the slow weights from the parameters before the first update.
        fresh = {p: p.detach().clone() for g in self.param_groups for p in g["params"]
                 if p.grad is not None and "slow_buffer" not in self.state[p]}
        loss = super().step(closure)
        for p, initial in fresh.items():
            self.state[p]["slow_buffer"] = initial
        for group in self.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"]:
                continue
            fast = [p for p in group["params"] if "slow_buffer" in self.state[p]]
            if not fast:
                continue
            slow = [self.state[p]["slow_buffer"] for p in fast]
            torch._foreach_lerp_(slow, [p.detach() for p in fast], group["lookahead_alpha"])
            torch._foreach_copy_(fast, slow)
        return loss


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """An optimiser from an :class:`nern_fast.config.OptimConfig`."""
    params = list(params)
    betas = tuple(cfg.betas)
    if cfg.name == "ranger":
        return Ranger(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      k=cfg.lookahead_k, alpha=cfg.lookahead_alpha)
    if cfg.name == "radam":
        return torch.optim.RAdam(params, lr=cfg.lr, betas=betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, decoupled_weight_decay=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    raise ValueError(f"optimizer '{cfg.name}' is not one of ranger, radam, adamw, adam, sgd")


def lr_factor(step: int, total: int, lr: float, min_lr: float, schedule: str, warmup: int) -> float:
    """Multiplier of the base lr after ``step`` scheduler steps: linear warm-up, then cosine from
    lr to min_lr over the remaining steps (NeRN: CosineAnnealingLR with T_max = all steps)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    t = min(step - warmup, span) / span
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))) / lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    """A LambdaLR stepped once per training step (its state_dict restores the position)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.lr, cfg.min_lr, cfg.schedule,
                                          cfg.warmup_steps))


def optimizer_step(loss: torch.Tensor, params, optimizer: torch.optim.Optimizer, scheduler,
                   grad_clip) -> None:
    """One update of a recipe's loop: backward, optional gradient-norm clip, step, schedule, zero."""
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

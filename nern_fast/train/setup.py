"""Building what a run needs from its config: device, data, networks, layout, predictors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import Config, ConfigError, PredictorConfig, usable_device
from ..data import TaskData, load_task_data
from ..layout import WeightLayout
from ..models import build_model, load_weights
from ..permutations import permute_layout
from ..predictor import FastPredictor


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return usable_device(name, "device")  # present here, the CUDA index too


def apply_runtime(cfg: Config) -> torch.device:
    """Threads, determinism, cuDNN's algorithm search and the device of a run."""
    # Set even when the config leaves the count to torch: torch.set_num_threads also switches MKL's
    # dynamic thread choice off, which changes the last bits of CPU GEMMs. Computing permutations
    # sets threads (and restores the count), a cached permutation does not, so without this a run
    # that computed them and one that read them (every --resume) trained on different bits.
    torch.set_num_threads(cfg.threads if cfg.threads is not None else torch.get_num_threads())
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    # A training run's conv shapes never change: timing cuDNN's algorithms once pays off (the
    # default heuristics chose FFT kernels for the weight gradients of a batch-256 ResNet-56).
    torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark and not cfg.deterministic)
    return resolve_device(cfg.device)


def make_network(model_cfg, task: TaskData, what: str = "model") -> nn.Module:
    """A network from a model (or teacher) config, its checkpoint loaded when one is given."""
    c, h = task.input_shape[0], task.input_shape[1]
    if model_cfg.num_classes and model_cfg.num_classes < task.num_classes:
        raise ConfigError(f"{what}.num_classes: {model_cfg.num_classes} outputs, but the {task.name} "
                          f"data has {task.num_classes} classes; set it to {task.num_classes} or leave "
                          f"it out (it then follows the data)")
    if model_cfg.in_channels and model_cfg.in_channels != c:
        raise ConfigError(f"{what}.in_channels: {model_cfg.in_channels}, but the {task.name} images "
                          f"have {c} channels; set it to {c} or leave it out")
    try:
        model = build_model(model_cfg.arch, model_cfg.num_classes or task.num_classes,
                            model_cfg.in_channels or c, h, model_cfg.small_input,
                            model_cfg.kwargs)
    except (ValueError, ImportError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{what}.arch: {exc}") from exc
    if model_cfg.checkpoint:
        load_weights(model, model_cfg.checkpoint)
    return model


def frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode (BatchNorm running statistics, as NeRN trains), no gradients, on ``device``."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def layout_include(p: PredictorConfig):
    if p.include == "all":
        return None
    return p.include


def make_layout(model: nn.Module, p: PredictorConfig, permutation_cache: Optional[Path],
                progress: bool = False) -> WeightLayout:
    layout = WeightLayout.from_model(model, kernel_size=p.kernel_size, include=layout_include(p),
                                     normalization=p.normalization, crop=p.crop)
    if p.permutation != "none":
        weights = [w.detach().cpu() for w in layout.model_weights(model)]
        cache = p.permutation_cache or permutation_cache
        layout = permute_layout(layout, weights, p.permutation, cache, progress)
    return layout


def make_predictor(layout: WeightLayout, p: PredictorConfig, hidden: Optional[int], seed: int,
                   device: torch.device) -> FastPredictor:
    """A fresh predictor; its initialisation is a function of ``seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pred = FastPredictor(layout, hidden=hidden or p.hidden, num_blocks=p.num_blocks,
                             levels=p.levels, base=p.base, encoding=p.encoding,
                             gauss_scale=tuple(p.gauss_scale), backend=p.backend,
                             precision=p.precision, init=p.init)
    return pred.to(device)


def load_data(cfg: Config) -> TaskData:
    return load_task_data(cfg.data)

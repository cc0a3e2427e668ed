"""``train-base``: train the network to be represented (no pretrained weights can be downloaded
here), and save it as a model file (architecture, weights, test accuracy)."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import Config, dump_yaml, to_dict
from ..models import save_model_file
from . import setup
from .errors import TrainingDiverged
from .evaluation import accuracy, autocast_context
from .logger import RunLog, progress_bar
from .optim import build_optimizer, build_scheduler, optimizer_step

MODEL_FILE = "model.pt"


def cosine_smoothness(weights) -> torch.Tensor:
    """NeRN's CosineSmoothness: Σ over layers of the cosine similarities of kernels adjacent in
    the channel and in the filter direction (1×1 layers contribute nothing)."""
    total = None
    for w in weights:
        if w.shape[2] * w.shape[3] == 1:
            continue
        k = w.reshape(w.shape[0], w.shape[1], -1)
        term = k.new_zeros(())
        if k.shape[1] > 1:
            term = term + F.cosine_similarity(k[:, :-1], k[:, 1:], dim=2).sum()
        if k.shape[0] > 1:
            term = term + F.cosine_similarity(k[:-1], k[1:], dim=2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def difference_smoothness(weights) -> torch.Tensor:
    """Σ over layers of the mean squared difference of kernels adjacent in the channel and in the
    filter direction."""
    total = None
    for w in weights:
        k = w.reshape(w.shape[0], w.shape[1], -1)
        term = k.new_zeros(())
        if k.shape[1] > 1:
            term = term + (k[:, 1:] - k[:, :-1]).square().sum(dim=2).mean()
        if k.shape[0] > 1:
            term = term + (k[1:] - k[:-1]).square().sum(dim=2).mean()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def train_base(cfg: Config, out_dir, echo: Callable = print, overwrite: bool = False) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.train_base.epochs``; returns a summary.

    ``OUT/model.pt`` and the ``config.yaml`` that describes it are written together at the end: a
    run that fails leaves an earlier model and its config as they were. An existing model is
    replaced only with ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for the trained model")
    if (out / MODEL_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out / MODEL_FILE} already holds a trained network; replace it with "
                              f"--overwrite or choose another --out")
    device = setup.apply_runtime(cfg)
    task = setup.load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = setup.make_network(cfg.model, task).to(device)
    # The folder only once the data and the network are there: a mistake in either leaves none.
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, cfg.logging.tensorboard)
    tb = cfg.train_base
    stream = task.train_stream(cfg.data.batch_size, device, cfg.seed, cfg.data.num_workers,
                               augment=cfg.data.augment)
    total = max(1, math.ceil(tb.epochs * stream.steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tb.optim)
    scheduler = build_scheduler(optimizer, tb.optim, total)
    test = lambda: task.test_batches(cfg.data.eval_batch_size, device, cfg.data.num_workers,
                                     cfg.data.max_eval_batches)
    smooth_weights = []
    if tb.smoothness > 0 or tb.smoothness_l2 > 0:  # the layers the predictor will represent
        unpermuted = dataclasses.replace(cfg.predictor, permutation="none")
        smooth_weights = setup.make_layout(model, unpermuted, None).model_weights(model)
    started = time.perf_counter()
    bar = progress_bar(total, 0, "train-base", cfg.logging.progress)
    loss_sum = torch.zeros((), device=device)
    count = 0
    shown = {}
    model.train()
    for step in range(1, total + 1):
        x, y = stream.next()
        with autocast_context(device, tb.autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=tb.label_smoothing)
        if tb.smoothness > 0:
            loss = loss - tb.smoothness * cosine_smoothness(smooth_weights)
        if tb.smoothness_l2 > 0:
            loss = loss + tb.smoothness_l2 * difference_smoothness(smooth_weights)
        optimizer_step(loss, params, optimizer, scheduler, tb.optim.grad_clip)
        loss_sum += loss.detach()
        count += 1
        bar.update(1)
        if step % cfg.logging.log_every == 0 or step == total:
            mean = float(loss_sum) / count
            if not math.isfinite(mean):
                raise TrainingDiverged(f"train-base: the loss became {mean} by step {step}; lower "
                                       f"train_base.optim.lr (nothing was saved)")
            shown["loss"] = f"{mean:.4f}"
            bar.set_postfix(shown)
            log.write({"stage": "train_base", "step": step, "loss": mean,
                       "lr": scheduler.get_last_lr()[0]}, global_step=step)
            loss_sum.zero_()
            count = 0
        if step % stream.steps_per_epoch == 0 and step < total and cfg.logging.progress:
            acc = accuracy(model, test())
            model.train()
            shown["test"] = f"{acc:.2f}%"
            bar.set_postfix(shown)
    bar.close()
    model.eval()
    acc = accuracy(model, test())
    seconds = time.perf_counter() - started
    c, h = task.input_shape[0], task.input_shape[1]
    extra = {}
    try:  # lets `nern-fast export` rebuild the network without --model
        from ..compressed import ModelSpec
        spec = ModelSpec.infer(model.cpu())
        if spec is not None:
            extra["model_spec"] = spec.describe()
    except Exception:  # the export module is optional here
        pass
    path = save_model_file(model, out / MODEL_FILE, cfg.model.arch, **extra,
                           num_classes=cfg.model.num_classes or task.num_classes,
                           in_channels=cfg.model.in_channels or c, image_size=h,
                           dataset=cfg.data.dataset, accuracy=acc, steps=total,
                           config=to_dict(cfg))
    dump_yaml(cfg, out / "config.yaml")
    summary = {"model": cfg.model.arch, "dataset": cfg.data.dataset, "accuracy": acc,
               "steps": total, "seconds": seconds, "path": str(path)}
    log.write({"event": "done", **summary})
    log.close()
    echo(f"train-base: {cfg.model.arch} on {cfg.data.dataset}: {acc:.2f} % test accuracy after "
         f"{total} steps ({seconds:.1f} s); saved {path}")
    return summary

"""Optional CUDA-graph capture of a training step's decode + loss + backward.

Where every shape of a step is static (a fixed number of sampled kernels, a fixed batch), the
forward and backward are captured once with ``torch.cuda.make_graphed_callables`` and replayed
each step, removing the launch overhead of the many small kernels; the optimiser step stays
eager (a few fused foreach kernels). Capture needs a decode backend that never synchronises with
the host; when capture fails (a host sync, a CPU run) the step runs eagerly, with a warning that
names the first error. Captures run on the objective's device, thread-local where this torch
allows (``nern_fast.cuda_capture``).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..cuda_capture import capture_failure, capturing_on, graphed_callables_options


class _FixedWarm(nn.Module):
    """A distillation objective with its Python flag fixed, so every argument is a tensor."""

    def __init__(self, objective: nn.Module):
        super().__init__()
        self.objective = objective

    def forward(self, x, rows):
        return self.objective(x, rows, False)


def maybe_graphed(objective: nn.Module, sample_args: tuple, enabled: bool, what: str):
    """The objective, captured in CUDA graphs when ``enabled`` and possible; else unchanged.

    The objective returns ``(loss, parts)``; the graphed version returns ``parts`` detached (an
    output of the graphs' autograd function requires grad: the step meter summing it would keep an
    autograd chain alive between logging intervals)."""
    if not enabled:
        return objective
    device = sample_args[0].device
    if device.type != "cuda":
        warnings.warn(f"{what}: cuda_graphs needs a CUDA device (running on {device}); the step "
                      f"runs eagerly", RuntimeWarning, stacklevel=2)
        return objective
    try:
        with capturing_on(device):
            graphed = torch.cuda.make_graphed_callables(objective, sample_args, num_warmup_iters=3,
                                                        **graphed_callables_options())
    except Exception as exc:  # capture refused: a host sync, an unsupported op, ...
        try:
            torch.cuda.synchronize(device)
        except Exception as sticky:  # an error the device keeps: nothing can run on it any more
            raise RuntimeError(f"{what}: the CUDA-graph capture failed ({capture_failure(exc)}) and "
                               f"left the device unusable") from sticky
        warnings.warn(f"{what}: could not capture the step in a CUDA graph ({capture_failure(exc)}); "
                      f"it runs eagerly. The decode backend must not synchronise with the host",
                      RuntimeWarning, stacklevel=2)
        return objective

    def step(*args):
        loss, parts = graphed(*args)
        return loss, parts.detach()
    return step


def graphed_distillation(objective: nn.Module, sample_args: tuple, enabled: bool, what: str):
    """Like :func:`maybe_graphed` for a DistillationObjective: returns ``f(x, rows)``."""
    if not enabled:
        return lambda x, rows: objective(x, rows, False)
    graphed = maybe_graphed(_FixedWarm(objective), sample_args, enabled, what)
    return graphed

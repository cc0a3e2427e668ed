"""Optional CUDA-graph capture of a training step's decode + loss + backward.

Where every shape of a step is static (a fixed number of sampled kernels, a fixed batch), the
forward and backward are captured once with ``torch.cuda.make_graphed_callables`` and replayed
each step, removing the launch overhead of the many small kernels; the optimiser step stays
eager (a few fused foreach kernels). Capture needs a decode backend that never synchronises with
the host; when capture fails (a host sync, a CPU run) the step runs eagerly, with a warning that
names the first error. Captures run on the objective's device, thread-local where this torch
allows (``nern_fast.cuda_capture``).

The capture records the objective with stand-ins for its parameters (``detach()`` views: the same
storage and version counter) passed as inputs, and each step passes the real parameters. Captured
with the parameters themselves, the capture's graph (kept alive by torch's static outputs) holds
their gradient accumulators, made on the capture's side stream; torch >= 2.10 then warned at every
step that the accumulator's stream differs from the step's, and a distillation stage, whose eager
warm-up steps had made the accumulators on the default stream, failed to capture (the capture
made the default stream wait: H200, torch 2.11). Stand-ins keep the real parameters' accumulators
out of the capture: they are made by the steps, on the steps' stream.
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


def parameters_as_inputs(objective: nn.Module):
    """``(call, parameters)``: ``call(*args, *params)`` is ``objective(*args)`` run with ``params``
    (one tensor per entry of ``parameters``, in order) in place of the objective's parameters."""
    named = list(objective.named_parameters())
    names, parameters = tuple(n for n, _ in named), tuple(p for _, p in named)
    count = len(names)

    def call(*args):
        user, params = args[:len(args) - count], args[len(args) - count:]
        return torch.func.functional_call(objective, dict(zip(names, params)), user)
    return call, parameters


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
    call, parameters = parameters_as_inputs(objective)
    stand_ins = tuple(p.detach().requires_grad_(p.requires_grad) for p in parameters)
    try:
        with capturing_on(device), warnings.catch_warnings():
            # torch 2.11 warms up on one side stream and captures on another, and its last warm-up
            # outputs stay alive over the capture: the stand-ins' gradient accumulators, made in the
            # warm-up, meet the capture's stream and torch >= 2.10 warns (H200, session 8, on the
            # reconstruction capture). They are never accumulated into, and a mismatch that involved
            # the default stream would fail the capture, which is reported below.
            warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream does not match")
            graphed = torch.cuda.make_graphed_callables(call, tuple(sample_args) + stand_ins,
                                                        num_warmup_iters=3, **graphed_callables_options())
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

    def step(*args):  # the real parameters: the same storage as the stand-ins, so nothing is copied
        loss, parts = graphed(*args, *parameters)
        return loss, parts.detach()
    return step


def graphed_distillation(objective: nn.Module, sample_args: tuple, enabled: bool, what: str):
    """Like :func:`maybe_graphed` for a DistillationObjective: returns ``f(x, rows)``."""
    if not enabled:
        return lambda x, rows: objective(x, rows, False)
    graphed = maybe_graphed(_FixedWarm(objective), sample_args, enabled, what)
    return graphed

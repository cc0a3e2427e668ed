"""Inference forward of a network whose conv weights come from the predictor (``torch.inference_mode``).

Providers:
* ``dense``: the ordinary network with stored weights (the floor: no decoding at all);
* ``nern_eager``: NeRN's way to run the network from a predictor — decode everything with the
  NeRN-style loop, write it into the convs, then run (the baseline of the speed-up column);
* ``on_demand`` / ``cached`` / ``materialized``: ``pred.attach(model, mode=...)`` from
  nern_fast.inference (issue #6), timing one forward of the attached model. ``materialized`` and
  ``cached`` decode during attach (set-up, not timed); ``on_demand`` decodes each decode group as
  its convs run;
* ``on_demand_bounded``: on_demand with each decode call's scratch capped at largest layer +
  predictor (``workspace_bytes``: the Triton chunked schedule's and csrc CUDA's activation buffers).
Peak memory is the column to watch here (on_demand holds at most two decode groups' weights, plus
what a decode call works in).
Run alone: ``python -m bench.inference_forward [--quick] [--device cuda]``."""
from __future__ import annotations

import copy

import torch

from nern_fast import FastPredictor

from .harness import decode_flops
from .nern_style import NernStyleDecoder
from .operation import Operation, Step
from .providers import NERN_BASELINE, Provider

ATTACH_MODES = ("on_demand", "cached", "materialized")


class DenseProvider(Provider):
    name = "dense"
    fixed_precision = "fp32"


class NernReconstructProvider(Provider):
    name = NERN_BASELINE
    fixed_precision = "fp32"


class AttachProvider(Provider):
    def __init__(self, mode: str, bounded: bool = False):
        self.name = mode + ("_bounded" if bounded else "")
        self.mode = mode
        self.bounded = bounded  # workspace_bytes = largest layer + predictor

    def attach_options(self, pred) -> dict:
        if not self.bounded:
            return {}
        largest = max(l.num_weights for l in pred.layout.layers) * 4
        return {"workspace_bytes": largest + sum(p.numel() * p.element_size() for p in pred.parameters())}

    def unavailable_reason(self, work, precision, subset, needs_grad):
        if not hasattr(FastPredictor, "attach") or not hasattr(FastPredictor, "detach"):
            return ("FastPredictor.attach/detach (nern_fast.inference, issue #6) are not in this "
                    "build yet")
        return None


class InferenceForward(Operation):
    name = "inference_forward"
    needs_model = True

    def providers(self):
        return ([NernReconstructProvider(), DenseProvider()] + [AttachProvider(m) for m in ATTACH_MODES]
                + [AttachProvider("on_demand", bounded=True)])

    def decode_flops_implied(self, case, work, provider):
        return 0.0 if isinstance(provider, DenseProvider) else decode_flops(work.layout.num_kernels, case.hidden)

    def prepare(self, case, work, provider, precision):
        work.set_requires_grad(False)
        model = copy.deepcopy(work.model).eval()
        images = work.images(case.batch)

        if isinstance(provider, DenseProvider):
            def run():
                with torch.inference_mode():
                    return model(images)
            return Step(run)

        if isinstance(provider, NernReconstructProvider):
            decoder = NernStyleDecoder(work.layout, work.encoding, work.device)
            targets = work.layout.model_weights(model)
            weights, biases, layout = work.weights, work.biases, work.layout

            def run():
                with torch.inference_mode():
                    for target, w in zip(targets, layout.split(decoder.decode(weights, biases))):
                        target.copy_(w)
                    return model(images)
            return Step(run)

        pred = work.predictor
        saved_precision = pred.precision
        pred.precision = precision
        try:
            attached = pred.attach(model, mode=provider.mode, **provider.attach_options(pred))
        except Exception:
            pred.precision = saved_precision
            raise

        def run():
            with torch.inference_mode():
                return attached(images)

        def release():
            try:
                pred.detach(attached)
            finally:
                pred.precision = saved_precision

        return Step(run, release=release)


OPERATION = InferenceForward()

if __name__ == "__main__":
    from .suite import main_for_operation
    raise SystemExit(main_for_operation(OPERATION.name))

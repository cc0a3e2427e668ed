"""Distillation step: decode every kernel with autograd, run the CNN with the decoded conv weights
on a batch, logit-distillation loss (KL to the original network's logits, batchmean), backward
into the predictor (full gradient). The CNN's own parameters are frozen (as in NeRN) and it runs
in eval mode; the teacher's logits are computed once, outside the timed step.
The TFLOP/s column stays blank: the CNN's FLOPs are not counted.
Run alone: ``python -m bench.distill_step [--quick] [--device cuda]``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .harness import decode_flops
from .operation import Operation, Step


class DistillStep(Operation):
    name = "distill_step"
    needs_grad = True
    needs_model = True

    def decode_flops_implied(self, case, work, provider):
        return decode_flops(work.layout.num_kernels, case.hidden, backward=True)

    def prepare(self, case, work, provider, precision):
        work.set_requires_grad(True)
        model = work.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        images = work.images(case.batch)
        with torch.no_grad():
            teacher = F.softmax(model(images), dim=1)
        names = [f"{l.name}.weight" for l in work.layout.layers]
        layout = work.layout
        decode = provider.full(work, precision)
        weights, biases, params = work.weights, work.biases, work.parameters

        def run():
            for p in params:
                p.grad = None
            decoded = dict(zip(names, layout.split(decode(weights, biases))))
            logits = functional_call(model, decoded, (images,))
            F.kl_div(F.log_softmax(logits, dim=1), teacher, reduction="batchmean").backward()

        def release():
            for p in params:
                p.grad = None

        return Step(run, release=release)


OPERATION = DistillStep()

if __name__ == "__main__":
    from .suite import main_for_operation
    raise SystemExit(main_for_operation(OPERATION.name))

"""Sampled reconstruction step: decode a random subset of 4,096 kernels with autograd, MSE against
the network's kernels, backward into the predictor (a decoupled stage-1 step, NERN_SPEC §8).

Besides the decode providers (each decoding only the subset) it times ``nern_joint``: NeRN's own
training-step decode, which decodes *every* kernel each step and lets gradients through the
sampled 4,096 only (NeRN's random_batch path), with NeRN's L2 loss over all weights. That is what
a reconstruction step costs in NeRN's code; its row counts the same FLOPs as the others (the
useful work), so its TFLOP/s shows how much of its time is spent on kernels without gradient.
Run alone: ``python -m bench.recon_step [--quick] [--device cuda]``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import decode_flops
from .nern_style import NernStyleDecoder
from .operation import Operation, Step
from .providers import Provider
from .workloads import SUBSET_SIZE

VARIANT = f"subset{SUBSET_SIZE}"


class NernJointProvider(Provider):
    name = "nern_joint"
    fixed_precision = "fp32"


class ReconStep(Operation):
    name = "recon_step"
    needs_grad = True
    subset = True

    def providers(self):
        base = super().providers()
        return base[:1] + [NernJointProvider()] + base[1:]

    def flops(self, case, work):
        return decode_flops(min(SUBSET_SIZE, work.layout.num_kernels), case.hidden, backward=True)

    def decode_flops_implied(self, case, work, provider):
        if isinstance(provider, NernJointProvider):
            return decode_flops(work.layout.num_kernels, case.hidden) + self.flops(case, work)
        return self.flops(case, work)

    def prepare(self, case, work, provider, precision):
        work.set_requires_grad(True)
        weights, biases, params = work.weights, work.biases, work.parameters
        rows = work.subset_rows(SUBSET_SIZE)

        if isinstance(provider, NernJointProvider):
            decoder = NernStyleDecoder(work.layout, work.encoding, work.device)
            target = work.target

            def run():
                for p in params:
                    p.grad = None
                flat = decoder.joint_decode(weights, biases, rows)
                torch.sqrt(F.mse_loss(flat, target)).backward()  # NeRN's L2Loss
        else:
            decode = provider.subset(work, precision)
            target = work.layout.kernel_rows(work.target, rows)

            def run():
                for p in params:
                    p.grad = None
                F.mse_loss(decode(weights, biases, rows), target).backward()

        def release():
            for p in params:
                p.grad = None

        return Step(run, release=release)


OPERATION = ReconStep()

if __name__ == "__main__":
    from .suite import main_for_operation
    raise SystemExit(main_for_operation(OPERATION.name))

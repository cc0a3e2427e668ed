"""Decode forward + backward with the full gradient: every kernel decoded with autograd, then the
gradient of a fixed upstream gradient on the flat weight buffer back into every MLP parameter
(what a full-gradient distillation step costs on the decoder side).
Run alone: ``python -m bench.decode_backward [--quick] [--device cuda]``."""
from __future__ import annotations

import torch

from nern_fast.reference import reference_decode

from .harness import decode_flops
from .operation import Operation, Step, relative_error


def upstream_gradient(work) -> torch.Tensor:
    """A fixed random dL/dw for the flat weight buffer (seeded, kept on the workload)."""
    if getattr(work, "_upstream", None) is None:
        g = torch.Generator().manual_seed(1)
        work._upstream = torch.randn(work.layout.num_weights, generator=g).to(work.device)
    return work._upstream


def reference_gradients(work) -> list:
    """Gradients of every parameter from the fp32 eager decoder (once per workload)."""
    if getattr(work, "_reference_grads", None) is None:
        work.set_requires_grad(True)
        reference_decode(work.weights, work.biases, work.layout, work.encoding, None,
                         "fp32").backward(upstream_gradient(work))
        work._reference_grads = [p.grad.detach().clone() for p in work.parameters]
        work.set_requires_grad(True)
    return work._reference_grads


class DecodeBackward(Operation):
    name = "decode_backward"
    needs_grad = True

    def flops(self, case, work):
        return decode_flops(work.layout.num_kernels, case.hidden, backward=True)

    def case_inputs(self, case, work):
        upstream_gradient(work)

    def prepare(self, case, work, provider, precision):
        work.set_requires_grad(True)
        decode = provider.full(work, precision)
        weights, biases, params = work.weights, work.biases, work.parameters
        grad_out = upstream_gradient(work)

        def run():
            for p in params:
                p.grad = None
            decode(weights, biases).backward(grad_out)

        def check():
            run()
            got = [p.grad.detach().clone() for p in params]
            errors = [relative_error(g, r) for g, r in zip(got, reference_gradients(work))]
            return f"max rel grad err vs fp32 eager {max(errors):.1e}"

        def release():
            for p in params:
                p.grad = None

        return Step(run, check, release)


OPERATION = DecodeBackward()

if __name__ == "__main__":
    from .suite import main_for_operation
    raise SystemExit(main_for_operation(OPERATION.name))

"""Decode forward: every kernel of the network, no gradient (what inference and NeRN's per-step
reconstruction do). Run alone: ``python -m bench.decode_forward [--quick] [--device cuda]``."""
from __future__ import annotations

import torch

from nern_fast.reference import reference_decode

from .harness import decode_flops
from .operation import Operation, Step, relative_error


def reference_output(work) -> torch.Tensor:
    """The fp32 eager decode of the workload (computed once, kept on the workload)."""
    if getattr(work, "_reference_flat", None) is None:
        with torch.no_grad():
            work._reference_flat = reference_decode(work.weights, work.biases, work.layout,
                                                    work.encoding, None, "fp32")
    return work._reference_flat


class DecodeForward(Operation):
    name = "decode_forward"

    def flops(self, case, work):
        return decode_flops(work.layout.num_kernels, case.hidden)

    def prepare(self, case, work, provider, precision):
        work.set_requires_grad(False)
        decode = provider.full(work, precision)
        weights, biases = work.weights, work.biases

        def run():
            with torch.no_grad():
                return decode(weights, biases)

        def check():
            return f"max rel err vs fp32 eager {relative_error(run(), reference_output(work)):.1e}"

        return Step(run, check)


OPERATION = DecodeForward()

if __name__ == "__main__":
    from .suite import main_for_operation
    raise SystemExit(main_for_operation(OPERATION.name))

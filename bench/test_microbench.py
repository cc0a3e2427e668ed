"""CPU microbenchmarks through pytest-benchmark: the same operations and providers as the suite,
on small cases (ResNet-20 at H=180, a ResNet-56 reconstruction step, a 64×64 permutation).

``pytest bench/ --benchmark-only`` (add ``--benchmark-json FILE`` to keep the numbers). A provider
that cannot run here is skipped with its reason; torch.compile is left out (a minute of
compilation per case on a small CPU — the suite measures it).
"""
from __future__ import annotations

import pytest
import torch

from bench.registry import operation
from bench.workloads import Case

DEVICE = torch.device("cpu")
CASES = [
    Case("decode_forward", "resnet20", 180),
    Case("decode_backward", "resnet20", 180),
    Case("recon_step", "resnet56", 280, variant="subset4096"),
    Case("permutations", "conv64x64", None, variant="crossfilter"),
]
LEFT_OUT = {"compile": "torch.compile is measured by the suite (nern-fast bench), not here"}


def _params():
    for case in CASES:
        for provider in operation(case.operation).providers():
            yield pytest.param(case, provider.name, id=f"{case.operation}-{case.layout}-{provider.name}")


_workloads: dict = {}


def _workload(op, case):
    key = op.workload_key(case)
    if key not in _workloads:
        _workloads.clear()  # one at a time: keeps the memory of a long session flat
        _workloads[key] = op.workload(case, DEVICE)
    return _workloads[key]


@pytest.mark.parametrize("case,provider_name", list(_params()))
def test_operation(benchmark, case, provider_name):
    if provider_name in LEFT_OUT:
        pytest.skip(LEFT_OUT[provider_name])
    op = operation(case.operation)
    provider = next(p for p in op.providers() if p.name == provider_name)
    work = _workload(op, case)
    precision = provider.fixed_precision or "fp32"
    reason = op.unavailable_reason(case, work, provider, precision)
    if reason:
        pytest.skip(reason)
    step = op.prepare(case, work, provider, precision)
    try:
        benchmark.extra_info.update(threads=torch.get_num_threads(), precision=precision,
                                    kernels=op.kernels(case, work))
        flops = op.flops(case, work)
        if flops:
            benchmark.extra_info["gflop"] = flops / 1e9
        benchmark.pedantic(step.run, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        step.release()


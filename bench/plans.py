"""What each suite measures: the CPU quick and full plans, the GPU plan and the harness self-test.

An :class:`Entry` is one case (operation, layout, hidden, batch, variant) with the precisions to
run and the providers to leave out of it (with the reason, which lands in the results file).
The GPU plan is ordered by priority (issue #3's goals first) because a time budget guards it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .harness import TimerSettings
from .workloads import NERN_HIDDEN

COMPILE_SLOW = "left out of --quick: compiling takes about a minute per case on this CPU"
COMPILE_SWEEP = "left out of sweeps: torch.compile recompiles for every shape"


@dataclass(frozen=True)
class Entry:
    operation: str
    layout: str
    hidden: Optional[int]
    precisions: tuple = ("fp32",)
    batch: Optional[int] = None
    variant: str = ""
    only: Optional[tuple] = None  # run only these providers (baseline speed-ups still apply)
    leave_out: tuple = ()  # ((provider, reason), ...)
    memory: bool = True


@dataclass
class Plan:
    name: str
    entries: list
    timer: TimerSettings
    budget_s: Optional[float] = None  # soft wall-clock budget: later cases are recorded as skipped
    max_call_s: Optional[float] = None  # CPU: skip a case whose estimated call time exceeds this
    memory: bool = True
    checks: bool = True  # one extra call per provider comparing its result with the fp32 reference


H20, H56, H18 = NERN_HIDDEN["resnet20"], NERN_HIDDEN["resnet56"], NERN_HIDDEN["resnet18"]
NO_COMPILE_QUICK = (("compile", COMPILE_SLOW),)
NO_COMPILE_SWEEP = (("compile", COMPILE_SWEEP),)
NO_COMPILE_STEPS = (("compile", "on CPU torch.compile is measured on decode_forward/decode_backward only "
                                "(a minute or more of compilation per case)"),)


def cpu_quick() -> Plan:
    e = [
        Entry("decode_forward", "resnet20", H20, leave_out=NO_COMPILE_QUICK),
        Entry("decode_forward", "resnet56", H56, leave_out=NO_COMPILE_QUICK, memory=False),
        Entry("decode_backward", "resnet20", H20, leave_out=NO_COMPILE_QUICK, memory=False),
        Entry("recon_step", "resnet20", H20, variant="subset4096", leave_out=NO_COMPILE_QUICK, memory=False),
        Entry("permutations", "conv64x64", None, variant="crossfilter", memory=False),
        Entry("permutations", "conv64x64", None, variant="infilter", memory=False),
        Entry("distill_step", "resnet20", H20, batch=8, leave_out=NO_COMPILE_QUICK, memory=False),
        Entry("inference_forward", "resnet20", H20, batch=1, memory=False),
    ]
    # No memory probes (a fresh process each) and no reference checks (an extra call each): the
    # plan must fit in two minutes on a 2-core CPU that other jobs share.
    return Plan("cpu-quick", e, TimerSettings(warmup=1, min_repeats=3, max_repeats=10, min_seconds=0.2,
                                              max_seconds=1.0), budget_s=100.0, max_call_s=5.0,
                memory=False, checks=False)


def cpu_full() -> Plan:
    e = [
        Entry("decode_forward", "resnet20", H20),
        Entry("decode_forward", "resnet56", H56),
        Entry("decode_forward", "resnet18", H18),
        Entry("decode_backward", "resnet20", H20),
        Entry("decode_backward", "resnet56", H56),
        Entry("decode_backward", "resnet18", H18),
        Entry("recon_step", "resnet20", H20, variant="subset4096", leave_out=NO_COMPILE_STEPS),
        Entry("recon_step", "resnet56", H56, variant="subset4096", leave_out=NO_COMPILE_STEPS),
        Entry("recon_step", "resnet18", H18, variant="subset4096", leave_out=NO_COMPILE_STEPS),
        Entry("distill_step", "resnet20", H20, batch=32, leave_out=NO_COMPILE_STEPS),
        Entry("distill_step", "resnet56", H56, batch=32, leave_out=NO_COMPILE_STEPS),
        Entry("inference_forward", "resnet56", H56, batch=1),
        Entry("inference_forward", "resnet56", H56, batch=32),
        Entry("inference_forward", "resnet18", H18, batch=1),
        Entry("permutations", "conv64x64", None, variant="crossfilter"),
        Entry("permutations", "conv64x64", None, variant="infilter"),
    ]
    # Sweeps: how decode time grows with the hidden size (ResNet-56) and with the kernel count (H=280).
    e += [Entry("decode_forward", "resnet56", h, leave_out=NO_COMPILE_SWEEP, memory=False)
          for h in (64, 128, 180, 400, 512)]
    e += [Entry("decode_forward", name, H56, leave_out=NO_COMPILE_SWEEP, memory=False)
          for name in ("resnet20", "resnet32", "resnet44", "resnet110", "resnet18")]
    return Plan("cpu-full", e, TimerSettings(warmup=1, min_repeats=5, max_repeats=20, min_seconds=1.0,
                                             max_seconds=15.0), max_call_s=30.0)


def gpu() -> Plan:
    """Ordered by priority: Triton tunes each new configuration on its first call (seconds each),
    so the issue-#3 goal cases come first and a time budget guards the rest."""
    tc = ("tf32", "bf16")
    later = (("compile", "measured at the end of the run (tf32, decode forward on ResNet20/56 only: "
                         "compile time)"),)
    e = [
        # Issue #3 goals: decode forward ResNet56/20 for all providers; ResNet18 at H=1256 on tensor
        # cores (TFLOP/s, % of peak); a full-gradient step on ResNet18 with peak memory.
        Entry("decode_forward", "resnet56", H56, tc, leave_out=later),
        Entry("decode_forward", "resnet20", H20, tc, leave_out=later),
        Entry("decode_forward", "resnet18", H18, tc, leave_out=later),
        Entry("decode_backward", "resnet18", H18, tc, leave_out=later),
        # Training steps and inference at NeRN's configurations.
        Entry("recon_step", "resnet18", H18, ("tf32",), variant="subset4096", leave_out=later),
        Entry("decode_backward", "resnet56", H56, ("tf32",), leave_out=later),
        Entry("recon_step", "resnet56", H56, ("tf32",), variant="subset4096", leave_out=later),
        Entry("distill_step", "resnet56", H56, ("tf32",), batch=256, leave_out=later),
        Entry("inference_forward", "resnet56", H56, ("tf32",), batch=1),
        Entry("inference_forward", "resnet56", H56, ("tf32",), batch=256),
        Entry("inference_forward", "resnet18", H18, ("tf32",), batch=1),
        Entry("inference_forward", "resnet18", H18, ("tf32",), batch=64),
        # IEEE fp32 on the small layouts (NeRN's own precision).
        Entry("decode_forward", "resnet56", H56, ("fp32",), leave_out=later),
        Entry("decode_forward", "resnet20", H20, ("fp32",), leave_out=later),
        Entry("permutations", "conv64x64", None, variant="crossfilter"),
        Entry("permutations", "conv64x64", None, variant="infilter"),
    ]
    # Sweeps (tf32): kernel count at H=280 (no new tuning), then hidden size on ResNet-56.
    e += [Entry("decode_forward", name, H56, ("tf32",), leave_out=NO_COMPILE_SWEEP)
          for name in ("resnet20", "resnet32", "resnet44", "resnet110", "resnet18")]
    e += [Entry("decode_forward", "resnet56", h, ("tf32",), leave_out=NO_COMPILE_SWEEP)
          for h in (128, 512, 1256)]
    # torch.compile last: each (layout, precision) costs a compilation of tens of seconds.
    e += [Entry("decode_forward", "resnet56", H56, ("tf32",), only=("compile",)),
          Entry("decode_forward", "resnet20", H20, ("tf32",), only=("compile",))]
    return Plan("gpu", e, TimerSettings(warmup=2, min_repeats=5, max_repeats=50, min_seconds=0.2,
                                        max_seconds=3.0), budget_s=240.0)


def gpu_quick() -> Plan:
    """The issue-#3 goal cases only (decode forward on ResNet20/56/18, ResNet18 full gradient)."""
    plan = gpu()
    plan.name, plan.entries, plan.budget_s = "gpu-quick", plan.entries[:4], 120.0
    return plan


def selftest() -> Plan:
    """Every operation on a network of a few hundred kernels, in seconds (tests/test_bench_harness)."""
    no_compile = (("compile", "left out of the self-test: compiling takes too long for a unit test"),)
    e = [Entry("decode_forward", "tiny", 16, ("fp32", "bf16"), leave_out=no_compile),
         Entry("decode_backward", "tiny", 16, leave_out=no_compile, memory=False),
         Entry("recon_step", "tiny", 16, variant="subset4096", leave_out=no_compile, memory=False),
         Entry("distill_step", "tiny", 16, batch=2, leave_out=no_compile, memory=False),
         Entry("inference_forward", "tiny", 16, batch=1, memory=False),
         Entry("permutations", "conv8x8", None, variant="crossfilter", memory=False),
         Entry("permutations", "conv8x8", None, variant="infilter", memory=False)]
    return Plan("selftest", e, TimerSettings(warmup=1, min_repeats=2, max_repeats=3, min_seconds=0.0,
                                             max_seconds=1.0), max_call_s=5.0)


PLANS = {"cpu-quick": cpu_quick, "cpu-full": cpu_full, "gpu": gpu, "gpu-quick": gpu_quick,
         "selftest": selftest}

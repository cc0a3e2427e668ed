"""Peak resident memory of one benchmark call, in a fresh process (CPU only).

``python -m bench.memprobe '<json spec>'`` builds the case, notes the resident size, sets the
provider up, runs one warm-up call, resets the kernel's high-water mark and runs one more call.
It prints one JSON line: ``peak_extra_bytes`` = high-water mark − resident size before set-up, so
the provider's persistent state (e.g. NeRN-style precomputed encodings) counts and the case's
inputs (predictor, targets, network) do not. The runner starts it with a fixed glibc mmap
threshold (``MALLOC_MMAP_THRESHOLD_``) so that freed blocks leave the resident size at once.
"""
from __future__ import annotations

import json
import sys

import torch


def main(argv=None) -> int:
    from . import harness
    from .registry import operation
    from .workloads import Case

    spec = json.loads((argv or sys.argv[1:])[0])
    torch.set_num_threads(int(spec["threads"]))
    case = Case(**spec["case"])
    op = operation(case.operation)
    device = torch.device("cpu")
    work = op.workload(case, device)
    provider = next(p for p in op.providers() if p.name == spec["provider"])
    op.case_inputs(case, work)
    harness.release_freed_memory()
    before = harness.rss_bytes()
    step = op.prepare(case, work, provider, spec["precision"])
    step.run()
    harness.release_freed_memory()
    reset = harness.reset_rss_peak()
    step.run()
    peak = harness.rss_peak_bytes()
    print(json.dumps({"peak_extra_bytes": peak - before, "rss_before_bytes": before, "hwm_reset": reset}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

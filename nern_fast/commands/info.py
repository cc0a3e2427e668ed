"""``nern-fast info``: versions, devices and which decode backends can run here (and why not)."""
from __future__ import annotations

import platform

from ._common import fail, user_errors


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, devices and available decode backends")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        return _report()
    except user_errors() as exc:  # e.g. a backend's extension that fails to load
        return fail("info", exc)


def _report() -> int:
    import torch

    import nern_fast
    from nern_fast import ops
    from nern_fast.layout import WeightLayout

    print(f"nern_fast {nern_fast.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    layout = WeightLayout.from_shapes([(4, 4)])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
        print(f"\n{device} ({name}):")
        w = [torch.zeros(8, 240, device=device), torch.zeros(9, 8, device=device)]
        request = ops.make_request(w, layout, nern_fast.EncodingSpec(), None, "fp32")
        for backend, reason in ops.availability(request).items():
            print(f"  {backend:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0

"""What the two CUDA-graph users (training steps, on-demand decodes) need around a capture.

* The capture runs on the device of the tensors it records (``torch.cuda.graph``'s default capture
  stream and ``make_graphed_callables``' side stream belong to the *current* device: a predictor on
  another GPU would run its kernels eagerly on a stream that is not capturing, leaving an empty
  graph whose replays do nothing).
* Only the capturing thread's CUDA calls may invalidate a capture (``thread_local``): in torch's
  default "global" mode a DataLoader's pin-memory thread allocating pinned memory mid-capture
  breaks it. ``make_graphed_callables`` takes the mode only in recent torch (2.14, not 2.11):
  :data:`GRAPHED_CALLABLES_THREAD_LOCAL` says whether callers must keep other threads quiet.
* A failed capture leaves the thread as it found it: torch's graph context ends an invalidated
  capture (which raises again: "operation failed due to a previous error during capture") before
  switching back from its side stream, so the current stream is restored here, and the message
  names the first error, not the second.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

CAPTURE_ERROR_MODE = "thread_local"
GRAPHED_CALLABLES_THREAD_LOCAL = ("capture_error_mode"
                                  in inspect.signature(torch.cuda.make_graphed_callables).parameters)


def graphed_callables_options() -> dict:
    """Keyword arguments of ``torch.cuda.make_graphed_callables`` for a thread-local capture."""
    return {"capture_error_mode": CAPTURE_ERROR_MODE} if GRAPHED_CALLABLES_THREAD_LOCAL else {}


@contextmanager
def capturing_on(device: torch.device):
    """Capture on ``device``; if the body raises, restore the thread's current stream."""
    with torch.cuda.device(device):
        previous = torch.cuda.current_stream(device)
        try:
            yield
        except BaseException:
            torch.cuda.set_stream(previous)
            raise


def capture_failure(exc: BaseException) -> str:
    """'Type: message' of the error that made a capture fail (the first of a chain)."""
    chain = [exc]
    while chain[-1].__context__ is not None and len(chain) < 4:
        chain.append(chain[-1].__context__)
    first = chain[-1]
    text = f"{type(first).__name__}: {str(first)[:240]}"
    if first is not exc:
        text += f" (ending the capture then raised {type(exc).__name__}: {str(exc)[:120]})"
    return text

"""Test setup. Triton kernels run on CPU under the interpreter when no GPU is present; the variable
must be set before triton is first imported, hence here, before any test module imports nern_fast."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

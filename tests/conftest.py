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


@pytest.fixture(scope="session", autouse=True)
def _oob_guards_everywhere():
    """NERN_FAST_TEST_OOB_GUARDS=1: every interpreted Triton launch of the session runs with +inf
    guards around its float tensors (tests/oob_guards.py): out-of-bounds reads show as failures."""
    if os.environ.get("NERN_FAST_TEST_OOB_GUARDS") != "1" or os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from oob_guards import oob_guards

    with oob_guards():
        yield

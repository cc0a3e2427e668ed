"""Guards around the float tensors of every Triton launch under the interpreter: out-of-bounds
reads made visible.

An out-of-bounds read in a kernel goes unnoticed under the interpreter (it reads whatever lies next
to the tensor) and on a GPU returns garbage or faults. With the guards on, every float tensor
argument of a launch is copied into the middle of a larger buffer filled with +inf (or NaN), the
kernel runs on that copy, and the copy is written back afterwards (outputs); a write outside the
copy (a changed guard) is an assertion error naming the argument. A value read past
either end of a tensor is then infinite and reaches the results: +inf survives the ReLUs (triton's
``tl.maximum`` drops a NaN operand, so a NaN guard can vanish at the first ReLU) and turns into NaN
at the first product with 0 — the way the padding rows' table reads of the first layer once leaked
into weight gradients (caught by these guards with that bug put back: the float64 gradcheck fails).

Used by tests/test_triton.py (representative decodes with padding rows, both fills) and for the
whole suite with ``NERN_FAST_TEST_OOB_GUARDS=1`` (tests/conftest.py: 536 passed with the guards on
at the commit that added them). Integer tensors (offsets, indices) are not guarded: a garbage index
would turn into a wild pointer rather than a visible value.
"""
from __future__ import annotations

import contextlib

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _guarded(t: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): ``view`` holds ``t``'s values (same shape and strides), the rest of
    ``buffer`` is ``fill``: 64 Ki elements or eight times the tensor on each side, whichever is more (a
    wrong row index reads a whole table further, not one element)."""
    span = t.untyped_storage().nbytes() // t.element_size()
    guard = max(1 << 16, 8 * span)
    buffer = torch.full((guard + span + guard,), fill, dtype=t.dtype, device=t.device)
    view = buffer.as_strided(t.shape, t.stride(), guard + t.storage_offset())
    view.copy_(t)
    return buffer, view


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def guarded_call(run, args: tuple, kwargs: dict, fill: float = float("inf")):
    """Call ``run(*args, **kwargs)`` with guarded copies of the float tensor arguments. Tensors that
    share storage with another argument (other than being the same object) are passed as they are:
    copying them apart would lose one of two overlapping writes."""
    tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    objects_per_storage: dict[int, set] = {}
    for t in tensors:
        objects_per_storage.setdefault(_storage_key(t), set()).add(id(t))
    copies: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # id -> (orig, buffer, view)
    for t in tensors:
        if (t.dtype in FLOAT_DTYPES and id(t) not in copies
                and len(objects_per_storage[_storage_key(t)]) == 1):
            copies[id(t)] = (t, *_guarded(t, fill))

    def swap(v):
        return copies[id(v)][2] if isinstance(v, torch.Tensor) and id(v) in copies else v

    result = run(*[swap(a) for a in args], **{k: swap(v) for k, v in kwargs.items()})
    for position, (original, buffer, view) in enumerate(copies.values()):
        _assert_untouched_outside(buffer, view, fill, position)
        # through .data: an input written back unchanged keeps its autograd version
        original.data.copy_(view)
    return result


def _assert_untouched_outside(buffer: torch.Tensor, view: torch.Tensor, fill: float, position: int) -> None:
    """Every element of ``buffer`` outside ``view`` still holds ``fill``: nothing was written out of
    bounds."""
    outside = torch.ones(buffer.shape, dtype=torch.bool, device=buffer.device)
    outside.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(False)
    rest = buffer[outside]
    same = torch.isnan(rest) if fill != fill else rest == fill
    if not bool(same.all()):
        raise AssertionError(f"a kernel wrote {int((~same).sum())} values outside float tensor argument "
                             f"#{position} (shape {tuple(view.shape)})")


@contextlib.contextmanager
def oob_guards(fill: float = float("inf")):
    """Guard every interpreted Triton launch inside the block with ``fill``."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return guarded_call(lambda *a, **k: original(self, *a, grid=grid, warmup=warmup, **k), args, kwargs,
                            fill)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original

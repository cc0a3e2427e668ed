"""The ``conv.weight`` an attached model shows between forwards: shape and dtype, no values.

A plain ``meta`` tensor would answer shape queries but also let ``F.conv2d(x, conv.weight)`` (code
that reads a conv's weight outside the conv's own forward: fusions, tracers, hand-written layers)
return an uninitialised result without a word. A ``RepresentedWeight`` answers metadata queries and
refuses every computation with an error that says what to do. Its dtype is the conv's dtype now,
also when the model's dtype changed since the last forward (``model.double()`` while attached).
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

_T = torch.Tensor
# What a placeholder answers: metadata (no values read), and what state_dict / copy / repr need.
# Properties arrive as their getters (``Tensor.shape.__get__``).
_METADATA = {
    _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.ndim.__get__, _T.is_meta.__get__,
    _T.layout.__get__, _T.requires_grad.__get__, _T.is_cuda.__get__, _T.is_cpu.__get__,
    _T.is_sparse.__get__, _T.is_quantized.__get__, _T.is_leaf.__get__,
    _T.grad.__get__, _T.grad_fn.__get__,
    _T.size, _T.dim, _T.numel, _T.nelement, _T.element_size, _T.stride, _T.is_contiguous,
    _T.is_floating_point, _T.is_complex, _T.get_device, _T.detach,
    _T.__repr__, _T.__format__, _T.__hash__, _T.__len__,
}


class AttachError(RuntimeError):
    """A model that cannot be attached or detached as asked (already attached, not attached, ...)."""


class AttachedWeightError(AttachError):
    """A computation on the placeholder of a represented conv weight (it has no values)."""


class RepresentedWeight(torch.Tensor):
    """Meta tensor standing in for a represented conv's weight (see the module docstring)."""

    _nern_fast_name: str
    _nern_fast_current: Optional[Callable[[], Optional[torch.Tensor]]]

    @staticmethod
    def make(shape, dtype: torch.dtype, name: str,
             current: Optional[Callable[[], Optional[torch.Tensor]]] = None) -> "RepresentedWeight":
        """``current()`` gives the conv's placeholder now (None once detached): a placeholder
        kept from before a dtype change answers with the current one's metadata."""
        weight = torch.Tensor._make_subclass(RepresentedWeight, torch.empty(shape, dtype=dtype, device="meta"))
        weight._nern_fast_name = name
        weight._nern_fast_current = current
        return weight

    def __deepcopy__(self, memo):
        return RepresentedWeight.make(self.shape, self.dtype, self._nern_fast_name)

    def __reduce_ex__(self, protocol):
        raise AttachedWeightError(
            f"'{self._nern_fast_name}.weight' is represented by a predictor (the model is attached) and "
            f"cannot be pickled (torch.save(model), multiprocessing): save model.state_dict() (it holds "
            f"the decoded weights), or detach first; nern_fast.save_compressed(model, pred, path) "
            f"stores the model compressed")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args and isinstance(args[0], RepresentedWeight) else None
        if func in _METADATA and self is not None:
            current = self._nern_fast_current() if self._nern_fast_current is not None else None
            if current is not None and current is not self:
                self = current
            with torch._C.DisableTorchFunctionSubclass():
                return func(self, *args[1:], **kwargs)  # plain tensors out (detach: a meta tensor)
        placeholder = self if self is not None else next(
            (a for a in _flat(args, kwargs) if isinstance(a, RepresentedWeight)), None)
        weight = ("a represented conv weight" if placeholder is None
                  else f"'{placeholder._nern_fast_name}.weight'")
        name = getattr(func, "__name__", str(func))
        if name in ("__get__", "__set__"):  # a property
            name = f"{'reading' if name == '__get__' else 'setting'} .{func.__self__.__name__}"
        else:
            name = f"{name}()"
        raise AttachedWeightError(
            f"{weight} is represented by a predictor (the model is "
            f"attached): it has no values outside the conv's own forward, so {name} on it cannot "
            f"run. Call the module (conv(x)) instead of using its weight directly, read the decoded "
            f"weights with model.state_dict(), or detach first (pred.detach(model))")


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def current_placeholder(attachment, i: int) -> Callable[[], Optional[torch.Tensor]]:
    """``current`` for :meth:`RepresentedWeight.make`: the attachment's placeholder of conv ``i``
    after it looked at the model's dtype; None once the attachment is gone (weak reference)."""
    ref = weakref.ref(attachment)

    def current() -> Optional[torch.Tensor]:
        owner = ref()
        if owner is None or not owner.attached:
            return None
        owner._sync_model()
        return owner._placeholders[i]
    return current

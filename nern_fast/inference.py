"""On-demand inference: run a network whose represented conv weights exist only as a predictor.

The API (stable; ``bench/inference_forward.py`` and the CLI use it)::

    model = pred.attach(model, mode="on_demand", cache_bytes=None, prefetch=True, graphs=False,
                        group_bytes=None, workspace_bytes=None)
    with torch.inference_mode():
        logits = model(x)                 # the user's forward code is unchanged
    attachment(model).stats              # decodes, cache hits, prefetches, held bytes, ...
    model = pred.detach(model)            # ordinary nn.Parameters again, holding the decoded values

    prepare_for_inference(model, pred, mode="on_demand", device="cuda")  # one call for CLIs

``attach`` works in place on ``model`` (same object, same module tree) and returns it. Modes:

* ``"on_demand"``: no represented conv weight is stored. A forward pre-hook on each represented conv
  decodes its weight right before the conv runs, together with the rest of its *decode group*
  (below); the group is dropped when a conv of another group needs its weights, and at the end of
  the forward (a forward hook puts the placeholder back after each conv). Weight memory: one group
  (plus, on CUDA with ``prefetch``, the next group being decoded on a side stream: at most two).
* ``"cached"``: as on_demand, but decoded layers are pinned up to ``cache_bytes`` bytes (``None``:
  no limit): a layer decoded while it still fits in what is left of the budget stays decoded across
  forwards, the others are decoded on demand every time. Nothing is ever evicted: the convs run in
  the same order every forward, where an LRU cache smaller than the network would evict every
  layer just before its next use and hit nothing. The cache fills during forwards (the first
  forward decodes every group in call order and pins each group's layers that still fit, so the
  first layers that fit are pinned), not at attach. A pinned layer has storage of its own.
* ``"materialized"``: every layer is decoded once, at attach time (the baseline).

Decode groups (:mod:`nern_fast.inference_groups`): consecutive represented layers (layout order)
decoded by one backend call, each group holding at most ``group_bytes`` bytes of weights (a larger
layer is a group of its own). A decode's GPU cost is mostly fixed per call, so fewer, larger calls
are what on-demand inference needs on a GPU (ResNet-56 at H=280: 54 calls → 6 with the default). The
default (``group_bytes=None``) is half of (largest layer + predictor), which keeps two groups — the
one the convs read and a prefetched one — within the on-demand bound of largest layer + predictor;
``group_bytes=0`` decodes one layer per call (each conv's weight exactly while it runs). Groups
follow the layout's order (the order convs are registered in the model); a model that runs its convs
in another order may decode a group more than once per forward (``stats["decodes"]`` shows it): pass
``group_bytes=0`` there. A group's weights are views of one decode output where the layout allows
(no crop to a smaller kernel, the convs' dtype); weights that are kept (cached pins, materialized,
``state_dict``, ``detach``) get storage of their own.

Decoder scratch (``workspace_bytes``): a decode call also allocates working memory of its own, on
top of the weights counted above. The Triton fused schedule holds the separable first-layer tables
and per-program scratch of BM rows × 2·H (+ the encoding's width with the direct first layer), its
programs at most one per BM rows of the call and a few per SM: a few MB for a layer-sized call, tens
of MB for a call that fills a large GPU (not bounded by ``workspace_bytes``). The Triton chunked
schedule (large hidden sizes) and the CUDA decoder of ``csrc`` run the MLP over chunks of rows whose
activations take up to 256 MB and 1 GiB by default (H200, commit 4d93b57, Triton tf32: an on-demand
ResNet-18 forward at H=1256, batch 1, needed 324 MB above its inputs against 55 MB materialized;
README's GPU table). ``workspace_bytes=N`` caps that scratch per decode call for the backends that
size it (``bounded_workspace``: at least one chunk or tile of rows whatever N; smaller chunks mean
more, smaller launches). ``None`` keeps the backends' defaults. It applies to every decode of the
attachment, so the modes still decode with the same calls.

Every mode decodes a group with the same call (a row slice of ``pred.decode_kernels``, under
``no_grad``, cast to the convs' original dtype), so the outputs of the three modes are identical for
the same backend, precision and groups. (A group's call decodes other rows than
``pred.decode_layer(i)``'s, so the values can differ from it in the last bits where the backend's
arithmetic depends on the call's size.) A :class:`LayerDecoder` makes that call straight to the
backend: the row indices of every layer, the input checks and the backend choice are made once per
device, dtype, precision and backend setting instead of at every conv (the per-layer host time is
what on_demand costs over materialized), and the decodes of one forward share one preparation of the
parameters (Triton: the packed weights and the first-layer tables, made by the first decode; see
LayerDecoder).

Prefetch (CUDA only; ignored on CPU): the first complete forward after attach records the order in
which the represented convs run (a conv called twice appears twice). In later forwards, as soon as
the first conv of a group has been launched on the current stream, the group of the next call that
reads another group is decoded on a side stream (which first waits for an event recorded just before
that conv, so it overlaps the convs of the current group); the conv that needs it waits for the
decode's event, and ``record_stream`` keeps the caching allocator from reusing the weights' memory
while the current stream still reads them. The two events are
created once and re-recorded (at most one prefetch is in flight; a wait uses the event's latest
record at the time it is enqueued). A forward that takes another path than the recorded one
decodes synchronously (and records the new order). Nothing prefetched outlives a forward of the
root model. Prefetch hides decode *GPU* time behind the convs; when the host is the bottleneck
(small layers, batch 1), it cannot help.

CUDA graphs (``graphs=True``; CUDA, on_demand and cached modes; ignored on CPU and in materialized
mode): with autograd off, each group's decode is captured once in a CUDA graph and replayed into
one of two static buffers of the largest group's size, so a decode costs a graph replay's few
microseconds of host time instead of the backend's Python path (the bound of on_demand on small
layers). Weight memory is then those two buffers (counted in ``held_bytes``) plus the graphs' shared
working pool. The first forward that decodes a group captures it (one eager decode, then the capture:
milliseconds per group, once). Details, limits and the fallback: ``nern_fast.inference_graphs``.

While attached:

* ``conv.weight`` of a represented conv is a placeholder (``RepresentedWeight``, a ``meta`` tensor)
  with the original shape and the conv's dtype (so shape queries such as
  ``WeightLayout.check_model`` still work); the real weight exists only while the conv runs. Any
  computation on the placeholder (``F.conv2d(x, conv.weight)``, ``conv.weight.data``, a fusion that
  reads the weight) raises ``AttachedWeightError`` (an ``AttachError``) instead of returning an
  uninitialised result: call the module, read ``model.state_dict()``, or detach. ``model.parameters()`` no longer yields the represented weights (they
  are not stored), so ``sum(p.numel() for p in model.parameters())`` counts what is stored.
* ``model.state_dict()`` is a complete ordinary state dict: the represented weights are decoded
  into it (detached), so it loads into a plain model. Loading a state dict *with* represented
  weights into an attached model is an error (detach first); loading one without them (the
  unrepresented parameters and buffers) works.
* Decoding happens under ``no_grad`` and outside inference mode, so the decoded weights are ordinary
  tensors: the model runs under ``torch.inference_mode()``, under ``no_grad``, and with gradients
  with respect to its inputs or its unrepresented parameters (never the predictor: train it with
  ``pred()``). With grad enabled, autograd keeps the weights a conv saved for backward alive.
* Move the predictor and the model together, before attaching (``prepare_for_inference`` does):
  ``attach`` chooses the decode backend, the prefetch stream and the graphs for the predictor's
  device then, and is all or nothing — a backend that cannot decode there refuses the attach, and
  a failure midway gives the convs their own weights back. A decoded weight is moved to its input's
  device and cast to its input's dtype if they differ, which works but copies every call (a model
  made half precision with its BatchNorms kept in float32 runs so). ``detach`` decodes before it changes
  anything: when it cannot, the model stays attached as it was. Moved after attaching
  (``model.cuda()``, ``model.to(device)``), the represented weights follow the model's device in
  ``state_dict`` and ``detach``; a predictor moved off the device it was attached on decodes
  without prefetch.
* An exception (even Ctrl-C) in the middle of a forward leaves nothing broken: hooks restore the
  placeholders, and the next forward of the root model starts from a clean state.
* A represented conv weight that another module holds too (``b.weight = a.weight``, ``b`` not
  represented) stays that module's Parameter, holding the decoded values; ``detach`` keeps the tie.
* ``model.to(dtype)`` / ``.double()`` / ``.half()`` while attached: the represented weights follow
  the dtype the model's other parameters took (converted per call; a conv's placeholder shows it
  at once) in forwards, ``state_dict`` and ``detach``.
* Hooks of the user's on a represented conv: a forward pre-hook registered after attach and every
  forward hook (the attachment moves its own, which puts the placeholder back, after them at each
  call) see the decoded weight; a pre-hook that runs before the attachment's (registered before
  attach, or with ``prepend=True``) sees the placeholder.
* ``torch.compile`` of an attached model runs: the attachment's hooks run eagerly (a graph break at
  each represented conv, ``torch.compiler.disable``) and the compiled parts read the weight the
  hook set, so every mode's outputs are what the eager model gives (checked with dynamo on the CPU;
  the first attach of a process imports dynamo for this, a second or so). ``fullgraph=True``
  refuses those graph breaks, naming the reason.
* Not supported while attached: ``torch.jit.trace``, ``torch.jit.script`` and ``torch.export``
  of the model or a module inside it, ``copy.deepcopy`` and pickling of the model or a module
  inside it (all raise AttachError; a copied submodule would keep running the original's hooks),
  several threads running the same attached model. Detach first.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from . import ops
from .inference_graphs import GraphedDecodes
from .inference_groups import check_group_bytes, groups_for
from .inference_placeholder import AttachedWeightError, AttachError, RepresentedWeight, current_placeholder

MODES = ("on_demand", "cached", "materialized")
_ATTR = "_nern_fast_attachment"
_local = threading.local()


@contextlib.contextmanager
def represented_as_placeholders() -> Iterator[None]:
    """Within this block, ``state_dict()`` of an attached model holds the ``meta`` placeholders of
    the represented weights (shape and dtype, no decode), e.g. to list a model's entries cheaply."""
    previous = getattr(_local, "placeholders", False)
    _local.placeholders = True
    try:
        yield
    finally:
        _local.placeholders = previous


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is a view into a larger buffer (a decode group's output): a
    kept weight must not keep its whole group alive, nor share storage with other weights."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == _nbytes(t):
        return t
    with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, as the decode's
        return t.clone()


class _AttachmentHook:
    """A hook an attachment registers on the model or a represented conv: calls
    ``method(index, *hook arguments)`` (``method(*hook arguments)`` without an index).

    * ``torch.compile`` runs it eagerly (a graph break at each hook): traced by dynamo, the decode
      and the placeholder swaps fail deep inside it; run eagerly, the compiled parts between the
      hooks read the decoded weight the hook set on the conv.
    * Copying or pickling a module that carries it raises :class:`AttachError`: the model's own
      refusal (``Attachment.__deepcopy__``) does not cover a module *inside* an attached model,
      whose copy would keep running the original attachment's hooks (still decoding from the
      predictor after the original is detached) and whose pickling failed on a local function.
    """

    def __init__(self, method, index: Optional[int] = None):
        self.method = method
        self.index = index
        self._call = _eager_caller()

    def __call__(self, *args):
        return self._call(self.method, self.index, args)

    def __deepcopy__(self, memo):
        raise AttachError(_DEEPCOPY_MESSAGE)

    def __reduce_ex__(self, protocol):
        raise AttachError(_PICKLE_MESSAGE)


def _call_hook(method, index: Optional[int], args: tuple):
    return method(*args) if index is None else method(index, *args)


_EAGER_CALLER: list = []


def _eager_caller():
    """``_call_hook`` wrapped by ``torch.compiler.disable`` (made at the first attach: importing
    dynamo takes a second or more, which a process that never attaches should not pay)."""
    if not _EAGER_CALLER:
        reason = ("nern_fast: an attached model's decode hooks run outside the compiled graphs (a graph "
                  "break at each represented conv), which fullgraph=True refuses; detach the model "
                  "(pred.detach(model)) to compile it whole")
        try:
            caller = torch.compiler.disable(_call_hook, reason=reason)
        except TypeError:  # a torch without disable(reason=)
            caller = torch.compiler.disable(_call_hook)
        _EAGER_CALLER.append(caller)
    return _EAGER_CALLER[0]


_DEEPCOPY_MESSAGE = ("copy.deepcopy of an attached model (or of a module inside it) is not supported: "
                     "detach it (pred.detach(model)), copy it, then attach the original and the copy")
_PICKLE_MESSAGE = ("an attached model (or a module inside it) cannot be pickled (torch.save(model), "
                   "multiprocessing): save model.state_dict() (it holds the decoded weights), or detach "
                   "first; nern_fast.save_compressed(model, pred, path) stores it compressed")


def _refuse_tracing() -> None:
    """torch.jit.trace and torch.export record a forward as a graph: through the decode hooks they
    failed deep inside the decoder (a tensor that requires grad inserted as a constant, a
    data-dependent guard) or would bake the decoded weights in as constants. Say what to do."""
    if torch.jit.is_tracing():
        what = "torch.jit.trace"
    elif torch.compiler.is_exporting() or torch.compiler.is_compiling():
        # (torch.compile never gets here: the hooks run eagerly, see _AttachmentHook)
        what = "torch.export"
    else:
        return
    raise AttachError(f"{what} of an attached model is not supported (its represented conv weights "
                      f"are decoded by hooks at every forward): detach first (pred.detach(model): "
                      f"ordinary Parameters holding the decoded weights) and {what.split('.')[-1]} "
                      f"that model; torch.compile runs an attached model (the decodes run eagerly)")


class LayerDecoder:
    """``pred.decode_layer(i)`` without the per-call work that cannot change between two convs.

    ``pred.decode_layer`` builds the layer's row indices (an ``arange`` launch on the device), checks
    the inputs (on CUDA, a device-side range assertion: several launches) and asks every backend
    whether it takes the call. Here the rows of all layers are one ``arange`` per device (each
    layer a view of it), and the checks and the backend choice run once per (device, dtype,
    precision, backend setting); the decode itself is the same backend call with the same
    arguments, so the values are identical to ``pred.decode_layer(i)``.

    Packing once per forward: a backend with ``prepare`` (Triton: the parameters packed as its
    kernels read them, tf32-rounded or bf16 copies) does that work at every call, i.e. once per
    layer. Between
    :meth:`share_preparation` ``(True)`` and ``(False)`` — an attachment brackets each forward of
    its root model, during which the parameters cannot change — the first decode prepares and the
    others reuse it. ``decode(i, prepared=...)`` takes a set made elsewhere (the CUDA graphs' static
    one, :meth:`prepare`).
    """

    def __init__(self, pred, groups: Optional[Sequence[range]] = None, workspace_bytes: Optional[int] = None):
        self.pred = pred
        self.workspace_bytes = workspace_bytes  # passed to backends with bounded_workspace
        layers = pred.layout.layers
        self.groups = list(groups) if groups is not None else [range(i, i + 1) for i in range(len(layers))]
        # A group's output splits into its layers' weights without copies when every layer uses
        # the full output width (no crop to a smaller kernel).
        width = pred.layout.kernel_size ** 2
        self._compact = [all(layers[i].size ** 2 == width for i in g) for g in self.groups]
        self._key = None
        self._rows: list[torch.Tensor] = []
        self._group_rows: list[torch.Tensor] = []
        self._backend = None
        self._sharing = False
        self._shared = None  # the prepared set shared by this forward's decodes
        self._shared_streams: set = set()  # side streams already marked as reading it

    def _select(self, weights: list, biases: list) -> None:
        pred, layout = self.pred, self.pred.layout
        device = weights[0].device
        rows = torch.arange(layout.num_kernels, device=device)
        ops.check_decode_inputs(weights, biases, layout, pred.encoding, rows)
        request = ops.make_request(weights, layout, pred.encoding, rows, pred.precision)
        self._backend = ops.select_backend(request, pred.backend)
        self._rows = [rows[l.kernel_offset:l.kernel_offset + l.num_kernels] for l in layout.layers]
        layers = layout.layers
        self._group_rows = [rows[layers[g.start].kernel_offset:
                                 layers[g.stop - 1].kernel_offset + layers[g.stop - 1].num_kernels]
                            for g in self.groups]

    def _parameters(self) -> tuple[list, list]:
        """The predictor's parameters, with the backend chosen for them (again when the device,
        dtype, precision, backend setting or grad mode changed)."""
        pred = self.pred
        weights, biases = pred.weights(), pred.biases()
        w0 = weights[0]
        key = (w0.device, w0.dtype, pred.precision, ops.requested_backend_name(pred.backend),
               torch.is_grad_enabled())
        if key != self._key:
            self._key = None
            self._shared = None
            self._shared_streams.clear()  # the next set's memory must be marked for them again
            self._select(weights, biases)
            self._key = key
        return weights, biases

    def backend_name(self) -> str:
        """The backend chosen for the current parameters (BackendUnavailable if none can decode)."""
        self._parameters()
        return self._backend.name

    @property
    def prepares(self) -> bool:
        """Whether the backend chosen for the current parameters has a ``prepare``."""
        self._parameters()
        return hasattr(self._backend, "prepare")

    def prepare(self):
        """A prepared set of the current parameters (the backend's ``prepare``), or None when the
        backend has nothing to prepare; call under ``no_grad``."""
        weights, biases = self._parameters()
        if not hasattr(self._backend, "prepare"):
            return None
        pred = self.pred
        return self._backend.prepare(weights, biases, pred.layout, pred.encoding, pred.precision)

    def share_preparation(self, on: bool) -> None:
        """Start (True) or end (False) a stretch of decodes that share one prepared set: the
        parameters must keep their values until it ends. Either way the previous set is dropped."""
        self._sharing = bool(on)
        self._shared = None
        self._shared_streams.clear()

    def shared_preparation(self):
        """The prepared set the decodes now share (made now if needed), or None (not sharing, or
        a backend without ``prepare``)."""
        if not self._sharing:
            return None
        if self._shared is None:
            self._shared = self.prepare()
        return self._shared

    def shared_used_on(self, stream) -> None:
        """Decodes on ``stream`` (a CUDA stream other than the one the set was made on) read the
        shared set: keep its memory from being reused before that stream is done with it."""
        shared = self._shared
        if shared is None or stream in self._shared_streams:
            return
        self._shared_streams.add(stream)
        for t in shared.params:  # (a decode's first-layer tables are made on the stream that reads them)
            t.record_stream(stream)

    def _decode_rows(self, weights: list, biases: list, rows: torch.Tensor, layers: range,
                     prepared) -> torch.Tensor:
        pred = self.pred
        if prepared is None and self._sharing:
            prepared = self.shared_preparation()
        extra = {} if prepared is None else {"prepared": prepared}
        if self.workspace_bytes is not None and getattr(self._backend, "bounded_workspace", False):
            extra["workspace_bytes"] = self.workspace_bytes
        if getattr(self._backend, "takes_layer_range", False):
            extra["layers"] = layers  # e.g. first-layer tables of these layers, not the network's
        return self._backend.decode(weights, biases, pred.layout, pred.encoding, rows, pred.precision,
                                    **extra)

    def _layer_view(self, i: int, out: torch.Tensor, first_row: int) -> torch.Tensor:
        layer = self.pred.layout.layers[i]
        s2 = layer.size * layer.size
        start = layer.kernel_offset - first_row
        out = out[start:start + layer.num_kernels]
        return (out if s2 == out.shape[1] else out[:, :s2]).reshape(layer.shape)

    def __call__(self, i: int, prepared=None) -> torch.Tensor:
        """Layer ``i``'s conv weight (C_out, C_in, s, s), decoding that layer's rows alone; call
        under ``no_grad``."""
        weights, biases = self._parameters()  # (first: the rows are rebuilt for a new device)
        out = self._decode_rows(weights, biases, self._rows[i], range(i, i + 1), prepared)
        return self._layer_view(i, out, self.pred.layout.layers[i].kernel_offset)

    def group_output(self, g: int, prepared=None) -> torch.Tensor:
        """The backend's output for group ``g``'s rows, (kernels, k*k); call under ``no_grad``."""
        weights, biases = self._parameters()
        return self._decode_rows(weights, biases, self._group_rows[g], self.groups[g], prepared)

    def split(self, g: int, out: torch.Tensor) -> list[torch.Tensor]:
        """Group ``g``'s output as its layers' conv weights (views of ``out``)."""
        first = self.pred.layout.layers[self.groups[g].start].kernel_offset
        return [self._layer_view(i, out, first) for i in self.groups[g]]

    def is_compact(self, g: int) -> bool:
        """Whether group ``g``'s output, flattened, is its layers' weights back to back."""
        return self._compact[g]

    def decode_group(self, g: int, prepared=None) -> list[torch.Tensor]:
        """The conv weights of group ``g``'s layers, decoded by one call (views of its output)."""
        return self.split(g, self.group_output(g, prepared))


class Attachment:
    """The state of one attached model: hooks, stored/cached/prefetched weights and statistics.

    ``stats`` (a dict, reset with :meth:`reset_stats`): ``decodes`` (decode calls run: one per
    decode group, see :mod:`nern_fast.inference_groups`), ``cache_hits``, ``prefetched`` (decodes
    taken from a prefetch), ``prefetch_dropped`` (prefetches never used), ``graph_replays`` (decodes
    replayed from a CUDA graph, counted in ``decodes`` too), ``graph_captures``, ``held_bytes``
    (decoded weight bytes alive now: stored, cached, the group the running convs read, a prefetched
    group, and the graphs' two static slots), ``peak_held_bytes`` and ``cached_bytes``.
    """

    def __init__(self, pred, model: nn.Module, mode: str, cache_bytes: Optional[int], prefetch: bool,
                 graphs: bool = False, group_bytes: Optional[int] = None,
                 workspace_bytes: Optional[int] = None):
        self.pred = pred
        self.model = model
        self.mode = mode
        self.cache_bytes = cache_bytes
        layout = pred.layout
        modules = dict(model.named_modules())
        self.convs: list[nn.Conv2d] = [modules[l.name] for l in layout.layers]
        self.names = [l.name for l in layout.layers]
        self._params = [(c.weight.dtype, c.weight.device, c.weight.requires_grad) for c in self.convs]
        self._param_order = [list(c._parameters) for c in self.convs]  # restored by detach
        self._handles: list = []  # hooks, once installed (attached): before the placeholders, which ask
        self._placeholders = [self._placeholder(i, c.weight.dtype) for i, c in enumerate(self.convs)]
        # model.to(dtype / device) / .double() / .half() / .cuda() while attached: the represented
        # weights follow the model's dtype and device, as seen on a witness (its first floating
        # tensor that is not represented).
        self._dtype_now = [dtype for dtype, _, _ in self._params]
        self._device_now = [device for _, device, _ in self._params]
        self._witness = _find_witness(model, {id(c.weight) for c in self.convs})
        self._witness_seen = None if self._witness is None else self._witness[2:]
        self.layer_bytes = [l.num_weights * p.element_size()
                            for l, p in zip(layout.layers, self._placeholders)]
        self.group_bytes, self.groups = groups_for(self.layer_bytes, self.predictor_bytes, group_bytes)
        self.group_of = [g for g, group in enumerate(self.groups) for _ in group]
        self.device = pred.layers[0].weight.device
        self.prefetch = bool(prefetch) and self.device.type == "cuda" and mode != "materialized"
        self._side_stream = torch.cuda.Stream(self.device) if self.prefetch else None
        self._prefetching = False  # this forward prefetches: the predictor is on self.device
        self._events = None  # (ready, done): created at the first prefetch, then re-recorded
        self.workspace_bytes = workspace_bytes
        self._decoder = LayerDecoder(pred, self.groups, workspace_bytes)
        # CUDA graphs of the group decodes (nern_fast.inference_graphs): CUDA, on_demand/cached.
        self._graphed = None
        if graphs and self.device.type == "cuda" and mode != "materialized":
            self._graphed = GraphedDecodes(self._decoder, layout.layers,
                                           [dtype for dtype, _, _ in self._params], self.device)
        self._store: "OrderedDict[int, torch.Tensor]" = OrderedDict()  # all layers, or the pinned ones
        self._store_bytes = 0
        self._current = None  # (group, weights, graph slot or None, held bytes): the group convs read now
        self._running: set[int] = set()  # convs whose decoded weight is set on them (running)
        self._pending = None  # (group, position, weights, event, graph slot, held bytes): a prefetch not yet used
        self._planned = None  # (group, call position, event): to prefetch once the running conv is launched
        self._order: Optional[tuple[int, ...]] = None  # conv call order of the last complete forward
        self._next_group_call: list = []  # per call position: the next position reading another group
        self._trace: list[int] = []
        self._in_forward = False
        self._state_dicting = False  # inside the root's state_dict(): one decode per group
        self._state_group = None  # (group, weights) decoded for the state dict's last conv
        self.stats: dict[str, int] = {}
        self.reset_stats()

    # ------------------------------------------------------------------ public
    @property
    def largest_layer_bytes(self) -> int:
        return max(self.layer_bytes)

    @property
    def largest_group_bytes(self) -> int:
        return max(sum(self.layer_bytes[i] for i in group) for group in self.groups)

    @property
    def predictor_bytes(self) -> int:
        return sum(_nbytes(p) for p in self.pred.parameters())

    @property
    def graphs_disabled(self) -> Optional[str]:
        """Why CUDA graphs were turned off after a failed capture (None: on, or never asked)."""
        return self._graphed.disabled if self._graphed is not None else None

    @property
    def cached_layers(self) -> list[int]:
        """Layer indices held in the store, in the order they were stored."""
        return list(self._store)

    def reset_stats(self) -> None:
        held = self._held_bytes()
        self.stats = {"decodes": 0, "cache_hits": 0, "prefetched": 0, "prefetch_dropped": 0,
                      "graph_replays": 0, "graph_captures": 0, "held_bytes": held,
                      "peak_held_bytes": held, "cached_bytes": self._store_bytes}

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        """Replace the represented convs' weights by the predictor's decodes. All or nothing: the
        backend is chosen first (one that cannot decode refuses here), and a failure or interrupt
        midway (a materialized decode, a hook) gives the convs their own Parameters back."""
        self._decoder.backend_name()
        originals = [conv._parameters["weight"] for conv in self.convs]
        # A represented weight Parameter that another module holds too (tied weights) stays that
        # module's: it gets the decoded values (restored on failure), and detach gives the conv that
        # same Parameter back, so the tie survives.
        self._tied = {i: originals[i] for i in self._tied_weights(originals)}
        kept = {i: p.detach().clone() for i, p in self._tied.items()}
        try:
            self._write_tied()
            self._install()
        except BaseException:
            self._release()
            with torch.no_grad():
                for i, value in kept.items():
                    originals[i].copy_(value)
            self._set_parameters(originals)
            raise

    def _tied_weights(self, weights: list) -> list[int]:
        """Indices of represented weights that a module other than their conv also holds."""
        by_id = {id(w): i for i, w in enumerate(weights)}
        convs = {id(c) for c in self.convs}
        return sorted({by_id[id(p)] for m in self.model.modules() if id(m) not in convs
                       for p in m._parameters.values() if p is not None and id(p) in by_id})

    @torch.no_grad()
    def _write_tied(self, weights: Optional[list] = None) -> None:
        """Decoded values into the tied Parameters (``weights``: already decoded, per conv); decoded
        by the same group calls as the forward's, so both modules see the same bits."""
        if weights is None and self._tied:
            weights = [None] * len(self.convs)
            with self._sharing_preparation():
                for g in sorted({self.group_of[i] for i in self._tied}):
                    for i, w in zip(self.groups[g], self._decode_group(g)):
                        weights[i] = w
        for i, param in self._tied.items():
            param.copy_(weights[i].to(dtype=param.dtype, device=param.device))

    def _install(self) -> None:
        for i, conv in enumerate(self.convs):
            del conv.weight  # drops the Parameter: the predictor now holds this layer
            conv.__dict__["weight"] = self._placeholders[i]
        if self.mode == "materialized":
            with self._sharing_preparation():
                for g in range(len(self.groups)):
                    self._pin_group(g, self._decode_group(g))
        root = self.model
        # torch.jit.script compiles a module's hooks, and failed on these with an AttributeError:
        # its __prepare_scriptable__ (called on every module first) says what to do instead.
        for module in (root, *self.convs):
            module.__dict__["__prepare_scriptable__"] = self._refuse_scripting
        hook = _AttachmentHook  # (objects, not bound methods: torch marks post hooks with an attribute)
        self._handles.append(root.register_forward_pre_hook(hook(self._root_start)))
        self._handles.append(root.register_forward_hook(hook(self._root_done)))
        self._handles.append(root.register_forward_hook(hook(self._root_cleanup), always_call=True))
        self._handles.append(root.register_state_dict_pre_hook(hook(lambda *args: self._state_dict_start())))
        self._handles.append(root.register_state_dict_post_hook(hook(lambda *args: self._state_dict_end())))
        self._after_ids = []  # each conv's _after_conv hook: moved last at each call (_before_conv)
        for i, conv in enumerate(self.convs):
            self._handles.append(conv.register_forward_pre_hook(hook(self._before_conv, i)))
            after = conv.register_forward_hook(hook(self._after_conv, i), always_call=True)
            self._handles.append(after)
            self._after_ids.append(after.id)
            self._handles.append(conv.register_state_dict_post_hook(hook(self._state_dict, i)))
            self._handles.append(conv.register_load_state_dict_pre_hook(hook(self._load, i)))
        self._update_held()

    # copy.deepcopy would copy this state but not the hooks (they would keep running the
    # original's), and pickling fails on them: say what to do instead (_AttachmentHook says the same
    # for a module inside the model).
    def __deepcopy__(self, memo):
        raise AttachError(_DEEPCOPY_MESSAGE)

    def __reduce_ex__(self, protocol):
        raise AttachError(_PICKLE_MESSAGE)

    def _refuse_scripting(self):
        raise AttachError("torch.jit.script of an attached model (or of a module inside it) is not "
                          "supported (its represented conv weights are decoded by hooks at every "
                          "forward): detach first (pred.detach(model): ordinary Parameters holding the "
                          "decoded weights) and script that model")

    def remove(self) -> None:
        """Remove every hook and give each represented conv an ordinary Parameter (decoded values).
        The weights are decoded before anything changes: a decode that fails leaves the model
        attached as it was."""
        self._drop_pending()
        self._drop_current()
        self._state_group = None
        self._sync_model()
        weights: list = [self._store.get(i) for i in range(len(self.convs))]
        try:
            with self._sharing_preparation():
                for g, group in enumerate(self.groups):
                    if any(weights[i] is None for i in group):
                        for i, weight in zip(group, self._decode_group(g)):
                            if weights[i] is None:
                                weights[i] = _own(weight)
        except Exception as exc:
            raise AttachError(f"detach could not decode the represented weights ({type(exc).__name__}: "
                              f"{exc}); the model is still attached, unchanged: make the predictor "
                              f"decodable (e.g. pred.backend = 'eager', or the {ops.ENV_BACKEND} "
                              f"environment variable) and detach again") from exc
        self._release()
        self._write_tied(weights)
        self._set_parameters([self._tied[i] if i in self._tied else
                              nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=requires_grad)
                              for i, (weight, dtype, device, (_, _, requires_grad))
                              in enumerate(zip(weights, self._dtype_now, self._device_now, self._params))])

    def _sync_model(self) -> None:
        """Follow a dtype or device change of the model since the last look (``_find_witness``): the
        convs that had the witness's dtype at attach take its new one (placeholders included), those
        that had its device its new device (where state_dict and detach put their weights; a
        forward moves a decoded weight to its input's device anyway)."""
        if self._witness is None:
            return
        kind, name, attached_dtype, attached_device = self._witness
        tensor = (self.model.get_parameter if kind == "parameter" else self.model.get_buffer)(name)
        now = (tensor.dtype, tensor.device)
        if now == self._witness_seen:
            return
        self._witness_seen = now
        for i, (dtype, device, _) in enumerate(self._params):
            if device == attached_device:
                self._device_now[i] = now[1]
            if dtype == attached_dtype and self._dtype_now[i] != now[0]:
                self._dtype_now[i] = now[0]
                self._placeholders[i] = self._placeholder(i, now[0])
                if i not in self._running:
                    self.convs[i].__dict__["weight"] = self._placeholders[i]

    def _placeholder(self, i: int, dtype: torch.dtype) -> RepresentedWeight:
        return RepresentedWeight.make(self.pred.layout.layers[i].shape, dtype, self.names[i],
                                      current_placeholder(self, i))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _release(self) -> None:
        """Remove the hooks and graphs and drop every decoded weight held."""
        if self._graphed is not None:
            self._graphed.close()
            self._graphed = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in (self.model, *self.convs):
            if module.__dict__.get("__prepare_scriptable__") == self._refuse_scripting:
                del module.__dict__["__prepare_scriptable__"]
        self._store.clear()
        self._store_bytes = 0
        self._running.clear()
        self._update_held()

    def _set_parameters(self, params: list) -> None:
        """Give each represented conv ``params[i]`` as its weight Parameter, where it was among
        the conv's parameters (state_dict key order)."""
        for conv, param, order in zip(self.convs, params, self._param_order):
            conv.__dict__.pop("weight", None)
            conv._parameters.pop("weight", None)
            conv.weight = param
            params_now = dict(conv._parameters)
            conv._parameters.clear()
            conv._parameters.update({k: params_now[k] for k in order if k in params_now})
            conv._parameters.update({k: v for k, v in params_now.items() if k not in order})

    # ------------------------------------------------------------------ decoding and storage
    @contextlib.contextmanager
    def _sharing_preparation(self) -> Iterator[None]:
        """Decodes in this block share one prepared set (see LayerDecoder): outside forwards."""
        self._decoder.share_preparation(True)
        try:
            yield
        finally:
            self._decoder.share_preparation(False)

    def _prepare_shared(self) -> None:
        """Make the forward's shared prepared set now, on the current stream (before a prefetch
        decodes on the side stream, which must find it made and ordered before it)."""
        with torch.inference_mode(False), torch.no_grad():
            self._decoder.shared_preparation()

    def _decode_group(self, g: int) -> list[torch.Tensor]:
        """Group ``g``'s conv weights, one eager decode call (views of its output where possible)."""
        # Ordinary tensors (not inference tensors), no autograd graph: usable in any later mode.
        with torch.inference_mode(False), torch.no_grad():
            weights = [weight.to(self._params[i][0]).contiguous()
                       for i, weight in zip(self.groups[g], self._decoder.decode_group(g))]
        self.stats["decodes"] += 1
        return weights

    def _pins(self, i: int) -> bool:
        """Whether a decode of layer ``i`` now would be kept in the store (cached mode)."""
        return (self.mode != "on_demand" and i not in self._store and
                (self.cache_bytes is None or self._store_bytes + self.layer_bytes[i] <= self.cache_bytes))

    def _pin_group(self, g: int, weights: list[torch.Tensor]) -> bool:
        """Keep the layers of group ``g`` that fit what is left of the budget (every layer in
        materialized mode), each in storage of its own; True when the whole group is now kept."""
        for i, weight in zip(self.groups[g], weights):
            if self._pins(i):
                weight = _own(weight)
                self._store[i] = weight
                self._store_bytes += _nbytes(weight)
        self.stats["cached_bytes"] = self._store_bytes
        return all(i in self._store for i in self.groups[g])

    def _decode_for_conv(self, g: int) -> tuple[list[torch.Tensor], Optional[int]]:
        """Group ``g``'s weights for convs about to run, and the graph slot they are views of
        (None: ordinary tensors). The graphs take it when nothing will keep the weights (see
        nern_fast.inference_graphs)."""
        graphed = self._graphed
        if self._uses_graphs(g):
            captures = graphed.captures
            result = graphed.decode(g, check=not self._in_forward)  # a forward checks once
            self.stats["graph_captures"] += graphed.captures - captures
            if result is not None:
                self.stats["decodes"] += 1
                self.stats["graph_replays"] += 1
                return result
        return self._decode_group(g), None

    def _uses_graphs(self, g: int) -> bool:
        """Whether a decode of group ``g`` now is a graph replay (not for kept weights, nor with
        autograd on: see nern_fast.inference_graphs)."""
        graphed = self._graphed
        return (graphed is not None and graphed.disabled is None and not torch.is_grad_enabled()
                and not any(self._pins(i) for i in self.groups[g]))

    def _drop_current(self) -> None:
        """Let go of the group the convs read (its graph slot is free once they are enqueued)."""
        current, self._current = self._current, None
        if current is not None and current[2] is not None and self._graphed is not None:
            self._graphed.release(current[2])

    @staticmethod
    def _held(weights: list[torch.Tensor], slot: Optional[int]) -> int:
        """Bytes a decoded group holds of its own (none in a graph slot: the slots are counted)."""
        return 0 if slot is not None else sum(map(_nbytes, weights))

    def _held_bytes(self) -> int:
        current, pending = self._current, self._pending
        current = current[3] if current is not None else 0
        pending = pending[5] if pending is not None else 0
        slots = self._graphed.slot_bytes if self._graphed is not None else 0
        return self._store_bytes + current + pending + slots

    def _update_held(self) -> None:
        held = self._held_bytes()
        self.stats["held_bytes"] = held
        self.stats["peak_held_bytes"] = max(self.stats.get("peak_held_bytes", 0), held)

    # ------------------------------------------------------------------ prefetch (CUDA)
    def _prefetch_events(self) -> tuple:
        if self._events is None:
            self._events = (torch.cuda.Event(), torch.cuda.Event())
        return self._events

    def _record_order(self, order: tuple[int, ...]) -> None:
        """Remember a complete forward's conv call order, and for each call the next call that
        reads another group (what a prefetch decodes while the current group's convs run)."""
        self._order = order
        groups = [self.group_of[i] for i in order]
        following: list = [None] * len(order)
        for p in range(len(order) - 2, -1, -1):
            following[p] = p + 1 if groups[p + 1] != groups[p] else following[p + 1]
        self._next_group_call = following

    def _plan_prefetch(self, i: int, position: int, main) -> None:
        order = self._order
        if order is None or position >= len(order) or order[position] != i:
            return
        call = self._next_group_call[position]
        if call is None or order[call] in self._store:
            return
        g = self.group_of[order[call]]
        pending, current = self._pending, self._current
        if (pending is not None and pending[:2] == (g, call)) or (current is not None and current[0] == g):
            return  # already on its way (planned at the group's first conv), or read now
        if not self._uses_graphs(g):
            self._prepare_shared()  # recorded by `ready` below: the side stream's decode reads it
        # Everything the current stream enqueued before conv i (e.g. a predictor just moved there).
        ready = self._prefetch_events()[0]
        ready.record(main)
        self._planned = (g, call, ready)

    def _start_prefetch(self, g: int, position: int, ready) -> None:
        self._drop_pending()
        side = self._side_stream
        side.wait_event(ready)
        done = self._prefetch_events()[1]
        with torch.cuda.stream(side):
            weights, slot = self._decode_for_conv(g)
            done.record(side)
        self._decoder.shared_used_on(side)
        self._pending = (g, position, weights, done, slot, self._held(weights, slot))

    def _take_prefetched(self, g: int, position: int, main) -> Optional[tuple]:
        """(weights, graph slot or None) prefetched for this conv call's group, or None."""
        pending = self._pending
        if pending is None:
            return None
        if pending[:2] != (g, position):
            self._drop_pending(main)  # another path than last time
            return None
        self._pending = None
        _, _, weights, event, slot, _ = pending
        main.wait_event(event)
        if slot is None:
            for weight in weights:  # freed later only after the main stream is done with them
                weight.record_stream(main)
        self.stats["prefetched"] += 1
        return weights, slot

    def _drop_pending(self, main=None) -> None:
        """Forget the prefetch on its way. Its weights may be freed on the side stream, but the
        current stream still waits for it (on the GPU only): the side decode may have made what a
        later decode on this stream reads (the first-layer tables of the forward's shared
        preparation, a layer range's metadata), and nothing else orders those reads after it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.stats["prefetch_dropped"] += 1
        (main if main is not None else torch.cuda.current_stream(self.device)).wait_event(pending[3])

    # ------------------------------------------------------------------ hooks
    def _root_start(self, module, args) -> None:
        # A fresh forward. Also repairs anything an interrupted forward (Ctrl-C skips the
        # always-call hooks) may have left behind.
        _refuse_tracing()
        self._drop_pending()
        # No prefetch while the predictor is away from the device attach made the streams for
        # (moved after attaching): its decodes would not run on those streams (CPU tensors have
        # no record_stream).
        self._prefetching = self.prefetch and self.pred.layers[0].weight.device == self.device
        self._planned = None
        for i in self._running:
            self.convs[i].__dict__["weight"] = self._placeholders[i]
        self._running.clear()
        self._drop_current()  # an interrupted forward's group: its slot conservatively released
        self._state_group = None
        self._sync_model()
        if self._graphed is not None:
            self._graphed.start_forward()
        self._decoder.share_preparation(True)  # the parameters keep their values until the end
        self._trace = []
        self._in_forward = True
        self._update_held()

    def _root_done(self, module, args, output) -> None:
        if self._in_forward:  # completed without an exception: remember the conv call order
            self._record_order(tuple(self._trace))

    def _root_cleanup(self, module, args, output) -> None:
        self._drop_pending()
        self._drop_current()
        self._decoder.share_preparation(False)
        self._planned = None
        self._in_forward = False
        self._trace = []
        self._update_held()

    def _acquire(self, i: int, position: Optional[int], main) -> tuple[torch.Tensor, Optional[int]]:
        """(weight, graph slot or None) for conv ``i``: stored, from the group the convs read now,
        prefetched or decoded now (with the rest of its group)."""
        if i in self._store:
            if self.mode == "cached":
                self.stats["cache_hits"] += 1
            return self._store[i], None
        g = self.group_of[i]
        current = self._current
        if current is None or current[0] != g:
            taken = None
            if main is not None and position is not None:
                taken = self._take_prefetched(g, position, main)
            self._drop_current()  # before a decode: one group alive (two only with a prefetch)
            weights, slot = taken if taken is not None else self._decode_for_conv(g)
            if self.mode != "on_demand" and slot is None and self._pin_group(g, weights):
                return self._store[i], None
            self._current = current = (g, weights, slot, self._held(weights, slot))
        return current[1][i - self.groups[g].start], current[2]

    def _before_conv(self, i: int, module: nn.Module, args) -> None:
        if not self._in_forward:
            _refuse_tracing()  # (a forward of the root checked at its start)
        position = len(self._trace) if self._in_forward else None
        main = torch.cuda.current_stream(self.device) if self._prefetching else None
        weight, _ = self._acquire(i, position, main)
        if position is not None:
            self._trace.append(i)
            if main is not None:
                self._plan_prefetch(i, position, main)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.device != weight.device:
            weight = weight.to(x.device)
        if not self._in_forward:
            self._sync_model()  # a conv called on its own (the root's start did it otherwise)
        # The conv runs in its input's dtype (F.conv2d accepts no other), which a model whose parts
        # have several dtypes (model.half(), then its BatchNorms .float()) gives it where the
        # witness cannot; otherwise the model's dtype, as followed. A copy per call when it differs.
        dtype = x.dtype if x is not None and x.is_floating_point() else self._dtype_now[i]
        if weight.dtype != dtype:
            weight = weight.to(dtype)
        module.__dict__["weight"] = weight
        self._running.add(i)
        # The placeholder goes back after every forward hook of the conv, also those registered
        # after attach (torch runs forward hooks in registration order, this one's list being read
        # after the conv's forward): a user's hook sees the decoded weight, as a pre-hook does.
        module._forward_hooks.move_to_end(self._after_ids[i])
        self._update_held()

    def _after_conv(self, i: int, module: nn.Module, args, output) -> None:
        module.__dict__["weight"] = self._placeholders[i]
        self._running.discard(i)
        if not self._in_forward:
            self._drop_current()  # a conv called on its own: nothing follows it
        planned, self._planned = self._planned, None
        if planned is not None and output is not None:  # output is None when the conv raised
            self._start_prefetch(*planned)
        self._update_held()

    def _state_dict_start(self) -> None:
        self._state_dicting = True
        self._sync_model()
        self._state_group = None

    def _state_dict_end(self) -> None:
        self._state_dicting = False
        self._state_group = None

    def _state_dict_weights(self, g: int) -> list[torch.Tensor]:
        """Group ``g``'s weights for state_dict(): decoded once for all its convs."""
        if self._state_group is not None and self._state_group[0] == g:
            return self._state_group[1]
        weights = self._decode_group(g)
        self._state_group = (g, weights) if self._state_dicting else None
        return weights

    def _state_dict(self, i: int, module, state_dict, prefix, local_metadata) -> None:
        if getattr(_local, "placeholders", False):
            weight = self._placeholders[i]
        else:
            if not self._state_dicting:
                self._sync_model()  # a conv's own state_dict()
            if i in self._store:
                weight = self._store[i]
            else:
                g = self.group_of[i]
                weight = _own(self._state_dict_weights(g)[i - self.groups[g].start])
            weight = weight.to(device=self._device_now[i], dtype=self._dtype_now[i])
        state_dict[prefix + "weight"] = weight.detach()
        if hasattr(state_dict, "move_to_end") and prefix + "bias" in state_dict:
            state_dict.move_to_end(prefix + "bias")  # keep an ordinary conv's key order

    def _load(self, i: int, module, state_dict, prefix, local_metadata, strict, missing_keys,
              unexpected_keys, error_msgs) -> None:
        key = prefix + "weight"
        if key in state_dict:
            state_dict.pop(key)
            error_msgs.append(f"'{key}' is represented by the predictor while the model is attached "
                              f"(mode '{self.mode}'); detach(model) before loading ordinary conv "
                              f"weights, or leave the represented weights out of the state dict")


# ---------------------------------------------------------------------- functions
def _find_witness(model: nn.Module, represented: set) -> Optional[tuple]:
    """(kind, name, dtype, device) of the model's first floating parameter or buffer that is not a
    represented weight: model.to(dtype / device) changes it too. None when the model has none."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and id(tensor) not in represented:
                return kind, name, tensor.dtype, tensor.device
    return None


def attachment(model: nn.Module) -> Optional[Attachment]:
    """The :class:`Attachment` of an attached model (its ``stats``, ``mode``, ...), or None."""
    return model.__dict__.get(_ATTR)


def is_attached(model: nn.Module) -> bool:
    return attachment(model) is not None


def attach(pred, model: nn.Module, mode: str = "on_demand", cache_bytes: Optional[int] = None,
           prefetch: bool = True, graphs: bool = False, group_bytes: Optional[int] = None,
           workspace_bytes: Optional[int] = None) -> nn.Module:
    """Make ``model`` run from ``pred`` (in place; returns ``model``). See the module docstring."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cache_bytes is not None:
        if mode != "cached":
            raise ValueError(f"cache_bytes applies to mode='cached' only, got mode={mode!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be a non-negative integer (bytes) or None (no limit), "
                             f"got {cache_bytes!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach needs the nn.Module the predictor represents, got {type(model).__name__}")
    existing = attachment(model)
    if existing is not None:
        if existing.pred is not pred:
            raise AttachError(f"the model is already attached to another predictor (mode "
                              f"'{existing.mode}'): a model runs from one predictor. Detach it first, or "
                              f"represent disjoint parts of it with predictors made for the submodules "
                              f"holding them (FastPredictor.for_model(model.layer3)), each attached to "
                              f"its submodule")
        raise AttachError(f"the model is already attached (mode '{existing.mode}'); call "
                          f"detach(model) before attaching it again")
    pred.layout.check_model(model)
    modules = dict(model.named_modules())
    for layer in pred.layout.layers:
        weight = modules[layer.name]._parameters.get("weight")
        if weight is None:
            raise AttachError(f"conv '{layer.name}' has no weight Parameter (attached through another "
                              f"model that shares it?); give it an ordinary nn.Parameter first")
    for name, value in (("graphs", graphs), ("prefetch", prefetch)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    check_group_bytes(group_bytes)
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes < 1):
        raise ValueError(f"workspace_bytes must be a positive integer (bytes of decoder scratch per "
                         f"decode call) or None (the backend's default), got {workspace_bytes!r}")
    state = Attachment(pred, model, mode, cache_bytes, prefetch, graphs, group_bytes, workspace_bytes)
    state.install()
    model.__dict__[_ATTR] = state
    return model


def detach(model: nn.Module, pred=None) -> nn.Module:
    """Undo :func:`attach`: ordinary Parameters holding the decoded weights, no hooks (in place)."""
    state = attachment(model)
    if state is None:
        raise AttachError("the model is not attached to a predictor; nothing to detach")
    if pred is not None and state.pred is not pred:
        raise AttachError("the model is attached to a different predictor than the one given; "
                          "detach it with that predictor (or with nern_fast.inference.detach(model))")
    state.remove()
    del model.__dict__[_ATTR]
    return model


def prepare_for_inference(model: nn.Module, pred, mode: str = "on_demand",
                          device: Optional[torch.device] = None, cache_bytes: Optional[int] = None,
                          prefetch: bool = True, graphs: bool = False,
                          group_bytes: Optional[int] = None,
                          workspace_bytes: Optional[int] = None) -> nn.Module:
    """One call for CLIs (``eval --on-demand``): move both to ``device``, ``eval()``, then attach.

    ``mode`` is one of :data:`MODES`, or ``"parameters"``: write the decoded weights into the
    model's ordinary parameters (``pred.load_into``) and attach nothing. Refused before anything
    moves when the mode is unknown or the model is attached already.
    """
    if mode != "parameters" and mode not in MODES:
        raise ValueError(f"mode must be 'parameters' or one of {MODES}, got {mode!r}")
    existing = attachment(model)
    if existing is not None:
        raise AttachError(f"the model is already attached (mode '{existing.mode}'); call "
                          f"detach(model) before preparing it again")
    if device is not None:
        model.to(device)
        pred.to(device)
    model.eval()
    if mode == "parameters":
        pred.load_into(model)
        return model
    return attach(pred, model, mode=mode, cache_bytes=cache_bytes, prefetch=prefetch, graphs=graphs,
                  group_bytes=group_bytes, workspace_bytes=workspace_bytes)

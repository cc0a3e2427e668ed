"""CUDA graphs for on-demand decodes: each decode group's decode captured once, then replayed.

On a GPU an on-demand forward of a small network is bound by the host: the backend's Python path
costs about 0.1 ms per layer (argument handling, parameter packing, several launches) where the
decode's GPU work is a few tens of microseconds and a conv's host time a few microseconds. Replaying
a captured CUDA graph costs a few microseconds of host time. ``attach(..., graphs=True)`` (CUDA,
on_demand and cached modes; ignored on CPU) decodes through :class:`GraphedDecodes`:

* each decode group's decode (consecutive layers decoded by one
  :class:`~nern_fast.inference.LayerDecoder` call, see :mod:`nern_fast.inference_groups`; then a copy,
  cast to the convs' dtype, into a static buffer: one copy when the group's output is its layers'
  weights back to back) is captured once per static buffer it writes, right after one eager decode
  of that group (which compiles and tunes the kernels: tuning synchronises, which a capture may
  not), and replayed from then on;
* with a backend that prepares its parameters (Triton: packing, tf32 rounding or bf16 copies),
  that preparation is captured once in its own graph, replayed once per forward before the first
  group's replay, and every group graph reads its static result: a group replay is the group's
  first-layer tables (those layers' only), the decode kernel and the copy, not the whole
  predictor's packing again;
* the decoded weights are views of one of two static buffers ("slots", per conv dtype) of the
  largest group's size, used alternately: weight memory is two groups, plus the graphs' shared
  pool (the decode's working memory and tables, one copy for all graphs, and the static prepared
  set: a packed copy of the predictor, 1.2 MB for ResNet-56 at H=280);
* ordering: a replay into a slot first waits for the event recorded after the last conv that read
  it was enqueued, and for the previous replay (the graphs share their pool: never two at once),
  unless that event was recorded on the replay's own stream (whose order already guarantees it),
  so a replay on the prefetch side stream or a user's stream is as safe as one on the current one.

A slot is reused by the next-but-one decode, so the graphs are used only where nothing keeps a
decoded weight: with autograd off (``torch.no_grad()`` / ``torch.inference_mode()``; with grad
enabled a conv saves its weight for backward, and the decode runs eagerly), and never for weights
that are kept (cached mode's pinned layers, ``state_dict``, ``detach``: eager decodes). The graphs
hold the parameters' storage: replacing a parameter (``pred.to(...)``, a new tensor) or changing
``pred.precision`` / ``pred.backend`` is detected at the start of the next forward (checked once
per forward: ~10 µs of host time) and everything is recaptured;
in-place updates (optimizer steps, ``load_state_dict``) are seen by the next replay. A capture that
fails (a backend that synchronises with the host: the eager backend copies its encoding table from
host memory at every call) turns the graphs off for this attachment, with a warning naming the
error; decodes then run eagerly. Captures run on the predictor's device and in torch's
"thread_local" mode (a DataLoader's pin-memory thread cannot break them); see ``cuda_capture``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import ops
from .cuda_capture import CAPTURE_ERROR_MODE, capture_failure, capturing_on


_NO_PACKING = "no packing"  # the backend prepares nothing: layer graphs pack, if anything, themselves


class GraphedDecodes:
    """Per-group CUDA graphs of a :class:`~nern_fast.inference.LayerDecoder` writing into two
    static slots. ``decode(g)`` returns ``(weights of group g's layers, slot)`` or None when graphs
    are off (``disabled`` says why); ``release(slot)`` records that the convs reading ``slot`` are
    enqueued.
    """

    def __init__(self, decoder, layers, dtypes, device: torch.device):
        self.decoder = decoder
        self.groups = decoder.groups
        self.shapes = [tuple(layer.shape) for layer in layers]
        self.numels = [layer.num_weights for layer in layers]
        self.dtypes = list(dtypes)
        # Where each layer sits in its dtype's slot when its group is decoded, and the slots' sizes.
        self._offsets = [0] * len(layers)
        self._slot_numels: dict = {}
        for group in self.groups:
            used: dict = {}
            for i in group:
                self._offsets[i] = used.get(self.dtypes[i], 0)
                used[self.dtypes[i]] = self._offsets[i] + self.numels[i]
            for dtype, numel in used.items():
                self._slot_numels[dtype] = max(self._slot_numels.get(dtype, 0), numel)
        self._one_dtype = [len({self.dtypes[i] for i in group}) == 1 for group in self.groups]
        self.device = device
        self.disabled: Optional[str] = None
        self.captures = 0
        self._graphs: dict = {}  # (group, slot) -> captured graph
        self._pool = None  # one memory pool shared by every graph (never two replays at once)
        self._capture_stream = None  # on self.device (torch's default one is on the current device)
        self._slots: dict = {}  # dtype -> [two flat buffers of the largest layer of that dtype]
        self._read_done: list = [None, None]  # per slot: (event, stream) after its last reader
        self._replayed = None  # (event, stream) after the last replay
        self._packing = None  # (graph, static prepared set), _NO_PACKING, or None: not captured yet
        self._packed = False  # whether this forward replayed the packing graph already
        self._last_slot = 1
        self._key = None  # the parameters (storage), precision and backend the graphs captured

    # ------------------------------------------------------------------ public
    @property
    def slot_bytes(self) -> int:
        """Bytes held by the static slots."""
        return sum(b.numel() * b.element_size() for pair in self._slots.values() for b in pair)

    def decode(self, g: int, check: bool = True) -> Optional[tuple[list[torch.Tensor], int]]:
        """Group ``g``'s weights, decoded into the next slot on the current stream, and the slot;
        None when graphs are off (the caller decodes eagerly). ``check=False`` skips the parameter
        check (:meth:`check_parameters`), for decodes inside a forward that began with one."""
        if self.disabled is not None:
            return None
        if check or self._key is None:
            self.check_parameters()
            self._packed = False  # outside a forward the parameters may have changed since
        slot = 1 - self._last_slot
        stream = torch.cuda.current_stream(self.device)
        for recorded in (self._read_done[slot], self._replayed):
            if recorded is not None and recorded[1] != stream:  # the same stream keeps the order
                stream.wait_event(recorded[0])
        if not self._packed and not self._replay_packing():
            return None
        graph = self._graphs.get((g, slot))
        if graph is None:
            graph = self._capture(g, slot)
            if graph is None:
                return None
            self._graphs[(g, slot)] = graph
        graph.replay()
        self._replayed = self._record(self._replayed, stream)
        self._last_slot = slot
        return self._slot_views(g, slot), slot

    def start_forward(self) -> None:
        """A forward of the root model begins: check the parameters once for the whole forward, and
        start with slot 0, so that the same call position uses the same slot every forward (a
        group is captured once per slot its positions use, not twice by alternation drifting
        across forwards; the events keep any order safe)."""
        if self.disabled is None:
            self.check_parameters()
        self._packed = False
        self._last_slot = 1

    def check_parameters(self) -> None:
        """Drop the graphs if the parameters' storage, the precision or the backend changed (the
        graphs read the storage they were captured with). ~10 µs of host time: once per forward."""
        key = self._parameters_key()
        if key != self._key:
            self.close()
            self._key = key

    def release(self, slot: int) -> None:
        """The convs reading ``slot`` are enqueued on the current stream: a later replay into
        that slot waits for them."""
        self._read_done[slot] = self._record(self._read_done[slot],
                                             torch.cuda.current_stream(self.device))

    def close(self) -> None:
        """Drop every graph, the pool and the slots (after the device finished with them)."""
        if self._graphs or self._slots:
            torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._pool = None
        self._capture_stream = None
        self._slots.clear()
        self._read_done = [None, None]
        self._replayed = None
        self._packing = None
        self._packed = False
        self._key = None

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _record(recorded: Optional[tuple], stream) -> tuple:
        """(event, stream): the event (created once, re-recorded) recorded on ``stream``."""
        event = recorded[0] if recorded is not None else torch.cuda.Event()
        event.record(stream)
        return event, stream

    def _parameters_key(self) -> tuple:
        pred = self.decoder.pred
        return (tuple((p.data_ptr(), p.dtype, p.device) for p in pred.parameters()), pred.precision,
                ops.requested_backend_name(pred.backend))

    def _slot(self, dtype: torch.dtype, slot: int) -> torch.Tensor:
        pair = self._slots.get(dtype)
        if pair is None:
            numel = self._slot_numels[dtype]
            with torch.inference_mode(False):  # ordinary tensors: written outside inference mode too
                pair = self._slots[dtype] = [torch.empty(numel, dtype=dtype, device=self.device)
                                             for _ in range(2)]
        return pair[slot]

    def _slot_views(self, g: int, slot: int) -> list[torch.Tensor]:
        views = []
        for i in self.groups[g]:
            offset = self._offsets[i]
            views.append(self._slot(self.dtypes[i], slot)[offset:offset + self.numels[i]].view(self.shapes[i]))
        return views

    def _replay_packing(self) -> bool:
        """Replay the packing graph (captured at the first call) on the current stream; False when
        graphs went off. The caller has ordered the stream after the last replay."""
        if self._packing is None:
            self._packing = self._capture_packing()
            if self._packing is None:
                return False
        if self._packing is not _NO_PACKING:
            self._packing[0].replay()
        self._packed = True
        return True

    def _static_prepared(self):
        return None if self._packing in (None, _NO_PACKING) else self._packing[1]

    def _fill(self, g: int, slot: int) -> None:
        static = self._static_prepared()
        if static is not None:
            # The group's first-layer tables are built inside its own graph (made during the eager
            # run before a capture, a graph would read memory freed once the next group's replace
            # them), and not kept in the static set afterwards.
            static.tables = None
        with torch.inference_mode(False), torch.no_grad():
            out = self.decoder.group_output(g, prepared=static)
            group = self.groups[g]
            if self.decoder.is_compact(g) and self._one_dtype[g]:  # one copy for the whole group
                numel = sum(self.numels[i] for i in group)
                self._slot(self.dtypes[group.start], slot)[:numel].copy_(out.reshape(-1))
            else:
                for weight, decoded in zip(self._slot_views(g, slot), self.decoder.split(g, out)):
                    weight.copy_(decoded)
        if static is not None:
            static.tables = None

    def _prepare(self):
        with torch.inference_mode(False), torch.no_grad():
            return self.decoder.prepare()

    def _capture_packing(self):
        """(graph, static prepared set) of the backend's preparation, _NO_PACKING when the backend
        prepares nothing, None (graphs off) on failure. Replay the graph before reading the set."""
        if not self.decoder.prepares:
            return _NO_PACKING
        made = []
        graph = self._captured(lambda: made.append(self._prepare()))
        return None if graph is None else (graph, made[-1])

    def _capture(self, g: int, slot: int):
        """Capture group ``g``'s decode into ``slot``; None (graphs off) on failure."""
        graph = self._captured(lambda: self._fill(g, slot))
        if graph is not None:
            self.captures += 1
        return graph

    def _captured(self, run):
        """``run()`` once eagerly (compiles and tunes outside the capture), then captured in a graph
        sharing the pool; None when the capture failed (graphs off, with a warning)."""
        try:
            with capturing_on(self.device):
                run()
                graph = torch.cuda.CUDAGraph()
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                    self._capture_stream = torch.cuda.Stream(self.device)
                with torch.cuda.graph(graph, pool=self._pool, stream=self._capture_stream,
                                      capture_error_mode=CAPTURE_ERROR_MODE):
                    run()
        except Exception as exc:  # a host sync or an op that cannot be captured
            self.disabled = capture_failure(exc)
            try:
                self.close()
            except Exception:  # the failed capture may leave an error on the device
                pass
            warnings.warn(f"on-demand decodes cannot be captured in CUDA graphs ({self.disabled}); "
                          f"they run eagerly (attach with graphs=False to silence this)", RuntimeWarning,
                          stacklevel=5)
            return None
        return graph

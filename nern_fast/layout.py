"""WeightLayout: everything static about which conv weights a predictor represents.

A layout lists the represented conv layers in ``model.modules()`` order, their weight shapes,
where each layer's kernels start in the flat kernel index space (``kernel_offset``) and where its
weights start in the flat buffer that holds every decoded conv weight (``weight_offset``), the
crop applied when a layer's kernel is smaller than the predictor's k×k output, the index
normalisation (NERN_SPEC §3) and optional coordinate permutations (NERN_SPEC §6).

Permutations are stored in one canonical form, ``coord_rows``: for every kernel slot q of a layer
(row q = f·C_in + c of its weight), the coordinate row whose decoded kernel lands in that slot.
NeRN's two forms are converted on the way in (:func:`coord_rows_from_crossfilter`,
:func:`coord_rows_from_infilter`).
"""
from __future__ import annotations

import dataclasses
import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

CROP_MODES = ("center", "average", "max")
NORMALIZATIONS = ("local", "global", "none")

IncludeSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


class LayoutError(ValueError):
    """A model, include list or permutation that a layout cannot represent."""


@dataclass(frozen=True)
class LayerSpec:
    """One represented conv layer."""

    name: str
    shape: tuple[int, int, int, int]  # (C_out, C_in / groups, s, s)
    kernel_offset: int  # first kernel of this layer in the flat kernel index space
    weight_offset: int  # first weight of this layer in the flat weight buffer
    crop: str = "center"

    @property
    def c_out(self) -> int:
        return self.shape[0]

    @property
    def c_in(self) -> int:
        return self.shape[1]

    @property
    def size(self) -> int:
        return self.shape[2]

    @property
    def num_kernels(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def num_weights(self) -> int:
        return self.num_kernels * self.shape[2] * self.shape[3]


@dataclass(frozen=True)
class LayerRange:
    """Consecutive layers ``layers`` of a layout and the spans ``(start, stop)`` they occupy in its
    flat index spaces: kernels, weights, filters (Σ C_out) and channels (Σ C_in). A decode whose rows
    all lie in these layers needs only their positions and first-layer table rows."""

    layers: range
    kernels: tuple[int, int]
    weights: tuple[int, int]
    filters: tuple[int, int]
    channels: tuple[int, int]
    layout_layers: int  # how many layers the layout has

    @property
    def is_whole(self) -> bool:
        """Whether the range is every layer of its layout (nothing to slice)."""
        return self.layers.start == 0 and self.layers.stop == self.layout_layers


def as_int(value: Any, what: str, minimum: Optional[int] = None, error: type = LayoutError) -> int:
    """``value`` as an int if it is an integer (numpy and 0-d tensor integers too) of at least
    ``minimum``; otherwise ``error`` naming ``what`` and the value. Floats are refused rather than
    truncated, and bools although Python counts them as ints (``hidden=True`` is a slip, not 1)."""
    bound = "" if minimum is None else f" >= {minimum}"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise error(f"{what} must be an integer{bound}, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and number < minimum:
        raise error(f"{what} must be an integer{bound}, got {value!r}")
    return number


def crop_window(kernel_size: int, size: int) -> tuple[int, int]:
    """NeRN's centre crop bounds ``[lo, hi)`` of a ``size`` kernel inside a k×k output."""
    return int(kernel_size / 2 - size / 2), int(kernel_size / 2 + size / 2)


def _as_long_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError) as exc:
        raise LayoutError(f"{what}: cannot be read as an integer tensor ({exc})") from exc
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise LayoutError(f"{what}: expected integer indices, got dtype {tensor.dtype}")
    return tensor.to(torch.long).cpu()


def _check_is_permutation(perm: torch.Tensor, length: int, what: str) -> None:
    if perm.dim() != 1 or perm.numel() != length:
        raise LayoutError(f"{what}: expected a permutation of length {length}, got shape "
                          f"{tuple(perm.shape)}; compute it from this layer's weights")
    if length and not torch.equal(torch.sort(perm).values, torch.arange(length)):
        raise LayoutError(f"{what}: not a permutation of 0..{length - 1} (repeated or missing "
                          f"indices); recompute it")


def coord_rows_from_crossfilter(chain: Any, layer: LayerSpec) -> torch.Tensor:
    """NeRN crossfilter form (the chain order of kernel rows) -> coord_rows (rank of each row)."""
    what = f"crossfilter permutation of layer '{layer.name}'"
    chain = _as_long_tensor(chain, what).flatten()
    _check_is_permutation(chain, layer.num_kernels, what)
    return torch.argsort(chain)


def coord_rows_from_infilter(filter_order: Any, channel_orders: Any, layer: LayerSpec) -> torch.Tensor:
    """NeRN infilter form (filter chain, per-filter channel chains) -> coord_rows.

    Kernel (f, c) gets coordinate (rank of f in the filter chain, rank of c in filter f's chain).
    """
    what = f"infilter permutation of layer '{layer.name}'"
    filter_order = _as_long_tensor(filter_order, what + " (filter order)").flatten()
    _check_is_permutation(filter_order, layer.c_out, what + " (filter order)")
    channel_orders = _as_long_tensor(channel_orders, what + " (channel orders)")
    if channel_orders.shape != (layer.c_out, layer.c_in):
        raise LayoutError(f"{what}: channel orders must have shape ({layer.c_out}, {layer.c_in}), "
                          f"got {tuple(channel_orders.shape)}")
    expected = torch.arange(layer.c_in).expand(layer.c_out, -1)
    if not torch.equal(torch.sort(channel_orders, dim=1).values, expected):
        bad = int((torch.sort(channel_orders, dim=1).values != expected).any(1).nonzero()[0])
        raise LayoutError(f"{what}: channel order of filter {bad} is not a permutation of "
                          f"0..{layer.c_in - 1}; recompute it")
    filter_rank = torch.argsort(filter_order)
    channel_rank = torch.argsort(channel_orders, dim=1)
    return (filter_rank[:, None] * layer.c_in + channel_rank).reshape(-1)


def _coord_rows_from_any(perm: Any, layer: LayerSpec) -> Optional[torch.Tensor]:
    if perm is None:
        return None
    if isinstance(perm, (tuple, list)) and len(perm) == 2:
        # (filter order, channel orders): a vector and a matrix. A crossfilter chain of a 2-kernel
        # layer is a pair too, of scalars.
        try:
            dims = tuple(torch.as_tensor(part).dim() for part in perm)
        except (TypeError, ValueError, RuntimeError):
            dims = None
        if dims == (1, 2):
            return coord_rows_from_infilter(perm[0], perm[1], layer)
    return coord_rows_from_crossfilter(perm, layer)


def _weight_shape(name: str, module: nn.Module) -> tuple:
    """The conv's weight shape; a LayoutError for a lazy conv before its first forward (no shape)."""
    weight = module.weight
    if nn.parameter.is_lazy(weight):
        raise LayoutError(f"layer '{name}' is a lazy conv ({type(module).__name__}) whose weight is not "
                          f"initialised yet (its shape comes from its first input); run the model once "
                          f"on an example input (one forward pass, model(x)) before making a layout, "
                          f"loading or flattening weights")
    return tuple(weight.shape)


def _unrepresentable(name: str, module: nn.Conv2d, kernel_size: int) -> Optional[tuple[str, str]]:
    """Why a conv cannot be represented with a k×k predictor and what to do, or None if it can."""
    kh, kw = _weight_shape(name, module)[2:]
    if kh != kw:
        return (f"its kernel is {kh}x{kw}, not square (NeRN's predictor outputs square kernels)",
                "leave it out of include")
    if kh > kernel_size:
        return (f"its kernel is {kh}x{kw}, larger than the predictor's {kernel_size}x{kernel_size}",
                f"leave it out of include or raise kernel_size to {kh}")
    return None


def _nern_preset(name: str, module: nn.Module, parents: Mapping[str, nn.Module]) -> bool:
    """NeRN's choice: the 3×3 convs inside residual blocks (stem, shortcuts, classifier excluded)."""
    if not isinstance(module, nn.Conv2d) or _weight_shape(name, module)[2:] != (3, 3):
        return False
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = parents.get(".".join(parts[:depth]))
        cls = type(parent).__name__ if parent is not None else ""
        if cls.endswith("Block") or cls.endswith("Bottleneck"):
            return True
    return False


def _check_representable_weights(chosen: list[tuple[str, nn.Conv2d]],
                                 every_conv_of: Optional[int] = None) -> None:
    """A represented weight is decoded into the conv's own Parameter: a computed weight
    (parametrizations, the old weight_norm hook) would ignore it, and one Parameter shared by two
    convs (tied weights) would be represented twice, by two different decodes. ``every_conv_of``:
    the kernel size when ``chosen`` came from include=None ("every conv"), which has no list to
    leave a layer out of: the message then gives the predicate that does."""
    def leave_out(n: str) -> str:
        if every_conv_of is None:
            return f"leave '{n}' out of include"
        return (f"leave '{n}' out of include, e.g. include=lambda name, m: name != '{n}' and "
                f"m.kernel_size[0] == m.kernel_size[1] <= {every_conv_of} (include=None's rule)")
    owner: dict[int, str] = {}
    for n, m in chosen:
        if torch.nn.utils.parametrize.is_parametrized(m, "weight") or not isinstance(
                m._parameters.get("weight"), nn.Parameter):
            if getattr(m.__dict__.get("weight"), "is_meta", False):
                raise LayoutError(f"layer '{n}' is attached to a predictor (its weight is decoded when "
                                  f"it runs); detach the model first")
            raise LayoutError(f"layer '{n}' has a computed weight (a parametrization such as "
                              f"weight_norm or orthogonal), not a Parameter a decode can write; remove "
                              f"it (torch.nn.utils.parametrize.remove_parametrizations) or "
                              f"{leave_out(n)}")
        first = owner.setdefault(id(m.weight), n)
        if first != n:
            raise LayoutError(f"layers '{first}' and '{n}' share one weight Parameter (tied weights); "
                              f"represent one of them: {leave_out(n)}")


def _select_convs(model: nn.Module, kernel_size: int, include: IncludeSpec) -> list[tuple[str, nn.Conv2d]]:
    chosen = _chosen_convs(model, kernel_size, include)
    _check_representable_weights(chosen, kernel_size if include is None else None)
    return chosen


def _chosen_convs(model: nn.Module, kernel_size: int, include: IncludeSpec) -> list[tuple[str, nn.Conv2d]]:
    named = list(model.named_modules())
    if isinstance(include, str) and include != "nern":
        include = [include]
    if include is not None and include != "nern" and not callable(include) and (
            isinstance(include, (bytes, Mapping)) or not hasattr(include, "__iter__")):
        raise LayoutError(f"include must be None or 'all' (every conv), 'nern', a module name, a list of "
                          f"module names or a function (name, module) -> bool; got {type(include).__name__}")
    if include is None:
        return [(n, m) for n, m in named if isinstance(m, nn.Conv2d)
                and _unrepresentable(n, m, kernel_size) is None]
    if include == "nern":
        parents = dict(named)
        return [(n, m) for n, m in named if _nern_preset(n, m, parents)]
    if callable(include):
        chosen = [(n, m) for n, m in named if isinstance(m, nn.Conv2d) and include(n, m)]
    else:
        names = list(include)
        modules = dict(named)
        for n in names:
            if not isinstance(n, str):
                raise LayoutError(f"include lists {n!r} ({type(n).__name__}); give module names as "
                                  f"strings, e.g. 'layer1.0.conv1'")
            if n not in modules:
                first_name = {id(m): k for k, m in reversed(named)}
                alias = dict(model.named_modules(remove_duplicate=False)).get(n)
                if alias is not None and id(alias) in first_name:
                    raise LayoutError(f"include names '{n}', which is the module '{first_name[id(alias)]}' "
                                      f"under a second name; name it '{first_name[id(alias)]}' (a module "
                                      f"registered twice is listed once, under its first name)")
                close = [k for k, m in named if isinstance(m, nn.Conv2d)][:8]
                raise LayoutError(f"include names '{n}', which is not a module of the model; "
                                  f"conv modules are e.g. {close}")
            if not isinstance(modules[n], nn.Conv2d):
                raise LayoutError(f"include names '{n}', a {type(modules[n]).__name__}; only "
                                  f"nn.Conv2d layers can be represented")
        wanted = set(names)
        chosen = [(n, m) for n, m in named if n in wanted]
    for n, m in chosen:
        why = _unrepresentable(n, m, kernel_size)
        if why is not None:
            raise LayoutError(f"layer '{n}' cannot be represented: {why[0]}; {why[1]}")
    return chosen


def _no_match_message(model: nn.Module, kernel_size: int, include: IncludeSpec) -> str:
    """Why ``include`` selected no conv of ``model``, and what to do."""
    cls = type(model).__name__
    named = list(model.named_modules())
    convs = [(n, m) for n, m in named if isinstance(m, nn.Conv2d)]
    if not convs:
        others = list(dict.fromkeys(type(m).__name__ for _, m in named
                                    if isinstance(m, nn.modules.conv._ConvNd)))
        extra = (f"; its {', '.join(others)} layers are not represented (only nn.Conv2d weights are)"
                 if others else "")
        return f"{cls} has no conv layer a predictor can represent: it has no nn.Conv2d{extra}"
    if isinstance(include, str) and include == "nern":
        return (f"{cls} has no conv layer include='nern' selects: it takes the 3x3 convs inside residual "
                f"blocks (modules whose class name ends in 'Block' or 'Bottleneck', as in ResNets), and "
                f"none of its {len(convs)} Conv2d layers is a 3x3 conv in such a block; use include='all' "
                f"(every square conv up to kernel_size), a list of module names or a function "
                f"(name, module) -> bool")
    if include is None:
        kernels = list(dict.fromkeys("x".join(map(str, m.weight.shape[2:])) for _, m in convs))
        square = [m.weight.shape[2] for _, m in convs if m.weight.shape[2] == m.weight.shape[3]]
        advice = (f"; raise kernel_size to {min(square)} or more to take the square ones" if square else
                  "; a non-square kernel cannot be represented (NeRN's predictor outputs square kernels)")
        return (f"{cls} has no conv layer the predictor can represent: every Conv2d kernel is non-square "
                f"or larger than the predictor's {kernel_size}x{kernel_size} (kernels: "
                f"{', '.join(kernels[:6])}){advice}")
    return (f"{cls} has no conv layer include={include!r} selects; name layers in include= (conv "
            f"modules are e.g. {[n for n, _ in convs][:8]})")


class LayoutTensors:
    """A layout's metadata as tensors on one device (what every backend reads)."""

    def __init__(self, layout: "WeightLayout", device: torch.device):
        layers = layout.layers
        long = dict(dtype=torch.long, device=device)
        self.device = device
        self.kernel_offsets = torch.tensor([l.kernel_offset for l in layers] + [layout.num_kernels], **long)
        self.weight_offsets = torch.tensor([l.weight_offset for l in layers] + [layout.num_weights], **long)
        self.c_out = torch.tensor([l.c_out for l in layers], **long)
        self.c_in = torch.tensor([l.c_in for l in layers], **long)
        self.size = torch.tensor([l.size for l in layers], **long)
        self.crop = torch.tensor([CROP_MODES.index(l.crop) for l in layers], **long)
        pos_layer, pos_filter, pos_channel = layout.normalized_positions()
        self.pos_layer = pos_layer.to(device)
        self.pos_filter = torch.cat(pos_filter).to(device)
        self.pos_channel = torch.cat(pos_channel).to(device)
        self.filter_offsets = torch.tensor(layout._filter_starts, **long)
        self.channel_offsets = torch.tensor(layout._channel_starts, **long)
        rows = layout.coord_rows()
        self.coord_rows = None if rows is None else rows.to(device)
        # One int32 table per layer for compiled kernels:
        # [kernel_off, weight_off, c_out, c_in, size, crop, filter_off, channel_off]
        self.meta = torch.stack([self.kernel_offsets[:-1], self.weight_offsets[:-1], self.c_out,
                                 self.c_in, self.size, self.crop, self.filter_offsets[:-1],
                                 self.channel_offsets[:-1]], dim=1).to(torch.int32).contiguous()

    def layer_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Layer index of each flat kernel index."""
        return torch.searchsorted(self.kernel_offsets, rows, right=True) - 1


class WeightLayout:
    """The represented conv layers of a network and how their kernels are coordinated."""

    def __init__(self, layers: Sequence[Union[LayerSpec, tuple]], kernel_size: int = 3,
                 normalization: str = "local", coord_rows: Optional[Mapping[int, torch.Tensor]] = None,
                 model_signature: Optional[Sequence[tuple]] = None):
        kernel_size = as_int(kernel_size, "kernel_size", minimum=1)
        if normalization not in NORMALIZATIONS:
            raise LayoutError(f"normalization '{normalization}' is not one of {NORMALIZATIONS}")
        if not layers:
            raise LayoutError("a layout needs at least one represented conv layer; the model has "
                              "none that matches (check include= and kernel_size=)")
        built, k_off, w_off = [], 0, 0
        for entry in layers:
            if isinstance(entry, LayerSpec):
                name, shape, crop = entry.name, entry.shape, entry.crop
            else:
                name, shape, *rest = entry
                crop = rest[0] if rest else "center"
            shape = tuple(as_int(s, f"layer '{name}': each dimension of weight shape {tuple(shape)}",
                                 minimum=1) for s in shape)
            if len(shape) != 4:
                raise LayoutError(f"layer '{name}': weight shape {shape} is not (C_out, C_in, s, s)")
            if shape[2] != shape[3]:
                raise LayoutError(f"layer '{name}': kernel {shape[2]}x{shape[3]} is not square")
            if shape[2] > kernel_size:
                raise LayoutError(f"layer '{name}': kernel {shape[2]}x{shape[3]} is larger than the "
                                  f"predictor output {kernel_size}x{kernel_size}; raise kernel_size")
            if crop not in CROP_MODES:
                raise LayoutError(f"layer '{name}': crop '{crop}' is not one of {CROP_MODES}")
            spec = LayerSpec(str(name), shape, k_off, w_off, crop)
            built.append(spec)
            k_off += spec.num_kernels
            w_off += spec.num_weights
        names = [l.name for l in built]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise LayoutError(f"layer names must be unique, repeated: {dup}")
        self.layers: tuple[LayerSpec, ...] = tuple(built)
        self.kernel_size = kernel_size
        self.normalization = normalization
        self.num_kernels = k_off
        self.num_weights = w_off
        self._coord_rows: dict[int, torch.Tensor] = {}
        for index, rows in (coord_rows or {}).items():
            # Canonical keys only (0..n-1): a negative one would be stored apart from its layer's.
            index = as_int(index, "a coord_rows key (layer index)", minimum=0)
            if index >= len(built):
                raise LayoutError(f"coord_rows names layer {index}, but the layout has {len(built)} "
                                  f"layers (0..{len(built) - 1})")
            layer = self.layers[index]
            rows = _as_long_tensor(rows, f"coordinate rows of layer '{layer.name}'").flatten()
            _check_is_permutation(rows, layer.num_kernels, f"coordinate rows of layer '{layer.name}'")
            self._coord_rows[int(index)] = rows
        # (name, weight shape) of every Conv2d of the model the layout was made from, if known:
        # lets check_model reject another architecture that merely shares the represented layers.
        self.model_signature = (None if model_signature is None else
                                tuple((str(n), tuple(int(x) for x in sh)) for n, sh in model_signature))
        self._tensors: dict[str, LayoutTensors] = {}
        # Where each layer's filters / channels start in Σ C_out / Σ C_in (and the totals, last),
        # and the LayerRange of each range asked for: a decode call asks for one (O(1) per call).
        self._filter_starts = tuple(itertools.accumulate((l.c_out for l in built), initial=0))
        self._channel_starts = tuple(itertools.accumulate((l.c_in for l in built), initial=0))
        self._ranges: dict[tuple[int, int], LayerRange] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, kernel_size: int = 3, include: IncludeSpec = None,
                   normalization: str = "local", crop: str = "center",
                   permutations: Any = None) -> "WeightLayout":
        """Layout of ``model``'s conv layers.

        ``include``: None or ``"all"`` (every Conv2d with a square kernel <= kernel_size; others are
        left out), ``"nern"`` (the 3×3
        convs inside residual blocks, as NeRN represents ResNets), a list of module names, or a
        callable ``(name, module) -> bool``.
        """
        if not isinstance(model, nn.Module):
            raise LayoutError(f"from_model needs an nn.Module, got {type(model).__name__}")
        as_int(kernel_size, "kernel_size (the predictor's k×k output)", minimum=1)  # before "no conv fits"
        if isinstance(include, str) and include == "all":
            include = None  # the config's name for every conv
        chosen = _select_convs(model, kernel_size, include)
        if not chosen:
            raise LayoutError(_no_match_message(model, kernel_size, include))
        layout = cls([(n, _weight_shape(n, m), crop) for n, m in chosen], kernel_size, normalization,
                     model_signature=conv_signature(model))
        return layout.with_permutations(permutations) if permutations is not None else layout

    @classmethod
    def from_shapes(cls, shapes: Sequence[Sequence[int]], kernel_size: int = 3,
                    normalization: str = "local", crop: str = "center",
                    names: Optional[Sequence[str]] = None) -> "WeightLayout":
        """Layout from weight shapes alone (benchmarks, tests); 2-tuples mean (C_out, C_in, k, k)."""
        names = names or [f"layer{i}" for i in range(len(shapes))]
        full = [tuple(s) if len(s) == 4 else (s[0], s[1], kernel_size, kernel_size) for s in shapes]
        return cls([(n, s, crop) for n, s in zip(names, full)], kernel_size, normalization)

    def with_permutations(self, permutations: Any) -> "WeightLayout":
        """A copy with coordinate permutations (NeRN forms), per layer as a list or a name->perm dict.

        Each entry: None; a crossfilter chain (the order of the layer's kernel rows); or an infilter
        pair ``(filter_order, channel_orders)`` with channel_orders of shape (C_out, C_in).
        """
        if isinstance(permutations, Mapping):
            unknown = set(permutations) - {l.name for l in self.layers}
            if unknown:
                raise LayoutError(f"permutations name layers the layout does not have: {sorted(unknown)}")
            per_layer = [permutations.get(l.name) for l in self.layers]
        else:
            per_layer = list(permutations)
            if len(per_layer) != len(self.layers):
                raise LayoutError(f"got {len(per_layer)} permutations for {len(self.layers)} layers; "
                                  f"give one per layer (None to keep a layer unpermuted)")
        rows = {}
        for i, (layer, perm) in enumerate(zip(self.layers, per_layer)):
            converted = _coord_rows_from_any(perm, layer)
            if converted is not None:
                rows[i] = converted
        return self.with_coord_rows(rows)

    def with_coord_rows(self, coord_rows: Mapping[int, torch.Tensor]) -> "WeightLayout":
        """A copy with permutations given in canonical form (layer index -> coord rows)."""
        return WeightLayout(self.layers, self.kernel_size, self.normalization, coord_rows,
                            self.model_signature)

    # ------------------------------------------------------------------ queries
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def max_dim(self) -> int:
        """M of global normalisation: the largest dimension of any represented weight shape."""
        return max(max(l.shape) for l in self.layers)

    @property
    def is_permuted(self) -> bool:
        return bool(self._coord_rows)

    def layer(self, key: Union[int, str]) -> LayerSpec:
        """The layer named ``key``, or at index ``key`` (negative indices count from the end, as in
        a list)."""
        if isinstance(key, str):
            for l in self.layers:
                if l.name == key:
                    return l
            raise KeyError(f"no represented layer named '{key}'; layers: {self.names}")
        index, n = as_int(key, "a layer index", error=TypeError), self.num_layers
        if not -n <= index < n:
            raise IndexError(f"layer index {index} is out of range: the layout has {n} layers "
                             f"(indices 0..{n - 1}, or -{n}..-1 from the end)")
        return self.layers[index]

    def layer_range(self, layers: range) -> LayerRange:
        """Where the consecutive ``layers`` (a non-empty ``range`` with step 1 inside
        0..num_layers) lie in the flat index spaces; ValueError otherwise."""
        if not isinstance(layers, range) or layers.step != 1 or len(layers) == 0 or \
                layers.start < 0 or layers.stop > self.num_layers:
            raise ValueError(f"layers must be a non-empty range of consecutive layers of the layout "
                             f"(within 0..{self.num_layers}), got {layers!r}")
        a, b = layers.start, layers.stop
        span = self._ranges.get((a, b))
        if span is None:
            first, last = self.layers[a], self.layers[b - 1]
            span = LayerRange(range(a, b),
                              (first.kernel_offset, last.kernel_offset + last.num_kernels),
                              (first.weight_offset, last.weight_offset + last.num_weights),
                              (self._filter_starts[a], self._filter_starts[b]),
                              (self._channel_starts[a], self._channel_starts[b]),
                              self.num_layers)
            self._ranges[(a, b)] = span
        return span

    def layer_coord_rows(self, index: int) -> Optional[torch.Tensor]:
        return self._coord_rows.get(index)

    def coord_rows(self) -> Optional[torch.Tensor]:
        """Per flat kernel slot, the (layer-local) coordinate row it decodes; None if unpermuted."""
        if not self._coord_rows:
            return None
        return torch.cat([self._coord_rows.get(i, torch.arange(l.num_kernels))
                          for i, l in enumerate(self.layers)])

    def normalized_positions(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Normalised (layer, filter, channel) positions as float32, computed as NeRN does.

        NeRN divides Python ints in double precision and stores float32; float32 division of the
        same integers rounds identically, but we compute in float64 and cast to be certain.
        """
        L = self.num_layers
        if self.normalization == "local":
            dl = float(L)
            df = [float(l.c_out) for l in self.layers]
            dc = [float(l.c_in) for l in self.layers]
        elif self.normalization == "global":
            m = float(self.max_dim)
            dl, df, dc = m, [m] * L, [m] * L
        else:
            dl, df, dc = 1.0, [1.0] * L, [1.0] * L
        f64 = torch.float64
        pos_layer = (torch.arange(L, dtype=f64) / dl).float()
        pos_filter = [(torch.arange(l.c_out, dtype=f64) / d).float() for l, d in zip(self.layers, df)]
        pos_channel = [(torch.arange(l.c_in, dtype=f64) / d).float() for l, d in zip(self.layers, dc)]
        return pos_layer, pos_filter, pos_channel

    def tensors(self, device: Union[str, torch.device] = "cpu") -> LayoutTensors:
        """Metadata tensors on ``device`` (cached)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in self._tensors:
            self._tensors[key] = LayoutTensors(self, device)
        return self._tensors[key]

    # ------------------------------------------------------------------ weights
    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer conv weights as views of one flat buffer."""
        if flat.dim() != 1 or flat.numel() != self.num_weights:
            raise ValueError(f"expected a flat buffer of {self.num_weights} weights, got shape "
                             f"{tuple(flat.shape)}")
        # One split (its backward is one cat) rather than a slice per layer (whose backwards each
        # fill a zero buffer of the whole network and are then summed).
        sizes = [l.num_weights for l in self.layers]
        return [part.view(l.shape) for part, l in zip(flat.split_with_sizes(sizes), self.layers)]

    def model_weights(self, model: nn.Module) -> list[torch.Tensor]:
        """The represented conv weights of ``model`` (after checking it matches): its own weight
        Parameters (an attached model, tied or computed weights are refused: a write would be lost)."""
        self.check_model(model)
        modules = dict(model.named_modules())
        chosen = [(l.name, modules[l.name]) for l in self.layers]
        _check_representable_weights(chosen)
        for n, m in chosen:
            if m.weight.is_meta:
                raise LayoutError(f"layer '{n}': the model's weights are on the meta device (shapes, no "
                                  f"values to read or write); materialise the model first, e.g. "
                                  f"model.to_empty(device='cpu'), then load_into / load_state_dict")
        return [m.weight for _, m in chosen]

    def flatten(self, weights: Union[nn.Module, Sequence[torch.Tensor]]) -> torch.Tensor:
        """One flat buffer of per-layer weights (a model or a list in layout order)."""
        if isinstance(weights, nn.Module):
            weights = self.model_weights(weights)
        if len(weights) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} weight tensors, got {len(weights)}")
        for w, l in zip(weights, self.layers):
            if tuple(w.shape) != l.shape:
                raise ValueError(f"layer '{l.name}': expected weight shape {l.shape}, got {tuple(w.shape)}")
        return torch.cat([w.detach().reshape(-1) for w in weights])

    def kernel_rows(self, flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows of k·k values for flat kernel indices, in the format of a subset decode.

        A layer with s < k fills the first s·s entries (its s×s kernel, row-major); the rest are 0.
        """
        k2 = self.kernel_size ** 2
        t = self.tensors(flat.device)
        rows = rows.to(flat.device, torch.long)
        layer = t.layer_of(rows)
        size = t.size[layer]
        local = rows - t.kernel_offsets[layer]
        start = t.weight_offsets[layer] + local * size * size
        col = torch.arange(k2, device=flat.device)
        valid = col[None, :] < (size * size)[:, None]
        index = torch.where(valid, start[:, None] + col[None, :], torch.zeros_like(start)[:, None])
        return torch.where(valid, flat[index], torch.zeros((), dtype=flat.dtype, device=flat.device))

    def check_model(self, model: nn.Module) -> None:
        """Raise a clear error unless ``model`` has every layer of this layout with the same shape."""
        modules = dict(model.named_modules())
        theirs = conv_signature(model)
        wrapped = _wrapper_hint([n for n, _ in (self.model_signature or [(l.name, 0) for l in self.layers])],
                                [n for n, _ in theirs])
        if wrapped is not None and (self.model_signature is not None
                                    or any(l.name not in modules for l in self.layers)):
            raise LayoutError(wrapped)
        if self.model_signature is not None:
            if theirs != self.model_signature:
                mine, got = dict(self.model_signature), dict(theirs)
                diff = [f"{n}: {sh} (expected {mine[n]})" if n in mine else
                        f"{n}: {sh} (not in the layout's model)" for n, sh in theirs if mine.get(n) != sh]
                diff += [f"{n}: {sh} (missing from the model)" for n, sh in mine.items() if n not in got]
                diff = diff or ["the same convs in another order"]
                raise LayoutError(f"the model's conv layers differ from those of the model this layout "
                                  f"was made from ({'; '.join(diff[:3])}); was the predictor made for "
                                  f"another architecture?")
        for l in self.layers:
            m = modules.get(l.name)
            if m is None:
                raise LayoutError(f"the model has no module '{l.name}' that this layout represents; "
                                  f"was the predictor made for another architecture?")
            if not isinstance(m, nn.Conv2d):
                raise LayoutError(f"module '{l.name}' is a {type(m).__name__}, the layout expects Conv2d")
            if _weight_shape(l.name, m) != l.shape:
                raise LayoutError(f"layer '{l.name}': the model's weight is {tuple(m.weight.shape)}, the "
                                  f"layout expects {l.shape}; was the predictor made for another "
                                  f"architecture?")

    # ------------------------------------------------------------------ (de)serialisation
    def describe(self) -> dict:
        """A plain description (str/int/list/tensor only) that :meth:`from_description` restores."""
        return {
            "kernel_size": self.kernel_size,
            "normalization": self.normalization,
            "layers": [{"name": l.name, "shape": list(l.shape), "crop": l.crop} for l in self.layers],
            "coord_rows": {str(i): r.clone() for i, r in self._coord_rows.items()},
            "model_signature": (None if self.model_signature is None else
                                [[n, list(sh)] for n, sh in self.model_signature]),
        }

    @classmethod
    def from_description(cls, desc: Mapping) -> "WeightLayout":
        try:
            layers = [(d["name"], tuple(d["shape"]), d.get("crop", "center")) for d in desc["layers"]]
            rows = {int(i): r for i, r in dict(desc.get("coord_rows", {})).items()}
            signature = desc.get("model_signature")
            return cls(layers, int(desc["kernel_size"]), str(desc["normalization"]), rows,
                       None if signature is None else [(n, tuple(sh)) for n, sh in signature])
        except (KeyError, TypeError) as exc:
            raise LayoutError(f"layout description is incomplete or malformed ({exc!r})") from exc

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightLayout):
            return NotImplemented
        return (self.layers == other.layers and self.kernel_size == other.kernel_size
                and self.normalization == other.normalization
                and self._coord_rows.keys() == other._coord_rows.keys()
                and all(torch.equal(r, other._coord_rows[i]) for i, r in self._coord_rows.items()))

    __hash__ = None  # mutable caches inside; compare with ==

    def __repr__(self) -> str:
        return (f"WeightLayout({self.num_layers} layers, {self.num_kernels} kernels, "
                f"{self.num_weights} weights, k={self.kernel_size}, normalization='{self.normalization}'"
                f"{', permuted' if self.is_permuted else ''})")

    def table(self) -> str:
        """A text table of layers, kernels and weights."""
        head = f"{'#':>3}  {'layer':<28} {'shape':<20} {'kernels':>9} {'weights':>10} {'crop':<7} perm"
        lines = [head, "-" * len(head)]
        for i, l in enumerate(self.layers):
            lines.append(f"{i:>3}  {l.name:<28} {str(l.shape):<20} {l.num_kernels:>9} "
                         f"{l.num_weights:>10} {l.crop:<7} {'yes' if i in self._coord_rows else '-'}")
        lines.append("-" * len(head))
        lines.append(f"{'':>3}  {'total':<28} {'':<20} {self.num_kernels:>9} {self.num_weights:>10}")
        return "\n".join(lines)


def replace_crop(layout: WeightLayout, crop: str) -> WeightLayout:
    """The same layout with every layer using ``crop``."""
    layers = [dataclasses.replace(l, crop=crop) for l in layout.layers]
    return WeightLayout(layers, layout.kernel_size, layout.normalization,
                        {i: layout.layer_coord_rows(i) for i in range(layout.num_layers)
                         if layout.layer_coord_rows(i) is not None}, layout.model_signature)


def conv_signature(model: nn.Module) -> tuple:
    """(name, weight shape) of every Conv2d of ``model``, in module order."""
    return tuple((n, _weight_shape(n, m)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _wrapper_hint(mine: Sequence[str], theirs: Sequence[str]) -> Optional[str]:
    """A message if the two lists of conv names differ only by one prefix (a torch.compile,
    DataParallel or DistributedDataParallel wrapper on one side), else None."""
    if not mine or len(mine) != len(theirs) or list(mine) == list(theirs):
        return None
    for longer, shorter, model_is_wrapped in ((theirs, mine, True), (mine, theirs, False)):
        prefix = longer[0][:len(longer[0]) - len(shorter[0])]
        if prefix.endswith(".") and all(a == prefix + b for a, b in zip(longer, shorter)):
            known = "torch.compile adds '_orig_mod.', DataParallel / DistributedDataParallel 'module.'"
            if model_is_wrapped:
                return (f"the model looks wrapped: its conv layers are those of the layout's model under "
                        f"the prefix '{prefix}' ({known}); pass the inner module (model.module or "
                        f"model._orig_mod), or make the layout from the wrapper")
            return (f"the layout was made from a wrapped model: its layers carry the prefix '{prefix}' "
                    f"that this model's lack ({known}); pass the wrapper, or make the layout from the "
                    f"inner model")
    return None

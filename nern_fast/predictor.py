"""FastPredictor: the NeRN predictor MLP as a drop-in module whose decode runs on the fastest backend."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .encoding import EncodingSpec
from .io import FileFormatError, PathLike, atomic_save, describe_contents, safe_load
from .layout import IncludeSpec, LayoutError, WeightLayout, as_int
from .reference import check_precision

FILE_FORMAT = "nern_fast.predictor"
FILE_VERSION = 1


class FastPredictor(nn.Module):
    """Maps the positional encoding of every kernel coordinate of ``layout`` to its k×k weights.

    MLP (NERN_SPEC §5): ``Linear(6·levels → H), ReLU, (num_blocks-2) × [Linear(H → H), ReLU],
    Linear(H → k²)`` with NeRN's parameter names (``layers.{i}``, ``final_linear_layer``).
    ``backend`` picks the decoder ("auto", "eager", "triton", "csrc"); ``precision`` is "fp32",
    "tf32" or "bf16" (bf16 operands, fp32 accumulation).

    Which backend decodes, by precedence: a name given now (this constructor, ``load(...,
    backend=...)``, ``load_compressed(..., backend=...)``, ``pred.backend = ...``), then the
    ``NERN_FAST_BACKEND`` environment variable, then a name that merely came from a file (saved
    perhaps on another machine: a file saved with "triton" on a GPU loads on a CPU with
    ``NERN_FAST_BACKEND=csrc`` or ``backend="csrc"``), then "auto". A name chosen that way other
    than "auto" raises :class:`~nern_fast.ops.BackendUnavailable` when it cannot decode a call,
    rather than falling back to another backend.
    """

    def __init__(self, layout: WeightLayout, hidden: int = 280, num_blocks: int = 5, levels: int = 40,
                 base: float = 0.76, encoding: str = "basic", gauss_scale: Sequence[float] = (1, .1, .1),
                 backend: str = "auto", precision: str = "fp32", init: str = "fmod"):
        super().__init__()
        if not isinstance(layout, WeightLayout):
            raise TypeError(f"layout must be a WeightLayout (WeightLayout.from_model(model)), got "
                            f"{type(layout).__name__}; or use FastPredictor.for_model(model)")
        hidden = as_int(hidden, "hidden (the MLP width)", minimum=1, error=ValueError)
        num_blocks = as_int(num_blocks, "num_blocks (MLP layers, input and output included)", minimum=2,
                            error=ValueError)
        levels = as_int(levels, "levels (encoding frequencies)", minimum=1, error=ValueError)
        if init not in ("fmod", "default"):
            raise ValueError(f"init must be 'fmod' (NeRN) or 'default', got {init!r}")
        self.layout = layout
        self.encoding = EncodingSpec(encoding, levels, base, tuple(gauss_scale))
        self.hidden = hidden
        self.num_blocks = num_blocks
        self.precision = check_precision(precision)
        self.backend = backend  # given now (from_file_dict marks a name read from a file)
        sizes = [self.encoding.size] + [hidden] * (num_blocks - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.final_linear_layer = nn.Linear(hidden, layout.kernel_size ** 2)
        if init == "fmod":
            with torch.no_grad():
                for p in self.parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.fmod(p, 2))

    @classmethod
    def for_model(cls, model: nn.Module, kernel_size: int = 3, include: IncludeSpec = None,
                  normalization: str = "local", crop: str = "center", permutations: Any = None,
                  **kwargs) -> "FastPredictor":
        """A predictor for ``model``'s conv layers (layout keywords pass to WeightLayout.from_model)."""
        layout = WeightLayout.from_model(model, kernel_size=kernel_size, include=include,
                                         normalization=normalization, crop=crop,
                                         permutations=permutations)
        return cls(layout, **kwargs)

    @classmethod
    def from_nern(cls, checkpoint: Union[PathLike, dict], model: nn.Module, config: Union[PathLike, dict],
                  permutations: Any = None, **kwargs) -> "FastPredictor":
        """A predictor from the official NeRN code's checkpoint and YAML config (see nern_compat).
        ``include`` (a keyword) defaults to ``"auto"``: the convs NeRN's code represents in that
        network (:func:`nern_fast.nern_compat.nern_layer_set`; the stem too in CIFAR ResNets)."""
        from .nern_compat import predictor_from_nern
        return predictor_from_nern(cls, checkpoint, model, config, permutations, **kwargs)

    # ------------------------------------------------------------------ parameters
    def weights(self) -> list[torch.Tensor]:
        return [l.weight for l in self.layers] + [self.final_linear_layer.weight]

    def biases(self) -> list[torch.Tensor]:
        return [l.bias for l in self.layers] + [self.final_linear_layer.bias]

    @property
    def backend(self) -> str:
        """The backend name this predictor asks the dispatcher for now (precedence: see the class
        docstring and :func:`nern_fast.ops.requested_backend_name`)."""
        return ops.requested_backend_name(self._backend_name, from_file=self._backend_from_file)

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend_name, self._backend_from_file = name, False

    @property
    def config(self) -> dict:
        """Constructor arguments (besides the layout) that recreate this predictor."""
        e = self.encoding
        return {"hidden": self.hidden, "num_blocks": self.num_blocks, "levels": e.levels,
                "base": e.base, "encoding": e.kind, "gauss_scale": list(e.gauss_scale),
                "backend": self._backend_name,  # as given or read: never NERN_FAST_BACKEND's
                "precision": self.precision}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def represented_parameters(self) -> int:
        return self.layout.num_weights

    @property
    def compression_ratio(self) -> float:
        """Predictor parameters / represented conv parameters (< 1 compresses)."""
        return self.num_parameters / self.represented_parameters

    # ------------------------------------------------------------------ decoding
    def decode_flat(self) -> torch.Tensor:
        """Every represented conv weight in one flat buffer (layout order)."""
        return ops.decode(self.weights(), self.biases(), self.layout, self.encoding, None,
                          self.precision, self.backend)

    def forward(self) -> list[torch.Tensor]:
        """The conv weights of every represented layer, as views of one decoded buffer."""
        return self.layout.split(self.decode_flat())

    def decode_kernels(self, rows: torch.Tensor) -> torch.Tensor:
        """Decode the flat kernel indices ``rows`` -> ``(len(rows), k·k)`` (see reference.py)."""
        if isinstance(rows, (list, tuple)) and len(rows) == 0:
            rows = torch.empty(0, dtype=torch.long)  # as_tensor([]) would be float32
        try:
            rows = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"rows must be flat kernel indices (an integer tensor, array or list), got "
                            f"{type(rows).__name__}: {exc}") from None
        if rows.is_meta:
            raise ValueError("rows is a meta tensor (no values); give the kernel indices on the "
                             "predictor's device or the CPU")
        if rows.device != self.layers[0].weight.device:
            rows = rows.to(self.layers[0].weight.device)
        return ops.decode(self.weights(), self.biases(), self.layout, self.encoding, rows.reshape(-1),
                          self.precision, self.backend)

    def decode_layer(self, index: Union[int, str]) -> torch.Tensor:
        """One layer's conv weight ``(C_out, C_in, s, s)``, decoding only that layer's kernels;
        ``index``: a layer name or position (negative counts from the end; IndexError if outside)."""
        layer = self.layout.layer(index)
        device = self.layers[0].weight.device
        rows = torch.arange(layer.kernel_offset, layer.kernel_offset + layer.num_kernels, device=device)
        out = self.decode_kernels(rows)
        s2 = layer.size * layer.size
        return (out if s2 == out.shape[1] else out[:, :s2]).reshape(layer.shape)

    @torch.no_grad()
    def load_into(self, model: nn.Module) -> nn.Module:
        """Write the decoded weights into ``model``'s represented conv weights (in place)."""
        targets = self.layout.model_weights(model)
        for target, decoded in zip(targets, self.forward()):
            target.copy_(decoded.to(dtype=target.dtype, device=target.device))
        return model

    def extra_repr(self) -> str:
        e = self.encoding
        return (f"hidden={self.hidden}, num_blocks={self.num_blocks}, encoding={e.kind}(levels="
                f"{e.levels}, base={e.base}), kernel={self.layout.kernel_size}, "
                f"layers={self.layout.num_layers}, kernels={self.layout.num_kernels}, "
                f"precision={self.precision}, backend={self.backend}, "
                f"compression_ratio={self.compression_ratio:.4f}")

    # ------------------------------------------------------------------ files
    def to_file_dict(self) -> dict:
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "config": self.config,
                "layout": self.layout.describe(),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    def save(self, path: PathLike) -> None:
        """One file: config + layout + weights, written atomically (temp file, then rename)."""
        atomic_save(self.to_file_dict(), path)

    @classmethod
    def from_file_dict(cls, data: dict, model: Optional[nn.Module] = None, source: str = "<dict>",
                       **overrides) -> "FastPredictor":
        found = data.get("format")
        if isinstance(found, str) and found != FILE_FORMAT:  # another file of ours
            raise FileFormatError(f"{source}: expected a predictor file, found {describe_contents(data)}")
        if data.get("version", 0) > FILE_VERSION:
            raise FileFormatError(f"{source}: written by a newer nern_fast (file version "
                                  f"{data.get('version')}, this one reads {FILE_VERSION}); upgrade")
        try:
            layout = WeightLayout.from_description(data["layout"])
            config = {**dict(data["config"]), **overrides}
            state = data["state_dict"]
        except (KeyError, TypeError, LayoutError) as exc:
            raise FileFormatError(f"{source}: predictor file is incomplete ({exc})") from exc
        if model is not None:
            try:
                layout.check_model(model)
            except LayoutError as exc:
                raise LayoutError(f"{source} does not fit the given model: {exc}") from exc
        pred = cls(layout, init="default", **config)
        if "backend" not in overrides:  # the file's name yields to NERN_FAST_BACKEND (class docstring)
            pred._backend_from_file = True
        first = next(iter(state.values()), None) if isinstance(state, dict) else None
        if isinstance(first, torch.Tensor):
            # The stored device and dtype, set before loading: an fp32 module would round a float64 state.
            pred.to(first.device, **({"dtype": first.dtype} if first.is_floating_point() else {}))
        try:
            pred.load_state_dict(state)
        except RuntimeError as exc:
            raise FileFormatError(f"{source}: weights do not match the stored config ({exc})") from exc
        return pred

    @classmethod
    def load(cls, path: PathLike, model: Optional[nn.Module] = None, map_location=None,
             **overrides) -> "FastPredictor":
        """Read a file written by :meth:`save`; with ``model``, check that the predictor fits it.

        ``overrides`` replace constructor arguments stored in the file, e.g. ``backend="csrc"`` for
        a predictor saved with ``"triton"`` on a GPU machine (a name given here beats
        ``NERN_FAST_BACKEND``, which beats the file's)."""
        data = safe_load(path, FILE_FORMAT, map_location=map_location)
        return cls.from_file_dict(data, model, str(path), **overrides)

    # ------------------------------------------------------------------ inference (nern_fast.inference)
    def attach(self, model: nn.Module, mode: str = "on_demand", cache_bytes: Optional[int] = None,
               prefetch: bool = True, graphs: bool = False, group_bytes: Optional[int] = None,
               workspace_bytes: Optional[int] = None) -> nn.Module:
        """Run ``model`` from this predictor: "on_demand", "cached" or "materialized" (see inference)."""
        from .inference import attach
        return attach(self, model, mode=mode, cache_bytes=cache_bytes, prefetch=prefetch, graphs=graphs,
                      group_bytes=group_bytes, workspace_bytes=workspace_bytes)

    def detach(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`attach`: ``model`` gets ordinary parameters holding the decoded weights."""
        from .inference import detach
        return detach(model, self)

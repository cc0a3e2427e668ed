"""The compressed model file: a network stored as its predictor plus what the predictor does not hold.

One file (``torch.save`` of plain dicts, lists, strings, numbers and tensors; written atomically,
read with ``torch.load(weights_only=True)``)::

    {"format": "nern_fast.compressed_model", "version": 1,
     "predictor": {"config": ..., "layout": ..., "storage": "fp32"|"fp16"|"bf16"|"int8",
                   "dtype": "float32", "state": {name: tensor | {"int8": q, "scale": s}}},
     "state_dict": {key: tensor}   # every parameter and buffer that is not represented
     "architecture": {"model_class", "model_spec", "conv_signature", "represented", "entries",
                      "structure_digest"}}

``architecture.entries`` lists the key, shape and dtype of every entry of the model's state dict
(represented weights included) and ``conv_signature`` every Conv2d's name and weight shape: a model
built for loading must match both exactly, so a file for another architecture is rejected with the
first differences named. ``structure_digest`` (:func:`structure_digest`; absent from older files)
digests the module tree (names, types, ``extra_repr``), which the state dict does not show: a model
from ``model_fn`` that matches the entries but not the tree (a maxpool replaced, a stride changed)
loads with an :class:`ArchitectureWarning`, as its outputs will not be the saved model's.

Predictor storage (``predictor_dtype``): ``fp32`` (exact), ``fp16`` / ``bf16`` (every predictor
tensor rounded), ``int8`` (each weight matrix quantised symmetrically per output row: ``q =
round(w / s)``, ``s = max|w_row| / 127``, biases kept in fp32). Loading gives a predictor of the
dtype it had when saved (``predictor.dtype`` in the file; float32 for a file without it), holding the
stored values; the rest of the model is stored at full precision.

A :class:`ModelSpec` records how to rebuild the network without user code: ``cifar_resnet``
(depth, num_classes, in_channels, width), ``torchvision`` (builder name, num_classes) or
``registry`` (a built-in architecture name of ``nern_fast.models.build_model`` with num_classes,
in_channels, image_size: what ``nern-fast train-base`` model files record). cifar_resnet and
torchvision specs are inferred when saving; every spec is checked by building the model on the
``meta`` device and comparing its whole module tree with the model's (names, types, ``extra_repr``
and plain attributes: a torchvision model with its maxpool replaced or a stride changed has the same
parameters but is another network, so it gets no spec). For any other network pass ``model_fn`` to
:func:`load_compressed`.

Represented weights are found by identity, not by name: a conv registered under two names, or
another module's Parameter that is a represented conv's weight, is not stored either; loading needs
a model that shares those weights the same way.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .io import FileFormatError, PathLike, atomic_save, safe_load
from .layout import LayoutError, conv_signature
from .predictor import FastPredictor

FORMAT = "nern_fast.compressed_model"
VERSION = 1
PREDICTOR_DTYPES = ("fp32", "fp16", "bf16", "int8")
_FLOAT_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_INT8_MAX = 127


class ArchitectureMismatch(LayoutError):
    """A model that does not have the architecture a compressed file was saved from."""


class StorageDtypeError(ValueError):
    """A predictor that the chosen ``predictor_dtype`` cannot store (or an unknown dtype name)."""


class ArchitectureWarning(UserWarning):
    """A model from ``model_fn`` whose module tree differs from the saved network's while its convs
    and state-dict entries match (a pooling layer replaced, a stride changed)."""


# ---------------------------------------------------------------------- model spec
@dataclass(frozen=True)
class ModelSpec:
    """How to build a network from a name and keyword arguments (no user code, no pickles)."""

    kind: str  # "cifar_resnet" | "torchvision" | "registry"
    args: dict = field(default_factory=dict)

    KINDS = ("cifar_resnet", "torchvision", "registry")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"model spec kind '{self.kind}' is not one of {self.KINDS}")
        if self.kind == "registry" and ":" in str(self.args.get("arch", "")):
            # A file must never make us import code it names; user models come with model_fn.
            raise ValueError(f"model spec {self.args.get('arch')!r} names user code; pass model_fn")

    def build(self) -> nn.Module:
        if self.kind == "cifar_resnet":
            from .models import cifar_resnet
            return cifar_resnet(**self.args)
        if self.kind == "registry":
            from . import models
            if not hasattr(models, "build_model"):
                raise ImportError(f"this nern_fast has no model registry to build {self.describe()}; "
                                  f"pass model_fn")
            return models.build_model(**self.args)
        try:
            import torchvision
        except ImportError as exc:
            raise ImportError(f"building {self.describe()} needs torchvision, which is not installed; "
                              f"install it or pass model_fn") from exc
        args = dict(self.args)
        name = args.pop("name")
        return torchvision.models.get_model(name, weights=None, **args)

    def describe(self) -> dict:
        return {"kind": self.kind, "args": dict(self.args)}

    @classmethod
    def from_description(cls, desc: Any) -> "ModelSpec":
        if not isinstance(desc, dict) or "kind" not in desc:
            raise ValueError(f"a model spec is a dict {{'kind': ..., 'args': {{...}}}}, got {desc!r}")
        return cls(str(desc["kind"]), dict(desc.get("args") or {}))

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``resnet20`` (CIFAR ResNet-20), ``cifar_resnet:depth=56,num_classes=100`` or
        ``torchvision:resnet18[,num_classes=10]`` (the CLI's ``--model``)."""
        text = text.strip()
        if text.startswith("resnet") and text[6:].isdigit():
            return cls("cifar_resnet", {"depth": int(text[6:])})
        kind, _, rest = text.partition(":")
        if kind not in cls.KINDS or not rest:
            raise ValueError(f"cannot read model '{text}': use e.g. resnet20, "
                             f"cifar_resnet:depth=56,num_classes=100 or torchvision:resnet18")
        args: dict = {}
        for i, part in enumerate(p for p in rest.split(",") if p):
            key, eq, value = part.partition("=")
            if not eq:
                if kind == "torchvision" and i == 0:
                    args["name"] = key
                    continue
                raise ValueError(f"model '{text}': '{part}' is not key=value")
            args[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
        if kind == "torchvision" and "name" not in args:
            raise ValueError(f"model '{text}': name the torchvision builder, e.g. torchvision:resnet18")
        return cls(kind, args)

    @classmethod
    def infer(cls, model: nn.Module) -> Optional["ModelSpec"]:
        """A spec that rebuilds ``model``'s architecture, or None (checked on the meta device)."""
        for spec in _candidate_specs(model):
            try:
                if _same_architecture(spec.build_on_meta(), model):
                    return spec
            except Exception:  # a candidate that cannot even be built is simply not the one
                continue
        return None

    def build_on_meta(self) -> nn.Module:
        with torch.device("meta"):
            return self.build()


def _candidate_specs(model: nn.Module) -> list[ModelSpec]:
    from .models.cifar_resnet import CifarResNet
    if isinstance(model, CifarResNet):
        return [ModelSpec("cifar_resnet", {"depth": model.depth, "num_classes": model.linear.out_features,
                                           "in_channels": model.conv1.in_channels,
                                           "width": model.conv1.out_channels})]
    if not type(model).__module__.startswith("torchvision.models"):
        return []
    try:
        import torchvision
    except ImportError:
        return []
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    extra = {"num_classes": linears[-1].out_features} if linears else {}
    cls_name = type(model).__name__.lower()
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        flat = name.replace("_", "").lower()
        # A builder defined in the class's module (Inception3 is inception_v3's, SwinTransformer
        # swin_t's: their names do not start with the class's), or named after the class.
        same_module = getattr(torchvision.models.get_model_builder(name), "__module__", None) == type(model).__module__
        if same_module or flat.startswith(cls_name) or (
                cls_name == "resnet" and flat.startswith(("wideresnet", "resnext"))):
            names.append(name)
    return [ModelSpec("torchvision", {"name": n, **extra}) for n in names]


def model_entries(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) of every entry of ``model``'s ordinary state dict, without decoding:
    an attached model's represented weights are read from their placeholders."""
    from .inference import represented_as_placeholders
    with represented_as_placeholders():
        state = model.state_dict()
    return {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in state.items()}


def architecture_differences(expected_convs: list, expected_entries: dict, model: nn.Module) -> list[str]:
    """What differs between a recorded architecture and ``model`` (names and shapes; not dtypes)."""
    problems = []
    theirs = list(conv_signature(model))
    if theirs != expected_convs:
        want, got = dict(expected_convs), dict(theirs)
        problems += [f"conv '{n}' is {got[n]}, expected {want[n]}" for n in got if n in want and want[n] != got[n]]
        problems += [f"conv '{n}' is missing" for n in want if n not in got]
        problems += [f"the model has conv '{n}', not expected" for n in got if n not in want]
        if not problems:
            problems.append("the conv layers come in another order")
    got = model_entries(model)
    problems += [f"'{k}' has shape {got[k][0]}, expected {expected_entries[k][0]}" for k in got
                 if k in expected_entries and got[k][0] != expected_entries[k][0]]
    problems += [f"'{k}' is missing from the model" for k in expected_entries if k not in got]
    problems += [f"the model has '{k}', not expected" for k in got if k not in expected_entries]
    return problems


def _attribute_token(value: Any) -> Any:
    """A comparable stand-in for a module attribute: plain values as they are, others by type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_attribute_token(v) for v in value)
    return f"<{type(value).__qualname__}>"


def module_tree(model: nn.Module) -> dict[str, tuple]:
    """name -> (type, extra_repr, public plain attributes) of every submodule, aliases included:
    what the state dict does not show (Identity vs MaxPool2d, a stride, a flag ``forward`` reads)."""
    tree = {}
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = {k: _attribute_token(v) for k, v in vars(m).items()
                 if not k.startswith("_") and k != "training" and not isinstance(v, torch.Tensor)}
        tree[name] = (type(m), m.extra_repr(), attrs)
    return tree


def structure_differences(candidate: nn.Module, model: nn.Module) -> list[str]:
    """How ``model``'s module tree differs from ``candidate``'s (the network a spec builds)."""
    want, got = module_tree(candidate), module_tree(model)
    problems = [f"the model has module '{n}' ({got[n][0].__name__}), not built" for n in got if n not in want]
    problems += [f"module '{n}' ({want[n][0].__name__}) is missing from the model" for n in want if n not in got]
    for n in (n for n in got if n in want and got[n] != want[n]):
        (gt, gr, ga), (wt, wr, wa) = got[n], want[n]
        if gt is not wt:
            problems.append(f"'{n}' is {gt.__qualname__}, expected {wt.__qualname__}")
        elif gr != wr:
            problems.append(f"'{n}' is {gt.__name__}({gr}), expected {wt.__name__}({wr})")
        else:
            keys = [k for k in {**wa, **ga} if ga.get(k, "<unset>") != wa.get(k, "<unset>")]
            problems += [f"'{n}'.{k} is {ga.get(k, '<unset>')!r}, expected {wa.get(k, '<unset>')!r}"
                         for k in keys]
    if not problems and list(got) != list(want):
        problems.append("the modules come in another order")
    return problems


def structure_digest(model: nn.Module) -> str:
    """A short digest of ``model``'s module tree: every submodule's name (aliases included), type
    name and ``extra_repr`` (hyperparameters such as strides and kernel sizes). What the state dict
    does not show: a torchvision ResNet with its maxpool replaced has the stock one's entries. 16 hex
    characters in the file instead of the tree itself (kilobytes, a few % of a small file)."""
    tree = [(n, t.__qualname__, r) for n, (t, r, _) in module_tree(model).items()]
    return hashlib.sha256(repr(tree).encode()).hexdigest()[:16]


def _architecture_problems(candidate: nn.Module, model: nn.Module) -> list[str]:
    """Everything that keeps ``candidate`` (built from a spec) from being ``model``'s network."""
    problems = architecture_differences(list(conv_signature(model)), model_entries(model), candidate)
    return problems or structure_differences(candidate, model)


def _same_architecture(candidate: nn.Module, model: nn.Module) -> bool:
    return not _architecture_problems(candidate, model)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise FileFormatError(f"unknown dtype '{name}' in the file")
    return dtype


# ---------------------------------------------------------------------- predictor storage
def quantize_int8(weight: torch.Tensor) -> dict:
    """Symmetric per-output-row int8: ``{"int8": q (rows, cols) int8, "scale": (rows,) float32}``."""
    w = weight.detach().float()
    peak = w.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / _INT8_MAX, torch.ones_like(peak))
    q = torch.round(w / scale[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return {"int8": q.contiguous(), "scale": scale.contiguous()}


def dequantize_int8(entry: dict) -> torch.Tensor:
    return entry["int8"].float() * entry["scale"].float()[:, None]


def _check_representable(name: str, tensor: torch.Tensor, predictor_dtype: str) -> None:
    """Lossy storages must not silently turn values into others: int8 has no NaN or inf (they would
    become arbitrary integers), fp16 overflows to inf beyond 65504."""
    if not tensor.is_floating_point() or predictor_dtype in ("fp32", "bf16"):
        return
    finite = torch.isfinite(tensor)
    if predictor_dtype == "int8" and not bool(finite.all()):
        raise StorageDtypeError(f"predictor tensor '{name}' holds {int((~finite).sum())} NaN/inf values, which "
                         f"int8 storage cannot represent (a diverged predictor?); store it with "
                         f"predictor_dtype='fp32' or fix the predictor")
    limit = torch.finfo(torch.float16).max
    if predictor_dtype == "fp16" and bool((tensor[finite].abs() > limit).any()):
        raise StorageDtypeError(f"predictor tensor '{name}' has values beyond fp16's range (|x| > {limit:.0f}): "
                         f"they would be stored as inf; use predictor_dtype='bf16' or 'fp32'")


def pack_predictor_state(pred: FastPredictor, predictor_dtype: str) -> dict:
    """The predictor's tensors as stored: cast (fp32/fp16/bf16) or int8 per-row quantised."""
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise StorageDtypeError(f"predictor_dtype must be one of {PREDICTOR_DTYPES}, got {predictor_dtype!r}")
    packed = {}
    for name, tensor in pred.state_dict().items():
        tensor = tensor.detach().cpu()
        _check_representable(name, tensor, predictor_dtype)
        if predictor_dtype == "int8":
            packed[name] = quantize_int8(tensor) if tensor.dim() == 2 else tensor.float().clone()
        else:
            packed[name] = tensor.to(_FLOAT_STORAGE[predictor_dtype]).clone()
    return packed


def unpack_predictor_state(packed: dict, dtype: torch.dtype) -> dict:
    state = {}
    for name, entry in packed.items():
        if isinstance(entry, dict):
            if set(entry) != {"int8", "scale"}:
                raise FileFormatError(f"predictor entry '{name}' is neither a tensor nor an int8 "
                                      f"(int8, scale) pair")
            state[name] = dequantize_int8(entry).to(dtype)
        elif isinstance(entry, torch.Tensor):
            state[name] = entry.to(dtype)
        else:
            raise FileFormatError(f"predictor entry '{name}' is a {type(entry).__name__}, not a tensor")
    return state


def predictor_as_stored(pred: FastPredictor, predictor_dtype: str) -> FastPredictor:
    """A copy of ``pred`` with the values it would have after a save/load at ``predictor_dtype``."""
    dtype = pred.layers[0].weight.dtype
    state = unpack_predictor_state(pack_predictor_state(pred, predictor_dtype), dtype)
    copy = FastPredictor(pred.layout, init="default", **pred.config).to(dtype)
    copy.load_state_dict(state)
    return copy.to(pred.layers[0].weight.device)


# ---------------------------------------------------------------------- save / load
def _tensor_key(t: torch.Tensor) -> Optional[tuple]:
    """Same key, same memory (the same Parameter, or a detached view of it); None: nothing to compare."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def represented_keys(model: nn.Module, pred: FastPredictor) -> set[str]:
    """The state-dict keys of ``model`` that hold a weight ``pred`` represents, by identity, not by
    name: a represented conv under every name it is registered as (``self.b = self.a``; attached,
    its placeholder), and any entry that is a represented conv's weight (a Parameter shared by
    another module)."""
    from .inference import represented_as_placeholders
    modules = dict(model.named_modules())
    convs = [modules[l.name] for l in pred.layout.layers]
    weights = {_tensor_key(c.weight) for c in convs} - {None}
    conv_ids = {id(c) for c in convs}
    under_every_name = {f"{n}.weight" if n else "weight"
                        for n, m in model.named_modules(remove_duplicate=False) if id(m) in conv_ids}
    with represented_as_placeholders():
        state = model.state_dict(keep_vars=True)
    return under_every_name | {k for k, v in state.items() if _tensor_key(v) in weights}


def compressed_file_dict(model: nn.Module, pred: FastPredictor, predictor_dtype: str = "fp32",
                         model_spec: Union[str, ModelSpec, dict, None] = "auto") -> dict:
    """The dict :func:`save_compressed` writes (tensors on the CPU, compact storages)."""
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise StorageDtypeError(f"predictor_dtype must be one of {PREDICTOR_DTYPES}, got {predictor_dtype!r}")
    pred.layout.check_model(model)
    from .inference import represented_as_placeholders
    represented = represented_keys(model, pred)
    with represented_as_placeholders():
        state = model.state_dict()
    stored, copies = {}, {}
    for k, v in state.items():
        if k in represented:
            continue
        if v.device.type == "meta":
            raise ValueError(f"'{k}' of the model has no values (a meta tensor): the model is attached "
                             f"to a predictor that represents other layers than the one being saved, "
                             f"or was built on the meta device; detach it (or load its weights) first")
        key = _tensor_key(v)  # one copy per tensor: an alias (self.b = self.a) is stored once
        if key is None or key not in copies:
            copy = v.detach().cpu().clone()
            if key is None:
                stored[k] = copy
                continue
            copies[key] = copy
        stored[k] = copies[key]
    entries = [[k, list(shape), dtype] for k, (shape, dtype) in model_entries(model).items()]
    if model_spec == "auto":
        spec = ModelSpec.infer(model)
    elif model_spec is None:
        spec = None
    else:
        spec = model_spec if isinstance(model_spec, ModelSpec) else (
            ModelSpec.parse(model_spec) if isinstance(model_spec, str) else ModelSpec.from_description(model_spec))
        problems = _architecture_problems(spec.build_on_meta(), model)
        if problems:
            raise ArchitectureMismatch(f"model_spec {spec.describe()} builds another architecture than "
                                       f"the model being saved ({'; '.join(problems[:4])}"
                                       f"{' ...' if len(problems) > 4 else ''}); fix it or pass "
                                       f"model_spec=None (loading then needs model_fn)")
    return {
        "format": FORMAT,
        "version": VERSION,
        "predictor": {"config": pred.config, "layout": pred.layout.describe(), "storage": predictor_dtype,
                      "dtype": _dtype_name(pred.layers[0].weight.dtype),
                      "state": pack_predictor_state(pred, predictor_dtype)},
        "state_dict": stored,
        "architecture": {
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_spec": None if spec is None else spec.describe(),
            "conv_signature": [[n, list(s)] for n, s in conv_signature(model)],
            "represented": sorted(represented),
            "entries": entries,
            "structure_digest": structure_digest(model),
        },
    }


def save_compressed(model: nn.Module, pred: FastPredictor, path: PathLike, predictor_dtype: str = "fp32",
                    model_spec: Union[str, ModelSpec, dict, None] = "auto") -> Path:
    """Write ``model`` as ``pred`` + its unrepresented parameters and buffers, to one file.

    ``predictor_dtype``: "fp32", "fp16", "bf16" or "int8" (see the module docstring).
    ``model_spec``: "auto" (infer a cifar_resnet / torchvision spec when possible), None (loading
    will need ``model_fn``), a :class:`ModelSpec`, its description dict, or text such as "resnet56".
    The model may be attached to ``pred`` or hold ordinary weights (its represented conv weights are
    not stored either way).
    """
    return atomic_save(compressed_file_dict(model, pred, predictor_dtype, model_spec), path)


@dataclass
class CompressedFile:
    """A compressed file read and checked, before any model is built."""

    path: str
    predictor: FastPredictor
    storage: str
    state_dict: dict
    architecture: dict

    @property
    def model_spec(self) -> Optional[ModelSpec]:
        desc = self.architecture.get("model_spec")
        return None if desc is None else ModelSpec.from_description(desc)

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`ArchitectureMismatch` naming the first differences unless ``model`` fits."""
        expected_convs = [(n, tuple(s)) for n, s in self.architecture["conv_signature"]]
        expected_entries = {k: (tuple(s), d) for k, s, d in self.architecture["entries"]}
        problems = architecture_differences(expected_convs, expected_entries, model)
        if problems:
            spec = self.architecture.get("model_spec")
            raise ArchitectureMismatch(
                f"{self.path} was saved from another architecture ({self.architecture.get('model_class')}"
                f"{', spec ' + str(spec) if spec else ''}); the given model differs: "
                f"{'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}. Build the model the "
                f"file was saved from (model_fn)")

    def check_structure(self, model: nn.Module) -> None:
        """Warn (:class:`ArchitectureWarning`) when ``model``'s module tree is not the saved one's
        (files that record its digest): the convs and entries match, the network does not."""
        recorded = self.architecture.get("structure_digest")
        if recorded is None or structure_digest(model) == recorded:
            return
        warnings.warn(
            f"{self.path}: the model from model_fn is not the network the file was saved from "
            f"({self.architecture.get('model_class')}): its convs and state-dict entries match, its "
            f"module tree does not (a module's type or a hyperparameter in its repr: a stride, a "
            f"padding, a pooling layer replaced by nn.Identity, but also a BatchNorm momentum). The "
            f"weights load; where the difference acts in evaluation its outputs are not the saved "
            f"model's: build the network the file was saved from",
            ArchitectureWarning, stacklevel=4)

    def build_model(self, model_fn: Union[Callable[[], nn.Module], nn.Module, None] = None) -> nn.Module:
        """The model with the stored state loaded; its represented conv weights are left as built.
        A model from ``model_fn`` whose module tree differs from the saved one's (convs and entries
        matching) loads with an :class:`ArchitectureWarning`."""
        if isinstance(model_fn, nn.Module):
            model = model_fn
        elif model_fn is not None:
            model = model_fn()
            if not isinstance(model, nn.Module):
                raise TypeError(f"model_fn must return an nn.Module, returned {type(model).__name__}")
        else:
            spec = self.model_spec
            if spec is None:
                raise ValueError(f"{self.path} records no buildable model spec (the model is a "
                                 f"{self.architecture.get('model_class')}); pass model_fn, a function "
                                 f"that builds that network, to load_compressed")
            model = spec.build()
        self.check_model(model)
        if model_fn is not None:  # (a spec's model was compared with the whole tree when saving)
            self.check_structure(model)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        represented = represented_keys(model, self.predictor)
        unshared = [k for k in missing if k not in represented and k in self.architecture["represented"]]
        if unshared:
            raise ArchitectureMismatch(
                f"{self.path}: {unshared[:4]} {'is' if len(unshared) == 1 else 'are'} not stored: in the saved "
                f"model {'it is' if len(unshared) == 1 else 'they are'} a represented conv weight under "
                f"another name (a shared module or Parameter), in the given model not; build the model "
                f"so that it shares those weights as the saved one did (model_fn)")
        left = [k for k in missing if k not in represented]
        if left or unexpected:  # check_model makes this unreachable unless the file lies about itself
            raise FileFormatError(f"{self.path}: stored state does not fit the model (missing "
                                  f"{left[:4]}, unexpected {unexpected[:4]})")
        return model


def read_compressed(path: PathLike, map_location=None) -> CompressedFile:
    """Read and check a compressed file: the predictor is built, the model is not."""
    data = safe_load(path, FORMAT, map_location=map_location)
    source = str(path)
    if data.get("version", 0) > VERSION:
        raise FileFormatError(f"{source}: written by a newer nern_fast (file version {data.get('version')}, "
                              f"this one reads {VERSION}); upgrade")
    try:
        p = data["predictor"]
        storage = p["storage"]
        dtype = _dtype_from_name(p.get("dtype", "float32"))  # the predictor's dtype when saved
        state = unpack_predictor_state(p["state"], dtype)
        pred_dict = {"config": p["config"], "layout": p["layout"], "state_dict": state}
        stored, architecture = data["state_dict"], data["architecture"]
        missing = [k for k in ("conv_signature", "represented", "entries") if k not in architecture]
        if missing or not isinstance(stored, dict):
            raise KeyError(f"architecture {missing}" if missing else "state_dict")
    except (KeyError, TypeError) as exc:
        raise FileFormatError(f"{source}: compressed model file is incomplete ({exc!r})") from exc
    if storage not in PREDICTOR_DTYPES:
        raise FileFormatError(f"{source}: unknown predictor storage '{storage}'")
    predictor = FastPredictor.from_file_dict(pred_dict, source=source)
    return CompressedFile(source, predictor, storage, stored, architecture)


def _check_mode_options(mode: str, options: dict) -> None:
    """Refuse options that ``mode`` would ignore, and a ``prefetch`` that is not a bool (any other
    value would silently count as true or false). ``attach`` checks the values of the others."""
    from .inference import MODES
    if mode != "parameters" and mode not in MODES:
        raise ValueError(f"mode must be 'parameters' or one of {MODES}, got {mode!r}")
    given = [name for name, value in options.items() if value is not None]
    if mode == "parameters" and given:
        raise ValueError(f"mode='parameters' would ignore {', '.join(given)}: they apply to an attached "
                         f"model only (mode {' / '.join(map(repr, MODES))}), and 'parameters' writes the "
                         f"decoded weights into ordinary parameters; leave them out or choose such a mode")
    prefetch = options.get("prefetch")
    if prefetch is not None and not isinstance(prefetch, bool):
        raise TypeError(f"prefetch must be True or False, got {prefetch!r}")


def load_compressed(path: PathLike, model_fn: Union[Callable[[], nn.Module], nn.Module, None] = None,
                    mode: str = "parameters", map_location=None, cache_bytes: Optional[int] = None,
                    prefetch: Optional[bool] = None, group_bytes: Optional[int] = None,
                    workspace_bytes: Optional[int] = None,
                    backend: Optional[str] = None) -> tuple[nn.Module, FastPredictor]:
    """Read a file written by :func:`save_compressed` -> ``(model, predictor)``.

    The model comes from ``model_fn`` (a function building it, or a model instance to fill) or,
    without it, from the model spec recorded in the file; it is checked against the recorded
    architecture. ``mode``: "parameters" (the decoded weights written into ordinary parameters: an
    ordinary model), or "on_demand" / "cached" / "materialized" (the model attached to the
    predictor, see :mod:`nern_fast.inference`; ``cache_bytes``, ``prefetch`` (default True),
    ``group_bytes`` and ``workspace_bytes`` as in ``attach``, and refused in "parameters" mode,
    where they would do nothing). Both are on the device of ``map_location`` (CPU by default); the
    model is in ``eval()`` mode, ready for inference.

    ``backend`` replaces the decode backend stored in the file (e.g. "csrc" or "eager" for a file
    saved with "triton" on a GPU machine). Without it ``NERN_FAST_BACKEND``, when set, beats the
    stored name (see :class:`FastPredictor`).
    """
    from .inference import attach
    _check_mode_options(mode, {"cache_bytes": cache_bytes, "prefetch": prefetch,
                                 "group_bytes": group_bytes, "workspace_bytes": workspace_bytes})
    loaded = read_compressed(path, map_location=map_location)
    model = loaded.build_model(model_fn)
    pred = loaded.predictor
    if backend is not None:
        pred.backend = backend
    model.to(pred.layers[0].weight.device).eval()
    if mode == "parameters":
        pred.load_into(model)
    else:
        attach(pred, model, mode=mode, cache_bytes=cache_bytes,
               prefetch=True if prefetch is None else prefetch, group_bytes=group_bytes,
               workspace_bytes=workspace_bytes)
    return model, pred


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict())`` (the plain, uncompressed file)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getbuffer().nbytes

"""Run configuration: YAML files validated into dataclasses.

One file describes a whole job: the network (``model``), its data (``data``), how to train it when
no checkpoint exists (``train_base``), the predictor (``predictor``) and the recipe as a list of
``stages`` (see ``configs/``). Every key is checked: an unknown key or a bad value raises
:class:`ConfigError` naming the key (``stages.1.optim.lr``) and the valid choices.

``--set key=value`` overrides (:func:`apply_overrides`) use the same dotted paths, with list
indices as numbers; values are read as YAML (``--set stages.0.steps=200``,
``--set predictor.permutation=crossfilter``, ``--set model.checkpoint=null``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


# ------------------------------------------------------------------------------ sections
@dataclass
class ModelConfig:
    """The network whose conv weights are represented (or a teacher)."""

    # cifar_resnet20/32/44/56/110, resnet18/34/50 (torchvision), or "package.module:callable"
    arch: str = "cifar_resnet20"
    checkpoint: Optional[str] = None  # nern_fast model file or a plain state_dict
    num_classes: Optional[int] = None  # default: the data set's
    in_channels: Optional[int] = None  # default: the data set's
    # torchvision ResNets: 3×3 stride-1 stem without max-pool (small images such as CIFAR)
    small_input: Optional[bool] = None  # default: true when images are smaller than 64 pixels
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the constructor


@dataclass
class DataConfig:
    dataset: Literal["digits", "cifar10", "cifar100", "imagenet"] = "digits"
    root: Optional[str] = None  # cifar: download folder; imagenet: folder with train/ and val/
    download: bool = True
    image_size: Optional[int] = None  # digits: resize the 8×8 images (default 8); imagenet: crop
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 2  # DataLoader workers (torchvision data sets)
    augment: bool = True  # training batches: digits ±1-pixel shifts; cifar / imagenet crop + flip
    split_seed: int = 0  # digits: the fixed train/test split
    test_fraction: float = 0.2  # digits
    noise: Literal["uniform", "gaussian"] = "uniform"  # data-free inputs (stage inputs: noise)
    max_eval_batches: Optional[int] = None  # cap evaluation (large test sets, quick runs)


@dataclass
class PredictorConfig:
    hidden: int = 280
    num_blocks: int = 5
    levels: int = 40
    base: float = 0.76
    encoding: Literal["basic", "ffn"] = "basic"
    gauss_scale: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.1])
    kernel_size: int = 3
    normalization: Literal["local", "global", "none"] = "local"
    crop: Literal["center", "average", "max"] = "center"
    include: Union[str, list[str]] = "nern"  # "nern", "all" or a list of conv module names
    permutation: Literal["none", "crossfilter", "infilter"] = "none"
    permutation_cache: Optional[str] = None  # folder; default OUT/permutations
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    backend: str = "auto"
    init: Literal["fmod", "default"] = "fmod"


@dataclass
class OptimConfig:
    name: Literal["ranger", "radam", "adamw", "adam", "sgd"] = "ranger"
    lr: float = 5e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    eps: float = 1e-5
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    lookahead_k: int = 6  # ranger
    lookahead_alpha: float = 0.5  # ranger
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0  # linear learning-rate warm-up
    grad_clip: Optional[float] = None  # max gradient norm


@dataclass
class TeacherConfig:
    """A teacher for logit distillation other than the original network."""

    arch: str = "cifar_resnet56"
    checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    in_channels: Optional[int] = None
    small_input: Optional[bool] = None
    kwargs: dict = field(default_factory=dict)


@dataclass
class StageConfig:
    """One training stage of a recipe."""

    type: Literal["reconstruct", "distill"] = "reconstruct"
    name: Optional[str] = None  # default: the type, numbered when repeated
    steps: Optional[int] = None
    epochs: Optional[float] = None  # distill only: passes over the training set
    predictor: Literal["continue", "new"] = "continue"  # new: a fresh predictor (progressive)
    hidden: Optional[int] = None  # size of a new predictor (default predictor.hidden)
    target: Literal["original", "previous"] = "original"  # previous: the last stage's output
    optim: OptimConfig = field(default_factory=OptimConfig)
    weights_batch_size: int = 4096  # kernels per step with gradients
    sampler: Literal["uniform", "random_weighted_batch", "all"] = "random_weighted_batch"
    reconstruction_loss: Literal["l2", "mse"] = "l2"
    reconstruction_weight: float = 1.0
    # distill only
    fmd_weight: float = 0.0  # feature-map distillation (NeRN's attention loss)
    kd_weight: float = 0.0  # logit distillation
    kd_loss: Literal["kl", "stable_kl", "temp_stable_kl"] = "stable_kl"
    temperature: float = 2.0  # temp_stable_kl
    loss_warmup_steps: int = 0  # steps where only the reconstruction term counts
    gradients: Literal["sampled", "full"] = "sampled"  # NeRN's subset, or through every kernel
    inputs: Literal["task", "noise"] = "task"  # noise: data-free distillation
    teacher: Optional[TeacherConfig] = None  # default: the original network
    feature_maps: Union[str, list[str]] = "bn+blocks"  # bn, blocks, bn+blocks, nern or module names
    autocast: Literal["none", "bf16"] = "none"  # CNN forward in bf16 autocast
    cuda_graphs: bool = False  # capture decode + loss + backward in CUDA graphs (static shapes)
    eval_every: Optional[int] = None  # steps between test-set evaluations (default: stage end)


@dataclass
class BaseOptimConfig(OptimConfig):
    """The optimiser of ``train_base``: SGD with momentum and a cosine schedule by default."""

    name: Literal["ranger", "radam", "adamw", "adam", "sgd"] = "sgd"
    lr: float = 0.1
    min_lr: float = 0.0
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class TrainBaseConfig:
    """Training the network to be represented (``nern-fast train-base``)."""

    epochs: float = 30
    optim: BaseOptimConfig = field(default_factory=BaseOptimConfig)
    label_smoothing: float = 0.0
    autocast: Literal["none", "bf16"] = "none"
    # NeRN's CosineSmoothness regulariser on the convs the predictor will represent: the loss
    # gains -smoothness · Σ cos(adjacent kernels) over channels and filters (NeRN trained its
    # networks with 1e-4); smooth weights are what a predictor can represent compactly.
    smoothness: float = 0.0
    # A difference prior on the same convs: + smoothness_l2 · Σ ‖k − k_next‖² over kernels adjacent
    # in the channel and in the filter direction (mean over pairs × number of layers). It makes
    # neighbouring kernels close in value, not only in direction.
    smoothness_l2: float = 0.0


@dataclass
class LoggingConfig:
    log_every: int = 50  # steps between log lines (the only host syncs of a step loop)
    checkpoint_every: int = 500  # steps between checkpoints (and at every stage end)
    progress: bool = True  # tqdm bars, shown on a terminal only
    tensorboard: bool = False  # also log to OUT/tensorboard (needs the tensorboard package)


@dataclass
class Config:
    recipe: str = "custom"  # a label for reports
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    threads: Optional[int] = None  # torch CPU threads (default: torch's choice)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    cudnn_benchmark: bool = True  # time cuDNN's conv algorithms for fixed shapes (off if deterministic)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train_base: TrainBaseConfig = field(default_factory=TrainBaseConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    stages: list[StageConfig] = field(default_factory=list)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Keys of StageConfig that only a distill stage uses.
DISTILL_ONLY = ("epochs", "fmd_weight", "kd_weight", "kd_loss", "temperature", "loss_warmup_steps",
                "gradients", "inputs", "teacher", "feature_maps", "autocast")
FEATURE_MAP_PRESETS = ("bn", "blocks", "bn+blocks", "nern")
MODEL_ARCHS = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
               "cifar_resnet110", "resnet18", "resnet34", "resnet50")
# Seeds are 0 .. 2**32 - 1: torch generators take 64-bit seeds, and the seeds derived from them
# (seed · 1_000_003 + epoch in nern_fast.data) must stay in that range.
SEED_LIMIT = 2 ** 32


# ------------------------------------------------------------------------------ conversion
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list and typing.get_args(tp):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: {value!r} is not a valid value; expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of the valid choices "
                              f"{', '.join(repr(c) for c in choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):
            try:  # YAML 1.1 reads 5e-3 as a string
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # NaN or infinity never make a usable setting
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this file, not the user's


def _build(cls, data: Any, prefix: str):
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{full}: unknown key; valid keys{' of ' + prefix if prefix else ''}: "
                              f"{', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], full)
    obj = cls(**kwargs)
    obj.__dict__["_given"] = frozenset(data)  # keys the user set (checked by _check_stage)
    return obj


# ------------------------------------------------------------------------------ checks
def _positive(value, key: str, allow_zero: bool = False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_model(m, key: str) -> None:
    depth = m.arch[len("cifar_resnet"):] if m.arch.startswith("cifar_resnet") else ""
    if depth.isdigit():
        if (int(depth) - 2) % 6 or int(depth) < 8:
            raise ConfigError(f"{key}.arch: a CIFAR ResNet depth is 6n+2 (8, 14, 20, 32, 44, 56, "
                              f"110, ...), got {m.arch!r}")
    elif m.arch not in MODEL_ARCHS and ":" not in m.arch:
        raise ConfigError(f"{key}.arch: {m.arch!r} is not one of {', '.join(MODEL_ARCHS)} (any "
                          f"cifar_resnet<6n+2>), nor a user model 'package.module:callable'")
    _positive(m.num_classes, f"{key}.num_classes")
    _positive(m.in_channels, f"{key}.in_channels")


def _check_optim(o: OptimConfig, key: str) -> None:
    _positive(o.lr, f"{key}.lr")
    _positive(o.min_lr, f"{key}.min_lr", allow_zero=True)
    _positive(o.weight_decay, f"{key}.weight_decay", allow_zero=True)
    _positive(o.eps, f"{key}.eps")
    _positive(o.warmup_steps, f"{key}.warmup_steps", allow_zero=True)
    _positive(o.grad_clip, f"{key}.grad_clip")
    if o.lookahead_k < 1:
        raise ConfigError(f"{key}.lookahead_k: must be >= 1, got {o.lookahead_k}")
    if not 0 <= o.lookahead_alpha <= 1:
        raise ConfigError(f"{key}.lookahead_alpha: must be in [0, 1], got {o.lookahead_alpha}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"{key}.betas: expected two numbers in [0, 1), got {o.betas!r}")
    if o.min_lr > o.lr:
        raise ConfigError(f"{key}.min_lr: {o.min_lr} is above lr {o.lr}")
    if not 0 <= o.momentum < 1:  # SGD's; 1 or more never forgets a step (the updates grow)
        raise ConfigError(f"{key}.momentum: must be in [0, 1), got {o.momentum}")


def _check_stage(s: StageConfig, key: str) -> None:
    given = getattr(s, "_given", frozenset())
    if s.type == "reconstruct":
        defaults = StageConfig()
        extra = [k for k in DISTILL_ONLY if k in given and getattr(s, k) != getattr(defaults, k)]
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: only a distill stage uses it (this stage has "
                              f"type 'reconstruct'); remove it or set type: distill")
        if s.reconstruction_weight <= 0:
            raise ConfigError(f"{key}.reconstruction_weight: a reconstruct stage needs a weight > 0")
    if s.steps is None and s.epochs is None:
        raise ConfigError(f"{key}: give steps{' or epochs' if s.type == 'distill' else ''}")
    if s.steps is not None and s.epochs is not None:
        raise ConfigError(f"{key}: give steps or epochs, not both")
    _positive(s.steps, f"{key}.steps")
    _positive(s.epochs, f"{key}.epochs")
    _positive(s.hidden, f"{key}.hidden")
    if s.hidden is not None and s.predictor != "new":
        raise ConfigError(f"{key}.hidden: only a new predictor can take another size; set "
                          f"predictor: new")
    _positive(s.weights_batch_size, f"{key}.weights_batch_size")
    for name in ("reconstruction_weight", "fmd_weight", "kd_weight"):
        _positive(getattr(s, name), f"{key}.{name}", allow_zero=True)
    _positive(s.temperature, f"{key}.temperature")
    _positive(s.loss_warmup_steps, f"{key}.loss_warmup_steps", allow_zero=True)
    _positive(s.eval_every, f"{key}.eval_every")
    # With epochs the stage's length is known only at run time. eval_every beyond the stage's
    # steps is fine (evaluation at the stage end only, the default): shortened runs of shipped
    # configs rely on it. The warm-ups are not: they would never end.
    if s.steps is not None:
        if s.optim.warmup_steps > s.steps:
            raise ConfigError(f"{key}.optim.warmup_steps: {s.optim.warmup_steps} is more than the "
                              f"stage's {s.steps} steps, so the learning rate would never reach lr; "
                              f"lower it or raise steps")
        if s.loss_warmup_steps and s.loss_warmup_steps >= s.steps:
            raise ConfigError(f"{key}.loss_warmup_steps: {s.loss_warmup_steps} is not below the "
                              f"stage's {s.steps} steps, so the distillation terms would never count; "
                              f"lower it or raise steps")
    if s.type == "distill":
        if s.reconstruction_weight == 0 and s.fmd_weight == 0 and s.kd_weight == 0:
            raise ConfigError(f"{key}: every loss weight is 0; set kd_weight, fmd_weight or "
                              f"reconstruction_weight")
        if s.inputs == "noise" and s.epochs is not None:
            raise ConfigError(f"{key}.epochs: noise inputs have no epochs; give steps")
        if isinstance(s.feature_maps, str) and s.feature_maps not in FEATURE_MAP_PRESETS:
            raise ConfigError(f"{key}.feature_maps: {s.feature_maps!r} is not one of "
                              f"{', '.join(FEATURE_MAP_PRESETS)} (or a list of module names)")
        if not s.feature_maps and s.fmd_weight > 0:
            raise ConfigError(f"{key}.feature_maps: empty, but fmd_weight is {s.fmd_weight}: name the "
                              f"maps to distil (a preset such as 'bn+blocks' or module names) or set "
                              f"fmd_weight: 0")
        if s.teacher is not None:
            _check_model(s.teacher, f"{key}.teacher")
    _check_optim(s.optim, f"{key}.optim")


def _check_seed(value: int, key: str) -> None:
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{key}: must be an integer in 0 .. {SEED_LIMIT - 1}, got {value}")


def _check_encoding(p: PredictorConfig) -> None:
    """The encoding settings, checked by the encoding itself (the one place of its limits)."""
    from .encoding import EncodingSpec
    try:
        EncodingSpec(p.encoding, p.levels, p.base, tuple(p.gauss_scale))
    except ValueError as exc:
        raise ConfigError(f"predictor: {exc}") from exc


def parse_device(name, key: str = "device", choices: str = "'cpu', 'cuda', 'cuda:N'"):
    """``name`` (a string or torch.device) as a torch.device this library runs on: cpu, cuda or
    cuda:N. Whether the device is present here is :func:`usable_device`'s question."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or not (device.type == "cuda" or str(device) == "cpu"):
        raise ConfigError(f"{key}: {str(name)!r} is not one of {choices}")
    return device


def usable_device(name, key: str = "device"):
    """:func:`parse_device`, and the device must be present on this machine."""
    import torch
    device = parse_device(name, key)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}: {str(name)!r} asks for CUDA, but CUDA is not available here "
                              f"(torch {torch.__version__} sees no GPU); use cpu")
        if (device.index or 0) >= count:
            raise ConfigError(f"{key}: {str(name)!r} is not a device of this machine, which has "
                              f"cuda:0 .. cuda:{count - 1}")
    return device


def validate(cfg: Config) -> Config:
    """Cross-field checks after conversion (raises :class:`ConfigError`)."""
    _check_model(cfg.model, "model")
    _check_seed(cfg.seed, "seed")
    d = cfg.data
    _check_seed(d.split_seed, "data.split_seed")
    for name in ("batch_size", "eval_batch_size", "image_size", "max_eval_batches"):
        _positive(getattr(d, name), f"data.{name}")
    _positive(d.num_workers, "data.num_workers", allow_zero=True)
    if not 0 < d.test_fraction < 1:
        raise ConfigError(f"data.test_fraction: must be in (0, 1), got {d.test_fraction}")
    if d.dataset == "imagenet" and not d.root:
        raise ConfigError("data.root: the imagenet data set needs the folder holding train/ and val/")
    p = cfg.predictor
    for name in ("hidden", "kernel_size"):
        _positive(getattr(p, name), f"predictor.{name}")
    if p.num_blocks < 2:
        raise ConfigError(f"predictor.num_blocks: must be >= 2, got {p.num_blocks}")
    if len(p.gauss_scale) != 3:
        raise ConfigError(f"predictor.gauss_scale: expected 3 numbers, got {p.gauss_scale!r}")
    _check_encoding(p)
    if isinstance(p.include, str) and p.include not in ("nern", "all"):
        raise ConfigError(f"predictor.include: {p.include!r} is not 'nern' or 'all' (or a list of "
                          f"conv module names)")
    if p.backend not in ("auto", "eager", "triton", "csrc"):
        raise ConfigError(f"predictor.backend: {p.backend!r} is not one of 'auto', 'eager', "
                          f"'triton', 'csrc'")
    if cfg.device != "auto":  # whether it is present is checked where it is used
        parse_device(cfg.device, "device", "'auto', 'cpu', 'cuda', 'cuda:N'")
    _positive(cfg.threads, "threads")
    _positive(cfg.train_base.epochs, "train_base.epochs")
    _check_optim(cfg.train_base.optim, "train_base.optim")
    _positive(cfg.train_base.smoothness, "train_base.smoothness", allow_zero=True)
    _positive(cfg.train_base.smoothness_l2, "train_base.smoothness_l2", allow_zero=True)
    if not 0 <= cfg.train_base.label_smoothing < 1:
        raise ConfigError(f"train_base.label_smoothing: must be in [0, 1), got "
                          f"{cfg.train_base.label_smoothing}")
    _positive(cfg.logging.log_every, "logging.log_every")
    _positive(cfg.logging.checkpoint_every, "logging.checkpoint_every")
    names = []
    for i, stage in enumerate(cfg.stages):
        _check_stage(stage, f"stages.{i}")
        if i == 0 and stage.target == "previous":
            raise ConfigError("stages.0.target: the first stage has no previous stage; use original")
        names.append(stage.name)
    given = [n for n in names if n is not None]
    if len(set(given)) != len(given):
        raise ConfigError(f"stages: names must be unique, got {given}")
    return cfg


# ------------------------------------------------------------------------------ entry points
def from_dict(data: Any) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    _name_stages(cfg)
    return cfg


def _name_stages(cfg: Config) -> None:
    counts: dict[str, int] = {}
    for s in cfg.stages:
        if s.name is None:
            counts[s.type] = counts.get(s.type, 0) + 1
    seen: dict[str, int] = {}
    taken = {s.name for s in cfg.stages if s.name}
    for s in cfg.stages:
        if s.name is None:
            seen[s.type] = seen.get(s.type, 0) + 1
            name = s.type if counts[s.type] == 1 else f"{s.type}{seen[s.type]}"
            while name in taken:
                name += "_"
            s.name = name
            taken.add(name)


@functools.lru_cache(maxsize=None)
def _unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so the first setting would be lost without a word). Checked on the composed node
    tree before anything is built: building flattens '<<' merges into the merging mappings' nodes,
    where a key that overrides a merged one would look like a duplicate."""
    import yaml

    def check(node, seen: set) -> None:
        if id(node) in seen:  # an alias: the same node again
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, value_node in node.value:
                if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(key_node, yaml.ScalarNode):
                    key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                    if key in first_line:  # (keys next to a '<<' merge override merged ones by design)
                        raise ConfigError(f"duplicate key {key_node.value!r} at line {line} (first given "
                                          f"at line {first_line[key]}); keep one")
                    first_line[key] = line
                check(value_node, seen)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                check(item, seen)

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_document(self, node):
            check(node, set())
            return super().construct_document(node)

    return UniqueKeyLoader


def _load_yaml(stream) -> Any:
    import yaml
    return yaml.load(stream, Loader=_unique_key_loader())


def read_yaml(path: Union[str, os.PathLike]) -> dict:
    import yaml
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path}: no such file")
    try:
        with open(path) as f:
            data = _load_yaml(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` -> (path, value read as YAML)."""
    import yaml
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value (e.g. stages.0.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: the key is empty")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc
    except ConfigError as exc:
        raise ConfigError(f"--set {text!r}: {exc}") from exc
    return key, value


def apply_overrides(data: dict, overrides: list) -> dict:
    """A copy of the raw config ``data`` with ``key.path=value`` overrides applied."""
    data = copy.deepcopy(data)
    for text in overrides or []:
        key, value = parse_override(text) if isinstance(text, str) else text
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: '{where}' is not an index of a list of "
                                      f"{len(node)} entries")
                if last:
                    node[int(part)] = value
                else:
                    if node[int(part)] is None:
                        node[int(part)] = {}
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:depth])}' is a value, not a "
                                  f"section")
    return data


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[list] = None,
                data: Optional[dict] = None) -> Config:
    """Read, override and validate a config (``path`` or an already-read ``data`` dict)."""
    raw = read_yaml(path) if path is not None else copy.deepcopy(data or {})
    raw = apply_overrides(raw, overrides or [])
    try:
        return from_dict(raw)
    except ConfigError as exc:
        # A value that came from --set is that option's problem, not the file's.
        keys = [parse_override(o)[0] if isinstance(o, str) else o[0] for o in overrides or []]
        if any(str(exc).startswith(f"{key}:") for key in keys):
            raise ConfigError(f"--set {exc}") from exc
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from exc
        raise


def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a config, for files and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Config, path: Union[str, os.PathLike]) -> None:
    import yaml
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

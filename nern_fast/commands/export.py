"""``nern-fast export``: write a trained predictor as a compressed model file or a plain state dict.

Sources (one of):
  --compressed FILE           a compressed model file (convert it, e.g. to a plain state dict)
  --predictor FILE --base CKPT [--model SPEC]
                              a predictor file (FastPredictor.save) plus the original model's
                              checkpoint, which supplies every unrepresented parameter and buffer
                              (stem, BN, shortcuts, classifier). SPEC builds the network
                              (resnet20, cifar_resnet:depth=56,num_classes=100,
                              torchvision:resnet18); without it the architecture recorded in the
                              checkpoint is used (a `nern-fast train-base` model file, or a
                              "model_spec" entry {"kind": ..., "args": {...}}).
Formats:
  compressed                  nern_fast.save_compressed (--predictor-dtype fp32|fp16|bf16|int8)
  state_dict                  torch.save(model.state_dict()) of the reconstructed network: loads
                              into the plain architecture with load_state_dict
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from ._common import check_output_file, fail, user_errors

CHECKPOINT_STATE_KEYS = ("model_state_dict", "state_dict", "model")


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a compressed model file or a plain state dict",
                              description=__doc__, formatter_class=_raw_formatter())
    source = p.add_argument_group("source")
    source.add_argument("--compressed", help="a compressed model file")
    source.add_argument("--predictor", help="a predictor file (FastPredictor.save)")
    source.add_argument("--base", help="the original model's checkpoint (state dict), with --predictor")
    source.add_argument("--model", help="model spec, e.g. resnet56 or torchvision:resnet18")
    p.add_argument("--format", choices=("compressed", "state_dict"), default="compressed")
    p.add_argument("--predictor-dtype", choices=("fp32", "fp16", "bf16", "int8"), default=None,
                   help="storage of the predictor in a compressed file (default fp32)")
    p.add_argument("--device", default="cpu", help="where to decode the weights (cpu, cuda)")
    p.add_argument("--out", required=True, help="output file (an existing one is replaced only with "
                                                "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def _raw_formatter():
    import argparse
    return argparse.RawDescriptionHelpFormatter


def run(args) -> int:
    try:
        return _export(args)
    except user_errors() as exc:
        return fail("export", exc)


@contextlib.contextmanager
def _option_error(option: str, caused_by: tuple = (ValueError, TypeError)):
    """nern_fast.compressed reports a bad model spec or a predictor a storage cannot hold as a
    plain ValueError (TypeError: wrong constructor arguments): name the option to change when the
    error is of a kind that option causes (``caused_by``); other value errors keep their own words."""
    from nern_fast.config import ConfigError
    try:
        yield
    except user_errors():
        raise
    except caused_by as exc:
        raise ConfigError(f"{option}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


def _export(args) -> int:
    from nern_fast.compressed import read_compressed, save_compressed, state_dict_bytes
    from nern_fast.config import ConfigError, usable_device
    from nern_fast.io import atomic_save

    if bool(args.compressed) == bool(args.predictor):
        raise ConfigError("give either --compressed FILE or --predictor FILE --base CHECKPOINT")
    if args.predictor_dtype is not None and args.format != "compressed":
        raise ConfigError("--predictor-dtype applies to --format compressed only (a state dict holds "
                          "the decoded weights in the network's dtype); for the weights an int8 / fp16 "
                          "predictor decodes, export --format compressed with it, then export that "
                          "file with --compressed FILE --format state_dict")
    args.predictor_dtype = args.predictor_dtype or "fp32"
    device = usable_device(args.device, "--device")
    out = check_output_file(args.out, "--out")
    _check_not_overwritten(args, out)
    if args.compressed:
        loaded = read_compressed(args.compressed, map_location="cpu")
        spec = _model_spec(args.model) if args.model else None
        with _option_error("--model"):
            model = loaded.build_model(spec.build if spec is not None else None).eval()
        pred = loaded.predictor
        args.model_spec = spec or loaded.model_spec
        source = Path(args.compressed)
    else:
        model, pred = _from_predictor(args)
        source = Path(args.predictor)
    model.to(device)
    pred.to(device)
    if args.format == "compressed":
        spec = getattr(args, "model_spec", None)
        from nern_fast.compressed import StorageDtypeError
        with _option_error("--predictor-dtype", caused_by=(StorageDtypeError,)):
            save_compressed(model, pred, out, predictor_dtype=args.predictor_dtype,
                            model_spec="auto" if spec is None else spec)
    else:
        pred.load_into(model)  # the reconstructed network: decoded weights in ordinary parameters
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
    plain = state_dict_bytes(model)  # same shapes and dtypes as the original network's file
    size = out.stat().st_size
    print(f"source     {source}")
    print(f"predictor  H={pred.hidden}, {pred.num_parameters} parameters for "
          f"{pred.represented_parameters} conv weights in {pred.layout.num_layers} layers")
    print(f"wrote      {out} ({args.format}"
          f"{', predictor ' + args.predictor_dtype if args.format == 'compressed' else ''})")
    if args.format == "compressed":
        print(f"size       {size} bytes; plain state dict {plain} bytes; ratio {size / plain:.4f} "
              f"({plain / size:.2f}x smaller)")
    else:
        print(f"size       {size} bytes")
    return 0


def _check_not_overwritten(args, out: Path) -> None:
    """Nothing saved is lost to a mistake: an --out that is one of this export's own inputs is
    refused (it would replace the predictor or network it reads), any other existing file is
    replaced only with --overwrite."""
    from nern_fast.config import ConfigError
    if not out.exists():
        return
    for option in ("--compressed", "--predictor", "--base"):
        source = getattr(args, option[2:])
        if source and Path(source).exists() and Path(source).resolve() == out.resolve():
            raise ConfigError(f"--out {out} is the {option} file this export reads; write to another file")
    if not getattr(args, "overwrite", False):
        raise ConfigError(f"--out {out} already exists; replace it with --overwrite or choose another file")


def _read_checkpoint(path):
    import torch

    from nern_fast.io import FileFormatError, load_torch_file
    data = load_torch_file(path, "checkpoint")
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: expected a state dict or a checkpoint dict, got {type(data).__name__}")
    spec = data.get("model_spec") if isinstance(data.get("model_spec"), dict) else None
    if data.get("format") == "nern_fast.model" and isinstance(data.get("arch"), str):
        spec = _spec_of_model_file(data)
    if all(isinstance(v, torch.Tensor) for v in data.values()):
        return data, spec
    for key in CHECKPOINT_STATE_KEYS:
        state = data.get(key)
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return state, spec
    raise FileFormatError(f"{path}: found no model state dict (a dict of tensors, or one under "
                          f"{list(CHECKPOINT_STATE_KEYS)}); keys: {list(data)[:8]}")


def _spec_of_model_file(data: dict):
    """The architecture of a ``nern-fast train-base`` model file (arch, num_classes, in_channels)."""
    from nern_fast.compressed import ModelSpec
    arch = data["arch"]
    args = {k: data[k] for k in ("num_classes", "in_channels") if isinstance(data.get(k), int)}
    if arch.startswith("cifar_resnet") and arch[len("cifar_resnet"):].isdigit():
        return ModelSpec("cifar_resnet", {"depth": int(arch[len("cifar_resnet"):]), **args}).describe()
    if ":" in arch:
        return None  # user code: name it with --model or use the Python API with model_fn
    if isinstance(data.get("image_size"), int):
        args["image_size"] = data["image_size"]
    return ModelSpec("registry", {"arch": arch, **args}).describe()


def _model_spec(text: str):
    from nern_fast.compressed import ModelSpec
    with _option_error("--model"):
        return ModelSpec.parse(text)


def _from_predictor(args):
    from nern_fast import FastPredictor
    from nern_fast.compressed import ModelSpec, represented_keys
    from nern_fast.config import ConfigError

    if not args.base:
        raise ConfigError("--predictor needs --base CHECKPOINT: the original model's state dict holds "
                          "the parameters the predictor does not represent (stem, BN, classifier)")
    state, stored_spec = _read_checkpoint(args.base)
    if args.model:
        spec = _model_spec(args.model)
    elif stored_spec is not None:
        with _option_error(f"the model spec recorded in {args.base} (name the network with --model)"):
            spec = ModelSpec.from_description(stored_spec)
    else:
        raise ConfigError(f"{args.base} records no model spec; name the network with --model "
                          f"(e.g. resnet56, cifar_resnet:depth=20,num_classes=100, torchvision:resnet18)")
    with _option_error("--model"):
        model = spec.build()
    pred = FastPredictor.load(args.predictor, model=model, map_location="cpu")
    args.model_spec = spec
    represented = represented_keys(model, pred)  # by identity: aliases and tied weights too
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # load_state_dict's shape mismatches
        raise ConfigError(f"{args.base} does not fit {spec.describe()} ({str(exc)[:300]}); check --model") from exc
    missing = [k for k in missing if k not in represented]
    if missing or unexpected:
        raise ConfigError(f"{args.base} does not fit {spec.describe()}: missing {missing[:4]}, "
                          f"unexpected {list(unexpected)[:4]}; check --model")
    model.eval()
    return model, pred

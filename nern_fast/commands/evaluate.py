"""``nern-fast eval``: original vs reconstructed accuracy, reconstruction RMSE (overall and per
layer), compression ratio and parameter counts of a predictor file.

The network and data come from the predictor file (``fit`` records them), or from ``--config``;
``--checkpoint`` points at the original network's weights when they moved. ``--on-demand`` runs
the reconstructed network layer by layer from the predictor (``pred.attach(model,
mode="on_demand")``, nern_fast.inference) instead of materialising every weight first.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ._common import check_output_file, fail, user_errors


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="accuracy, reconstruction error and compression of a "
                                           "predictor", description=__doc__)
    p.add_argument("--predictor", required=True, help="predictor file (fit writes OUT/predictor.pt)")
    p.add_argument("--config", help="YAML config for the network and data (default: recorded in "
                                    "the predictor file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry (repeatable): model.*, data.*, device, threads, "
                        "seed, deterministic; of the predictor, which comes from its file, only "
                        "predictor.backend and predictor.precision")
    p.add_argument("--checkpoint", help="the original network's weights (overrides model.checkpoint)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the config's)")
    p.add_argument("--on-demand", action="store_true",
                   help="evaluate with the predictor attached on demand (layer-by-layer decode)")
    p.add_argument("--graphs", action="store_true",
                   help="with --on-demand on CUDA: replay each decode from a CUDA graph "
                        "(nern_fast.inference_graphs)")
    p.add_argument("--group-bytes", type=int, metavar="N",
                   help="with --on-demand: decode consecutive layers together, up to N bytes of "
                        "weights per call (0: one layer per call; default: half of largest layer + "
                        "predictor, nern_fast.inference_groups)")
    p.add_argument("--workspace-bytes", type=int, metavar="N",
                   help="with --on-demand: at most N bytes of decoder scratch per decode call (the "
                        "Triton chunked schedule and the CUDA decoder; default: the backend's)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--per-layer", action="store_true", help="print the RMSE of every layer")
    p.set_defaults(func=run)


# What eval reads of a config: the network, the data and the run-time settings. The predictor is
# the file's (of its settings, --set may change how it decodes: backend and precision).
EVAL_KEYS = ("model.", "data.", "device", "threads", "seed", "deterministic", "cudnn_benchmark")
PREDICTOR_KEYS = ("backend", "precision")


def _check_override_keys(overrides: list, predictor: str) -> None:
    """Every --set key is one eval uses: the others (the predictor's shape, the stages, train_base,
    logging) would be ignored without a word, as they were."""
    from nern_fast.config import ConfigError, parse_override
    for text in overrides:
        key = parse_override(text)[0]
        if key.startswith("predictor.") and key[len("predictor."):] in PREDICTOR_KEYS:
            continue
        if any(key == k or key.startswith(k) for k in EVAL_KEYS):
            continue
        if key.split(".")[0] not in ("predictor", "stages", "train_base", "logging", "recipe"):
            continue  # not a config key at all: the config's validation names the valid ones
        source = (f"the predictor and its settings come from {predictor}" if key.startswith("predictor")
                  else "only fit and train-base use it")
        raise ConfigError(f"--set {key}: eval does not use it ({source}); eval takes model.*, data.*, "
                          f"device, threads, seed, deterministic, and predictor.backend / "
                          f"predictor.precision to decode the saved predictor another way")


def _predictor_overrides(overrides: list, cfg) -> dict:
    """``--set predictor.backend=`` / ``predictor.precision=`` as FastPredictor overrides (their
    values validated with the config)."""
    from nern_fast.config import parse_override
    keys = {parse_override(text)[0] for text in overrides}
    return {name: getattr(cfg.predictor, name) for name in PREDICTOR_KEYS if f"predictor.{name}" in keys}


def _config(args, recorded: dict):
    from nern_fast.config import ConfigError, load_config
    _check_override_keys(args.overrides, args.predictor)
    overrides = list(args.overrides)
    if args.checkpoint:
        overrides.append(f"model.checkpoint={args.checkpoint}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.config:
        return load_config(args.config, overrides)
    if not recorded:
        raise ConfigError(f"{args.predictor} does not record its network and data (not written by "
                          f"`nern-fast fit`); pass --config")
    data = {"model": dict(recorded.get("model", {})), "data": dict(recorded.get("data", {}))}
    _resolve_recorded_paths(data, recorded.get("cwd"))
    return load_config(data=data, overrides=overrides)


def _resolve_recorded_paths(sections: dict, fit_cwd) -> None:
    """A relative network file or data root recorded by fit is relative to the folder fit ran in:
    where it is not found from here but is from there, use that one (eval from any folder)."""
    if not fit_cwd:
        return
    for section, key in (("model", "checkpoint"), ("data", "root")):
        value = sections[section].get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists():
            continue
        there = Path(fit_cwd) / value
        if there.exists():
            sections[section][key] = str(there)


def evaluate(args) -> dict:
    import torch

    for flag, given in (("--graphs", args.graphs), ("--group-bytes", args.group_bytes is not None),
                        ("--workspace-bytes", args.workspace_bytes is not None)):
        if given and not args.on_demand:
            from nern_fast.config import ConfigError
            raise ConfigError(f"{flag} applies to --on-demand evaluation; add --on-demand")
    if args.group_bytes is not None and args.group_bytes < 0:
        from nern_fast.config import ConfigError
        raise ConfigError(f"--group-bytes must be 0 (one layer per decode) or a positive number of "
                          f"bytes, got {args.group_bytes}")
    if args.workspace_bytes is not None and args.workspace_bytes < 1:
        from nern_fast.config import ConfigError
        raise ConfigError(f"--workspace-bytes must be a positive number of bytes, got {args.workspace_bytes}")

    from nern_fast.io import safe_load
    from nern_fast.predictor import FILE_FORMAT, FastPredictor
    from nern_fast.train import setup
    from nern_fast.train.evaluation import accuracy
    from nern_fast.train.fit import RUN_KEY, backend_name
    from nern_fast.train.losses import per_layer_rmse, rmse

    data = safe_load(args.predictor, FILE_FORMAT, map_location="cpu")
    cfg = _config(args, data.get(RUN_KEY) or {})
    predictor_overrides = _predictor_overrides(args.overrides, cfg)
    if not cfg.model.checkpoint:
        from nern_fast.config import ConfigError
        raise ConfigError("model.checkpoint: eval needs the original network's weights; pass "
                          "--checkpoint FILE")
    if not Path(cfg.model.checkpoint).exists():
        from nern_fast.config import ConfigError
        raise ConfigError(f"model.checkpoint: the network file {cfg.model.checkpoint} does not exist "
                          f"(moved or deleted since fit?); pass --checkpoint FILE")
    device = setup.apply_runtime(cfg)
    task = setup.load_data(cfg)
    model = setup.frozen(setup.make_network(cfg.model, task), device)
    pred = FastPredictor.from_file_dict(data, model, str(args.predictor), **predictor_overrides).to(device).eval()
    layout = pred.layout
    test = lambda: task.test_batches(cfg.data.eval_batch_size, device, cfg.data.num_workers,
                                     cfg.data.max_eval_batches)
    original = layout.flatten(model).to(device).float()
    original_accuracy = accuracy(model, test())
    graph_replays, decode_groups, peak_held_bytes = 0, None, None
    with torch.no_grad():
        decoded = pred.decode_flat().float()
    if args.on_demand:
        if not hasattr(pred, "attach"):
            raise ImportError("--on-demand needs nern_fast.inference (pred.attach), which is not "
                              "part of this installation")
        from nern_fast.inference import attachment
        pred.attach(model, mode="on_demand", graphs=args.graphs, group_bytes=args.group_bytes,
                    workspace_bytes=args.workspace_bytes)
        try:
            reconstructed_accuracy = accuracy(model, test())
            state = attachment(model)
            graph_replays = state.stats["graph_replays"]  # 0: not asked, or CPU
            decode_groups, peak_held_bytes = len(state.groups), state.stats["peak_held_bytes"]
        finally:
            pred.detach(model)  # leaves the decoded weights in the model (not used after this)
    else:
        reconstructed_accuracy = accuracy(model, test(), layout, decoded)
    per_layer = per_layer_rmse(decoded, original, layout)
    total_params = sum(p.numel() for p in model.parameters())
    return {
        "predictor": str(args.predictor), "model": cfg.model.arch, "dataset": cfg.data.dataset,
        "device": str(device), "backend": backend_name(pred),
        "mode": "on_demand" if args.on_demand else "materialized",
        "graph_replays": graph_replays,
        "decode_groups": decode_groups,  # decode calls per forward (on demand)
        "peak_held_bytes": peak_held_bytes,  # decoded weights held at once (on demand)
        "original_accuracy": original_accuracy, "reconstructed_accuracy": reconstructed_accuracy,
        "accuracy_drop": original_accuracy - reconstructed_accuracy,
        "reconstruction_rmse": rmse(decoded, original),
        "per_layer_rmse": {l.name: v for l, v in zip(layout.layers, per_layer)},
        "compression_ratio": pred.compression_ratio, "predictor_parameters": pred.num_parameters,
        "represented_parameters": pred.represented_parameters,
        "model_parameters": total_params,
        "unrepresented_parameters": total_params - pred.represented_parameters,
        "stored_parameters": total_params - pred.represented_parameters + pred.num_parameters,
    }


def run(args) -> int:
    try:
        if args.json:
            check_output_file(args.json, "--json")  # before the evaluation, not after it
        r = evaluate(args)
    except user_errors() as exc:
        return fail("eval", exc)
    print(f"{r['model']} on {r['dataset']} ({r['device']}, backend {r['backend']}, {r['mode']})")
    print(f"  accuracy:            original {r['original_accuracy']:.2f} %, reconstructed "
          f"{r['reconstructed_accuracy']:.2f} % ({-r['accuracy_drop']:+.2f})")
    print(f"  reconstruction RMSE: {r['reconstruction_rmse']:.6f}")
    print(f"  compression ratio:   {r['compression_ratio']:.4f} (predictor "
          f"{r['predictor_parameters']:,} parameters / {r['represented_parameters']:,} represented "
          f"conv weights)")
    print(f"  network parameters:  {r['model_parameters']:,} original, {r['stored_parameters']:,} "
          f"stored with the predictor ({r['unrepresented_parameters']:,} not represented)")
    if r["decode_groups"] is not None:
        print(f"  on demand:           {r['decode_groups']} decode calls per forward, at most "
              f"{r['peak_held_bytes']:,} bytes of decoded weights held at once")
    if args.per_layer:
        width = max(len(n) for n in r["per_layer_rmse"])
        for name, value in r["per_layer_rmse"].items():
            print(f"    {name:<{width}}  {value:.6f}")
    if args.json:
        from nern_fast.io import atomic_write_text
        try:
            atomic_write_text(args.json, json.dumps(r, indent=2) + "\n")  # an earlier file survives a failure
        except OSError as exc:
            return fail("eval", exc)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0

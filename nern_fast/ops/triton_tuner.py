"""Launch configurations of the Triton decoder and the tuner that picks one per call shape.

A configuration names the schedule — ``fused`` (one persistent launch, every layer per tile of
rows; best at small and medium H) or ``chunked`` (per chunk of rows one tensor-core GEMM launch per
layer; for large H) — its tile sizes and the first-layer form (separable tables or the direct
encoding GEMM). On CUDA the tuner times a short list of candidates once per (kind, device, shape
bucket, settings): first the tile shapes of each schedule with the separable first layer, then the
winner with the direct first layer. Timing runs on a prefix of at most ``TUNE_ROWS`` rows (large
calls cost the same per row). Decisions are remembered in the process and on disk
(``NERN_FAST_TRITON_TUNE_CACHE``: a file path, or 0 to disable; default
``$XDG_CACHE_HOME/nern_fast/triton_tune.json`` or ``~/.cache/...``), keyed by device name, triton
and torch versions and a hash of the kernel and launcher sources, so a second process does not
re-tune and a code change never reuses a stale decision. Without tuning (interpreter, CPU,
``NERN_FAST_TRITON_AUTOTUNE=0``) the first candidate is taken: chunked for H >= ``CHUNKED_MIN_HIDDEN``,
fused below.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch
import triton

from .triton_inputs import INTERPRETED, DecodeShape, env_flag, next_power_of_2

FIRST_LAYER_MODES = ("auto", "separable", "direct")
SCHEDULES = ("auto", "fused", "chunked")
CHUNKED_MIN_HIDDEN = 512  # the untuned default switches to the chunked schedule here
CHUNKED_MIN_TIMED = 256  # below this the tuner does not even try the chunked schedule
TUNE_ROWS = 1 << 17
_INTERPRETER_PROGRAMS = 3  # "SMs" under the interpreter: several programs, several tiles each


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one call. Fused: BM rows per tile, BN output / BK reduction columns per chunk,
    programs per SM of the persistent grid. Chunked: the GEMM tiles (BM × BN × BK) of every layer
    launch (programs_per_sm unused). ``k_major``: the backward's tf32 products read K-major operands
    (transposed copies; ``kernels/decode_bwd.py`` and ``decode_chunked.py`` say why)."""

    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    separable: bool
    schedule: str = "fused"
    k_major: bool = False
    tma: bool = False  # chunked forward GEMMs through TMA descriptors (Hopper)

    def describe(self) -> str:
        grid = f" programs/SM={self.programs_per_sm}" if self.schedule == "fused" else ""
        return (f"{self.schedule} BM={self.bm} BN={self.bn} BK={self.bk} warps={self.num_warps} "
                f"stages={self.num_stages}{grid} "
                f"first_layer={'separable' if self.separable else 'direct'}"
                f"{' k_major' if self.k_major else ''}{' tma' if self.tma else ''}")


# ----------------------------------------------------------------------------- candidates
def _fused_tiles(kind: str, shape: DecodeShape) -> list[tuple]:
    """(BM, BN, BK, warps, stages, programs/SM) of the fused kernels, the default first.

    From sm_90 compiles of these kernels (ptxas register/spill counts, see kernels/README.md): the
    forward candidates compile without spills (separable first layer); backward ones spill a few
    dozen bytes per thread (more with the max crop). Small H gets smaller row tiles (more programs
    for layouts of a few ten thousand kernels).
    """
    if INTERPRETED:
        return [(64, 64, 64, 4, 1, 1)]
    if shape.k2_pad >= 32:  # k >= 5: the crop's gathers hold BM × K2P values per window position
        return _large_kernel_tiles(kind, shape)
    big = shape.hidden >= 768
    p = shape.precision
    if p == "fp32":  # IEEE fp32: FMA dots, no tensor cores; operands live in registers
        if kind == "fwd":
            return [(64, 64, 32, 4, 2, 2), (32, 64, 32, 4, 2, 4)]
        return [(32, 64, 32, 4, 1, 2), (64, 64, 16, 8, 1, 1)]
    if p == "fp32x3":  # the split operands need registers: smaller accumulators
        if kind == "fwd":
            return [(128, 64, 32, 8, 3, 1), (64, 64, 32, 4, 3, 2)]
        return [(64, 64, 32, 4, 2, 2)]
    if p == "tf32":
        if kind == "fwd":
            if big:
                return [(128, 128, 32, 8, 3, 1), (64, 256, 32, 8, 3, 1)]
            return [(128, 128, 32, 8, 3, 1), (64, 128, 32, 4, 3, 2), (64, 64, 32, 4, 3, 2)]
        return [(64, 64, 32, 4, 2, 2), (128, 64, 32, 8, 2, 1)]
    if kind == "fwd":  # bf16
        if big:
            return [(128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 3, 1)]
        return [(128, 128, 64, 8, 3, 1), (64, 128, 64, 4, 3, 2), (64, 64, 64, 4, 3, 2)]
    return [(128, 64, 64, 8, 2, 1), (64, 64, 64, 4, 2, 2)]


def _large_kernel_tiles(kind: str, shape: DecodeShape) -> list[tuple]:
    """Fused tiles for k >= 5 (K2P >= 32): the usual forward tiles with at most 2048 / K2P rows (64
    for k = 5, 32 for k = 7/8); in the backward 16-row tiles over 8 warps. Larger tiles spilled
    kilobytes per thread (sm_90 compiles, H = 280, max crop: triton 3.6 k = 5 tf32 backward at 32
    rows and 4 warps 1.5 KB, k = 7 fp32 at 32 rows and 8 warps 4.9 KB, fp32 with BK = 16 up to
    5.3 KB; triton 3.8 k = 7 backward 2.1-2.4 KB at 64-128 rows); these stay at or under 112 B."""
    if kind == "fwd":
        small = replace(shape, kernel_size=3)  # the k = 3 candidates, rows capped
        return [(min(bm, 2048 // shape.k2_pad), *rest) for bm, *rest in _fused_tiles("fwd", small)]
    bk = 64 if shape.precision == "bf16" else 32
    return [(16, 64, bk, 8, 1 if shape.precision == "fp32" else 2, 2)]


def _chunked_tiles(kind: str, shape: DecodeShape) -> list[tuple]:
    """(BM, BN, BK, warps, stages, 1) of the chunked schedule's GEMM launches, the default first:
    the usual tensor-core GEMM tiles (sm_90 compiles in kernels/README.md)."""
    if INTERPRETED:
        return [(32, 32, 32, 4, 1, 1)]
    p = shape.precision
    if p == "fp32":
        return [(64, 64, 32, 4, 2, 1)]
    if p == "fp32x3":
        return [(128, 64, 32, 8, 3, 1)]
    if p == "tf32":
        if kind == "fwd":
            return [(128, 128, 32, 8, 3, 1), (128, 256, 32, 8, 3, 1)]
        return [(128, 128, 32, 8, 3, 1)]
    if kind == "fwd":  # bf16
        return [(128, 256, 64, 8, 3, 1), (128, 128, 64, 8, 4, 1)]
    return [(128, 128, 64, 8, 3, 1)]


# Precisions whose tensor-core products are tf32 instructions: K-major operands only (see LaunchConfig).
K_MAJOR_PRECISIONS = ("tf32", "fp32x3")


def k_major_enabled() -> bool:
    """Whether the tuner tries K-major operands for the tf32 backward (NERN_FAST_TRITON_K_MAJOR=1).

    Off by default: on the H200 (db84227) the chunked K-major backward was 4x faster than as stored
    (24.5 against 99.6 ms on 131,072 ResNet-18 rows at H = 1256), but ``bench.backward_accuracy``
    (cea8d5d) found its first and hidden weight gradients 4x tf32's error (their dzᵀ, then stored by
    the input-gradient GEMM). dzᵀ now comes from the transpose kernel; until a GPU run of that check
    clears it, the speed is opt-in."""
    return env_flag("NERN_FAST_TRITON_K_MAJOR", False)


def _k_major_variants(kind: str, shape: DecodeShape, k_major: bool) -> tuple[bool, ...]:
    """The tf32 backward (both schedules), where enabled, is also tried with K-major operands, after
    the operands as stored (the untuned default). Every other call as it is."""
    if k_major and kind == "bwd" and shape.precision in K_MAJOR_PRECISIONS:
        return (False, True)
    return (False,)


try:  # host-side TMA descriptors (triton >= 3.4); the chunked launcher builds them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


@lru_cache(maxsize=1)
def _tma_supported() -> bool:
    """Hopper or newer (the tensor memory accelerator), and a triton with host-side descriptors."""
    if INTERPRETED or TensorDescriptor is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 9


def _tma_variants(kind: str, sched: str, shape: DecodeShape) -> tuple[bool, ...]:
    """The chunked tf32/bf16 forward GEMMs are also tried through TMA descriptors, after the pointer
    version (H200: faster in bf16 at H = 1256, slower in tf32; the tuner decides per shape)."""
    if sched == "chunked" and kind == "fwd" and shape.precision in ("tf32", "bf16") and _tma_supported():
        return (False, True)
    return (False,)


SMALL_CALL_ROWS = 8192  # a fused forward of at most this many rows also tries narrower row tiles


def _small_call_tiles(kind: str, shape: DecodeShape, tiles: list) -> list:
    """Narrower row tiles (32 and 16 rows, 4 warps, 2 programs per SM) for small fused forwards,
    after the usual ones, for the tuner. An on-demand decode of one layer is a call of 256-4,096
    rows (ResNet-56; a decode group's last call 8,192): with 64- or 128-row tiles 2-64 programs work
    on a GPU of 132 SMs, each running
    every MLP layer of its tile one after the other, so the call takes about one program's time;
    more, smaller tiles spread it over more SMs at the price of reading the weights once per tile,
    and of Hopper's wgmma (sm_90 compiles, triton 3.8: below 64 rows the products are mma.sync;
    tests/test_triton_compile.py). The backward is left out (each program adds a weight-gradient
    partial to reduce)."""
    if kind != "fwd" or shape.rows > SMALL_CALL_ROWS:
        return []
    bm, bn, bk, _, stages, _ = tiles[0]
    return [(narrow, bn, bk, 4, stages, 2) for narrow in (32, 16) if narrow < bm]


def default_schedule(shape: DecodeShape) -> str:
    return "chunked" if shape.hidden >= CHUNKED_MIN_HIDDEN else "fused"


def _schedules(shape: DecodeShape, schedule: str, tuning: bool) -> list[str]:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule '{schedule}' is not one of {SCHEDULES}")
    if schedule != "auto":
        return [schedule]
    first = default_schedule(shape)
    if not tuning or shape.hidden < CHUNKED_MIN_TIMED:
        return [first]
    return [first, "fused" if first == "chunked" else "chunked"]


def _first_layer_separable(shape: DecodeShape, first_layer: str) -> bool:
    if first_layer not in FIRST_LAYER_MODES:
        raise ValueError(f"first_layer '{first_layer}' is not one of {FIRST_LAYER_MODES}")
    if shape.ffn and first_layer == "separable":
        raise ValueError("the ffn encoding mixes the three indices inside every sine: its first layer "
                         "is not separable; use first_layer='direct' or 'auto'")
    return not shape.ffn and first_layer != "direct"


def candidate_configs(kind: str, shape: DecodeShape, first_layer: str = "auto", schedule: str = "auto",
                      tuning: bool = False) -> tuple[LaunchConfig, ...]:
    """Launch configurations worth timing for ``kind`` ("fwd" or "bwd"), the default first.

    All use one first-layer form: separable unless ``first_layer`` is "direct" or the encoding is
    ffn (the tuner tries the direct form on the winner when ``first_layer`` is "auto").
    """
    return _candidate_configs(kind, shape, first_layer, schedule, tuning, k_major_enabled())


@lru_cache(maxsize=256)
def _candidate_configs(kind: str, shape: DecodeShape, first_layer: str, schedule: str, tuning: bool,
                       k_major: bool) -> tuple[LaunchConfig, ...]:
    separable = _first_layer_separable(shape, first_layer)
    # Chunks wider than the (power-of-two-rounded) hidden size or rows than the call has only waste.
    cap_h = max(16, next_power_of_2(shape.hidden))
    cap_m = max(16, next_power_of_2(max(shape.rows, 1)))
    out = []
    for sched in _schedules(shape, schedule, tuning):
        tiles = _fused_tiles(kind, shape) if sched == "fused" else _chunked_tiles(kind, shape)
        if sched == "fused" and tuning:
            tiles = tiles + _small_call_tiles(kind, shape, tiles)
        for bm, bn, bk, warps, stages, pps in tiles:
            if sched == "fused":
                bm = min(bm, cap_m)
            for operands_k_major in _k_major_variants(kind, shape, k_major):
                for tma in _tma_variants(kind, sched, shape):
                    config = LaunchConfig(bm, min(bn, cap_h), min(bk, cap_h), warps, stages, pps, separable,
                                          sched, operands_k_major, tma)
                    if config not in out:
                        out.append(config)
    return tuple(out)


# ----------------------------------------------------------------------------- devices
_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


_DEVICE_NAMES: dict[int, str] = {}


def device_key(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES:  # a query per call costs a few µs of host time
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


def tuning_enabled(device: torch.device) -> bool:
    """Time candidates on CUDA unless NERN_FAST_TRITON_AUTOTUNE=0 (never under the interpreter)."""
    return not INTERPRETED and device.type == "cuda" and env_flag("NERN_FAST_TRITON_AUTOTUNE", True)


def _time_ms(fn: Callable[[], None]) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=2, rep=10)


# ----------------------------------------------------------------------------- on-disk decisions
def cache_path() -> Optional[Path]:
    """Where tuning decisions are kept (None: not kept)."""
    value = os.environ.get("NERN_FAST_TRITON_TUNE_CACHE", "").strip()
    if value.lower() in ("0", "off", "false", "no"):
        return None
    if value and value.lower() not in ("1", "on", "true", "yes"):
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nern_fast" / "triton_tune.json"


@lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of the kernel and launcher sources: a decision is only reused for the same code."""
    here = Path(__file__).resolve().parent
    import nern_fast.kernels as kernels
    files = sorted(Path(kernels.__file__).resolve().parent.glob("*.py"))
    files += [here / name for name in ("triton_tuner.py", "triton_fused.py", "triton_chunked.py",
                                       "triton_inputs.py")]
    digest = hashlib.sha1()
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _disk_key(key: tuple) -> str:
    kind, device, shape, first_layer, schedule = key
    return json.dumps([kind, device, f"triton {triton.__version__}", f"torch {torch.__version__}",
                       code_hash(), asdict(shape), first_layer, schedule], sort_keys=True)


def _read_disk(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data.get("entries", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _load_decision(key: tuple, allowed: list[LaunchConfig]) -> Optional[LaunchConfig]:
    path = cache_path()
    if path is None:
        return None
    entry = _read_disk(path).get(_disk_key(key))
    if not isinstance(entry, dict):
        return None
    try:
        config = LaunchConfig(**entry["config"])
    except (KeyError, TypeError):
        return None
    return config if config in allowed else None  # never a configuration this code would not try


def _save_decision(key: tuple, config: LaunchConfig, ms: float) -> None:
    path = cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_disk(path)  # merge: other processes may have added decisions
        entries[_disk_key(key)] = {"config": asdict(config), "ms": ms}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": 1, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"nern_fast: could not write the Triton tuning cache {path}: {exc}", RuntimeWarning)


# ----------------------------------------------------------------------------- choosing
_TUNED: dict[tuple, LaunchConfig] = {}


def _log(message: str) -> None:
    if env_flag("NERN_FAST_TRITON_TUNE_LOG", False):
        print(f"[nern_fast.triton] {message}", file=sys.stderr)


@lru_cache(maxsize=256)
def _tune_key(kind: str, device: str, shape: DecodeShape, first_layer: str, schedule: str) -> tuple:
    """A decision's key: the call shape with its rows bucketed by powers of 4 (cached: the
    dataclass copy costs µs of host time per call)."""
    rows_bucket = max(0, round(math.log2(max(shape.rows, 1)) / 2))
    return kind, device, replace(shape, rows=rows_bucket), first_layer, schedule


def choose_config(kind: str, shape: DecodeShape, device: torch.device, first_layer: str,
                  run: Callable[[LaunchConfig], None], tune: Optional[bool] = None,
                  timer: Optional[Callable[[Callable[[], None]], float]] = None,
                  schedule: str = "auto") -> LaunchConfig:
    """The fastest candidate for (kind, shape, device, settings): remembered in the process and on
    disk, timed only the first time. Without tuning the first candidate is taken.
    Candidates that fail to compile or launch (e.g. out of shared memory) are skipped."""
    if tune is None:
        tune = tuning_enabled(device)
    timer = timer or _time_ms
    candidates = candidate_configs(kind, shape, first_layer, schedule, bool(tune))
    try_direct = tune and first_layer == "auto" and candidates[0].separable
    if not tune or (len(candidates) == 1 and not try_direct):
        return candidates[0]
    key = _tune_key(kind, device_key(device), shape, first_layer, schedule)
    best = _TUNED.get(key)
    if best is not None and (not best.k_major or k_major_enabled()):  # K-major taken back: re-time
        return best
    allowed = list(candidates) + [replace(c, separable=False) for c in candidates] if try_direct else list(
        candidates)
    best = _load_decision(key, allowed)
    if best is not None:
        _log(f"{kind} H={shape.hidden} {shape.precision} rows={shape.rows}: cached {best.describe()}")
    else:
        timings = _time_all(kind, shape, candidates, run, timer)
        best = min(timings, key=timings.get)
        if try_direct and timings[best] < float("inf"):
            direct = replace(best, separable=False)
            timings.update(_time_all(kind, shape, [direct], run, timer))
            best = min(timings, key=timings.get)
        if timings[best] == float("inf"):
            raise RuntimeError(f"no Triton launch configuration runs the {kind} decode on {device} "
                               f"(hidden {shape.hidden}, precision {shape.precision}); use another backend")
        for config, ms in sorted(timings.items(), key=lambda kv: kv[1]):
            _log(f"{kind} H={shape.hidden} {shape.precision} rows={shape.rows}: {ms:9.4f} ms  "
                 f"{config.describe()}")
        _save_decision(key, best, timings[best])
    _TUNED[key] = best
    return best


def _time_all(kind: str, shape: DecodeShape, configs, run, timer) -> dict:
    timings = {}
    for config in configs:
        try:
            timings[config] = timer(lambda: run(config))
        except Exception as exc:  # a candidate the device cannot run: skip it
            timings[config] = float("inf")
            _log(f"{kind} H={shape.hidden} {config.describe()}: failed ({type(exc).__name__}: {exc})")
    return timings


def tuned_configs() -> dict:
    """What the tuner chose so far: {(kind, device, shape, first_layer, schedule): LaunchConfig}."""
    return dict(_TUNED)

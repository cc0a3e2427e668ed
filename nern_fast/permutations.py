"""Permutation smoothing (NERN_SPEC §6): NeRN's crossfilter and infilter chains, computed fast.

Both are NeRN's greedy nearest-neighbour chain (``NeRN/permutations/tsp.py: get_max_sim_order``):
start at row 0, repeatedly jump to the not-yet-visited row of highest cosine similarity, ties to the
lowest index. NeRN's quirks are kept so the chains are the same:

* a NaN similarity (a zero kernel) wins ``np.argmax``: while an unvisited zero kernel exists the
  chain jumps to the lowest-indexed one, and from a zero kernel it goes to the lowest unvisited row;
* infilter (``calc_all=True``) special-cases vectors of length 1 (1×1 kernels): similarity is
  ``-(a_i/‖a‖ - a_j/‖a‖)²`` with ‖a‖ the norm of the whole filter;
* the infilter filter chain compares filters by the sum over channels of per-kernel cosine
  similarities (each kernel normalised on its own, then the filter flattened), after reordering
  every filter's channels by its own chain.

Ties are ties of the float32 similarities as each walk computes them (NeRN's too): cosines equal
in exact arithmetic but summed in another order (the compiled walks' lanes, the fallback's BLAS
products) can differ in the last bit, so with quantised or ternary weights, whose cosines often tie
exactly, the compiled and the fallback walks may break such a tie differently (exactly identical
kernels tie in both). A permutation is computed once and travels in the layout and its cache file.
A kernel whose float32 norm underflows to 0 counts as a zero kernel (see ``_normalise_rows``).

Results come in the NeRN forms :meth:`WeightLayout.with_permutations` accepts: crossfilter, the
chain (row order, length C_out·C_in); infilter, ``(filter_order, channel_orders)``.

Speed: NeRN spends O(N) Python list work per chain step. When the compiled extension has them
(``csrc/permutations_cpu.cpp``: ``torch.ops.nern_fast_C.point_chains`` / ``matrix_chains`` /
``infilter_chains``) the chains are walked in C++: crossfilter takes the dot products of the
current kernel with every remaining one per step (no N×N matrix); infilter is one call per layer
(normalisation; per filter its chain — up to 128 channels from their cosine matrices, four chains
walked side by side, wider filters by a walk that computes the cosines as it goes; then the filter
matrix and its chain: on a 64×64 layer the per-op overhead of doing that in torch was most of the
time), or, for
1×1 kernels and single-channel layers (NeRN's length-1 rule), torch-computed matrices walked in
C++. Without the extension: infilter runs all of a layer's per-filter chains at once (batched
numpy ops per step), and crossfilter precomputes, in blocks, each row's best candidates with a
bound that proves when the first unvisited candidate is the exact answer; the walk is a plain Python
loop over those short lists and only falls back to a full row scan when the bound cannot decide. A
large layer on a GPU also takes that path (its candidate lists come from GPU matrix products).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import math
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .io import FileFormatError, PathLike, atomic_save, safe_load

MODES = ("crossfilter", "infilter")
CACHE_FORMAT = "nern_fast.permutations"
CACHE_VERSION = 1

# Crossfilter candidate search: candidates kept per row, and columns per group for the bound.
_CANDIDATES = 8
_GROUP = 32
_REBUILD = 4  # rebuild the lists when this fraction of their rows is left
_BLOCK_ELEMENTS = 1 << 18  # similarity entries per block (1 MiB of float32: stays in cache)
# A crossfilter chain on a GPU weight with more kernels than this uses the GPU candidate lists:
# the compiled walk does ~N²·d/2 multiply-adds on one CPU thread (a 512×512 layer: minutes).
_COMPILED_GPU_MAX_KERNELS = 1 << 16


class ChainOps(NamedTuple):
    """The compiled chain walks (``csrc/permutations_cpu.cpp``)."""
    point_chains: Callable
    matrix_chains: Callable
    infilter_chains: Optional[Callable]  # None in a build that predates it


@functools.lru_cache(maxsize=None)
def compiled_chain_ops() -> Optional[ChainOps]:
    """The chain ops of the compiled extension, or None when it is not built (or built without
    them): the pure Python/numpy paths below are then used."""
    try:
        importlib.import_module("nern_fast._C")
    except Exception:  # missing or broken build: the extension's loader reports why elsewhere
        pass  # the ops may still have been registered by another library (tests, benchmarks)
    ops = torch.ops.nern_fast_C
    try:
        point, matrix = ops.point_chains, ops.matrix_chains
    except (AttributeError, RuntimeError):
        return None
    try:
        infilter_op = ops.infilter_chains
    except (AttributeError, RuntimeError):
        infilter_op = None
    return ChainOps(point, matrix, infilter_op)


def _check_weight(weight: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{what}: expected a conv weight (C_out, C_in, s, s), got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"{what}: expected a floating point weight, got {weight.dtype}")
    # NeRN computes in the weights' numpy dtype (float32 for trained networks).
    return weight.detach().to(torch.float32)


@contextlib.contextmanager
def _one_thread():
    """Run torch's CPU ops on one thread. These are many small ops: extra threads add nothing,
    and on a busy machine OpenMP's spinning makes them ten times slower or worse."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------ batched chains
def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ per row (last dim); zero rows give NaN, as NeRN's division does. A row whose norm
    underflows to 0 (|x| below ~1e-23 in float32) counts as zero too (NeRN's division would give
    it ±inf, whose similarities are NaN or ±inf at random): NaN, as the fallback walk and the
    compiled infilter treat it."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.masked_fill(norm == 0, float("nan"))


def _similarities(vectors: torch.Tensor) -> torch.Tensor:
    """NeRN's ``get_all_cosine_sim`` for a batch of row sets ``(B, n, d)`` -> ``(B, n, n)``."""
    if vectors.shape[-1] == 1:
        # NeRN: normalise by the norm of the whole set, similarity = -(difference)².
        norm = torch.linalg.vector_norm(vectors, dim=(-2, -1), keepdim=True)
        scaled = (vectors / norm)[..., 0]
        return -(scaled[..., :, None] - scaled[..., None, :]) ** 2
    normed = _normalise_rows(vectors)
    return normed @ normed.transpose(-1, -2)


def greedy_chains(similarity: torch.Tensor) -> torch.Tensor:
    """Greedy chains of a batch of similarity matrices ``(B, n, n)`` -> orders ``(B, n)``.

    Each chain starts at 0 and moves to the unvisited index of highest similarity (first maximum,
    i.e. the lowest index, on ties; NaN counts as the highest, as in ``np.argmax``).
    """
    b, n, _ = similarity.shape
    ops = compiled_chain_ops()
    if ops is not None:
        return ops.matrix_chains(similarity.to(torch.float32).contiguous())
    # numpy: this loop is per-step overhead bound, and numpy's is a few times lower than torch's.
    # NaN must win like np.argmax's first NaN: any finite value above every similarity will do
    # (a visited index gets -inf added, so it must be finite).
    sim = similarity.double().numpy()
    finite = np.isfinite(sim)
    top = float(np.abs(sim[finite]).max()) + 1.0 if finite.any() else 1.0
    sim = np.where(finite, sim, top)
    order = np.zeros((b, n), dtype=np.int64)
    if n > 1:
        batch = np.arange(b)
        penalty = np.zeros((b, n))
        penalty[:, 0] = -np.inf
        current = np.zeros(b, dtype=np.int64)
        for step in range(1, n):
            current = np.argmax(sim[batch, current] + penalty, axis=1)  # first maximum
            order[:, step] = current
            penalty[batch, current] = -np.inf
    return torch.from_numpy(order)


# ------------------------------------------------------------------------------ crossfilter
class _CandidateLists:
    """Per row of a point set, its best unvisited-candidate list and a trust bound.

    For row i: ``index[i]`` lists K other rows by (similarity desc, index asc) and ``bound[i]`` is
    an upper bound on the similarity of every row *not* in the list. The first unvisited entry of
    the list is the exact greedy choice when its similarity is strictly above the bound.
    """

    def __init__(self, points: torch.Tensor, candidates: int, group: int):
        n = points.shape[0]
        k = min(candidates, n - 1)
        groups = -(-n // group)
        q = min(k, groups)  # groups searched per row
        block = max(1, _BLOCK_ELEMENTS // max(n, 1))
        padded = groups * group
        index_rows, value_rows, bound_rows = [], [], []
        buffer = torch.full((block, padded), -math.inf, device=points.device)
        arange = torch.arange(block, device=points.device)
        for start in range(0, n, block):
            stop = min(start + block, n)
            rows = stop - start
            sim = buffer[:rows]
            torch.mm(points[start:stop], points.T, out=sim[:, :n])
            sim[arange[:rows], arange[:rows] + start] = -math.inf  # never yourself
            grouped = sim.view(rows, groups, group)
            group_max = grouped.amax(dim=2)
            chosen = torch.topk(group_max, q, dim=1, sorted=False).indices
            outside = group_max.scatter_(1, chosen, -math.inf).amax(dim=1)  # unchosen groups
            gathered = grouped[arange[:rows, None], chosen].reshape(rows, q * group)
            columns = (chosen[:, :, None] * group + arange[None, None, :group]).reshape(rows, q * group)
            best = torch.topk(gathered, min(k + 1, q * group), dim=1)
            values, cols = best.values, torch.gather(columns, 1, best.indices)
            next_value = (values[:, k] if values.shape[1] > k
                          else torch.full((rows,), -math.inf, device=values.device))
            values, cols = values[:, :k], cols[:, :k]
            # topk leaves equal values in any order: sort by index, then stably by value.
            by_index = torch.sort(cols, dim=1)
            values = torch.gather(values, 1, by_index.indices)
            by_value = torch.sort(values, dim=1, descending=True, stable=True)
            index_rows.append(torch.gather(by_index.values, 1, by_value.indices))
            value_rows.append(by_value.values)
            bound_rows.append(torch.maximum(next_value, outside))
        self.index = torch.cat(index_rows).tolist()
        self.value = torch.cat(value_rows).tolist()
        self.bound = torch.cat(bound_rows).tolist()


def _crossfilter_chain(vectors: torch.Tensor, candidates: int = _CANDIDATES,
                       group: int = _GROUP) -> list[int]:
    """NeRN's crossfilter chain (``get_max_sim_order(calc_all=False)``) of rows ``(n, d)``."""
    n = vectors.shape[0]
    if n <= 2:
        return list(range(n))
    norms = torch.linalg.vector_norm(vectors, dim=1)
    zero = (norms == 0).tolist()
    points = vectors / torch.where(norms == 0, torch.ones_like(norms), norms)[:, None]
    points_np = points.cpu().numpy()
    zero_rows = [i for i in range(n) if zero[i]]  # ascending; NaN similarities in NeRN
    zero_pos = 0
    visited = bytearray(n)
    visited[0] = 1
    lowest = 1  # lowest unvisited index (NeRN's choice from a zero kernel)
    order = [0]
    current = 0
    ids = list(range(n))  # compact index -> row, for lists built on the remaining rows
    position = {r: i for i, r in enumerate(ids)}
    lists = _CandidateLists(points, candidates, group)
    built_size = n
    remaining = n - 1
    while remaining:
        while zero_pos < len(zero_rows) and visited[zero_rows[zero_pos]]:
            zero_pos += 1
        if zero[current]:
            while visited[lowest]:
                lowest += 1
            nxt = lowest
        elif zero_pos < len(zero_rows):
            nxt = zero_rows[zero_pos]
        else:
            nxt = -1
            ci = position.get(current)
            if ci is not None:
                bound = lists.bound[ci]
                for c, v in zip(lists.index[ci], lists.value[ci]):
                    row = ids[c]
                    if not visited[row]:
                        if v > bound:
                            nxt = row
                        break
            if nxt < 0:  # the lists cannot decide: scan every unvisited row
                sims = points_np @ points_np[current]
                sims[np.frombuffer(bytes(visited), dtype=np.bool_)] = -np.inf
                nxt = int(np.argmax(sims))
        visited[nxt] = 1
        order.append(nxt)
        current = nxt
        remaining -= 1
        if remaining and remaining * _REBUILD <= built_size and remaining > 2:
            # Most listed candidates are visited by now: rebuild the lists on the remaining rows
            # (they keep ascending row order, so ties still go to the lowest index).
            ids = [r for r in range(n) if not visited[r]] + [current]
            ids.sort()
            position = {r: i for i, r in enumerate(ids)}
            lists = _CandidateLists(points[torch.tensor(ids, device=points.device)], candidates,
                                    group)
            built_size = remaining
    return order


def crossfilter(weight: torch.Tensor) -> torch.Tensor:
    """NeRN crossfilter permutation of one conv weight: the chain of its kernel rows (f·C_in + c).

    The chain walk runs on the CPU; without the compiled op (or for a large layer on a GPU) the
    candidate lists are computed where the weight lives."""
    w = _check_weight(weight, "crossfilter")
    n = w.shape[0] * w.shape[1]
    vectors = w.reshape(n, -1)
    ops = compiled_chain_ops()
    with _one_thread():
        if ops is not None and (w.device.type == "cpu" or n <= _COMPILED_GPU_MAX_KERNELS):
            vectors = vectors.cpu()
            # A zero kernel normalises to NaN, as in NeRN (the op treats NaN rows NeRN's way).
            return ops.point_chains(_normalise_rows(vectors)[None])[0]
        return torch.tensor(_crossfilter_chain(vectors), dtype=torch.long)


def infilter(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeRN infilter permutation of one conv weight: ``(filter_order (C_out,), channel_orders
    (C_out, C_in))`` — per filter the chain of its channels, then the chain of the filters."""
    ops = compiled_chain_ops()
    if ops is not None and ops.infilter_chains is not None:
        # The usual case (a float32 CPU conv weight, C_in > 1, s > 1) as one compiled call on the
        # weight as it is, which checks it: run cold (after other work), every torch call or tensor
        # attribute read from Python costs microseconds, together as much as the walk itself.
        try:
            return tuple(ops.infilter_chains(weight))
        except (RuntimeError, TypeError):
            pass  # another dtype, device or shape: converted below, or NeRN's length-1 rule
    w = _check_weight(weight, "infilter").cpu()
    c_out, c_in = w.shape[0], w.shape[1]
    kernels = w.reshape(c_out, c_in, -1)
    if ops is not None and ops.infilter_chains is not None and c_in > 1 and kernels.shape[-1] > 1:
        return tuple(ops.infilter_chains(kernels))  # one call; splits the filters over threads
    with _one_thread():
        return _infilter(kernels)


def _infilter(kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Infilter with torch ops and :func:`greedy_chains` (no compiled infilter op, or NeRN's
    length-1 rule: 1×1 kernels or a single input channel)."""
    c_out, c_in = kernels.shape[0], kernels.shape[1]
    normed = _normalise_rows(kernels)  # NaN for a zero kernel, as in NeRN
    if kernels.shape[-1] == 1:
        channel_orders = greedy_chains(_similarities(kernels))  # NeRN's length-1 rule
    else:
        channel_orders = greedy_chains(normed @ normed.transpose(1, 2))
    if c_in == 1:
        # NeRN's code breaks here (its length-1 rule meets a 3-D array); a filter is then a
        # single kernel, so its chain is that of the kernels under the same rule.
        filter_sim = _similarities(kernels[:, 0][None])
    else:
        # Filter f: its normalised kernels in its own channel order, flattened; NeRN's filter
        # similarity is the plain dot product of these (the sum of per-kernel cosines).
        rows = (channel_orders + torch.arange(c_out)[:, None] * c_in).reshape(-1)
        filters = normed.reshape(c_out * c_in, -1).index_select(0, rows).reshape(c_out, -1)
        filter_sim = (filters @ filters.T)[None]
    filter_order = greedy_chains(filter_sim)[0]
    return filter_order, channel_orders


# ------------------------------------------------------------------------------ layers, cache
def weights_hash(weights: Sequence[torch.Tensor], mode: str) -> str:
    """A hash of the weights' values, shapes and dtypes and the permutation mode."""
    h = hashlib.sha256(f"{CACHE_FORMAT}/{CACHE_VERSION}/{mode}".encode())
    for w in weights:
        t = w.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def compute_permutations(weights: Sequence[torch.Tensor], mode: str,
                         cache_dir: Optional[PathLike] = None, progress: bool = False) -> list:
    """Per-layer NeRN permutations of conv weights (layout order), cached in ``cache_dir``.

    The cache file is named by a hash of the weights and the mode, so changed weights recompute.
    """
    if mode not in MODES:
        raise ValueError(f"permutation mode '{mode}' is not one of {MODES} (or 'none')")
    weights = list(weights)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{mode}_{weights_hash(weights, mode)}.pt"
        if path.exists():
            try:
                data = safe_load(path, CACHE_FORMAT)
                return _from_file(data, weights, mode, path)
            except FileFormatError:
                pass  # corrupt or stale: recompute and overwrite
    compute = crossfilter if mode == "crossfilter" else infilter
    items = weights
    if progress:
        from tqdm import tqdm
        items = tqdm(weights, desc=f"{mode} permutations", unit="layer", disable=None)  # terminals only
    result = [compute(w) for w in items]
    if path is not None:
        atomic_save({"format": CACHE_FORMAT, "version": CACHE_VERSION, "mode": mode,
                     "shapes": [list(w.shape) for w in weights], "permutations": result}, path)
    return result


def _from_file(data: dict, weights: Sequence[torch.Tensor], mode: str, path: Path) -> list:
    if data.get("mode") != mode or data.get("shapes") != [list(w.shape) for w in weights]:
        raise FileFormatError(f"{path}: permutations of another mode or other shapes")
    perms = data["permutations"]
    if len(perms) != len(weights):
        raise FileFormatError(f"{path}: {len(perms)} layers, expected {len(weights)}")
    return [tuple(p) if isinstance(p, (list, tuple)) else p for p in perms]


def permute_layout(layout, weights: Sequence[torch.Tensor], mode: Optional[str],
                   cache_dir: Optional[PathLike] = None, progress: bool = False):
    """``layout`` with NeRN permutations of ``weights`` (mode None/"none" returns it unchanged)."""
    if mode in (None, "none"):
        return layout
    return layout.with_permutations(compute_permutations(weights, mode, cache_dir, progress))

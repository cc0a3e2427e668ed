"""Permutations equal a straightforward NeRN-style Python loop (NeRN/permutations/tsp.py), and
the cache and layout plumbing work."""
import warnings

import numpy as np
import pytest
import torch

from nern_fast import WeightLayout
from nern_fast import permutations as P


# ------------------------------------------------------------------ the NeRN-style loop (oracle)
def _one_cosine_sim(source, candidates):
    normed = candidates / np.expand_dims(np.linalg.norm(candidates, axis=-1), -1)
    src = source / np.expand_dims(np.linalg.norm(source), -1)
    return np.dot(src, normed.T)


def _all_cosine_sim(vectors):
    if vectors.shape[1] == 1:  # NeRN's special case for vectors of length 1
        normed = vectors / np.linalg.norm(vectors, keepdims=True)
        return -(normed - normed.T) ** 2
    normed = vectors / np.expand_dims(np.linalg.norm(vectors, axis=-1), -1)
    normed = normed.reshape(normed.shape[0], -1)
    return np.dot(normed, normed.T)


def nern_chain(vectors, calc_all):
    """NeRN's get_max_sim_order: a loop over a list of remaining indices."""
    n = len(vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero kernels divide by zero, as in NeRN
        sims = _all_cosine_sim(vectors) if calc_all else None
        order, remaining, current = [0], list(range(1, n)), 0
        for _ in range(n - 1):
            candidates = [i for i in remaining if i != current]
            values = (sims[current, candidates] if calc_all
                      else _one_cosine_sim(vectors[current], vectors[candidates]))
            best = candidates[int(np.argmax(values))]
            order.append(best)
            remaining.remove(best)
            current = best
    return order


def nern_crossfilter(weight):
    w = weight.numpy()
    return nern_chain(w.reshape(-1, w.shape[-1] ** 2), calc_all=False)


def nern_infilter(weight):
    w = weight.numpy()
    channel_orders = [nern_chain(f.reshape(-1, w.shape[-1] ** 2), True) for f in w]
    reordered = np.array([f[o] for f, o in zip(w, channel_orders)])
    filters = nern_chain(reordered.reshape(-1, reordered.shape[1], reordered.shape[-1] ** 2), True)
    return filters, channel_orders


# ------------------------------------------------------------------ layers to test on
def _layers():
    g = torch.Generator().manual_seed(3)
    shapes = [(8, 8, 3), (16, 8, 3), (5, 7, 3), (12, 12, 1), (20, 20, 2), (24, 16, 3)]
    out = []
    for i, (co, ci, s) in enumerate(shapes):
        w = torch.randn(co, ci, s, s, generator=g)
        out.append((f"random{i}", w))
        z = w.clone()  # zero kernels: NaN similarities, which NeRN's argmax prefers
        z[1, 2 % ci] = 0
        z[3 % co, 0] = 0
        out.append((f"zeros{i}", z))
        d = w.clone()  # duplicates and scaled copies: exact ties go to the lowest index
        d[2 % co, 1 % ci] = d[0, 3 % ci]
        d[4 % co, 0] = 2 * d[0, 0]
        out.append((f"ties{i}", d))
    return out


LAYERS = _layers()


@pytest.fixture(params=["compiled", "python"])
def chain_walk(request, monkeypatch):
    """Both ways of walking the chains: the extension's C++ ops and the torch/numpy fallback."""
    if request.param == "compiled":
        if P.compiled_chain_ops() is None:
            pytest.skip("nern_fast._C is not built here (or has no chain ops)")
    else:
        monkeypatch.setattr(P, "compiled_chain_ops", lambda: None)
    return request.param


@pytest.mark.parametrize("name,weight", LAYERS, ids=[n for n, _ in LAYERS])
def test_crossfilter_equals_nern_loop(name, weight, chain_walk):
    expected = nern_crossfilter(weight)
    assert P.crossfilter(weight).tolist() == expected
    n = weight.shape[0] * weight.shape[1]
    # Tiny candidate lists and groups force the exact fallback scans and list rebuilds.
    for candidates, group in ((1, 2), (2, 4), (3, 8)):
        assert P._crossfilter_chain(weight.reshape(n, -1), candidates, group) == expected


@pytest.mark.parametrize("name,weight", LAYERS, ids=[n for n, _ in LAYERS])
def test_infilter_equals_nern_loop(name, weight, chain_walk):
    filters, channels = nern_infilter(weight)
    filter_order, channel_orders = P.infilter(weight)
    assert filter_order.tolist() == list(filters)
    assert channel_orders.tolist() == [list(c) for c in channels]


@pytest.mark.parametrize("shape", [(7, 37, 3), (37, 17, 2), (9, 70, 3), (3, 2, 5), (6, 128, 3), (5, 131, 3)])
def test_infilter_odd_widths(shape, chain_walk):
    # Widths around the compiled walk's 8- and 16-column groups, with exact ties and a zero kernel;
    # filters of up to 128 channels are walked four at a time from their matrices, wider ones not.
    c_out, c_in, s = shape
    w = torch.randn(c_out, c_in, s, s, generator=torch.Generator().manual_seed(sum(shape)))
    w[1, c_in - 1] = w[0, 0]
    for twin in (11, 19, 35):  # the same lane 8 and 16 columns on, and another 16-column group
        if twin < c_in:
            w[:, twin] = w[:, 3]
    w[shape[0] - 1] = w[0]
    w[2 % shape[0], 1] = 0
    filters, channels = nern_infilter(w)
    filter_order, channel_orders = P.infilter(w)
    assert filter_order.tolist() == list(filters)
    assert channel_orders.tolist() == [list(c) for c in channels]


def test_crossfilter_larger_layer(chain_walk):
    w = torch.randn(40, 32, 3, 3, generator=torch.Generator().manual_seed(1))
    assert P.crossfilter(w).tolist() == nern_crossfilter(w)


def test_single_input_channel_infilter_is_a_chain_of_kernels(chain_walk):
    # NeRN's own code fails for C_in == 1; the filter chain is then the chain of the kernels.
    w = torch.randn(9, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    filter_order, channel_orders = P.infilter(w)
    assert channel_orders.tolist() == [[0]] * 9
    assert filter_order.tolist() == nern_chain(w.numpy().reshape(9, 9), True)


def test_tiny_layers(chain_walk):
    for shape in ((1, 1, 3, 3), (1, 2, 3, 3), (2, 1, 1, 1)):
        w = torch.randn(shape)
        n = shape[0] * shape[1]
        assert sorted(P.crossfilter(w).tolist()) == list(range(n))
        fo, co = P.infilter(w)
        assert sorted(fo.tolist()) == list(range(shape[0]))


def test_bad_input():
    with pytest.raises(ValueError, match="conv weight"):
        P.crossfilter(torch.randn(4, 9))
    with pytest.raises(ValueError, match="floating point"):
        P.infilter(torch.ones(2, 2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="not one of"):
        P.compute_permutations([torch.randn(2, 2, 3, 3)], "sideways")


def test_forms_fit_the_layout_and_cache(tmp_path):
    weights = [torch.randn(8, 4, 3, 3), torch.randn(6, 8, 3, 3)]
    layout = WeightLayout.from_shapes([tuple(w.shape) for w in weights])
    for mode in P.MODES:
        perms = P.compute_permutations(weights, mode, cache_dir=tmp_path)
        permuted = layout.with_permutations(perms)  # the NeRN forms the layout accepts
        assert permuted.is_permuted
        files = list(tmp_path.glob(f"{mode}_*.pt"))
        assert len(files) == 1
        again = P.compute_permutations(weights, mode, cache_dir=tmp_path)  # read from the cache
        assert layout.with_permutations(again) == permuted
    changed = [weights[0] + 1, weights[1]]
    P.compute_permutations(changed, "crossfilter", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("crossfilter_*.pt"))) == 2  # a new hash, a new file
    assert P.permute_layout(layout, weights, "none") is layout


def test_corrupt_cache_is_recomputed(tmp_path):
    weights = [torch.randn(4, 4, 3, 3)]
    path = tmp_path / f"crossfilter_{P.weights_hash(weights, 'crossfilter')}.pt"
    path.write_bytes(b"not a torch file")
    perms = P.compute_permutations(weights, "crossfilter", cache_dir=tmp_path)
    assert perms[0].tolist() == nern_crossfilter(weights[0])
    assert path.stat().st_size > 100


@pytest.mark.parametrize("scale", [1e-24, 1e-30, 1e-44])
def test_kernel_whose_norm_underflows_counts_as_a_zero_kernel(scale, chain_walk):
    """A kernel of ~1e-24 weights has a float32 norm of 0: NeRN's division gives it ±inf, and the
    compiled crossfilter walk then wrote past the end of its arrays (a segfault). It now counts
    as a zero kernel in both walks and both forms: the same chains as with that kernel zeroed."""
    g = torch.Generator().manual_seed(5)
    for shape in ((16, 16, 3, 3), (6, 9, 2, 2)):
        w = torch.randn(shape, generator=g)
        tiny = w.clone()
        tiny[5, 7] = torch.randn(shape[2:], generator=g) * scale
        assert torch.linalg.vector_norm(tiny[5, 7]) == 0 and (tiny[5, 7] != 0).any()
        zeroed = w.clone()
        zeroed[5, 7] = 0
        assert P.crossfilter(tiny).tolist() == nern_crossfilter(zeroed)
        filters, channels = nern_infilter(zeroed)
        filter_order, channel_orders = P.infilter(tiny)
        assert filter_order.tolist() == list(filters)
        assert channel_orders.tolist() == [list(c) for c in channels]

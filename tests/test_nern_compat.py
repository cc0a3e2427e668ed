"""from_nern decodes what NeRN's eager code decodes. The NeRN-side computation below follows the
official code's steps (per-coordinate encodings, embedding permutation by argsort, per-layer MLP,
reshape, sampling) written out independently for the test."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from nern_fast import FastPredictor, FileFormatError, LayoutError
from nern_fast.models import cifar_resnet


def nern_positions(shapes):
    """NeRN's ``ReconstructedModel._get_tensor_indices``: the raw (layer, filter, channel) integers,
    which its embeddings encode whatever ``normalization_mode`` says (the normalised ones it also
    computes, ``.normalized_indices``, are never read)."""
    return [[(l, f, c) for f in range(s[0]) for c in range(s[1])] for l, s in enumerate(shapes)]


def nern_encode(positions, emb):
    """NeRN's MyPositionalEncoding of each position (a row of ``positions``), the same elementwise
    steps for all rows at once: its per-coordinate Python loop took minutes on ResNet-20 on a busy
    2-core machine."""
    levels, base = emb["enc_levels"], emb["base"]
    pos = torch.tensor(positions)
    if emb["type"] == "basic":
        x = pos.unsqueeze(-1) * (base ** torch.arange(levels)) * np.pi  # (n, 3, levels)
    else:
        rng = torch.random.get_rng_state()
        torch.manual_seed(0)
        b = torch.randn((levels * 3, 3)) * torch.Tensor(emb["gauss_scale"])
        torch.random.set_rng_state(rng)
        x = (pos * 2 * np.pi) @ b.T  # (n, 3·levels)
    # NeRN: dstack([sin, cos]).flatten() per position, i.e. sin and cos interleaved
    return torch.stack([torch.sin(x), torch.cos(x)], dim=-1).reshape(len(positions), -1)


def nern_decode(state, cfg, shapes, perms=None, mode=None, chunk=5):
    nern = cfg["nern"]
    emb = nern["embeddings"]
    embeddings = [nern_encode(layer, emb) for layer in nern_positions(shapes)]
    if mode == "crossfilter":
        embeddings = [e[np.argsort(p)] for e, p in zip(embeddings, perms)]
    elif mode == "infilter":
        new = []
        for e, (fp, cp), s in zip(embeddings, perms, shapes):
            r = e.numpy().reshape(s[0], s[1], -1)[np.argsort(fp)]
            r = np.array([fe[inv] for fe, inv in zip(r, np.argsort(np.array(cp)))])
            new.append(torch.Tensor(r).reshape(e.shape))
        embeddings = new
    n_hidden = nern["num_blocks"] - 1
    k = nern["output_size"]
    out = []
    for e, s in zip(embeddings, shapes):
        pieces = []
        for i in range(0, e.shape[0], chunk):
            x = e[i:i + chunk]
            for j in range(n_hidden):
                x = torch.relu(F.linear(x, state[f"module.layers.{j}.weight"], state[f"module.layers.{j}.bias"]))
            pieces.append(F.linear(x, state["module.final_linear_layer.weight"],
                                   state["module.final_linear_layer.bias"]))
        w = torch.vstack(pieces).reshape(s[0], s[1], k, k)
        size = s[-1]
        if nern["sampling_mode"] == "center":
            lo, hi = int(k / 2 - size / 2), int(k / 2 + size / 2)
            w = w[:, :, lo:hi, lo:hi]
        elif nern["sampling_mode"] == "average":
            w = F.avg_pool2d(w, k - size + 1, 1)
        else:
            w = F.max_pool2d(w, k - size + 1, 1)
        out.append(w)
    return out


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 6, 3)
        self.c = nn.Conv2d(6, 5, 1)


def make_files(tmp_path, emb_type="basic", norm="local", sampling="center", hidden=12, blocks=4,
               levels=5, permute_mode=None):
    cfg = {"nern": {"hidden_layer_size": hidden, "num_blocks": blocks, "output_size": 3,
                    "sampling_mode": sampling, "method": "kxk",
                    "embeddings": {"type": emb_type, "enc_levels": levels, "base": 0.76,
                                   "normalization_mode": norm, "gauss_scale": [1, 0.1, 0.1],
                                   "permutations": {"permute_mode": permute_mode}}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(3)
    sizes = [6 * levels] + [hidden] * (blocks - 1)
    state = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        state[f"module.layers.{i}.weight"] = torch.randn(b, a) / math.sqrt(a)
        state[f"module.layers.{i}.bias"] = torch.randn(b) * 0.1
    state["module.final_linear_layer.weight"] = torch.randn(9, hidden) / math.sqrt(hidden)
    state["module.final_linear_layer.bias"] = torch.randn(9) * 0.1
    torch.save(state, tmp_path / "predictor.pt")
    return cfg, state


@pytest.mark.parametrize("emb_type", ["basic", "ffn"])
@pytest.mark.parametrize("norm", ["local", "global", "None"])
@pytest.mark.parametrize("sampling", ["center", "average", "max"])
def test_from_nern_decodes_like_nern(tmp_path, emb_type, norm, sampling):
    cfg, state = make_files(tmp_path, emb_type, norm, sampling)
    model = SmallNet()
    pred = FastPredictor.from_nern(tmp_path / "predictor.pt", model, tmp_path / "cfg.yaml", include=None)
    shapes = [tuple(m.weight.shape) for m in (model.a, model.b, model.c)]
    expected = nern_decode(state, cfg, shapes)
    for got, want in zip(pred(), expected):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["crossfilter", "infilter"])
def test_from_nern_with_permutations(tmp_path, mode):
    cfg, state = make_files(tmp_path, permute_mode=mode)
    model = SmallNet()
    shapes = [tuple(m.weight.shape) for m in (model.a, model.b, model.c)]
    rng = np.random.default_rng(0)
    if mode == "crossfilter":
        perms = [rng.permutation(s[0] * s[1]).tolist() for s in shapes]
    else:
        perms = [(rng.permutation(s[0]).tolist(), [rng.permutation(s[1]).tolist() for _ in range(s[0])])
                 for s in shapes]
    folder = tmp_path / "perms"
    folder.mkdir()
    for i, p in enumerate(perms):
        torch.save(p, folder / f"layer_{i}.pt")
    with pytest.raises(LayoutError, match="permutations="):
        FastPredictor.from_nern(tmp_path / "predictor.pt", model, tmp_path / "cfg.yaml", include=None)
    pred = FastPredictor.from_nern(tmp_path / "predictor.pt", model, tmp_path / "cfg.yaml",
                                   permutations=folder, include=None)
    expected = nern_decode(state, cfg, shapes, perms, mode)
    for got, want in zip(pred(), expected):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_from_nern_on_resnet20_takes_nerns_layer_set(tmp_path):
    """NeRN's CIFAR ResNet-20 (maorash/NeRN tasks/cifar10/cifar_resnet.py, get_learnable_weights)
    represents the stem conv and the 18 block convs: 19 layers, 29,744 kernels (the "nern" preset
    leaves the stem out: 29,696, every layer's coordinate l/18 instead of l/19)."""
    cfg, state = make_files(tmp_path, hidden=16, blocks=5, levels=40)
    model = cifar_resnet(20)
    pred = FastPredictor.from_nern(state, model, cfg["nern"], backend="eager")
    assert pred.layout.names[0] == "conv1" and pred.layout.num_layers == 19
    assert pred.layout.num_kernels == 29744 and pred.hidden == 16 and pred.num_blocks == 5
    preset = FastPredictor.from_nern(state, model, cfg["nern"], backend="eager", include="nern")
    assert preset.layout.num_kernels == 29696
    shapes = [l.shape for l in pred.layout.layers]
    expected = nern_decode(state, cfg, shapes, chunk=4096)
    for got, want in zip(pred(), expected):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_from_nern_errors(tmp_path):
    cfg, state = make_files(tmp_path)
    model = SmallNet()
    small = {k: v for k, v in state.items() if "final" not in k}
    with pytest.raises(FileFormatError, match="final_linear_layer"):
        FastPredictor.from_nern(small, model, cfg, include=None)
    wrong = dict(cfg["nern"], hidden_layer_size=13)
    with pytest.raises(FileFormatError, match="does not match"):
        FastPredictor.from_nern(state, model, {"nern": wrong}, include=None)
    with pytest.raises(ValueError, match="kxk"):
        FastPredictor.from_nern(state, model, {"nern": dict(cfg["nern"], method="basic")}, include=None)
    with pytest.raises(FileNotFoundError):
        FastPredictor.from_nern(tmp_path / "nope.pt", model, cfg, include=None)


def test_nern_normalization_mode_is_ignored_as_nerns_code_does(tmp_path):
    """NeRN encodes raw indices for every normalization_mode: the three decode the same weights
    here, and other than a layout normalised per layer (what the config's 'local' would mean)."""
    model = SmallNet()
    decodes = []
    for norm in ("local", "global", "None"):
        cfg, state = make_files(tmp_path, norm=norm)
        pred = FastPredictor.from_nern(state, model, cfg, include=None)
        assert pred.layout.normalization == "none"
        decodes.append(pred())
    for other in decodes[1:]:
        assert all(torch.equal(a, b) for a, b in zip(decodes[0], other))
    local = FastPredictor.from_nern(state, model, cfg, include=None, normalization="local")
    assert not torch.allclose(local()[1], decodes[0][1])


class NeRNStyleBlock(nn.Module):
    def __init__(self, planes):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)


class NeRNStyleNet(nn.Module):
    """Like NeRN's own model classes: get_learnable_weights() names the represented convs."""

    def __init__(self, reverse=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.block = NeRNStyleBlock(4)
        self.extra = nn.Conv2d(4, 4, 1)  # not in NeRN's list
        self.reverse = reverse

    def get_learnable_weights(self):
        weights = [self.stem.weight, self.block.conv1.weight, self.block.conv2.weight]
        return weights[::-1] if self.reverse else weights


def test_auto_layer_set_asks_get_learnable_weights(tmp_path):
    """A model with NeRN's get_learnable_weights() (NeRN's own classes, whose blocks the "nern"
    preset does not recognise) is represented as that list says."""
    cfg, state = make_files(tmp_path)
    pred = FastPredictor.from_nern(state, NeRNStyleNet(), cfg)
    assert pred.layout.names == ["stem", "block.conv1", "block.conv2"]
    with pytest.raises(LayoutError, match="another order than the model's modules"):
        FastPredictor.from_nern(state, NeRNStyleNet(reverse=True), cfg)
    odd = NeRNStyleNet()
    odd.get_learnable_weights = lambda: [odd.stem.weight, torch.zeros(3)]
    with pytest.raises(LayoutError, match=r"get_learnable_weights\(\)\[1\] is not the weight of an nn.Conv2d"):
        FastPredictor.from_nern(state, odd, cfg)


def test_permutations_must_fit_the_configs_permute_mode(tmp_path):
    """NeRN applies no permutation cache without a permute_mode, and each mode has its own form:
    a cache of the other form (or none asked for) decoded other weights without a word."""
    model = SmallNet()
    shapes = [tuple(m.weight.shape) for m in (model.a, model.b, model.c)]
    chains = [list(range(s[0] * s[1]))[::-1] for s in shapes]
    pairs = [(list(range(s[0])), [list(range(s[1]))] * s[0]) for s in shapes]
    cfg, state = make_files(tmp_path)
    with pytest.raises(LayoutError, match="permute_mode is None: NeRN's code applies none"):
        FastPredictor.from_nern(state, model, cfg, permutations=chains, include=None)
    cfg, state = make_files(tmp_path, permute_mode="infilter")
    with pytest.raises(LayoutError, match="layer 0 is not an infilter .* pair"):
        FastPredictor.from_nern(state, model, cfg, permutations=chains, include=None)
    FastPredictor.from_nern(state, model, cfg, permutations=pairs, include=None)
    cfg, state = make_files(tmp_path, permute_mode="crossfilter")
    with pytest.raises(LayoutError, match="layer 0 is not a crossfilter chain"):
        FastPredictor.from_nern(state, model, cfg, permutations=pairs, include=None)


def test_malformed_nern_files_are_named(tmp_path):
    cfg, state = make_files(tmp_path)
    model = SmallNet()
    with pytest.raises(FileFormatError, match=r"entries \['extra'\] are not tensors"):
        FastPredictor.from_nern({**state, "extra": [1, 2]}, model, cfg, include=None)
    with pytest.raises(ValueError, match="hidden_layer_size must be an integer, got 'abc'"):
        FastPredictor.from_nern(state, model, {"nern": dict(cfg["nern"], hidden_layer_size="abc")}, include=None)
    with pytest.raises(ValueError, match="embeddings must be a mapping, got list"):
        FastPredictor.from_nern(state, model, {"nern": dict(cfg["nern"], embeddings=[1])}, include=None)
    with pytest.raises(ValueError, match=r"embeddings.gauss_scale must be a list of numbers"):
        emb = dict(cfg["nern"]["embeddings"], gauss_scale="wide")
        FastPredictor.from_nern(state, model, {"nern": dict(cfg["nern"], embeddings=emb)}, include=None)

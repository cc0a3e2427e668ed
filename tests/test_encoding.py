import math

import pytest
import torch

from nern_fast import EncodingSpec


def test_basic_hand_computed():
    spec = EncodingSpec("basic", levels=2, base=0.5)
    e = spec.encode(torch.tensor([[0.5, 0.25, 1.0]]))[0]
    expected = []
    for p in (0.5, 0.25, 1.0):
        for j in range(2):
            x = p * 0.5 ** j * math.pi
            expected += [math.sin(x), math.cos(x)]
    assert e.shape == (12,)
    assert torch.allclose(e, torch.tensor(expected), atol=1e-7)


def test_basic_matches_nern_expression_exactly():
    """NeRN: torch.tensor(pos).unsqueeze(-1) * (base ** arange(levels)) * pi, dstack(sin, cos)."""
    spec = EncodingSpec("basic", levels=40, base=0.76)
    pos = (3 / 54, 17 / 64, 5 / 32)
    x = torch.tensor(pos).unsqueeze(-1) * (0.76 ** torch.arange(40)) * math.pi
    nern = torch.dstack([torch.sin(x), torch.cos(x)]).flatten()
    ours = spec.encode(torch.tensor([pos]))[0]
    assert torch.equal(ours, nern)


def test_ffn_matches_seeded_matrix():
    spec = EncodingSpec("ffn", levels=5, gauss_scale=(1, 0.1, 0.1))
    torch.manual_seed(0)
    b = torch.randn(15, 3) * torch.tensor([1, 0.1, 0.1])
    assert torch.equal(spec.ffn_matrix(), b)
    pos = (0.5, 0.25, 0.125)
    x = (torch.tensor(pos) * 2 * math.pi) @ b.T
    nern = torch.dstack([torch.sin(x), torch.cos(x)]).flatten()
    assert torch.equal(spec.encode(torch.tensor([pos]))[0], nern)


def test_ffn_matrix_does_not_disturb_global_rng():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    EncodingSpec("ffn", levels=3).ffn_matrix()
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("levels", [1, 7, 64])
def test_sizes_and_separable_blocks(levels):
    spec = EncodingSpec("basic", levels=levels)
    p = torch.rand(5, 3)
    e = spec.encode(p)
    assert e.shape == (5, 6 * levels)
    for i in range(3):
        assert torch.equal(spec.encode_index(p[:, i], i), e[:, i * 2 * levels:(i + 1) * 2 * levels])


@pytest.mark.parametrize("kw, message", [
    (dict(kind="sine"), "not one of"),
    (dict(levels=0), "1..64"),
    (dict(levels=65), "1..64"),
    (dict(base=-1.0), "positive"),
    (dict(gauss_scale=(1, 2)), "3 values"),
    (dict(base=9.0, levels=40), r"base\^39 = 10\^37.2, above 1e33"),  # float32 encodings overflow: NaN weights
])
def test_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        EncodingSpec(**kw)

"""On-demand / cached / materialized inference (nern_fast.inference) on CPU with the eager backend;
the CUDA prefetch tests at the end run where a GPU is present."""
from __future__ import annotations

import contextlib
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import random_predictor
from nern_fast import LayoutError, WeightLayout
from nern_fast.inference import AttachedWeightError, AttachError, attachment, is_attached, prepare_for_inference
from nern_fast.models import cifar_resnet

REPRESENTED = ["c0", "c1", "c2", "c3"]


class ChainNet(nn.Module):
    """A stem conv (not represented), then represented 8→8, 8→16 (with bias), 16→16 3×3 and a
    16→8 1×1 conv (cropped). ``twice`` runs c0 two times; ``fail`` raises after c1."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c0 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)
        self.twice = False
        self.fail = False
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.c0(x))
        if self.twice:
            x = F.relu(self.c0(x))
        x = F.relu(self.c1(x))
        if self.fail:
            raise RuntimeError("failure in the middle of the forward")
        x = self.c3(F.relu(self.c2(x)))
        return self.head(x.mean((2, 3)))


def make(permuted: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = ChainNet().eval()
    layout = WeightLayout.from_model(model, include=REPRESENTED)
    if permuted:
        g = torch.Generator().manual_seed(3)
        layout = layout.with_permutations([torch.randperm(l.num_kernels, generator=g)
                                           for l in layout.layers])
    pred = random_predictor(layout, backend="eager")
    return model, pred


def run(model, x, grad_mode="inference"):
    if grad_mode == "inference":
        with torch.inference_mode():
            return model(x)
    with torch.no_grad():
        return model(x)


def layer_bytes(pred):
    return [l.num_weights * 4 for l in pred.layout.layers]


def materialized_output(model, pred, x, **attach):
    """The materialized mode's output (what every mode must equal); leaves the model detached."""
    out = run(pred.attach(model, mode="materialized", **attach), x)
    pred.detach(model)
    return out


def attached_one_layer_per_call(enable, model, pred, x, **enable_options):
    """(materialized output, state): the model attached on demand with one layer per decode call,
    then faked CUDA streams / graphs enabled on it by a fixture's ``enable``."""
    expected = materialized_output(model, pred, x, group_bytes=0)
    pred.attach(model, mode="on_demand", group_bytes=0)
    return expected, enable(model, **enable_options)


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("grad_mode", ["inference", "no_grad"])
def test_modes_give_identical_outputs(permuted, batch, grad_mode):
    model, pred = make(permuted)
    x = torch.randn(batch, 3, 6, 6)
    outputs = {}
    for mode, cache in [("materialized", None), ("on_demand", None), ("cached", None), ("cached", 6000)]:
        pred.attach(model, mode=mode, cache_bytes=cache)
        first, second = run(model, x, grad_mode), run(model, x, grad_mode)
        pred.detach(model)
        assert torch.equal(first, second)
        outputs[(mode, cache)] = first
    reference = outputs[("materialized", None)]
    for key, out in outputs.items():
        assert torch.equal(out, reference), key
    # The detached model is an ordinary model with the decoded weights: same outputs again.
    assert torch.equal(run(model, x, grad_mode), reference)
    # ... and those weights are the predictor's decode of each layer.
    for i, name in enumerate(REPRESENTED):
        assert torch.equal(getattr(model, name).weight, pred.decode_layer(i).detach())


@pytest.mark.parametrize("mode", ["on_demand", "cached", "materialized"])
def test_model_dtype_changed_while_attached_is_followed(mode):
    """model.double() while attached: the represented weights follow the model's dtype (a copy per
    call) in its forward, state_dict and detach — as if the detached model had been converted."""
    model, pred = make()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pred.attach(model, mode=mode)
    model.double()
    out = run(model, x)
    conv_alone = model.c2(torch.randn(1, 16, 4, 4, dtype=torch.float64))  # outside a root forward
    state = model.state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float64}
    assert model.c0.weight.dtype == torch.float64  # the placeholder
    pred.detach(model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert torch.equal(run(model, x), out)
    plain, _ = make()
    pred.load_into(plain)
    plain.double()
    assert torch.equal(run(plain, x), out)
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    assert conv_alone.dtype == torch.float64


@pytest.mark.parametrize("mode", ["on_demand", "cached", "materialized"])
def test_model_moved_while_attached_keeps_its_weights_on_the_models_device(mode):
    """model.cuda() / model.to(device) while attached (``meta`` stands in for a GPU here): state_dict
    and detach put the represented weights on the model's device, as they do its other
    parameters (they stayed on the attach-time device: a mixed-device model after detach)."""
    model, pred = make()
    pred.attach(model, mode=mode)
    model.to("meta")
    assert {v.device.type for v in model.state_dict().values()} == {"meta"}
    model.to(torch.float64)  # dtype and device followed together
    state = model.state_dict()
    assert {(v.device.type, v.dtype) for k, v in state.items() if v.is_floating_point()} == \
        {("meta", torch.float64)}
    assert model.c0.weight.dtype == torch.float64 and model.c0.weight.is_meta  # the placeholder
    pred.detach(model)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float64)}
    assert isinstance(model.c0.weight, nn.Parameter)


@pytest.mark.parametrize("mode", ["on_demand", "cached", "materialized"])
def test_half_model_with_float_batchnorms_runs_attached(mode):
    """model.to(bf16) with its BatchNorms kept in float32 (the usual mixed half-precision set-up),
    every conv represented: the witness the attachment follows is a BatchNorm, still float32, and
    the convs decoded float32 weights for bf16 inputs (F.conv2d refused them). They now run in their
    input's dtype, as the same model with ordinary parameters does."""
    torch.manual_seed(0)
    model = cifar_resnet(8, width=4).eval()
    pred = random_predictor(WeightLayout.from_model(model, include=None), backend="eager")
    x = torch.randn(2, 3, 16, 16).bfloat16()

    def keep_batchnorms_float(m):
        m.to(torch.bfloat16)
        for module in m.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.float()
        return m

    plain = copy.deepcopy(model)
    pred.load_into(plain)
    expected = run(keep_batchnorms_float(plain), x)
    pred.attach(model, mode=mode)
    keep_batchnorms_float(model)
    assert torch.equal(run(model, x), expected)
    pred.detach(model)


class TiedNet(nn.Module):
    """``b`` (not represented) runs with the weight Parameter of the represented ``a``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


@pytest.mark.parametrize("mode", ["on_demand", "cached", "materialized"])
def test_a_weight_tied_to_an_unrepresented_module_gets_the_decoded_values(mode):
    """attach leaves the tied Parameter to the other module, holding the decode (it kept the
    original values, so the two convs ran different weights); detach keeps the tie."""
    torch.manual_seed(0)
    model = TiedNet().eval()
    pred = random_predictor(WeightLayout.from_model(model, include=["a"]), backend="eager")
    x = torch.randn(2, 4, 5, 5)
    plain = TiedNet().eval()
    plain.load_state_dict(model.state_dict())
    pred.load_into(plain)
    expected = run(plain, x)
    pred.attach(model, mode=mode)
    assert torch.equal(model.b.weight, pred.decode_layer(0).detach())
    assert torch.equal(run(model, x), expected)
    pred.detach(model)
    assert model.a.weight is model.b.weight
    assert torch.equal(run(model, x), expected)


@pytest.mark.parametrize("mode", ["on_demand", "cached", "materialized"])
def test_represented_weight_used_outside_its_conv_is_an_error_not_garbage(mode):
    """Code that reads conv.weight outside the conv's forward (F.conv2d(x, conv.weight), a fusion,
    .data) got an uninitialised result from a meta placeholder: now a clear error; metadata works."""
    model, pred = make()
    x = torch.randn(2, 8, 5, 5)
    pred.attach(model, mode=mode)
    w = model.c0.weight
    assert (w.shape, w.dtype, w.device.type, w.numel(), w.dim()) == ((8, 8, 3, 3), torch.float32, "meta", 576, 4)
    for use in (lambda: F.conv2d(x, w, padding=1), lambda: w + 1, lambda: w.data,
                lambda: w.to("cpu"), lambda: torch.cat([w, w]), lambda: w.abs().sum(),
                lambda: nn.init.kaiming_normal_(w), lambda: setattr(w, "requires_grad", False)):
        with pytest.raises(AttachedWeightError, match=r"'c0\.weight' is represented.*conv\(x\)"):
            use()
    with pytest.raises(AttachedWeightError, match=r"so setting \.requires_grad on it"):
        w.requires_grad = False
    with pytest.raises(AttachedWeightError, match=r"so reading \.data on it"):
        w.data
    out = model.c0(x)  # the module decodes
    pred.detach(model)
    torch.testing.assert_close(out, F.conv2d(x, model.c0.weight, padding=1), rtol=0, atol=0)


def test_placeholder_dtype_follows_the_model_before_the_next_forward():
    """model.double() while attached: conv.weight (and a reference kept from before) shows float64
    at once, not only after the next forward; after detach a kept placeholder answers its own."""
    model, pred = make()
    pred.attach(model)
    kept = model.c1.weight
    model.double()
    assert model.c1.weight.dtype == torch.float64 and kept.dtype == torch.float64
    assert kept.element_size() == 8
    pred.detach(model)
    assert model.c1.weight.dtype == torch.float64 and isinstance(model.c1.weight, nn.Parameter)
    assert kept.shape == (16, 8, 3, 3)
    with pytest.raises(AttachedWeightError):
        kept.sum()


def test_deepcopy_and_pickle_of_an_attached_model_say_detach_first(tmp_path):
    import copy
    import pickle
    model, pred = make()
    pred.attach(model)
    with pytest.raises(AttachError, match="deepcopy of an attached model.*detach"):
        copy.deepcopy(model)
    with pytest.raises(AttachError, match="cannot be pickled.*state_dict"):
        pickle.dumps(model)
    with pytest.raises(AttachError, match="cannot be pickled"):
        torch.save(model, tmp_path / "m.pt")
    x = torch.randn(1, 3, 6, 6)
    out = run(model, x)  # still attached and working
    pred.detach(model)
    assert torch.equal(run(copy.deepcopy(model), x), out)


def test_deepcopy_and_pickle_of_a_module_inside_an_attached_model_say_detach_first():
    """A submodule's copy carried the attachment's hooks: it kept decoding from the predictor after
    the original was detached, and its pickling failed on a local function."""
    import pickle
    torch.manual_seed(0)
    model = cifar_resnet(8, width=4).eval()
    pred = random_predictor(WeightLayout.from_model(model, include="nern"), backend="eager")
    pred.attach(model)
    for part in (model.layer1, model.layer1[0].conv1):
        with pytest.raises(AttachError, match=r"deepcopy of an attached model \(or of a module inside it\).*detach"):
            copy.deepcopy(part)
        with pytest.raises(AttachError, match="cannot be pickled.*state_dict"):
            pickle.dumps(part)
    x = torch.randn(2, 3, 8, 8)
    out = run(model, x)
    pred.detach(model)
    block = copy.deepcopy(model.layer1)  # detached: ordinary modules again
    assert isinstance(block[0].conv1.weight, nn.Parameter) and not block[0].conv1._forward_pre_hooks
    assert torch.equal(run(model, x), out)


@pytest.mark.parametrize("mode", ["on_demand", "cached", "materialized"])
def test_user_hooks_on_an_attached_conv_see_the_decoded_weight(mode):
    """Forward hooks registered after attach ran after the attachment's own, which had already put
    the placeholder back: reading module.weight there raised AttachedWeightError."""
    model, pred = make()
    early = []
    model.c1.register_forward_hook(lambda m, a, o: early.append(m.weight.clone()))  # before attach
    pred.attach(model, mode=mode)
    expected = model.state_dict()["c1.weight"]
    seen = []
    model.c1.register_forward_pre_hook(lambda m, a: seen.append(("pre", m.weight.clone())))
    handle = model.c1.register_forward_hook(lambda m, a, o: seen.append(("post", m.weight.clone())))
    model.c1.register_forward_hook(lambda m, a, kw, o: seen.append(("kwargs", m.weight.clone())), with_kwargs=True)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(2):
        out = run(model, x)
    direct = model.c1(torch.randn(1, 8, 5, 5))  # a conv called on its own runs the hooks too
    assert [k for k, _ in seen] == ["pre", "post", "kwargs"] * 3 and len(early) == 3
    for _, weight in seen + [(None, w) for w in early]:
        assert torch.equal(weight, expected)
    assert model.c1.weight.device.type == "meta" and direct.shape == (1, 16, 5, 5)
    handle.remove()
    assert torch.equal(run(model, x), out)
    pred.detach(model)
    assert torch.equal(run(model, x), out)


def test_torch_compile_runs_an_attached_model():
    """torch.compile traced the attachment's hooks and failed inside dynamo (an internal error about
    the placeholder); the hooks now run eagerly and the compiled parts read the decoded weights."""
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    expected = materialized_output(model, pred, x)
    pred.attach(model, mode="on_demand")
    compiled = torch.compile(model, backend="eager")  # dynamo only: fast, the same kernels
    for grad_mode in ("inference", "no_grad", "no_grad"):
        assert torch.equal(run(compiled, x, grad_mode), expected)
    assert model.c1.weight.device.type == "meta"
    assert attachment(model).stats["held_bytes"] == 0
    torch._dynamo.reset()  # (else the code compiled above serves the next call, not compiled again)
    with pytest.raises(Exception, match=r"graph break at each represented conv.*pred\.detach"):
        run(torch.compile(model, backend="eager", fullgraph=True), x)  # one graph cannot hold the hooks
    assert torch.equal(run(model, x), expected)
    pred.detach(model)
    torch._dynamo.reset()


def test_tracing_or_scripting_an_attached_model_says_detach_first():
    """torch.jit.trace failed with 'Cannot insert a Tensor that requires grad as a constant',
    torch.export with a data-dependent guard deep in the decoder, torch.jit.script with an
    AttributeError or a complaint about a hook's *args: now one AttachError saying what to do."""
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    pred.attach(model, mode="on_demand")
    expected = run(model, x)
    with pytest.raises(AttachError, match=r"torch\.jit\.trace of an attached model.*detach first"):
        torch.jit.trace(model, x, check_trace=False)
    with pytest.raises(AttachError, match=r"torch\.jit\.trace of an attached model"):
        torch.jit.trace(model.c1, torch.randn(1, 8, 5, 5))  # a represented conv alone
    with pytest.raises(AttachError, match=r"torch\.export of an attached model.*detach first"):
        torch.export.export(model, (x,))
    for target in (model, model.c1):
        with pytest.raises(AttachError, match=r"torch\.jit\.script of an attached model.*detach first"):
            torch.jit.script(target)
    assert torch.equal(run(model, x), expected)  # still attached and working
    pred.detach(model)
    assert "__prepare_scriptable__" not in vars(model) and "__prepare_scriptable__" not in vars(model.c1)
    traced = torch.jit.trace(model, x)  # detached: an ordinary model
    assert torch.equal(traced(x), expected)


def test_on_demand_keeps_no_weight_alive():
    model, pred = make()
    pred.attach(model, mode="on_demand", group_bytes=0)
    seen = []

    def grab(module, args):  # runs after the attach hook: sees the decoded weight
        seen.append(weakref.ref(module.weight))

    for name in REPRESENTED:
        getattr(model, name).register_forward_pre_hook(grab)
    out = run(model, torch.randn(2, 3, 6, 6))
    assert len(seen) == 4 and out.shape == (2, 5)
    assert all(ref() is None for ref in seen), "a decoded weight outlived the forward"
    for name in REPRESENTED:
        w = getattr(model, name).weight
        assert w.device.type == "meta" and not isinstance(w, nn.Parameter)
    stats = attachment(model).stats
    assert stats["held_bytes"] == 0 and stats["cached_bytes"] == 0
    assert stats["peak_held_bytes"] == max(layer_bytes(pred)) == attachment(model).largest_layer_bytes
    assert stats["decodes"] == 4
    # What the model stores: everything but the represented weights.
    stored = {n for n, _ in model.named_parameters()}
    assert stored == {"stem.weight", "stem.bias", "bn.weight", "bn.bias", "c1.bias", "c3.bias",
                      "head.weight", "head.bias"}


def _cpu_backends():
    from nern_fast import ops
    names = ["eager"]
    try:
        ops.get_backend("csrc")
        names.append("csrc")
    except ops.BackendUnavailable:
        pass
    return names


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("permuted", [False, True])
def test_layer_decoder_equals_decode_layer(backend, permuted):
    from nern_fast.inference import LayerDecoder
    model, pred = make(permuted)
    pred.backend = backend
    decoder = LayerDecoder(pred)
    with torch.no_grad():
        for i in range(pred.layout.num_layers):  # includes the cropped 1x1 layer c3
            got = decoder(i)
            assert got.shape == pred.layout.layers[i].shape
            assert torch.equal(got, pred.decode_layer(i))
        assert decoder._backend.name == backend
        pred.to(torch.float64)  # a new dtype: checks and backend choice are made again
        got = decoder(2)
        assert got.dtype == torch.float64 and torch.equal(got, pred.decode_layer(2))


def test_layer_decoder_follows_the_backend_setting(monkeypatch):
    from nern_fast import ops
    from nern_fast.inference import LayerDecoder
    model, pred = make()
    pred.backend = "auto"
    decoder = LayerDecoder(pred)
    with torch.no_grad():
        decoder(0)
        monkeypatch.setenv(ops.ENV_BACKEND, "eager")
        assert torch.equal(decoder(0), pred.decode_layer(0)) and decoder._backend.name == "eager"
        monkeypatch.setenv(ops.ENV_BACKEND, "no_such_backend")
        with pytest.raises(ops.BackendUnavailable):
            decoder(0)


def test_decode_groups_are_consecutive_layers_within_the_budget():
    from nern_fast.inference_groups import default_group_bytes, plan_groups
    assert plan_groups([5, 5, 5, 20, 1, 1], 10) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert plan_groups([5, 5, 5], 0) == [range(0, 1), range(1, 2), range(2, 3)]
    assert plan_groups([5, 5, 5], 100) == [range(0, 3)]
    assert plan_groups([], 10) == []
    assert default_group_bytes([4, 10, 6], 30) == 20  # half of largest layer + predictor
    model, pred = make()
    for bad in (-1, 1.5, True, "auto"):
        with pytest.raises(ValueError, match="group_bytes must be a non-negative integer"):
            pred.attach(model, group_bytes=bad)
    assert not is_attached(model) and isinstance(model.c0.weight, nn.Parameter)


def test_workspace_bytes_reaches_the_backends_that_bound_their_scratch(monkeypatch):
    from nern_fast import ops
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    expected = materialized_output(model, pred, x)
    eager = ops.get_backend("eager")
    seen = []

    class Bounded:  # the eager backend, as a backend with bounded_workspace would take the call
        name, bounded_workspace = "bounded", True

        def decode(self, *args, workspace_bytes=None):
            seen.append(workspace_bytes)
            return eager.decode(*args)

    pred.attach(model, mode="on_demand", workspace_bytes=4096)
    assert attachment(model).workspace_bytes == 4096
    assert torch.equal(run(model, x), expected)  # eager: no bounded_workspace, not passed to it
    pred.detach(model)
    monkeypatch.setattr(ops, "select_backend", lambda request, name="auto": Bounded())
    pred.attach(model, mode="on_demand", workspace_bytes=4096)
    assert torch.equal(run(model, x), expected)
    assert seen and set(seen) == {4096}
    pred.detach(model)
    seen.clear()
    pred.attach(model, mode="on_demand")  # None: the backend's own default
    run(model, x)
    assert seen and set(seen) == {None}
    pred.detach(model)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="workspace_bytes must be a positive integer"):
            pred.attach(model, workspace_bytes=bad)
    assert not is_attached(model)


GROUPS_OF_TWO = (2304 + 4608, 9216 + 512)  # ChainNet's layer bytes: groups {c0, c1} and {c2, c3}


def test_grouped_on_demand_decodes_each_group_once_per_forward():
    model, pred = make(permuted=True)
    group_bytes = max(GROUPS_OF_TWO)
    x = torch.randn(2, 3, 6, 6)
    expected = materialized_output(model, pred, x, group_bytes=group_bytes)
    per_layer = materialized_output(model, pred, x, group_bytes=0)
    assert torch.allclose(expected, per_layer, rtol=1e-5, atol=1e-6)  # other call sizes, same maths
    pred.attach(model, mode="on_demand", group_bytes=group_bytes)
    state = attachment(model)
    assert state.groups == [range(0, 2), range(2, 4)] and state.largest_group_bytes == max(GROUPS_OF_TWO)
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = weakref.ref(module.weight), module.weight.untyped_storage().data_ptr()
        return hook

    for name in REPRESENTED:
        getattr(model, name).register_forward_pre_hook(grab(name))
    for forward in (1, 2):
        assert torch.equal(run(model, x), expected)
        assert state.stats["decodes"] == 2 * forward
    # c0 and c1 read views of one decode's output; c3 (cropped 1x1) its own copy.
    assert seen["c0"][1] == seen["c1"][1] and seen["c2"][1] != seen["c3"][1]
    assert all(ref() is None for ref, _ in seen.values()), "a decoded weight outlived the forward"
    assert state.stats["held_bytes"] == 0
    assert state.stats["peak_held_bytes"] == max(GROUPS_OF_TWO)  # one group at a time without prefetch
    # A conv called on its own decodes its group and keeps nothing.
    out = model.c1(torch.randn(1, 8, 4, 4))
    assert out.shape == (1, 16, 4, 4) and state.stats["decodes"] == 5 and state.stats["held_bytes"] == 0


def test_grouped_state_dict_and_detach_decode_each_group_once():
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    pred.attach(model, mode="on_demand", group_bytes=max(GROUPS_OF_TWO))
    state = attachment(model)
    expected = run(model, x)
    decodes = state.stats["decodes"]
    sd = model.state_dict()
    assert state.stats["decodes"] == decodes + 2 and state._state_group is None
    for name in REPRESENTED:  # each weight in storage of its own (savable by safetensors, too)
        w = sd[name + ".weight"]
        assert w.untyped_storage().nbytes() == w.numel() * w.element_size()
    pred.detach(model)
    assert state.stats["decodes"] == decodes + 4
    pointers = {getattr(model, n).weight.untyped_storage().data_ptr() for n in REPRESENTED}
    assert len(pointers) == 4
    for name in REPRESENTED:
        assert torch.equal(getattr(model, name).weight, sd[name + ".weight"])
    assert torch.equal(run(model, x), expected)


def test_grouped_cached_pins_copies_of_what_fits():
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    group_bytes = max(GROUPS_OF_TWO)
    expected = materialized_output(model, pred, x, group_bytes=group_bytes)
    pred.attach(model, mode="cached", cache_bytes=2304 + 512, group_bytes=group_bytes)
    state = attachment(model)
    for _ in range(3):
        assert torch.equal(run(model, x), expected)
    # c0 and c3 fit: each kept in storage of its own (not the whole group's output)
    assert state.cached_layers == [0, 3] and state.stats["held_bytes"] == 2304 + 512
    for i in (0, 3):
        kept = state._store[i]
        assert kept.untyped_storage().nbytes() == kept.numel() * 4
    # c3 is pinned when c2 decodes their group: a hit already in the first forward.
    assert state.stats["decodes"] == 2 + 2 * 2 and state.stats["cache_hits"] == 1 + 2 * 2
    pred.detach(model)
    # Unlimited: each group decoded once, then every conv is a hit.
    pred.attach(model, mode="cached", group_bytes=group_bytes)
    for _ in range(2):
        assert torch.equal(run(model, x), expected)
    # (c1 and c3 are hits already in the first forward: pinned with their group)
    assert attachment(model).stats["decodes"] == 2 and attachment(model).stats["cache_hits"] == 2 + 4
    pred.detach(model)


def test_cached_pins_what_fits_across_forwards():
    model, pred = make()
    sizes = layer_bytes(pred)  # 2304, 4608, 9216, 512
    limit = sizes[0] + sizes[1] + sizes[3]  # layer 2 does not fit after 0 and 1; 3 still does
    pred.attach(model, mode="cached", cache_bytes=limit, group_bytes=0)
    state = attachment(model)
    observed = []

    def check(module, args):
        observed.append(state.stats["cached_bytes"])

    for name in REPRESENTED:
        getattr(model, name).register_forward_pre_hook(check)
    x = torch.randn(1, 3, 6, 6)
    expected = run(model, x)
    assert state.cached_layers == [0, 1, 3] and state.stats["cached_bytes"] == limit
    assert state.stats["decodes"] == 4 and state.stats["cache_hits"] == 0
    # Later forwards: the pinned layers are hits, only layer 2 is decoded (LRU would evict each
    # layer before its next use here and hit nothing).
    for forward in range(1, 4):
        assert torch.equal(run(model, x), expected)
        assert state.stats["decodes"] == 4 + forward and state.stats["cache_hits"] == 3 * forward
    assert state.cached_layers == [0, 1, 3] and max(observed) <= limit
    assert state.stats["held_bytes"] == limit


def test_cached_pins_the_first_layers_in_call_order():
    model, pred = make()
    model.twice = True  # call order 0, 0, 1, 2, 3
    sizes = layer_bytes(pred)
    pred.attach(model, mode="cached", cache_bytes=sizes[0] + sizes[2], group_bytes=0)
    state = attachment(model)
    run(model, torch.randn(1, 3, 6, 6))
    # 0 pinned (its second call is a hit), 1 fits after 0 and is pinned, 2 no longer fits, 3 fits.
    assert state.cached_layers == [0, 1, 3] and state.stats["cache_hits"] == 1


def test_cached_hits_and_a_layer_larger_than_the_cache():
    model, pred = make()
    sizes = layer_bytes(pred)
    pred.attach(model, mode="cached", cache_bytes=sizes[2] - 1, group_bytes=0)  # layer 2 never fits
    state = attachment(model)
    x = torch.randn(1, 3, 6, 6)
    run(model, x)
    assert 2 not in state.cached_layers and state.stats["decodes"] == 4
    run(model, x)
    assert state.stats["decodes"] == 5  # only layer 2 decoded again
    assert state.stats["cache_hits"] == 3
    pred.detach(model)
    pred.attach(model, mode="cached", cache_bytes=0, group_bytes=0)  # nothing cached: as on_demand
    run(model, x)
    run(model, x)
    assert attachment(model).stats["decodes"] == 8 and attachment(model).stats["held_bytes"] == 0


def test_unlimited_cache_decodes_each_layer_once():
    model, pred = make()
    pred.attach(model, mode="cached", group_bytes=0)
    for _ in range(3):
        run(model, torch.randn(2, 3, 6, 6))
    stats = attachment(model).stats
    assert stats["decodes"] == 4 and stats["cache_hits"] == 8
    assert stats["cached_bytes"] == sum(layer_bytes(pred))


def test_conv_called_twice_in_one_forward():
    model, pred = make()
    model.twice = True
    x = torch.randn(3, 3, 6, 6)
    pred.attach(model, mode="materialized", group_bytes=0)
    expected = run(model, x)
    pred.detach(model)
    pred.attach(model, mode="on_demand", group_bytes=0)
    assert torch.equal(run(model, x), expected)
    state = attachment(model)
    # The second call of c0 reads the weight decoded for the first (the group the convs read).
    assert state.stats["decodes"] == 4 and state.stats["held_bytes"] == 0
    assert state._order == (0, 0, 1, 2, 3)  # the call order prefetch follows on CUDA
    pred.detach(model)
    assert torch.equal(run(model, x), expected)


def test_exception_in_forward_leaves_hooks_working():
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    pred.attach(model, mode="materialized")
    expected = run(model, x)
    pred.detach(model)
    for mode in ("on_demand", "cached"):
        pred.attach(model, mode=mode, cache_bytes=5000 if mode == "cached" else None)
        state = attachment(model)
        model.fail = True
        with pytest.raises(RuntimeError, match="middle of the forward"):
            run(model, x)
        model.fail = False
        assert all(getattr(model, n).weight.device.type == "meta" for n in REPRESENTED)
        assert not state._running and state._current is None and not state._in_forward
        assert torch.equal(run(model, x), expected)
        pred.detach(model)


def test_interrupt_inside_a_conv_is_repaired_by_the_next_forward():
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    expected = materialized_output(model, pred, x)
    pred.attach(model, mode="on_demand")

    def interrupt(module, args):
        raise KeyboardInterrupt  # not an Exception: always-call hooks do not run

    handle = model.c1.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(model, x)
    assert model.c1.weight.device.type != "meta"  # left behind by the interrupted forward
    handle.remove()
    assert torch.equal(run(model, x), expected)
    assert model.c1.weight.device.type == "meta"
    assert attachment(model).stats["held_bytes"] == 0


def test_calling_a_represented_conv_directly():
    model, pred = make()
    pred.attach(model, mode="on_demand")
    x = torch.randn(1, 8, 5, 5)
    out = model.c0(x)  # outside a forward of the root model: decoded synchronously
    assert torch.equal(out, F.conv2d(x, pred.decode_layer(0).detach(), None, 1, 1))
    assert model.c0.weight.device.type == "meta"


def test_state_dict_while_attached_is_an_ordinary_state_dict():
    model, pred = make()
    plain_keys = list(model.state_dict())
    pred.attach(model, mode="on_demand")
    state = model.state_dict()
    assert list(state) == plain_keys
    for i, name in enumerate(REPRESENTED):
        assert torch.equal(state[f"{name}.weight"], pred.decode_layer(i).detach())
    fresh = ChainNet().eval()
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(run(fresh, x), run(model, x))
    with pytest.raises(RuntimeError, match="detach"):
        model.load_state_dict(state)
    unrepresented = {k: v for k, v in state.items() if k not in {f"{n}.weight" for n in REPRESENTED}}
    model.load_state_dict(unrepresented)  # strict: the represented weights are not expected
    assert torch.equal(run(model, x), run(fresh, x))


def test_gradients_with_respect_to_the_input():
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    grads = []
    for mode in ("materialized", "on_demand"):
        pred.attach(model, mode=mode)
        xg = x.clone().requires_grad_()
        model(xg).square().sum().backward()
        grads.append(xg.grad)
        assert all(p.grad is None for p in pred.parameters())
        pred.detach(model)
    assert torch.equal(grads[0], grads[1])


def test_detach_restores_parameters():
    model, pred = make()
    model.c2.weight.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    pred.attach(model, mode="on_demand")
    assert is_attached(model)
    pred.detach(model)
    assert not is_attached(model)
    assert [n for n, _ in model.named_parameters()] == names  # same names, same order
    for name in REPRESENTED:
        w = getattr(model, name).weight
        assert isinstance(w, nn.Parameter) and w.device.type == "cpu"
    assert not model.c2.weight.requires_grad and model.c1.weight.requires_grad
    assert not model.c0._forward_pre_hooks and not model._forward_hooks
    pred.attach(model, mode="cached")  # attachable again
    pred.detach(model)


def test_attach_errors():
    model, pred = make()
    with pytest.raises(ValueError, match="mode must be one of"):
        pred.attach(model, mode="lazy")
    with pytest.raises(ValueError, match="cached"):
        pred.attach(model, mode="on_demand", cache_bytes=100)
    with pytest.raises(ValueError, match="non-negative"):
        pred.attach(model, mode="cached", cache_bytes=-1)
    with pytest.raises(AttachError, match="not attached"):
        pred.detach(model)
    with pytest.raises(LayoutError):
        pred.attach(cifar_resnet(8, width=4))
    pred.attach(model)
    with pytest.raises(AttachError, match="already attached"):
        pred.attach(model)
    _, other = make(seed=1)
    with pytest.raises(AttachError, match="different predictor"):
        other.detach(model)
    with pytest.raises(AttachError, match="already attached to another predictor.*submodule"):
        other.attach(model)
    pred.detach(model)


@pytest.mark.parametrize("root_first", [False, True])
def test_two_predictors_on_disjoint_parts_of_a_model(root_first):
    """One predictor per model; disjoint parts run from two when the second is made for, and
    attached to, the submodule holding its convs."""
    torch.manual_seed(0)
    model = cifar_resnet(8, width=4).eval()
    inner = random_predictor(WeightLayout.from_model(model.layer2, include="nern"), backend="eager", seed=1)
    outer = random_predictor(WeightLayout.from_model(
        model, include=lambda n, m: n.startswith(("layer1.", "layer3.")) and m.kernel_size == (3, 3)),
        backend="eager", seed=2)
    x = torch.randn(2, 3, 8, 8)
    order = [(outer, model, "cached"), (inner, model.layer2, "on_demand")]
    for p, part, mode in (order if root_first else order[::-1]):
        p.attach(part, mode=mode)
    out, state = run(model, x), model.state_dict()
    with pytest.raises(AttachError, match="another predictor"):
        inner.attach(model)
    with pytest.raises(AttachError, match="different predictor"):
        inner.detach(model)
    for p, part, _ in (order if root_first else order[::-1]):
        p.detach(part)
    assert torch.equal(run(model, x), out)
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("failure", ["no backend", "decode error", "interrupt"])
def test_failed_attach_leaves_the_model_as_it_was(failure, monkeypatch):
    """attach is all or nothing: a backend that cannot decode refuses before the model changes, and
    a failure or Ctrl-C during a materialized decode gives the convs their own Parameters back."""
    from nern_fast import ops
    from nern_fast.inference import Attachment
    model, pred = make()
    pred.backend = "auto"
    params = list(model.named_parameters())
    x = torch.randn(2, 3, 12, 12)
    expected = run(model, x)
    if failure == "no backend":
        monkeypatch.setenv(ops.ENV_BACKEND, "no_such_backend")
        error, mode = ops.BackendUnavailable, "on_demand"
    else:
        error = RuntimeError if failure == "decode error" else KeyboardInterrupt
        calls = []

        def decode_group(self, g, _f=Attachment._decode_group):
            calls.append(g)
            if len(calls) == 2:
                raise error("decode failed")
            return _f(self, g)
        monkeypatch.setattr(Attachment, "_decode_group", decode_group)
        mode = "materialized"
    with pytest.raises(error):
        pred.attach(model, mode=mode, group_bytes=0)
    assert not is_attached(model)
    assert list(model.named_parameters()) == params  # the same Parameter objects, in their order
    assert not model.c0._forward_pre_hooks and not model._forward_hooks and not model._state_dict_hooks
    assert torch.equal(run(model, x), expected)
    monkeypatch.undo()
    pred.attach(model, mode=mode)
    pred.detach(model)


def test_detach_that_cannot_decode_leaves_the_model_attached(monkeypatch):
    from nern_fast import ops
    model, pred = make()
    pred.backend = "auto"
    pred.attach(model, mode="on_demand")
    monkeypatch.setenv(ops.ENV_BACKEND, "no_such_backend")
    with pytest.raises(AttachError, match="still attached, unchanged.*detach again"):
        pred.detach(model)
    assert is_attached(model) and model.c0._forward_pre_hooks
    monkeypatch.delenv(ops.ENV_BACKEND)
    x = torch.randn(2, 3, 12, 12)
    expected = run(model, x)
    pred.detach(model)
    assert not is_attached(model) and isinstance(model.c0.weight, nn.Parameter)
    assert torch.equal(run(model, x), expected)


def test_cifar_resnet_modes_and_prepare_for_inference():
    torch.manual_seed(0)
    model = cifar_resnet(8, width=4).eval()
    pred = random_predictor(WeightLayout.from_model(model, include="nern"), backend="eager")
    x = torch.randn(4, 3, 8, 8)
    outs = []
    for mode in ("materialized", "on_demand", "cached"):
        prepare_for_inference(model, pred, mode=mode)
        outs.append(run(model, x))
        pred.detach(model)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    prepare_for_inference(model, pred, mode="parameters")
    assert not is_attached(model)
    torch.testing.assert_close(run(model, x), outs[0], rtol=1e-5, atol=1e-5)


def test_prepare_for_inference_refuses_before_it_changes_anything():
    """An attached model, or an unknown mode: refused before the model is moved or put in eval mode
    (it was moved and eval()'d, then refused by attach or load_into)."""
    torch.manual_seed(0)
    model = cifar_resnet(8, width=4)
    pred = random_predictor(WeightLayout.from_model(model, include="nern"), backend="eager")
    with pytest.raises(ValueError, match="mode must be 'parameters' or one of"):
        prepare_for_inference(model, pred, mode="lazy", device=torch.device("meta"))
    assert model.training and next(model.parameters()).device.type == "cpu"
    pred.attach(model, mode="on_demand")
    model.train()
    for mode in ("parameters", "on_demand"):
        with pytest.raises(AttachError, match="already attached"):
            prepare_for_inference(model, pred, mode=mode, device=torch.device("meta"))
        assert model.training and model.conv1.weight.device.type == "cpu"
    pred.detach(model)


# ---------------------------------------------------------------------- prefetch logic, streams faked on CPU
class FakeEvent:
    def __init__(self, log=None, name="event"):
        self.log, self.name = log, name

    def record(self, stream):
        stream.log.append(("record", stream.name))


class FakeStream:
    """Stands in for a CUDA stream: logs waits and recorded events so the ordering can be checked."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def record_event(self):
        self.log.append(("record", self.name))
        return FakeEvent()

    def wait_event(self, event):
        self.log.append(("wait", self.name))


@pytest.fixture
def fake_streams(monkeypatch):
    log = []
    main, side = FakeStream("main", log), FakeStream("side", log)
    current = [main]

    @contextlib.contextmanager
    def use(stream):
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    def set_stream(stream):
        log.append(("set_stream", stream.name))
        current[-1] = stream

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "set_stream", set_stream)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("capture", log))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda self, stream: log.append(("record_stream", stream.name)))

    def enable(model):
        state = attachment(model)
        state.prefetch, state._side_stream = True, side
        return state
    return enable, log


def test_prefetch_logic_with_faked_streams(fake_streams):
    enable, log = fake_streams
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    pred.attach(model, mode="materialized", group_bytes=0)
    expected_once = run(model, x)
    model.twice = True
    expected = run(model, x)
    pred.detach(model)
    pred.attach(model, mode="on_demand", group_bytes=0)
    state = enable(model)
    assert torch.equal(run(model, x), expected)  # learns the order (0, 0, 1, 2, 3)
    assert state.stats["prefetched"] == 0 and state._order == (0, 0, 1, 2, 3)
    log.clear()
    assert torch.equal(run(model, x), expected)
    # c0's second call reads the first's weight; 1, 2 and 3 come from prefetches (1 planned at
    # c0's first call, for the call after the second).
    assert state.stats["prefetched"] == 3 and state.stats["decodes"] == 8
    assert state.stats["held_bytes"] == 0 and state._pending is None
    assert state.stats["peak_held_bytes"] <= 2 * state.largest_layer_bytes
    # Per prefetch: the side stream waits for the event recorded before the running conv, decodes,
    # records its event; the consumer waits for it and marks the weight used on the main stream.
    assert log.count(("wait", "side")) == 3 and log.count(("wait", "main")) == 3
    assert log.count(("record_stream", "main")) == 3
    first_wait = log.index(("wait", "side"))
    assert log[first_wait - 1] == ("record", "main") and log[first_wait + 1] == ("record", "side")
    # Another path than the recorded one: the stale prefetch is dropped, results stay exact.
    model.twice = False
    dropped, prefetched = state.stats["prefetch_dropped"], state.stats["prefetched"]
    log.clear()
    assert torch.equal(run(model, x), expected_once)
    newly_dropped = state.stats["prefetch_dropped"] - dropped
    assert newly_dropped > 0 and state._order == (0, 1, 2, 3)
    # The main stream waits for a dropped prefetch too: its side decode may have made what a later
    # decode on the main stream reads (the shared preparation's first-layer tables of its range).
    taken = state.stats["prefetched"] - prefetched
    assert log.count(("wait", "main")) == taken + newly_dropped
    prefetched = state.stats["prefetched"]
    assert torch.equal(run(model, x), expected_once)
    assert state.stats["prefetched"] == prefetched + 3
    # An exception with a prefetch in flight: nothing stays held, the next forward is exact.
    model.fail = True
    with pytest.raises(RuntimeError):
        run(model, x)
    model.fail = False
    assert state._pending is None and state.stats["held_bytes"] == 0
    assert torch.equal(run(model, x), expected_once)
    # Cached mode prefetches only what the cache does not hold.
    pred.detach(model)
    pred.attach(model, mode="cached", cache_bytes=layer_bytes(pred)[2], group_bytes=0)
    state = enable(model)
    for _ in range(3):
        assert torch.equal(run(model, x), expected_once)
    assert state.stats["prefetched"] > 0 and state.stats["cached_bytes"] <= layer_bytes(pred)[2]


def test_no_prefetch_while_the_predictor_is_off_its_attach_device(fake_streams, monkeypatch):
    """Attached on a GPU, then model.cpu(); pred.cpu(): the prefetch streams are the GPU's but the
    decodes CPU tensors, which have no record_stream (NotImplementedError on a GPU machine, at the
    first prefetched weight). Faked: the attachment's device says cuda:0, the predictor is on the
    CPU. Forwards then decode without prefetch, exactly."""
    enable, log = fake_streams
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    expected, state = attached_one_layer_per_call(enable, model, pred, x)
    for _ in range(2):
        assert torch.equal(run(model, x), expected)
    assert state.stats["prefetched"] > 0  # the fakes prefetch while the devices agree
    state.device = torch.device("cuda", 0)  # where it was attached; the predictor moved since

    def record_stream(self, stream):  # what torch does for a CPU tensor
        raise NotImplementedError("Could not run 'aten::record_stream' with arguments from the 'CPU' backend")
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    prefetched = state.stats["prefetched"]
    for _ in range(2):
        assert torch.equal(run(model, x), expected)
    assert state.stats["prefetched"] == prefetched and state._pending is None
    state.device = torch.device("cpu")  # back together (the fakes' CPU "GPU"): prefetching again
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    run(model, x)
    assert state.stats["prefetched"] > prefetched
    pred.detach(model)


# ---------------------------------------------------------------------- CUDA graphs logic, faked on CPU
class FakeGraph:
    """A 'captured' decode: a replay runs the same fill again (on CPU)."""

    def __init__(self, fill):
        self.fill = fill

    def replay(self):
        self.fill()


def graphed_decodes(state):
    """What attach(..., graphs=True) makes on CUDA, for a CPU attachment."""
    from nern_fast.inference_graphs import GraphedDecodes
    return GraphedDecodes(state._decoder, state.pred.layout.layers, [d for d, _, _ in state._params],
                          state.device)


@pytest.fixture
def fake_graphs(fake_streams, monkeypatch):
    """Turns on nern_fast.inference_graphs for a CPU attachment, with graphs that re-run the fill."""
    from nern_fast import inference_graphs

    def capture(self, g, slot):
        self._fill(g, slot)  # eager first, as the real capture
        self.captures += 1
        return FakeGraph(lambda: self._fill(g, slot))

    def capture_packing(self):
        static = self._prepare()  # a backend's prepared set, filled again in place by each replay
        if static is None:
            return inference_graphs._NO_PACKING

        def replay():
            fresh = self._prepare()
            for kept, new in zip(static.params, fresh.params):
                kept.copy_(new)
        log.append(("capture_packing", torch.cuda.current_stream().name))
        return FakeGraph(replay), static

    monkeypatch.setattr(inference_graphs.GraphedDecodes, "_capture", capture)
    monkeypatch.setattr(inference_graphs.GraphedDecodes, "_capture_packing", capture_packing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    enable_prefetch, log = fake_streams

    def enable(model, prefetch=False):
        state = attachment(model)
        state._graphed = graphed_decodes(state)
        if prefetch:
            enable_prefetch(model)
        state.reset_stats()
        return state
    return enable, log


def test_graph_decodes_alternate_slots_and_order_their_replays(fake_graphs):
    enable, log = fake_graphs
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    expected, state = attached_one_layer_per_call(enable, model, pred, x)
    log.clear()
    assert torch.equal(run(model, x), expected)
    # Slots 0, 1, 0, 1 for c0..c3: one capture each; every replay and every conv (releasing its
    # slot) records an event; on one stream its order suffices, so nothing waits.
    assert state.stats["graph_captures"] == 4 and state.stats["graph_replays"] == 4
    assert state.stats["decodes"] == 4
    assert log.count(("wait", "main")) == 0 and log.count(("record", "main")) == 4 + 4
    # On another stream the first replay waits for the main stream's last replay and for the last
    # reader of slot 0, the second for the last reader of slot 1; later ones follow the stream.
    log.clear()
    with torch.cuda.stream(FakeStream("user", log)):
        assert torch.equal(run(model, x), expected)
    assert log.count(("wait", "user")) == 2 + 1 and ("record", "user") in log
    assert state.stats["held_bytes"] == 2 * state.largest_layer_bytes  # the two slots, nothing else
    for grad_mode in ("inference", "no_grad"):
        assert torch.equal(run(model, x, grad_mode), expected)
    assert state.stats["graph_captures"] == 4 and state.stats["graph_replays"] == 16
    # A conv called twice: the call order (0, 0, 1, 2, 3); the second call reads the first's slot.
    model.twice = True
    pred.detach(model)
    expected_twice, state = attached_one_layer_per_call(enable, model, pred, x)
    for _ in range(2):
        assert torch.equal(run(model, x), expected_twice)
    assert state.stats["graph_captures"] == 4 and state.stats["graph_replays"] == 8
    pred.detach(model)
    assert state._graphed is None and state._current is None


def test_graph_decodes_with_prefetch_and_cached(fake_graphs):
    enable, log = fake_graphs
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    expected, state = attached_one_layer_per_call(enable, model, pred, x, prefetch=True)
    for _ in range(3):
        assert torch.equal(run(model, x), expected)
    assert state.stats["prefetched"] > 0 and state.stats["graph_replays"] == state.stats["decodes"] == 12
    assert ("record", "side") in log and state._pending is None
    assert state.stats["peak_held_bytes"] <= 2 * state.largest_layer_bytes
    pred.detach(model)
    # Cached: the layers that fit are pinned (eager decodes, kept); the others replay graphs.
    pred.attach(model, mode="cached", cache_bytes=layer_bytes(pred)[0] + layer_bytes(pred)[1], group_bytes=0)
    state = enable(model, prefetch=True)
    for _ in range(3):
        assert torch.equal(run(model, x), expected)
    assert state.cached_layers == [0, 1] and state.stats["cache_hits"] == 4
    assert state.stats["graph_replays"] == 6
    pred.detach(model)


def test_grouped_prefetch_decodes_the_next_group_on_the_side_stream(fake_streams):
    enable, log = fake_streams
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    group_bytes = max(GROUPS_OF_TWO)
    expected = materialized_output(model, pred, x, group_bytes=group_bytes)
    pred.attach(model, mode="on_demand", group_bytes=group_bytes)
    state = enable(model)
    run(model, x)  # learns the order
    log.clear()
    for forward in (1, 2):
        assert torch.equal(run(model, x), expected)
        # {c0, c1} decoded at c0; {c2, c3} prefetched once, planned at c0 (not again at c1).
        assert state.stats["prefetched"] == forward and state.stats["decodes"] == 2 + 2 * forward
    assert log.count(("wait", "side")) == 2 and state.stats["prefetch_dropped"] == 0
    assert state.stats["held_bytes"] == 0 and state._pending is None
    assert state.stats["peak_held_bytes"] == sum(GROUPS_OF_TWO)  # the two groups, at most
    pred.detach(model)


def test_grouped_graph_decodes_capture_each_group(fake_graphs):
    enable, log = fake_graphs
    model, pred = make(permuted=True)
    x = torch.randn(2, 3, 6, 6)
    group_bytes = max(GROUPS_OF_TWO)
    expected = materialized_output(model, pred, x, group_bytes=group_bytes)
    pred.attach(model, mode="on_demand", group_bytes=group_bytes)
    state = enable(model, prefetch=True)
    for _ in range(3):  # {c0, c1}: one copy of the whole output; {c2, c3}: one per layer (c3 cropped)
        assert torch.equal(run(model, x), expected)
    assert state.stats["graph_captures"] == 2 and state.stats["graph_replays"] == 6
    assert state.stats["held_bytes"] == 2 * state.largest_group_bytes  # the two slots
    assert state.stats["prefetched"] > 0
    pred.detach(model)
    assert torch.equal(run(model, x), expected)


def test_graph_decodes_follow_new_parameters_and_skip_autograd(fake_graphs):
    enable, _ = fake_graphs
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    pred.attach(model, mode="on_demand", group_bytes=0)
    state = enable(model)
    run(model, x)
    assert state.stats["graph_captures"] == 4
    # In-place updates are seen by the next replay; a replaced parameter recaptures.
    with torch.no_grad():
        pred.layers[0].weight.mul_(1.5)
    pred.layers[1].bias = nn.Parameter(pred.layers[1].bias.detach() + 0.1)
    out = run(model, x)
    assert state.stats["graph_captures"] == 8
    pred.detach(model)
    assert torch.equal(out, materialized_output(model, pred, x, group_bytes=0))
    # With autograd on, a conv keeps its weight for backward: decodes run eagerly, no slot is used.
    pred.attach(model, mode="on_demand", group_bytes=0)
    state = enable(model)
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    assert state.stats["graph_replays"] == 0 and state.stats["decodes"] == 4
    assert xg.grad is not None and state.stats["held_bytes"] == 0
    pred.detach(model)


def _on_demand_with_graph_decodes():
    """An on-demand attachment decoding through GraphedDecodes (what graphs=True makes on CUDA),
    its input and the materialized output."""
    model, pred = make()
    x = torch.randn(2, 3, 6, 6)
    expected = materialized_output(model, pred, x, group_bytes=0)
    pred.attach(model, mode="on_demand", group_bytes=0)
    state = attachment(model)
    state._graphed = graphed_decodes(state)
    return model, pred, x, expected, state


def test_graph_capture_failure_falls_back_to_eager(fake_streams, monkeypatch):
    def refuse():
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", refuse)  # the real _capture, refused
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model, pred, x, expected, state = _on_demand_with_graph_decodes()
    with pytest.warns(RuntimeWarning, match="cannot be captured in CUDA graphs"):
        assert torch.equal(run(model, x), expected)
    assert "not permitted" in state.graphs_disabled
    assert torch.equal(run(model, x), expected)
    assert state.stats["graph_replays"] == 0 and state.stats["decodes"] == 8
    pred.detach(model)


def test_graph_capture_failure_restores_the_stream_and_names_the_cause(fake_streams, monkeypatch):
    """torch's graph context ends an invalidated capture before switching back from its side
    stream, and ending it raises a second error: the fallback restores the current stream and its
    warning names the first error."""
    enable, log = fake_streams
    main = torch.cuda.current_stream()

    class FailingCapture:
        def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
            self.stream = stream
            assert capture_error_mode == "thread_local"  # other threads cannot break the capture

        def __enter__(self):
            torch.cuda.set_stream(self.stream)

        def __exit__(self, *exc):  # like capture_end() after a failed capture; the stream stays
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def host_sync_inside_capture(*args, **kwargs):
        if torch.cuda.current_stream().name == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        return original_decode(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model, pred, x, expected, state = _on_demand_with_graph_decodes()
    original_decode = state._graphed.decoder.__class__.group_output
    monkeypatch.setattr(state._graphed.decoder.__class__, "group_output", host_sync_inside_capture)
    with pytest.warns(RuntimeWarning, match="not permitted when stream is capturing"):
        assert torch.equal(run(model, x), expected)
    assert torch.cuda.current_stream() is main
    assert ("set_stream", "main") in log
    assert "previous error during capture" in state.graphs_disabled  # both, the cause first
    assert state.graphs_disabled.index("not permitted") < state.graphs_disabled.index("previous error")
    pred.detach(model)


# ---------------------------------------------------------------------- one preparation per forward (Triton)
@pytest.fixture
def triton_preparations(monkeypatch):
    """The predictor of ``make()`` on the Triton backend (CPU: the interpreter) and counters of its
    parameter packings and first-layer table builds."""
    tb = pytest.importorskip("nern_fast.ops.triton_backend", reason="triton is not installed")
    if not tb.INTERPRETED or tb.INTERPRETER_PROBLEM is not None:
        pytest.skip(str(tb.INTERPRETER_PROBLEM or "CPU runs need the Triton interpreter"))
    from nern_fast.ops import triton_fused, triton_inputs
    monkeypatch.setenv("NERN_FAST_TRITON_FIRST_LAYER", "separable")
    counts = {"packs": 0, "tables": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(triton_inputs, "pack_parameters", counted("packs", triton_inputs.pack_parameters))
    monkeypatch.setattr(triton_fused, "_build_tables", counted("tables", triton_fused._build_tables))

    def make_triton(permuted=False, **attach):
        """model, predictor (Triton), an input and the materialized output (model detached) of an
        attachment made with ``attach`` (give the decode groups the test's attachment uses: under
        the interpreter a row's bits may depend on its place in a tile — numpy's sgemm rounds by
        position on some CPUs, e.g. OpenBLAS's Haswell kernels — so a layer decoded alone and in a
        group can differ in the last bit; one attachment always decodes through the same groups)."""
        model, pred = make(permuted)
        pred.backend = "triton"
        x = torch.randn(2, 3, 6, 6)
        return model, pred, x, materialized_output(model, pred, x, **attach)

    def taken():
        got = dict(counts)
        counts.update(packs=0, tables=0)
        return got
    return make_triton, taken


@pytest.mark.parametrize("grad_mode", ["inference", "no_grad"])
def test_triton_decodes_of_a_forward_share_one_preparation(triton_preparations, grad_mode):
    make_triton, taken = triton_preparations
    model, pred, x, expected = make_triton(permuted=True)
    # One packing per forward (or attach, detach); first-layer tables per decode group ({c0, c1},
    # {c2}, {c3}: each group's own layers, never the whole network's at once).
    per_forward = {"packs": 1, "tables": 3}
    assert taken() == per_forward  # the materialized attach decoded 3 groups; detach 0
    pred.attach(model, mode="on_demand")
    assert len(attachment(model).groups) == 3
    for _ in range(2):
        assert torch.equal(run(model, x, grad_mode), expected)
        assert taken() == per_forward  # one packing per forward, not one per group
    assert attachment(model)._decoder._shared is None  # dropped with the forward
    # Outside a root forward nothing vouches for the parameters: each decode prepares for itself.
    with torch.no_grad():
        model.c0(torch.randn(1, 8, 4, 4))
    assert taken() == {"packs": 1, "tables": 1}
    # The next forward sees an in-place update (a new preparation per forward).
    with torch.no_grad():
        pred.layers[0].weight.mul_(1.25)
    updated = run(model, x, grad_mode)
    assert not torch.equal(updated, expected)
    # A forward that raises drops its preparation; the next one starts afresh.
    model.fail = True
    with pytest.raises(RuntimeError, match="fail"):
        run(model, x, grad_mode)
    assert attachment(model)._decoder._shared is None
    model.fail = False
    taken()
    assert torch.equal(run(model, x, grad_mode), updated)
    assert taken() == per_forward
    pred.detach(model)
    assert taken() == per_forward  # detach decodes the 3 groups with one preparation
    assert torch.equal(run(model, x, grad_mode), updated)


def test_triton_prefetch_prepares_on_the_main_stream(triton_preparations, fake_streams):
    """The prefetch decodes on the side stream read the forward's prepared set: it is made on the
    main stream before the event the side stream waits for, and marked used by the side stream."""
    make_triton, taken = triton_preparations
    enable, log = fake_streams
    model, pred, x, expected = make_triton(group_bytes=0)
    pred.attach(model, mode="on_demand", group_bytes=0)
    state = enable(model)
    run(model, x)  # learns the order
    taken()
    log.clear()
    assert torch.equal(run(model, x), expected)
    assert state.stats["prefetched"] == 3 and taken() == {"packs": 1, "tables": 4}  # tables per layer
    shared_tensors = 6  # the six packed parameter tensors, once per forward (tables: per stream)
    assert log.count(("record_stream", "side")) == shared_tensors
    pred.detach(model)


def test_triton_graph_decodes_replay_one_packing_per_forward(triton_preparations, fake_graphs):
    """With graphs, the preparation is a graph of its own, replayed once per forward before the
    first layer's replay; the layer graphs read its static set and pack nothing."""
    make_triton, taken = triton_preparations
    enable, log = fake_graphs
    model, pred, x, expected = make_triton(group_bytes=0)
    taken()  # the materialized attach
    pred.attach(model, mode="on_demand", group_bytes=0)
    state = enable(model)
    assert torch.equal(run(model, x), expected)
    # First forward: the packing's (faked) capture and its replay, 2 preparations; the layers'
    # eager runs and captures read the static set, each building its own layer's tables (in its
    # graph: a capture's eager run and its replay, 2 per layer).
    assert taken() == {"packs": 2, "tables": 8} and log.count(("capture_packing", "main")) == 1
    for _ in range(2):
        assert torch.equal(run(model, x), expected)
        # the packing replay; the 4 layer replays pack nothing and build their layer's tables
        assert taken() == {"packs": 1, "tables": 4}
    assert state.stats["graph_replays"] == 12 and state.stats["graph_captures"] == 4
    with torch.no_grad():
        pred.layers[1].bias.add_(0.1)  # in place: the next packing replay sees it
    out = run(model, x)
    pred.detach(model)
    assert torch.equal(out, materialized_output(model, pred, x, group_bytes=0))


# ---------------------------------------------------------------------- CUDA: prefetch on a side stream
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_resnet(depth=20):
    torch.manual_seed(0)
    model = cifar_resnet(depth).eval().cuda()
    pred = random_predictor(WeightLayout.from_model(model, include="nern"), hidden=64, levels=8).cuda()
    return model, pred


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("group_bytes", [None, 0])  # decode groups, one call per layer
def test_cuda_prefetch_matches_materialized(batch, group_bytes):
    model, pred = _cuda_resnet()
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    pred.attach(model, mode="materialized", group_bytes=group_bytes)
    expected = run(model, x)
    pred.detach(model)
    for mode, cache in (("on_demand", None), ("cached", 2 * 64 * 64 * 9 * 4)):
        pred.attach(model, mode=mode, cache_bytes=cache, prefetch=True, group_bytes=group_bytes)
        state = attachment(model)
        assert state.prefetch
        for _ in range(3):
            assert torch.equal(run(model, x), expected)
        torch.cuda.synchronize()
        assert state.stats["prefetched"] > 0
        if mode == "on_demand":
            assert state.stats["held_bytes"] == 0
            assert state.stats["peak_held_bytes"] <= 2 * state.largest_group_bytes
        pred.detach(model)


@cuda
@pytest.mark.gpu
def test_cuda_on_demand_frees_memory_and_survives_path_changes():
    model, pred = _cuda_resnet()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    expected = materialized_output(model, pred, x)
    pred.attach(model, mode="on_demand", prefetch=True)
    run(model, x)  # learns the order
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # also retires blocks whose record_stream events completed
    before = torch.cuda.memory_allocated()
    out = run(model, x)
    assert torch.equal(out, expected)
    del out
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= before  # nothing decoded is kept
    assert attachment(model).stats["prefetched"] > 0
    # Another path than the recorded one: the stale prefetch is dropped, results stay exact.
    model.layer1[1].forward = lambda t: t  # skip a block: a different conv call order
    run(model, x)
    del model.layer1[1].forward
    state = attachment(model)
    assert state.stats["prefetch_dropped"] >= 1 and state.stats["held_bytes"] == 0
    assert torch.equal(run(model, x), expected)
    torch.cuda.synchronize()
    pred.detach(model)
    assert torch.equal(run(model, x), expected)


@cuda
@pytest.mark.gpu
def test_cuda_prefetch_on_a_user_stream():
    model, pred = _cuda_resnet()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    expected = materialized_output(model, pred, x)
    pred.attach(model, mode="on_demand", prefetch=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        outs = [run(model, x) for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(o, expected) for o in outs)
    pred.detach(model)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "csrc"])
def test_cuda_layer_decoder_equals_decode_layer(backend):
    from nern_fast import ops
    from nern_fast.inference import LayerDecoder
    model, pred = _cuda_resnet()
    pred.backend = backend
    try:
        with torch.no_grad():
            expected = [pred.decode_layer(i) for i in range(pred.layout.num_layers)]
    except ops.BackendUnavailable as exc:
        pytest.skip(str(exc))
    decoder = LayerDecoder(pred)
    with torch.no_grad():
        for i, want in enumerate(expected):  # row views at an offset of one arange
            assert torch.equal(decoder(i), want)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "csrc"])
def test_cuda_graphs_match_materialized(backend):
    from nern_fast import ops
    model, pred = _cuda_resnet()
    pred.backend = backend
    x = torch.randn(4, 3, 32, 32, device="cuda")
    try:
        expected = run(pred.attach(model, mode="materialized"), x)
    except ops.BackendUnavailable as exc:
        pytest.skip(str(exc))
    pred.detach(model)
    for mode, prefetch in (("on_demand", False), ("on_demand", True), ("cached", True)):
        cache = 4 * 16 * 16 * 9 * 4 if mode == "cached" else None
        pred.attach(model, mode=mode, cache_bytes=cache, prefetch=prefetch, graphs=True)
        assert len(attachment(model).groups) < pred.layout.num_layers  # decode groups (default)
        state = attachment(model)
        for _ in range(3):
            assert torch.equal(run(model, x), expected)
        torch.cuda.synchronize()
        assert state.graphs_disabled is None, state.graphs_disabled
        assert state.stats["graph_replays"] > 0 and state.stats["graph_captures"] > 0
        # A backend that prepares (Triton) has its preparation in a packing graph of its own.
        packing_graph = state._graphed._packing not in (None, "no packing")
        assert packing_graph == hasattr(state._decoder._backend, "prepare"), state._decoder._backend.name
        if mode == "on_demand":
            assert state.stats["graph_replays"] == state.stats["decodes"]
            assert state.stats["peak_held_bytes"] <= 2 * state.largest_group_bytes
        pred.detach(model)
    # The graphs read the parameters' storage: an in-place update is seen by the next replay.
    pred.attach(model, mode="on_demand", graphs=True)
    run(model, x)
    with torch.no_grad():
        pred.layers[0].weight.mul_(1.25)
    out = run(model, x)
    pred.detach(model)
    assert torch.equal(out, materialized_output(model, pred, x))



@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "csrc"])
def test_cuda_on_demand_forward_captured_whole_in_a_user_graph(backend):
    """A user may capture an on-demand model's whole forward in one CUDA graph (no host path per
    layer left): the replays equal the materialized output, also after the input changes."""
    from nern_fast import ops
    model, pred = _cuda_resnet()
    pred.backend = backend
    x = torch.randn(4, 3, 32, 32, device="cuda")
    try:
        expected = materialized_output(model, pred, x)
    except ops.BackendUnavailable as exc:
        pytest.skip(str(exc))
    other = torch.randn_like(x)
    expected_other = materialized_output(model, pred, other)
    pred.attach(model, mode="on_demand", prefetch=False)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(model, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_out = model(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expected)
    static_x.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expected_other)
    pred.detach(model)

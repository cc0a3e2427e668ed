import pytest
import torch
from torch import nn

from helpers import mixed_layout
from nern_fast import LayoutError, WeightLayout
from nern_fast.layout import coord_rows_from_crossfilter, coord_rows_from_infilter, crop_window
from nern_fast.models import cifar_resnet


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.big = nn.Conv2d(8, 8, 5, padding=2)
        self.rect = nn.Conv2d(8, 8, (1, 3))
        self.group = nn.Conv2d(8, 16, 3, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
        self.point = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(4, 2)


def test_default_include_takes_square_kernels_up_to_k_in_module_order():
    layout = WeightLayout.from_model(Mixed())
    assert layout.names == ["stem", "group", "depthwise", "point"]
    assert [l.shape for l in layout.layers] == [(8, 3, 3, 3), (16, 2, 3, 3), (16, 1, 3, 3), (4, 16, 1, 1)]
    assert [l.kernel_offset for l in layout.layers] == [0, 24, 56, 72]
    assert [l.weight_offset for l in layout.layers] == [0, 216, 504, 648]
    assert layout.num_kernels == 136 and layout.num_weights == 712
    assert layout.max_dim == 16


def test_include_by_names_and_callable():
    model = Mixed()
    assert WeightLayout.from_model(model, include=["point", "stem"]).names == ["stem", "point"]
    assert WeightLayout.from_model(model, include="point").names == ["point"]
    pred = WeightLayout.from_model(model, include=lambda n, m: m.groups > 1)
    assert pred.names == ["group", "depthwise"]
    assert WeightLayout.from_model(model, kernel_size=5).names == ["stem", "big", "group", "depthwise", "point"]


def test_nern_preset_on_cifar_and_torchvision_resnets():
    layout = WeightLayout.from_model(cifar_resnet(56), include="nern")
    assert layout.num_layers == 54 and layout.num_kernels == 94208
    assert "conv1" not in layout.names
    torchvision = pytest.importorskip("torchvision")
    r18 = WeightLayout.from_model(torchvision.models.resnet18(), include="nern")
    assert r18.num_layers == 16 and r18.num_kernels == 1220608
    assert all(".conv" in n and "downsample" not in n for n in r18.names)
    r50 = WeightLayout.from_model(torchvision.models.resnet50(), include="nern")
    assert all(n.endswith("conv2") for n in r50.names) and r50.num_layers == 16


@pytest.mark.parametrize("include, message", [
    (["big"], "larger than"),
    (["rect"], "not square"),
    (["nope"], "not a module"),
    (["fc"], "only nn.Conv2d"),
])
def test_include_errors_name_the_layer(include, message):
    with pytest.raises(LayoutError, match=message) as info:
        WeightLayout.from_model(Mixed(), include=include)
    assert include[0] in str(info.value)


def test_model_without_representable_layer():
    with pytest.raises(LayoutError, match="no conv layer"):
        WeightLayout.from_model(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(LayoutError, match="no conv layer"):
        WeightLayout.from_model(nn.Sequential(nn.Conv2d(3, 3, 5)))


@pytest.mark.parametrize("kernel_size", [0, -1, 2.5, True, "3"])
def test_kernel_size_must_be_a_positive_integer(kernel_size):
    """Checked before any conv is selected: not "no conv layer ... raise kernel_size"."""
    with pytest.raises(LayoutError, match=f"kernel_size .*got {kernel_size!r}"):
        WeightLayout.from_model(Mixed(), kernel_size=kernel_size)
    with pytest.raises(LayoutError, match=f"kernel_size must be an integer >= 1, got {kernel_size!r}"):
        WeightLayout.from_shapes([(4, 4, 1, 1)], kernel_size=kernel_size)


@pytest.mark.parametrize("shape, bad", [((4.5, 4), 4.5), ((4, 4, 3.0, 3), 3.0), ((True, 4), True), ((0, 4), 0)])
def test_from_shapes_refuses_non_integers(shape, bad):
    """A float is refused rather than truncated (4.5 -> 4), a bool rather than read as 1."""
    with pytest.raises(LayoutError, match=rf"layer 'layer0': each dimension of weight shape .* must be "
                                          rf"an integer >= 1, got {bad!r}"):
        WeightLayout.from_shapes([shape])
    assert WeightLayout.from_shapes([(torch.tensor(4), 4)]).layers[0].shape == (4, 4, 3, 3)


def test_layer_index_errors_name_the_index_and_the_layer_count():
    layout = mixed_layout()
    assert layout.layer(-1) == layout.layers[3] and layout.layer(-4) == layout.layers[0]
    for bad in (4, 99, -5):
        with pytest.raises(IndexError, match=rf"layer index {bad} is out of range: the layout has 4 layers"):
            layout.layer(bad)
    with pytest.raises(TypeError, match="layer index must be an integer, got 1.0"):
        layout.layer(1.0)
    with pytest.raises(LayoutError, match="coord_rows names layer 4, but the layout has 4 layers"):
        layout.with_coord_rows({4: torch.arange(8)})
    with pytest.raises(LayoutError, match="coord_rows key .* >= 0, got -1"):
        layout.with_coord_rows({-1: torch.arange(128)})


def test_normalized_positions_modes():
    layout = WeightLayout.from_shapes([(4, 2), (8, 4)], normalization="local")
    pl, pf, pc = layout.normalized_positions()
    assert torch.equal(pl, torch.tensor([0.0, 0.5]))
    assert torch.equal(pf[1], torch.arange(8) / 8)
    assert torch.equal(pc[0], torch.tensor([0.0, 0.5]))
    glob = WeightLayout.from_shapes([(4, 2), (8, 4)], normalization="global")
    pl, pf, pc = glob.normalized_positions()
    assert torch.equal(pl, torch.tensor([0.0, 1 / 8])) and torch.equal(pc[1], torch.arange(4) / 8)
    none = WeightLayout.from_shapes([(4, 2), (8, 4)], normalization="none")
    pl, pf, pc = none.normalized_positions()
    assert torch.equal(pf[1], torch.arange(8.0)) and torch.equal(pl, torch.tensor([0.0, 1.0]))
    # global M counts the kernel dimensions too (NeRN: max over whole shapes)
    assert WeightLayout.from_shapes([(2, 2, 5, 5)], kernel_size=5, normalization="global").max_dim == 5


def test_crop_window_matches_nern():
    assert crop_window(3, 1) == (1, 2)
    assert crop_window(5, 3) == (1, 4)
    assert crop_window(3, 2) == (0, 2)
    assert crop_window(7, 1) == (3, 4)


def test_crossfilter_and_infilter_conversion():
    layout = WeightLayout.from_shapes([(2, 3)])
    layer = layout.layers[0]
    chain = [0, 4, 2, 5, 1, 3]
    rows = coord_rows_from_crossfilter(chain, layer)
    assert rows.tolist() == [chain.index(q) for q in range(6)]  # slot q decodes its chain rank
    filter_order = [1, 0]
    channel_orders = [[2, 0, 1], [0, 1, 2]]
    rows = coord_rows_from_infilter(filter_order, channel_orders, layer)
    # kernel (f, c) -> (rank of f in filter chain, rank of c in filter f's chain)
    expected = []
    for f in range(2):
        for c in range(3):
            expected.append(filter_order.index(f) * 3 + channel_orders[f].index(c))
    assert rows.tolist() == expected


@pytest.mark.parametrize("perm, message", [
    ([0, 1, 2], "length 6"),
    ([0, 1, 2, 3, 4, 4], "not a permutation"),
    (([0, 0], [[0, 1, 2], [0, 1, 2]]), "filter order"),
    (([1, 0], [[0, 1, 1], [0, 1, 2]]), "filter 0"),
    ([0.0, 1, 2, 3, 4, 5], "integer"),
])
def test_bad_permutations_are_clear_errors(perm, message):
    layout = WeightLayout.from_shapes([(2, 3)], names=["conv"])
    with pytest.raises(LayoutError, match=message) as info:
        layout.with_permutations([perm])
    assert "conv" in str(info.value)


def test_permutations_by_name_and_wrong_count():
    layout = WeightLayout.from_shapes([(2, 3), (2, 2)], names=["a", "b"])
    permuted = layout.with_permutations({"b": [3, 2, 1, 0]})
    assert permuted.layer_coord_rows(0) is None
    assert permuted.coord_rows().tolist() == list(range(6)) + [3, 2, 1, 0]
    with pytest.raises(LayoutError, match="2 layers"):
        layout.with_permutations([None])
    with pytest.raises(LayoutError, match="does not have"):
        layout.with_permutations({"zzz": [0]})


def test_split_views_share_storage_and_kernel_rows():
    layout = mixed_layout()
    flat = torch.arange(layout.num_weights, dtype=torch.float32)
    views = layout.split(flat)
    assert [tuple(v.shape) for v in views] == [l.shape for l in layout.layers]
    assert all(v.data_ptr() == flat[l.weight_offset:].data_ptr() for v, l in zip(views, layout.layers))
    last = layout.layers[-1]
    rows = torch.tensor([0, last.kernel_offset + 3])
    out = layout.kernel_rows(flat, rows)
    assert out[0].tolist() == list(range(9))
    assert out[1].tolist() == [last.weight_offset + 3] + [0] * 8


def test_describe_round_trip_and_check_model():
    layout = mixed_layout(permuted=True)
    again = WeightLayout.from_description(layout.describe())
    assert again == layout
    model = cifar_resnet(20)
    lay = WeightLayout.from_model(model, include="nern")
    lay.check_model(model)
    with pytest.raises(LayoutError, match="another architecture"):
        lay.check_model(cifar_resnet(32))
    with pytest.raises(LayoutError, match="another architecture"):
        lay.check_model(cifar_resnet(20, width=8))


def test_check_model_names_convs_not_in_the_layout_and_missing_from_the_model():
    lay = WeightLayout.from_model(cifar_resnet(20), include="nern")
    with pytest.raises(LayoutError) as deeper:
        lay.check_model(cifar_resnet(32))
    assert "layer1.3.conv1: (16, 16, 3, 3) (not in the layout's model)" in str(deeper.value)
    assert "expected None" not in str(deeper.value)
    with pytest.raises(LayoutError) as shallower:
        WeightLayout.from_model(cifar_resnet(32), include="nern").check_model(cifar_resnet(20))
    assert "layer1.3.conv1: (16, 16, 3, 3) (missing from the model)" in str(shallower.value)
    with pytest.raises(LayoutError, match=r"layer1.0.conv1: \(8, 8, 3, 3\) \(expected \(16, 16, 3, 3\)\)"):
        lay.check_model(cifar_resnet(20, width=8))


def test_table_lists_every_layer():
    table = WeightLayout.from_model(cifar_resnet(20), include="nern").table()
    assert table.count("layer") >= 18 and "29696" in table


def test_layer_range_spans_and_refusals():
    """A range of consecutive layers: where its kernels, weights, filters and channels lie in the
    layout's flat index spaces (what a decode group's call slices), and clear refusals."""
    layout = mixed_layout()  # (8, 8, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (8, 16, 1, 1)
    span = layout.layer_range(range(1, 3))
    assert span.kernels == (64, 64 + 128 + 256)
    assert span.weights == (64 * 9, (64 + 128 + 256) * 9)
    assert span.filters == (8, 8 + 16 + 16) and span.channels == (8, 8 + 8 + 16)
    assert not span.is_whole and layout.layer_range(range(0, 4)).is_whole
    last = layout.layer_range(range(3, 4))
    assert last.kernels == (448, 576) and last.weights == (448 * 9, 448 * 9 + 128)
    tensors = layout.tensors()
    assert tensors.pos_filter[slice(*span.filters)].tolist() == \
        torch.cat([torch.arange(16) / 16, torch.arange(16) / 16]).tolist()
    for bad in (range(2, 2), range(-1, 2), range(0, 5), range(0, 4, 2), [1, 2]):
        with pytest.raises(ValueError, match="layers must be a non-empty range"):
            layout.layer_range(bad)
    # Every range against sums over its layers; each range's spans made once.
    t = layout.tensors()
    for a in range(4):
        for b in range(a + 1, 5):
            span = layout.layer_range(range(a, b))
            assert span.layers == range(a, b) and span is layout.layer_range(range(a, b))
            assert span.kernels == (t.kernel_offsets[a].item(), t.kernel_offsets[b].item())
            assert span.weights == (t.weight_offsets[a].item(), t.weight_offsets[b].item())
            before, inside = layout.layers[:a], layout.layers[a:b]
            f0, c0 = sum(l.c_out for l in before), sum(l.c_in for l in before)
            assert span.filters == (f0, f0 + sum(l.c_out for l in inside))
            assert span.channels == (c0, c0 + sum(l.c_in for l in inside))
            assert t.filter_offsets[a].item() == f0 and t.channel_offsets[a].item() == c0


def old_weight_norm(module):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still used
        nn.utils.weight_norm(module)


def test_weights_a_decode_cannot_own_are_refused():
    """A decode writes each represented conv's own weight Parameter: two convs tied to one
    Parameter would get two different decodes (the second overwriting the first), a computed
    weight (parametrization, old weight_norm hook) would ignore it, an attached conv has none."""
    tied = Mixed()
    tied.depthwise2 = nn.Conv2d(16, 16, 3, groups=16)
    tied.depthwise2.weight = tied.depthwise.weight
    with pytest.raises(LayoutError, match="'depthwise' and 'depthwise2' share one weight Parameter.*"
                                          "leave 'depthwise2' out of include"):
        WeightLayout.from_model(tied)
    assert WeightLayout.from_model(tied, include=["stem", "depthwise"]).names == ["stem", "depthwise"]
    for wrap in (lambda m: nn.utils.parametrizations.weight_norm(m),
                 lambda m: nn.utils.parametrizations.orthogonal(m),
                 old_weight_norm):
        model = Mixed()
        wrap(model.point)
        with pytest.raises(LayoutError, match="layer 'point' has a computed weight"):
            WeightLayout.from_model(model)
    from nern_fast import FastPredictor
    model = Mixed()
    pred = FastPredictor.for_model(model, hidden=8, levels=2, backend="eager")
    pred.attach(model)
    with pytest.raises(LayoutError, match="layer 'stem' is attached to a predictor.*detach"):
        WeightLayout.from_model(model)
    pred.detach(model)
    assert WeightLayout.from_model(model).names == pred.layout.names


@pytest.mark.parametrize("include,message", [(3, "include must be None.*got int"),
                                             ([0], "include lists 0 \\(int\\); give module names as strings"),
                                             (b"stem", "include must be None.*got bytes")])
def test_include_of_the_wrong_kind_is_named(include, message):
    with pytest.raises(LayoutError, match=message):
        WeightLayout.from_model(Mixed(), include=include)


def test_attached_model_weights_are_refused_not_read_as_placeholders():
    """load_into / flatten of an attached model read its meta placeholders: a write was lost
    silently and flatten returned a meta tensor."""
    from nern_fast import FastPredictor
    model = Mixed()
    pred = FastPredictor.for_model(model, hidden=8, levels=2, backend="eager")
    other = FastPredictor.for_model(model, hidden=8, levels=2, backend="eager")
    pred.attach(model)
    for call in (lambda: other.load_into(model), lambda: pred.layout.flatten(model)):
        with pytest.raises(LayoutError, match="attached to a predictor.*detach the model first"):
            call()
    pred.detach(model)
    other.load_into(model)
    assert torch.equal(pred.layout.flatten(model), other.decode_flat().detach())


def test_infilter_pair_of_a_two_kernel_layer_is_read_as_infilter():
    """A 2-kernel layer's crossfilter chain is a pair too: the forms are told apart by shape (a
    vector and a matrix is infilter), not by the layer's kernel count."""
    layout = WeightLayout.from_shapes([(2, 1), (1, 2)], kernel_size=3)
    infilter = layout.with_permutations([(torch.tensor([1, 0]), torch.tensor([[0], [0]])),
                                         (torch.tensor([0]), torch.tensor([[1, 0]]))])
    crossfilter = layout.with_permutations([[1, 0], [1, 0]])
    assert torch.equal(infilter.coord_rows(), torch.tensor([1, 0, 1, 0]))
    assert torch.equal(crossfilter.coord_rows(), infilter.coord_rows())
    with pytest.raises(LayoutError, match="infilter permutation of layer.*channel orders must have shape"):
        layout.with_permutations([(torch.tensor([1, 0]), torch.tensor([[0, 1]])), None])


# ---------------------------------------------------------------- models a user brings (arch stress)
def test_include_all_is_the_every_conv_preset():
    """The config's include "all" is accepted by the API too (it was read as a module name 'all')."""
    assert WeightLayout.from_model(Mixed(), include="all").names == WeightLayout.from_model(Mixed()).names


def test_lazy_conv_before_its_first_forward_is_named():
    """An uninitialised nn.LazyConv2d has no shape yet: a LayoutError says to run a forward first
    (it was torch's RuntimeError from deep inside the shape checks)."""
    def model():
        return nn.Sequential(nn.LazyConv2d(4, 3), nn.Conv2d(4, 4, 3))
    for include in (None, "all", ["0"], ["1"], lambda n, m: True, "nern"):
        with pytest.raises(LayoutError, match=r"layer '0' is a lazy conv .*not initialised.*forward"):
            WeightLayout.from_model(model(), include=include)
    from nern_fast import FastPredictor
    ready = model()
    ready(torch.zeros(1, 3, 6, 6))
    pred = FastPredictor.for_model(ready, hidden=8, levels=2, backend="eager")
    for call in (lambda m: pred.load_into(m), lambda m: pred.layout.flatten(m)):
        with pytest.raises(LayoutError, match=r"layer '0' is a lazy conv .*not initialised.*forward"):
            call(model())
    pred.load_into(ready)
    assert torch.equal(pred.layout.flatten(ready), pred.decode_flat().detach())


def test_meta_model_gives_a_layout_but_no_values():
    """A model built on the meta device has shapes (a layout) but no storage: load_into wrote
    nothing without a word and flatten returned a meta tensor."""
    from nern_fast import FastPredictor
    with torch.device("meta"):
        model = Mixed()
    pred = FastPredictor.for_model(model, hidden=8, levels=2, backend="eager")
    assert pred.layout.names == ["stem", "group", "depthwise", "point"]
    for call in (lambda: pred.load_into(model), lambda: pred.layout.flatten(model)):
        with pytest.raises(LayoutError, match=r"layer 'stem'.*meta device.*to_empty"):
            call()
    model.to_empty(device="cpu")
    pred.load_into(model)
    assert torch.equal(pred.layout.flatten(model), pred.decode_flat().detach())


@pytest.mark.parametrize("include, kernel_size, message, not_in", [
    (["rect"], 3, r"'rect' cannot be represented: its kernel is 1x3, not square \(NeRN's predictor "
                  r"outputs square kernels\); leave it out of include", "kernel_size"),
    (["rect"], 7, r"'rect' cannot be represented: its kernel is 1x3, not square", "kernel_size"),
    (["big"], 3, r"'big' cannot be represented: its kernel is 5x5, larger than the predictor's 3x3; "
                 r"leave it out of include or raise kernel_size to 5", None),
])
def test_unrepresentable_kernel_advice_fits_the_reason(include, kernel_size, message, not_in):
    """A non-square kernel was told to 'raise kernel_size', which never helps."""
    with pytest.raises(LayoutError, match=message) as info:
        WeightLayout.from_model(Mixed(), include=include, kernel_size=kernel_size)
    assert not_in is None or not_in not in str(info.value)


def test_no_match_messages_say_why():
    """No Conv2d at all, other conv kinds only, or a preset that matches nothing: the message says
    which, instead of 'raise kernel_size' for all of them."""
    with pytest.raises(LayoutError, match=r"Sequential has no conv layer .*: it has no nn.Conv2d$"):
        WeightLayout.from_model(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(LayoutError,
                       match=r"no nn.Conv2d; its ConvTranspose2d, Conv1d layers are not represented"):
        WeightLayout.from_model(nn.Sequential(nn.ConvTranspose2d(3, 3, 3), nn.Conv1d(3, 3, 3)))
    with pytest.raises(LayoutError, match=r"no conv layer include='nern' selects: .*3x3 convs inside "
                                          r"residual blocks.*include='all'"):
        WeightLayout.from_model(nn.Sequential(nn.Conv2d(3, 3, 3)), include="nern")
    with pytest.raises(LayoutError, match=r"every Conv2d kernel .*larger than.*5x5.*raise kernel_size"):
        WeightLayout.from_model(nn.Sequential(nn.Conv2d(3, 3, 5)))


def test_include_naming_a_second_name_of_a_shared_module():
    """A conv registered under two attribute names: model.named_modules() lists it once, so the
    second name was reported as 'not a module of the model'."""
    model = Mixed()
    model.alias = model.point
    with pytest.raises(LayoutError, match=r"include names 'alias', which is the module 'point' under a "
                                          r"second name; name it 'point'"):
        WeightLayout.from_model(model, include=["alias"])
    assert WeightLayout.from_model(model, include=["point"]).names == ["point"]


def test_wrapped_model_mismatch_names_the_wrapper():
    """A layout of a model used with its torch.compile / DataParallel wrapper (or the reverse): the
    names differ by a prefix, and the message said 'another architecture'."""
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner
    inner = Mixed()
    layout = WeightLayout.from_model(inner)
    with pytest.raises(LayoutError, match=r"wrapped.*prefix 'module\.'.*model\.module"):
        layout.check_model(Wrapper(inner))
    with pytest.raises(LayoutError, match=r"wrapped.*prefix 'module\.'"):
        WeightLayout.from_model(Wrapper(inner)).check_model(inner)


def test_refusals_under_include_none_suggest_a_predicate_that_works():
    """With include=None there is no list to 'leave the layer out of': the message gives a
    predicate, and that predicate makes the layout (it keeps include=None's rule: Mixed's 5x5 and
    1x3 convs would otherwise be refused next)."""
    import re
    tied = Mixed()
    tied.depthwise2 = nn.Conv2d(16, 16, 3, groups=16)
    tied.depthwise2.weight = tied.depthwise.weight
    computed = Mixed()
    nn.utils.parametrizations.weight_norm(computed.point)
    for model, left_out in ((tied, "depthwise2"), (computed, "point")):
        for include in (None, "all"):
            with pytest.raises(LayoutError, match=rf"leave '{left_out}' out of include, e.g. include=lambda"
                               ) as info:
                WeightLayout.from_model(model, include=include)
            advice = re.search(r"include=(lambda .*) \(include=None's rule\)", str(info.value))
            predicate = eval(advice.group(1))
            names = WeightLayout.from_model(model, include=predicate).names
            assert names == [n for n in ["stem", "group", "depthwise", "point"] if n != left_out]

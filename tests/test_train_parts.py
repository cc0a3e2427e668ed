"""Training building blocks: losses (NeRN's semantics), samplers, Ranger, schedules, scatter."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import mixed_layout
from nern_fast.train.losses import (FeatureMaps, feature_map_loss, feature_module_names, kd_loss,
                                    per_layer_rmse, reconstruction_loss, row_loss)
from nern_fast.train.objectives import scatter_rows
from nern_fast.train.optim import Ranger, build_optimizer, build_scheduler, lr_factor
from nern_fast.train.samplers import KernelSampler, kernel_norms
from nern_fast.config import OptimConfig
from nern_fast.models import cifar_resnet


def _flat_pair(layout):
    g = torch.Generator().manual_seed(0)
    return torch.randn(layout.num_weights, generator=g), torch.randn(layout.num_weights, generator=g)


def test_reconstruction_losses_match_nern_definitions():
    layout = mixed_layout()
    a, b = _flat_pair(layout)
    wa, wb = layout.split(a), layout.split(b)
    l2 = math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(wa, wb)) / layout.num_weights)
    mse = sum(float(F.mse_loss(x, y)) for x, y in zip(wa, wb)) / len(wa)
    assert float(reconstruction_loss(a, b, layout, "l2")) == pytest.approx(l2, rel=1e-5)
    assert float(reconstruction_loss(a, b, layout, "mse")) == pytest.approx(mse, rel=1e-5)
    assert per_layer_rmse(a, b, layout) == pytest.approx(
        [math.sqrt(float(F.mse_loss(x, y))) for x, y in zip(wa, wb)], rel=1e-5)


def test_row_losses_on_every_row_equal_the_full_losses():
    layout = mixed_layout()  # includes a cropped 1×1 layer: padding must not be counted
    a, b = _flat_pair(layout)
    rows = torch.arange(layout.num_kernels)
    ra, rb = layout.kernel_rows(a, rows), layout.kernel_rows(b, rows)
    for kind in ("l2", "mse"):
        assert float(row_loss(ra, rb, rows, layout, kind)) == pytest.approx(
            float(reconstruction_loss(a, b, layout, kind)), rel=1e-5)
    # a subset touching only layer 3: mse is that layer's mse
    sub = torch.arange(layout.layers[3].kernel_offset, layout.num_kernels)
    expected = float(F.mse_loss(layout.split(a)[3], layout.split(b)[3]))
    assert float(row_loss(layout.kernel_rows(a, sub), layout.kernel_rows(b, sub), sub, layout,
                          "mse")) == pytest.approx(expected, rel=1e-5)


def test_kd_losses():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    kl = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    assert float(kd_loss(s, t, "kl")) == pytest.approx(float(kl), rel=1e-5)
    stable = (F.softmax(t, 1) * (torch.log(F.softmax(t, 1)) - torch.log(F.softmax(s, 1) + 1e-4))).sum() / 6
    assert float(kd_loss(s, t, "stable_kl")) == pytest.approx(float(stable), rel=1e-4)
    temp = kd_loss(s, t, "temp_stable_kl", temperature=2.0)
    assert float(temp) == pytest.approx(4 * float(kd_loss(s / 2, t / 2, "stable_kl")), rel=1e-5)
    assert float(kd_loss(t, t, "kl")) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        kd_loss(s, t, "js")


def test_feature_map_loss_is_nerns_batched_attention_loss():
    maps_t = [torch.randn(4, 3, 5, 5), torch.randn(4, 2, 3, 3)]
    maps_s = [torch.randn(4, 3, 5, 5), torch.randn(4, 2, 3, 3)]

    def norm(m):
        return m / (m.reshape(4, -1).norm(dim=1).reshape(4, 1, 1, 1) + 1e-3)
    expected = sum(float(((norm(t) - norm(s)) ** 2).sum()) for s, t in zip(maps_s, maps_t)) / 4
    assert float(feature_map_loss(maps_s, maps_t)) == pytest.approx(expected, rel=1e-5)
    assert float(feature_map_loss(maps_t, maps_t)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="paired maps"):
        feature_map_loss(maps_s[:1], maps_t)


@pytest.mark.parametrize("group_bytes", [0, 2 * 4 * 3 * 5 * 5 * 4, 1 << 30])
def test_feature_map_loss_grouped_equals_map_by_map(group_bytes):
    # Stacked groups of same-shape maps (whole, in chunks of two, or none) give the per-map loss
    # and the same gradient for every student map, bf16 maps included.
    g = torch.Generator().manual_seed(5)
    shapes = [(4, 3, 5, 5), (4, 2, 3, 3), (4, 3, 5, 5), (4, 3, 5, 5), (4, 2, 3, 3), (4, 6, 2, 2)]
    maps_t = [torch.randn(sh, generator=g) for sh in shapes]
    maps_s = [torch.randn(sh, generator=g) for sh in shapes]
    maps_t[5], maps_s[5] = maps_t[5].bfloat16(), maps_s[5].bfloat16()

    def loss_and_grads(**kw):
        leaves = [m.clone().requires_grad_(True) for m in maps_s]
        loss = feature_map_loss(leaves, maps_t, **kw)
        loss.backward()
        return loss.detach(), [m.grad for m in leaves]

    per_map, grads_per_map = loss_and_grads(group_bytes=0)
    grouped, grads = loss_and_grads(group_bytes=group_bytes)
    torch.testing.assert_close(grouped, per_map, rtol=1e-6, atol=0)
    for got, want in zip(grads, grads_per_map):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="differs from the teacher"):
        feature_map_loss(maps_s[:2], maps_t[1:3])


def test_feature_map_group_setting(monkeypatch):
    from nern_fast.train.losses import FMD_GROUP_BYTES, default_group_bytes
    assert default_group_bytes(torch.device("cpu")) == 0
    assert default_group_bytes(torch.device("cuda")) == FMD_GROUP_BYTES
    monkeypatch.setenv("NERN_FAST_FMD_GROUP_MB", "8")
    assert default_group_bytes(torch.device("cpu")) == 8 << 20
    monkeypatch.setenv("NERN_FAST_FMD_GROUP_MB", "lots")
    with pytest.raises(ValueError, match="NERN_FAST_FMD_GROUP_MB='lots'"):
        feature_map_loss([torch.randn(2, 3)], [torch.randn(2, 3)])


def test_feature_maps_hooks_work_with_functional_call():
    model = cifar_resnet(8, 10, in_channels=1, width=4).eval()
    names = feature_module_names(model, "bn+blocks")
    assert "bn1" in names and "layer1.0" in names and "layer1.0.bn2" in names
    assert feature_module_names(model, "blocks") == ["layer1.0", "layer2.0", "layer3.0"]
    x = torch.randn(2, 1, 8, 8)
    with FeatureMaps(model, names) as rec:
        model(x)
    assert all(m is not None for m in rec.maps) and len(rec.maps) == len(names)
    weights = {"layer1.0.conv1.weight": torch.zeros_like(model.layer1[0].conv1.weight)}
    with FeatureMaps(model, ["layer1.0.bn1"]) as rec2:
        torch.func.functional_call(model, weights, (x,))
    assert not torch.allclose(rec2.maps[0], rec.maps[names.index("layer1.0.bn1")])
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    with pytest.raises(ValueError, match="lacks"):
        feature_module_names(model, ["nope"])
    with pytest.raises(ValueError, match="no such modules"):
        feature_module_names(nn.Sequential(nn.Conv2d(1, 1, 3)), "bn")


def test_bn_preset_leaves_shortcut_batchnorms_out():
    """NeRN's ResNet-18 get_feature_maps lists the stem, every block's bn1 and bn2 and its output:
    25 maps; the three downsample BatchNorms made 28 (a feature-map loss 1.18× NeRN's)."""
    import torchvision
    names = feature_module_names(torchvision.models.resnet18(), "bn+blocks")
    assert len(names) == 25 and not any("downsample" in n for n in names)
    assert set(names[:4]) == {"bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0"}


def test_samplers():
    layout = mixed_layout()
    flat, _ = _flat_pair(layout)
    norms = kernel_norms(layout, flat)
    assert norms.shape == (layout.num_kernels,)
    u = KernelSampler(layout, 50, "uniform", seed=1)
    rows = u.sample()
    assert rows.shape == (50,) and len(set(rows.tolist())) == 50  # without replacement
    a = KernelSampler(layout, 10, "all")
    assert torch.equal(a.sample(), torch.arange(layout.num_kernels))
    w = KernelSampler(layout, 64, "random_weighted_batch", seed=2, norms=norms)
    state = w.state_dict()
    draws = [w.sample() for _ in range(20)]
    assert all(d.shape == (64,) and int(d.max()) < layout.num_kernels for d in draws)
    assert any(len(set(d.tolist())) < 64 for d in draws)  # some weighted draws (replacement)
    w2 = KernelSampler(layout, 64, "random_weighted_batch", seed=99, norms=norms)
    w2.load_state_dict(state)
    assert all(torch.equal(x, w2.sample()) for x in draws)  # resumable
    # weighted draws prefer large kernels: a layout where one kernel holds all the norm
    spike = torch.zeros(layout.num_kernels)
    spike[7] = 1.0
    s = KernelSampler(layout, 16, "random_weighted_batch", seed=0, norms=spike)
    weighted = [d for d in (s.sample() for _ in range(30)) if len(set(d.tolist())) == 1]
    assert weighted and all(int(d[0]) == 7 for d in weighted)
    with pytest.raises(ValueError, match="needs the target kernel norms"):
        KernelSampler(layout, 8, "random_weighted_batch")
    with pytest.raises(ValueError, match="not one of"):
        KernelSampler(layout, 8, "stratified")


def test_scatter_rows_writes_kernels_and_passes_gradients():
    layout = mixed_layout(permuted=True)
    flat = torch.zeros(layout.num_weights)
    rows = torch.tensor([0, 5, layout.layers[3].kernel_offset + 2, 100])
    values = torch.randn(4, 9, requires_grad=True)
    out = scatter_rows(layout, flat, rows, values)
    back = layout.kernel_rows(out, rows)
    expected = values.detach().clone()
    expected[2, 1:] = 0  # the 1×1 layer keeps only its first entry
    assert torch.equal(back, expected)
    assert int((out != 0).sum()) == 9 * 3 + 1
    out.sum().backward()
    grad = torch.ones(4, 9)
    grad[2, 1:] = 0
    assert torch.equal(values.grad, grad)


def test_ranger_is_radam_plus_lookahead():
    torch.manual_seed(0)
    p1 = nn.Parameter(torch.randn(7))
    p2 = nn.Parameter(p1.detach().clone())
    ranger = Ranger([p1], lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3, k=3, alpha=0.5)
    radam = torch.optim.RAdam([p2], lr=0.05, betas=(0.5, 0.999), eps=1e-5, weight_decay=1e-3,
                              decoupled_weight_decay=True)
    slow = p1.detach().clone()
    for step in range(1, 10):
        for p, opt in ((p1, ranger), (p2, radam)):
            opt.zero_grad()
            (p ** 2).sum().backward()
            opt.step()
        if step % 3 == 0:  # lookahead by hand on the RAdam copy
            with torch.no_grad():
                slow += 0.5 * (p2 - slow)
                p2.copy_(slow)
        assert torch.allclose(p1, p2, atol=1e-6), step
    # state_dict round trip keeps the slow weights and the counter
    fresh = Ranger([nn.Parameter(p1.detach().clone())], lr=0.05)
    fresh.load_state_dict(ranger.state_dict())
    assert fresh.param_groups[0]["lookahead_step"] == 9
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["slow_buffer"],
                       ranger.state[p1]["slow_buffer"])


def test_build_optimizer_and_schedule():
    p = [nn.Parameter(torch.zeros(3))]
    for name, cls in (("ranger", Ranger), ("radam", torch.optim.RAdam), ("adamw", torch.optim.AdamW),
                      ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)):
        assert isinstance(build_optimizer(p, OptimConfig(name=name)), cls)
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=2)
    assert lr_factor(0, 10, 1.0, 0.1, "cosine", 2) == 0.5
    assert lr_factor(2, 10, 1.0, 0.1, "cosine", 2) == pytest.approx(1.0)
    assert lr_factor(10, 10, 1.0, 0.1, "cosine", 2) == pytest.approx(0.1)
    assert lr_factor(5, 10, 1.0, 0.1, "constant", 0) == 1.0
    opt = build_optimizer(p, cfg)
    sched = build_scheduler(opt, cfg, 10)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[-1] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)


def test_parameters_as_inputs_runs_the_objective_with_the_given_parameters():
    """What the CUDA-graph capture records: the objective with stand-ins passed for its parameters.
    The loss and every gradient equal the module's own call, and the gradients go to the tensors
    passed, not to the module's parameters (whose accumulators must stay out of the capture)."""
    from helpers import random_predictor
    from nern_fast.train.graphs import parameters_as_inputs
    from nern_fast.train.objectives import ReconstructionObjective

    layout = mixed_layout()
    pred = random_predictor(layout, hidden=20, num_blocks=3, levels=4)
    target = torch.randn(layout.num_weights, generator=torch.Generator().manual_seed(2))
    objective = ReconstructionObjective(pred, target)
    rows = torch.tensor([0, 5, 17, layout.num_kernels - 1])
    loss, parts = objective(rows)
    expected = torch.autograd.grad(loss, list(objective.parameters()))

    call, parameters = parameters_as_inputs(objective)
    assert [id(p) for p in parameters] == [id(p) for p in objective.parameters()]
    stand_ins = tuple(p.detach().requires_grad_() for p in parameters)
    loss2, parts2 = call(rows, *stand_ins)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    torch.testing.assert_close(parts2, parts, rtol=0, atol=0)
    loss2.backward()
    assert all(p.grad is None for p in parameters)
    for s, e in zip(stand_ins, expected):
        torch.testing.assert_close(s.grad, e, rtol=0, atol=0)
    # other values for the parameters are used, not the module's (a perturbed stand-in changes the loss)
    moved = tuple(s.detach() + (0.1 if i == 0 else 0.0) for i, s in enumerate(stand_ins))
    assert not torch.equal(call(rows, *moved)[0], loss)


def test_nern_preset_records_nerns_cifar_feature_maps():
    """NeRN's CIFAR BasicBlock (maorash/NeRN tasks/cifar10/cifar_resnet.py) appends bn1's output,
    then bn2's, which its in-place `out += shortcut(x)` turns into the post-add map, then that map
    again; the stem's bn1 output first. The "nern" preset records exactly those tensors."""
    model = cifar_resnet(20, 10, in_channels=3, width=4).eval()
    x = torch.randn(2, 3, 8, 8)

    def nern_style_maps():
        maps = []
        out = model.bn1(model.conv1(x))
        maps.append(out)
        out = F.relu(out)
        for layer in (model.layer1, model.layer2, model.layer3):
            for block in layer:
                o = block.bn1(block.conv1(out))
                maps.append(o)
                o = block.bn2(block.conv2(F.relu(o)))
                maps.append(o)
                o += block.shortcut(out)
                maps.append(o)
                out = F.relu(o)
        return maps

    names = feature_module_names(model, "nern")
    assert len(names) == 1 + 3 * 9
    with torch.no_grad(), FeatureMaps(model, names) as rec:
        model(x)
        expected = nern_style_maps()
    assert len(rec.maps) == len(expected)
    for got, want in zip(rec.maps, expected):
        assert torch.equal(got, want)
    import torchvision
    resnet18 = torchvision.models.resnet18()
    assert feature_module_names(resnet18, "nern") == feature_module_names(resnet18, "bn+blocks")

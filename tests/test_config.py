"""Configs: every error path names the key and the valid choices; overrides; shipped configs load."""
from pathlib import Path

import pytest

from nern_fast.config import (Config, ConfigError, apply_overrides, from_dict, load_config,
                              parse_override, read_yaml, to_dict)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def stage(**kw):
    return {"type": "reconstruct", "steps": 10, **kw}


def distill(**kw):
    return {"type": "distill", "steps": 10, "kd_weight": 1.0, **kw}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert from_dict(to_dict(cfg)) == cfg  # round trip (checkpoints store this form)


def test_defaults_and_stage_names():
    cfg = from_dict({"stages": [stage(), distill(), stage(predictor="new", hidden=8, target="previous")]})
    assert [s.name for s in cfg.stages] == ["reconstruct1", "distill", "reconstruct2"]
    assert cfg.stages[0].optim.name == "ranger" and cfg.stages[0].optim.lr == 5e-3
    assert cfg.train_base.optim.name == "sgd"  # train_base has its own optimiser defaults
    partial = from_dict({"train_base": {"optim": {"lr": 0.05}}})
    assert partial.train_base.optim.name == "sgd" and partial.train_base.optim.lr == 0.05


def test_yaml_style_numbers_are_read():
    cfg = from_dict({"stages": [stage(optim={"lr": "5e-3"})]})
    assert cfg.stages[0].optim.lr == 0.005


@pytest.mark.parametrize("data,match", [
    ({"stagse": []}, r"stagse: unknown key; valid keys: recipe, seed"),
    ({"model": {"arhc": "x"}}, r"model.arhc: unknown key; valid keys of model: arch"),
    ({"model": {"arch": "vgg11"}}, r"model.arch: 'vgg11' is not one of cifar_resnet20.*package.module:callable"),
    ({"model": {"arch": "cifar_resnet21"}}, r"model.arch: a CIFAR ResNet depth is 6n\+2"),
    ({"data": {"dataset": "mnist"}}, r"data.dataset: 'mnist' is not one of the valid choices 'digits', 'cifar10'"),
    ({"data": {"batch_size": 0}}, r"data.batch_size: must be > 0"),
    ({"data": {"batch_size": 1.5}}, r"data.batch_size: expected an integer"),
    ({"data": {"test_fraction": 1.5}}, r"data.test_fraction: must be in \(0, 1\)"),
    ({"data": {"dataset": "imagenet"}}, r"data.root: the imagenet data set needs"),
    ({"data": {"augment": "yes"}}, r"data.augment: expected true or false"),
    ({"predictor": {"encoding": "sinus"}}, r"predictor.encoding: 'sinus' is not one of the valid choices 'basic', 'ffn'"),
    ({"predictor": {"permutation": "tsp"}}, r"predictor.permutation: .*'none', 'crossfilter', 'infilter'"),
    ({"predictor": {"num_blocks": 1}}, r"predictor.num_blocks: must be >= 2"),
    ({"predictor": {"hidden": -3}}, r"predictor.hidden: must be > 0"),
    ({"predictor": {"gauss_scale": [1, 2]}}, r"predictor.gauss_scale: expected 3 numbers"),
    ({"predictor": {"include": "some"}}, r"predictor.include: 'some' is not 'nern' or 'all'"),
    ({"predictor": {"backend": "cuda"}}, r"predictor.backend: 'cuda' is not one of 'auto', 'eager'"),
    ({"predictor": {"precision": "fp16"}}, r"predictor.precision: 'fp16' is not one of the valid choices 'fp32', 'tf32', 'bf16'"),
    ({"device": "gpu"}, r"device: 'gpu' is not one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
    ({"threads": 0}, r"threads: must be > 0"),
    ({"train_base": {"epochs": 0}}, r"train_base.epochs: must be > 0"),
    ({"train_base": {"label_smoothing": 1}}, r"train_base.label_smoothing: must be in \[0, 1\)"),
    ({"train_base": {"smoothness": -1}}, r"train_base.smoothness: must be >= 0"),
    ({"train_base": {"optim": {"name": "lion"}}}, r"train_base.optim.name: 'lion' is not one of the valid choices 'ranger', 'radam', 'adamw', 'adam', 'sgd'"),
    ({"logging": {"log_every": 0}}, r"logging.log_every: must be > 0"),
    ({"logging": {"verbose": True}}, r"logging.verbose: unknown key"),
    ({"stages": {"type": "reconstruct"}}, r"stages: expected a list"),
    ({"stages": [{"type": "rebuild", "steps": 1}]}, r"stages.0.type: 'rebuild' is not one of the valid choices 'reconstruct', 'distill'"),
    ({"stages": [{"type": "reconstruct"}]}, r"stages.0: give steps"),
    ({"stages": [distill(epochs=2)]}, r"stages.0: give steps or epochs, not both"),
    ({"stages": [stage(steps=0)]}, r"stages.0.steps: must be > 0"),
    ({"stages": [stage(kd_weight=1.0)]}, r"stages.0.kd_weight: only a distill stage uses it"),
    ({"stages": [stage(inputs="noise")]}, r"stages.0.inputs: only a distill stage uses it"),
    ({"stages": [stage(reconstruction_weight=0.0)]}, r"stages.0.reconstruction_weight: a reconstruct stage needs"),
    ({"stages": [stage(target="previous")]}, r"stages.0.target: the first stage has no previous stage"),
    ({"stages": [stage(), stage(hidden=32)]}, r"stages.1.hidden: only a new predictor"),
    ({"stages": [stage(sampler="weighted")]}, r"stages.0.sampler: 'weighted' is not one of the valid choices 'uniform', 'random_weighted_batch', 'all'"),
    ({"stages": [stage(reconstruction_loss="l1")]}, r"stages.0.reconstruction_loss: 'l1' is not one of the valid choices 'l2', 'mse'"),
    ({"stages": [stage(weights_batch_size=0)]}, r"stages.0.weights_batch_size: must be > 0"),
    ({"stages": [stage(name="a"), stage(name="a")]}, r"stages: names must be unique"),
    ({"stages": [distill(kd_weight=0.0, reconstruction_weight=0.0)]}, r"stages.0: every loss weight is 0"),
    ({"stages": [distill(kd_loss="js")]}, r"stages.0.kd_loss: 'js' is not one of the valid choices 'kl', 'stable_kl', 'temp_stable_kl'"),
    ({"stages": [distill(gradients="some")]}, r"stages.0.gradients: 'some' is not one of the valid choices 'sampled', 'full'"),
    ({"stages": [distill(steps=None, epochs=1, inputs="noise")]}, r"stages.0.epochs: noise inputs have no epochs"),
    ({"stages": [distill(feature_maps="relu")]}, r"stages.0.feature_maps: 'relu' is not one of bn, blocks, bn\+blocks"),
    ({"stages": [distill(autocast="fp16")]}, r"stages.0.autocast: 'fp16' is not one of the valid choices 'none', 'bf16'"),
    ({"stages": [distill(teacher={"arch": "alexnet"})]}, r"stages.0.teacher.arch: 'alexnet' is not one of"),
    ({"stages": [distill(temperature=0)]}, r"stages.0.temperature: must be > 0"),
    ({"stages": [stage(optim={"lr": 0})]}, r"stages.0.optim.lr: must be > 0"),
    ({"stages": [stage(optim={"lr": 1e-4, "min_lr": 1e-3})]}, r"stages.0.optim.min_lr: 0.001 is above lr"),
    ({"stages": [stage(optim={"betas": [0.9]})]}, r"stages.0.optim.betas: expected two numbers in \[0, 1\)"),
    ({"stages": [stage(optim={"lookahead_k": 0})]}, r"stages.0.optim.lookahead_k: must be >= 1"),
    ({"stages": [stage(optim={"lookahead_alpha": 2})]}, r"stages.0.optim.lookahead_alpha: must be in \[0, 1\]"),
    ({"stages": [stage(optim={"schedule": "step"})]}, r"stages.0.optim.schedule: 'step' is not one of the valid choices 'cosine', 'constant'"),
    ({"stages": [stage(optim={"grad_clip": -1.0})]}, r"stages.0.optim.grad_clip: must be > 0"),
    ({"stages": [stage(optim="adam")]}, r"stages.0.optim: expected a mapping"),
    ([1, 2], r"the config: expected a mapping"),
    # non-finite numbers, wherever a float is read (YAML .nan / .inf, or the strings)
    ({"stages": [stage(optim={"lr": float("nan")})]}, r"stages.0.optim.lr: expected a finite number, got nan"),
    ({"stages": [stage(optim={"lr": "nan"})]}, r"stages.0.optim.lr: expected a finite number, got 'nan'"),
    ({"stages": [stage(optim={"lr": float("inf")})]}, r"stages.0.optim.lr: expected a finite number"),
    ({"train_base": {"epochs": float("nan")}}, r"train_base.epochs: expected a finite number"),
    ({"stages": [distill(temperature=float("inf"))]}, r"stages.0.temperature: expected a finite number"),
    ({"stages": [stage(reconstruction_weight=float("nan"))]}, r"stages.0.reconstruction_weight: expected a finite"),
    ({"stages": [stage(optim={"grad_clip": float("nan")})]}, r"stages.0.optim.grad_clip: expected a finite number"),
    ({"predictor": {"base": float("nan")}}, r"predictor.base: expected a finite number"),
    # the encoding's own limits
    ({"predictor": {"levels": 65}}, r"predictor: levels must be an integer in 1..64, got 65"),
    ({"predictor": {"levels": 0}}, r"predictor: levels must be an integer in 1..64, got 0"),
    ({"predictor": {"base": 0}}, r"predictor: base must be a positive finite number"),
    ({"predictor": {"base": 10, "levels": 40}}, r"predictor: base 10.0 with levels 40 gives frequencies up to base\^39 = 10\^39.0, above 1e33.*lower base or levels"),
    ({"stages": [distill(fmd_weight=1.0, feature_maps=[])]}, r"stages.0.feature_maps: empty, but fmd_weight is 1.0"),
    ({"stages": [stage(optim={"momentum": 1.5})]}, r"stages.0.optim.momentum: must be in \[0, 1\), got 1.5"),
    ({"train_base": {"optim": {"momentum": -1}}}, r"train_base.optim.momentum: must be in \[0, 1\)"),
    ({"predictor": {"gauss_scale": [1, "x", 0.1]}}, r"predictor.gauss_scale.1: expected a number"),
    # list items
    ({"predictor": {"include": [1, 2]}}, r"predictor.include: \[1, 2\] is not a valid value; expected str or list of str"),
    ({"stages": [distill(feature_maps=[1])]}, r"stages.0.feature_maps: \[1\] is not a valid value; expected str or list"),
    ({"stages": [stage(optim={"betas": [0.9, "high"]})]}, r"stages.0.optim.betas.1: expected a number"),
    # seeds torch accepts, also as seeds derived from them
    ({"seed": 99999999999999999999999}, r"seed: must be an integer in 0 .. 4294967295, got"),
    ({"seed": -1}, r"seed: must be an integer in 0 .. 4294967295, got"),
    ({"data": {"split_seed": 2 ** 32}}, r"data.split_seed: must be an integer in 0 .. 4294967295"),
    # device strings are parsed as torch parses them
    ({"device": "cuda:x"}, r"device: 'cuda:x' is not one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
    ({"device": "cuda:-1"}, r"device: 'cuda:-1' is not one of"),
    ({"device": "banana"}, r"device: 'banana' is not one of"),
    ({"stages": [stage(optim={"warmup_steps": 11})]}, r"stages.0.optim.warmup_steps: 11 is more than the stage's 10 steps"),
    ({"stages": [distill(loss_warmup_steps=10)]}, r"stages.0.loss_warmup_steps: 10 is not below the stage's 10 steps"),
])
def test_errors_name_the_key_and_choices(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(data)


def test_settings_near_the_limits_are_accepted():
    cfg = from_dict({"seed": 2 ** 32 - 1, "device": "cuda:1",  # present or not: checked where used
                     "data": {"dataset": "cifar10", "root": "data"},
                     "predictor": {"levels": 64, "base": 1.5, "include": ["conv1"]},
                     "stages": [stage(eval_every=500, optim={"warmup_steps": 10}),  # eval at the end only
                                distill(loss_warmup_steps=9, feature_maps=["layer1"]),
                                distill(steps=None, epochs=1, loss_warmup_steps=10 ** 6)]})  # length known later
    assert cfg.predictor.gauss_scale == [1.0, 0.1, 0.1] and cfg.stages[0].eval_every == 500
    # digits is embedded and ignores data.root: the shipped configs' "root: data" with
    # --set data.dataset=digits, and predictor files that recorded it, stay valid
    assert from_dict({"data": {"dataset": "digits", "root": "data"}}).data.root == "data"


def test_overrides():
    raw = {"stages": [stage()], "predictor": {"hidden": 10}}
    out = apply_overrides(raw, ["stages.0.steps=5", "predictor.hidden=20", "data.root=null",
                                "stages.0.optim.lr=1e-2", "seed=3"])
    assert out["stages"][0]["steps"] == 5 and out["predictor"]["hidden"] == 20
    assert out["data"] == {"root": None} and out["seed"] == 3
    assert raw["stages"][0]["steps"] == 10  # the input is not modified
    cfg = from_dict(out)
    assert cfg.stages[0].optim.lr == 0.01
    assert parse_override("stages=[{type: reconstruct, steps: 2}]")[1] == [{"type": "reconstruct", "steps": 2}]


@pytest.mark.parametrize("override,match", [
    ("stages.3.steps=1", r"'stages.3' is not an index of a list of 1 entries"),
    ("stages.x.steps=1", r"'stages.x' is not an index"),
    ("seed.value=1", r"'seed' is a value, not a section"),
    ("noequals", r"expected key=value"),
    ("=3", r"the key is empty"),
    ("seed=[unclosed", r"not valid YAML"),
])
def test_override_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides({"seed": 0, "stages": [stage()]}, [override])


def test_unknown_override_key_is_reported_by_validation():
    with pytest.raises(ConfigError, match=r"predictor.hiden: unknown key"):
        load_config(data={}, overrides=["predictor.hiden=3"])


def test_a_bad_override_is_blamed_on_set_not_on_the_file(tmp_path):
    """A key or value given with --set is reported as --set's, not as the config file's (it used to
    read "configs/x.yaml: stages.1.stepz: unknown key", sending the user to a file without it)."""
    path = tmp_path / "run.yaml"
    path.write_text("predictor:\n  hidden: 8\n")
    with pytest.raises(ConfigError, match=r"^--set predictor.hiden: unknown key"):
        load_config(path, ["predictor.hiden=3"])
    with pytest.raises(ConfigError, match=r"^--set predictor.hidden: expected an integer"):
        load_config(path, ["predictor.hidden=lots"])
    path.write_text("predictor:\n  hidden: lots\n")
    with pytest.raises(ConfigError, match=r"run.yaml: predictor.hidden: expected an integer"):
        load_config(path, ["seed=1"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(listing)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("predictor:\n  hidden: lots\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: predictor.hidden: expected an integer"):
        load_config(wrong)
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 0\npredictor:\n  hidden: 8\nseed: 5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: duplicate key 'seed' at line 4 \(first given at line 1\)"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("predictor:\n  hidden: 8\n  hidden: 9\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'hidden' at line 3"):
        load_config(nested)
    # a key next to a '<<' merge overrides the merged one: not a duplicate
    assert parse_override("predictor={<<: {hidden: 8, levels: 4}, hidden: 9}")[1] == {"hidden": 9, "levels": 4}
    # ... also when a mapping built earlier merges one that merges and overrides (building
    # flattens the merges into the nodes: the check runs before)
    merges = tmp_path / "merges.yaml"
    merges.write_text("x-optim: &adam {name: adam, lr: 0.005, weight_decay: 0.001}\n"
                      "stages:\n  - type: reconstruct\n    steps: 3\n    optim: &recon\n"
                      "      <<: *adam\n      lr: 0.01\ntrain_base:\n  optim:\n    <<: *recon\n")
    assert read_yaml(merges)["train_base"]["optim"] == {"name": "adam", "lr": 0.01, "weight_decay": 0.001}
    with pytest.raises(ConfigError, match=r"--set 'predictor=\{hidden: 8, hidden: 9\}': duplicate key 'hidden'"):
        parse_override("predictor={hidden: 8, hidden: 9}")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == from_dict({})

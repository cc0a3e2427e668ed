"""Short versions of every recipe on a tiny network: the loss falls, outputs are written, resume
continues exactly, a NaN stops the run with the last good checkpoint kept."""
import importlib.util
import json
import warnings

import pytest
import torch

from nern_fast.config import load_config
from nern_fast.predictor import FastPredictor
from nern_fast.train.base import train_base
from nern_fast.train.checkpoint import load_checkpoint
from nern_fast.train.fit import FitRun, StageInterrupted, TrainingDiverged

BASE = {
    "seed": 0, "device": "cpu", "threads": 1,
    "model": {"arch": "cifar_resnet8", "kwargs": {"width": 4}},
    "data": {"dataset": "digits", "batch_size": 32, "eval_batch_size": 512},
    "train_base": {"epochs": 1},
    "predictor": {"hidden": 16, "levels": 4, "num_blocks": 3},
    "logging": {"log_every": 2, "checkpoint_every": 1000, "progress": False},
}


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    summary = train_base(load_config(data=BASE), out, echo=_quiet)
    assert (out / "model.pt").exists() and (out / "log.jsonl").exists()
    assert summary["accuracy"] > 30  # one epoch of a tiny network on digits
    return out / "model.pt"


def _cfg(base_model, stages, **extra):
    data = {**BASE, **extra, "stages": stages}
    data["model"] = {**BASE["model"], "checkpoint": str(base_model)}
    return load_config(data=data)


def _losses(out, stage):
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    return [l["loss"] for l in lines if l.get("stage") == stage and "loss" in l]


def _fit(base_model, tmp_path, stages, **kw):
    out = tmp_path / "run"
    metrics = FitRun(_cfg(base_model, stages, **kw.pop("extra", {})), out, echo=_quiet, **kw).run()
    return out, metrics


def _check_outputs(out, metrics, n_stages):
    for name in ("metrics.json", "report.md", "predictor.pt", "checkpoint.pt", "config.yaml", "log.jsonl"):
        assert (out / name).exists(), name
    # The plot needs matplotlib (the `plot` / `dev` extras, not `test`): without it the report says so.
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "accuracy.png").exists()
    else:
        assert "matplotlib is not installed" in (out / "report.md").read_text()
    m = json.loads((out / "metrics.json").read_text())
    for key in ("original_accuracy", "final_accuracy", "compression_ratio", "reconstruction_rmse"):
        assert isinstance(m[key], float), key
    assert len(m["stages"]) == n_stages
    for s in m["stages"]:
        assert {"name", "accuracy", "reconstruction_rmse", "compression_ratio", "seconds"} <= set(s)
    assert "| original |" in (out / "report.md").read_text()
    assert len(list((out / "stages").glob("*.pt"))) == n_stages
    assert m == metrics or m["final_accuracy"] == metrics["final_accuracy"]


def _falls(losses):
    assert len(losses) >= 2 and losses[-1] < losses[0], losses


def test_reconstruction_only(base_model, tmp_path):
    out, metrics = _fit(base_model, tmp_path, [
        {"type": "reconstruct", "steps": 40, "sampler": "uniform", "weights_batch_size": 64,
         "optim": {"name": "adam", "lr": 3e-3}}])
    _falls(_losses(out, "reconstruct"))
    _check_outputs(out, metrics, 1)


def test_decoupled_and_progressive(base_model, tmp_path):
    out, metrics = _fit(base_model, tmp_path, [
        {"type": "reconstruct", "steps": 24, "weights_batch_size": 128,
         "optim": {"name": "adam", "lr": 3e-3}},
        {"type": "distill", "steps": 8, "reconstruction_weight": 0.0, "kd_weight": 1.0,
         "gradients": "sampled", "weights_batch_size": 128, "optim": {"name": "adam", "lr": 1e-3}},
        {"type": "reconstruct", "name": "round1", "predictor": "new", "hidden": 24, "steps": 24,
         "target": "previous", "optim": {"name": "adam", "lr": 3e-3}},
        {"type": "reconstruct", "name": "round2", "predictor": "new", "hidden": 24, "steps": 24,
         "target": "previous", "sampler": "all", "optim": {"name": "adam", "lr": 3e-3}}])
    _falls(_losses(out, "reconstruct"))
    _falls(_losses(out, "round1"))
    _falls(_losses(out, "round2"))
    _check_outputs(out, metrics, 4)
    assert metrics["stages"][2]["hidden"] == 24 and metrics["stages"][1]["hidden"] == 16
    # progressive rounds follow their target: the previous stage's output
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["stage_index"] == 4 and ckpt["previous_output"].shape == (metrics["represented_parameters"],)


@pytest.mark.parametrize("gradients", ["sampled", "full"])
def test_joint(base_model, tmp_path, gradients):
    out, metrics = _fit(base_model, tmp_path, [
        {"type": "distill", "steps": 30, "reconstruction_weight": 1.0, "fmd_weight": 1e-3,
         "kd_weight": 1e-2, "loss_warmup_steps": 4, "gradients": gradients,
         "weights_batch_size": 128, "optim": {"name": "ranger", "lr": 5e-3}}])
    losses = _losses(out, "distill")
    _falls(losses[2:])  # after the warm-up (the distillation terms join at step 4)
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    parts = [l for l in lines if l.get("stage") == "distill" and "loss" in l]
    assert parts[0]["logits"] == 0 and parts[0]["feature_maps"] == 0  # warm-up: recon only
    assert parts[-1]["logits"] > 0 and parts[-1]["feature_maps"] > 0
    _check_outputs(out, metrics, 1)


def test_data_free_teacher_and_bf16(base_model, tmp_path, monkeypatch):
    from nern_fast.train import fit as fit_module
    loads = []
    real_load = fit_module.load_teacher
    monkeypatch.setattr(fit_module, "load_teacher", lambda *a: loads.append(a[2]) or real_load(*a))
    out, metrics = _fit(base_model, tmp_path, [
        {"type": "reconstruct", "steps": 10, "optim": {"name": "adam", "lr": 3e-3}},
        {"type": "distill", "steps": 6, "reconstruction_weight": 0.0, "kd_weight": 1.0,
         "inputs": "noise", "autocast": "bf16", "kd_loss": "temp_stable_kl",
         "teacher": {"arch": "cifar_resnet8", "kwargs": {"width": 4},
                     "checkpoint": str(base_model)},
         "optim": {"name": "adam", "lr": 1e-3}}])
    assert len(_losses(out, "distill")) == 3
    assert loads == [1]  # the start-up check's teacher serves its stage: read once
    _check_outputs(out, metrics, 2)


def test_cuda_graphs_fall_back_on_cpu(base_model, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, metrics = _fit(base_model, tmp_path, [
            {"type": "reconstruct", "steps": 4, "cuda_graphs": True}])
    assert any("cuda_graphs needs a CUDA device" in str(w.message) for w in caught)
    assert metrics["stages"][0]["steps"] == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stage", [
    {"type": "reconstruct", "steps": 6, "weights_batch_size": 64, "optim": {"name": "adam", "lr": 1e-3}},
    {"type": "distill", "steps": 6, "reconstruction_weight": 1.0, "kd_weight": 0.1, "fmd_weight": 0.01,
     "loss_warmup_steps": 2, "weights_batch_size": 64, "optim": {"name": "adam", "lr": 1e-3}}])
def test_cuda_graphs_train_like_eager_steps(base_model, tmp_path, stage):
    """On a GPU the captured steps are taken (no fallback warning) and train as the eager ones:
    the same parameters after the stage, within the reordering of floating-point sums."""
    outs = {}
    for graphs in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, metrics = _fit(base_model, tmp_path / str(graphs), [{**stage, "cuda_graphs": graphs}],
                                extra={"device": "cuda"})
        assert not [w for w in caught if "CUDA graph" in str(w.message)], [str(w.message) for w in caught]
        assert metrics["stages"][0]["steps"] == 6
        outs[graphs] = _params(out)
    for k, eager in outs[False].items():
        torch.testing.assert_close(outs[True][k], eager, rtol=1e-4, atol=1e-5)


def _params(out):
    return FastPredictor.load(out / "predictor.pt").state_dict()


RESUME_STAGES = [
    {"type": "reconstruct", "steps": 10, "weights_batch_size": 64,
     "optim": {"name": "ranger", "lr": 5e-3}},
    {"type": "distill", "steps": 8, "reconstruction_weight": 1.0, "kd_weight": 0.1,
     "fmd_weight": 0.01, "loss_warmup_steps": 2, "weights_batch_size": 64,
     "optim": {"name": "ranger", "lr": 5e-3, "warmup_steps": 2}},
]


@pytest.mark.parametrize("stop_at", [(0, 5), (1, 3), (1, 8)])
def test_resume_equals_uninterrupted(base_model, tmp_path, stop_at):
    full = tmp_path / "full"
    FitRun(_cfg(base_model, RESUME_STAGES), full, echo=_quiet).run()
    part = tmp_path / "part"
    _interrupted_run(_cfg(base_model, RESUME_STAGES), part, stop_at)
    ckpt = load_checkpoint(part / "checkpoint.pt")
    assert (ckpt["stage_index"], ckpt["step"]) == stop_at
    with pytest.raises(FileExistsError, match="--resume"):
        FitRun(_cfg(base_model, RESUME_STAGES), part, echo=_quiet)
    with pytest.raises(Exception, match="differs from the checkpoint's in seed"):
        FitRun(_cfg(base_model, RESUME_STAGES, seed=1), part, resume=True, echo=_quiet)
    metrics = FitRun(_cfg(base_model, RESUME_STAGES), part, resume=True, echo=_quiet).run()
    a, b = _params(full), _params(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["final_accuracy"] == json.loads((full / "metrics.json").read_text())["final_accuracy"]
    # The logged means and each stage's final loss too: the loss sums of the log interval that the
    # interruption cut are checkpointed (a resumed run used to average only the steps after it).
    full_metrics = json.loads((full / "metrics.json").read_text())
    assert [s["final_loss"] for s in metrics["stages"]] == [s["final_loss"] for s in full_metrics["stages"]]
    for stage in ("reconstruct", "distill"):
        assert _losses(part, stage) == _losses(full, stage), stage


@pytest.mark.filterwarnings("ignore:.*cuda_graphs needs a CUDA device")
def test_resume_equals_uninterrupted_with_cuda_graphs_asked(base_model, tmp_path):
    """Asking for CUDA graphs does not shift the sampler's stream (the capture's sample rows are not
    drawn from it), so a resumed run still equals an uninterrupted one (here the graphs fall back
    to eager steps: no GPU; the sample is made before that)."""
    stages = [{**stage, "cuda_graphs": True} for stage in RESUME_STAGES]
    full, part = tmp_path / "full", tmp_path / "part"
    FitRun(_cfg(base_model, stages), full, echo=_quiet).run()

    def interrupt(stage, step):
        if (stage, step) == (0, 5):
            raise KeyboardInterrupt
    with pytest.raises(StageInterrupted):
        FitRun(_cfg(base_model, stages), part, on_step=interrupt, echo=_quiet).run()
    FitRun(_cfg(base_model, stages), part, resume=True, echo=_quiet).run()
    a, b = _params(full), _params(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _diverging_run(base_model, out, poison_at_step_6) -> FitRun:
    """A 20-step reconstruction (checkpoints every 4 steps) whose hook poisons it after step 6."""
    stages = [{"type": "reconstruct", "steps": 20, "optim": {"name": "adam", "lr": 1e-3}}]
    cfg = _cfg(base_model, stages, logging={**BASE["logging"], "checkpoint_every": 4})
    run = FitRun(cfg, out, on_step=lambda stage, step: poison_at_step_6(run) if step == 6 else None,
                 echo=_quiet)
    return run


def _assert_finite_checkpoint_of_step_4(out) -> None:
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 4  # written at step 4; step 8 was not written
    assert all(torch.isfinite(v).all() for v in ckpt["predictor"].values())


def test_nan_stops_and_keeps_last_good_checkpoint(base_model, tmp_path):
    """A NaN loss (here from a NaN target weight: the predictor itself stays finite) stops the run
    at the next read; the message names the checkpoint actually on disk."""
    def poison(run):
        run.original[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite between steps 6 and 8.*"
                                               r"the last checkpoint \(.*checkpoint.pt, stage 0 step 4\) is kept.*"
                                               r"start again with --overwrite"):
        _diverging_run(base_model, tmp_path / "nan", poison).run()
    _assert_finite_checkpoint_of_step_4(tmp_path / "nan")


def test_nan_parameters_stop_even_when_the_decode_hides_them(base_model, tmp_path, monkeypatch):
    """A decoder whose ReLU maps NaN to 0 (cuBLASLt's epilogue on a GPU) keeps the loss finite after
    the predictor diverged: the parameters are checked too, and no NaN checkpoint is written."""
    from nern_fast import ops

    decode = ops.decode
    monkeypatch.setattr(ops, "decode", lambda *a, **k: torch.nan_to_num(decode(*a, **k), nan=0.0))

    def poison(run):
        with torch.no_grad():
            run.predictor.weights()[1][0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"loss or the predictor's parameters became NaN"):
        _diverging_run(base_model, tmp_path / "hidden_nan", poison).run()
    _assert_finite_checkpoint_of_step_4(tmp_path / "hidden_nan")


def test_fit_errors(base_model, tmp_path):
    from nern_fast.config import ConfigError
    with pytest.raises(ConfigError, match="no stages"):
        FitRun(_cfg(base_model, []), tmp_path / "a")
    cfg = _cfg(base_model, [{"type": "reconstruct", "steps": 1}])
    cfg.model.checkpoint = None
    with pytest.raises(ConfigError, match="model.checkpoint: fit needs the trained network"):
        FitRun(cfg, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="--resume"):
        FitRun(_cfg(base_model, [{"type": "reconstruct", "steps": 1}]), tmp_path / "c", resume=True)
    cfg = _cfg(base_model, [{"type": "distill", "steps": 1, "kd_weight": 1.0,
                             "teacher": {"arch": "cifar_resnet8"}}])
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        FitRun(cfg, tmp_path / "d", echo=_quiet).run()


def _snapshot(out):
    """Every file of a run folder (path -> bytes), permutation caches left out."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "permutations" not in p.parts}


def test_overwrite_replaces_a_run_only_once_its_setup_succeeded(base_model, tmp_path):
    """--overwrite of a finished run with a mistake (a missing network, a teacher without weights,
    a feature map the model lacks) changes nothing in the folder; a correct one removes every
    output of the old run (here its second stage's files) before it writes its own."""
    out, _ = _fit(base_model, tmp_path, RESUME_STAGES[:1] + [dict(RESUME_STAGES[0], steps=2)])
    before = _snapshot(out)
    assert len(list((out / "stages").glob("*.pt"))) == 2
    from nern_fast.config import ConfigError
    missing = _cfg(base_model, RESUME_STAGES[:1])
    missing.model.checkpoint = str(tmp_path / "no_such_model.pt")
    teacher = _cfg(base_model, [RESUME_STAGES[0], {**RESUME_STAGES[1], "teacher": {"arch": "cifar_resnet8"}}])
    features = _cfg(base_model, [RESUME_STAGES[0], {**RESUME_STAGES[1], "feature_maps": ["layer1.0.bnX"]}])
    for cfg, error, match in ((missing, FileNotFoundError, "no_such_model"),
                              (teacher, ConfigError, r"stages\.1\.teacher\.checkpoint"),
                              (features, ConfigError, r"stages\.1\.feature_maps.*layer1\.0\.bnX")):
        with pytest.raises(error, match=match):
            FitRun(cfg, out, overwrite=True, echo=_quiet).run()
        assert _snapshot(out) == before
    with pytest.raises(ValueError, match="give one of them"):
        FitRun(_cfg(base_model, RESUME_STAGES[:1]), out, resume=True, overwrite=True)
    metrics = FitRun(_cfg(base_model, [dict(RESUME_STAGES[0], steps=3)]), out, overwrite=True,
                     echo=_quiet).run()
    _check_outputs(out, metrics, 1)
    assert len([l for l in (out / "log.jsonl").read_text().splitlines() if '"original"' in l]) == 1


def _interrupted_run(cfg, out, stop_at) -> None:
    """A run stopped by Ctrl-C after step stop_at[1] of stage stop_at[0] (its checkpoint there)."""
    def interrupt(stage, step):
        if (stage, step) == stop_at:
            raise KeyboardInterrupt
    with pytest.raises(StageInterrupted, match="continue with --resume"):
        FitRun(cfg, out, on_step=interrupt, echo=_quiet).run()


def _stopped_between_stages(base_model, out, monkeypatch, stages=RESUME_STAGES):
    """A run killed after stage 0 ended (its checkpoint: stage 1, step 0)."""
    run_stage = FitRun._run_stage

    def dies_at_stage_1(self, index, *args, **kwargs):
        if index == 1:
            raise RuntimeError("killed")
        return run_stage(self, index, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(FitRun, "_run_stage", dies_at_stage_1)
        with pytest.raises(RuntimeError, match="killed"):
            FitRun(_cfg(base_model, stages), out, echo=_quiet).run()
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["stage_index"], ckpt["step"]) == (1, 0)


def test_resume_between_stages_equals_uninterrupted(base_model, tmp_path, monkeypatch):
    """A checkpoint written at a stage's end starts the next stage as an uninterrupted run does:
    from the predictor, not from the previous stage's optimiser, scheduler and sampler states."""
    full = tmp_path / "full"
    FitRun(_cfg(base_model, RESUME_STAGES), full, echo=_quiet).run()
    part = tmp_path / "part"
    _stopped_between_stages(base_model, part, monkeypatch)
    FitRun(_cfg(base_model, RESUME_STAGES), part, resume=True, echo=_quiet).run()
    a, b = _params(full), _params(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_may_change_the_stages_not_started_yet(base_model, tmp_path, monkeypatch):
    """A stage that has not started may change on --resume (a mistake found at its start is fixed
    without losing the stages before it); one that has begun may not."""
    from nern_fast.config import ConfigError
    changed = [RESUME_STAGES[0], {**RESUME_STAGES[1], "optim": {"name": "adam", "lr": 1e-3}}]
    boundary = tmp_path / "boundary"
    _stopped_between_stages(base_model, boundary, monkeypatch)
    metrics = FitRun(_cfg(base_model, changed), boundary, resume=True, echo=_quiet).run()
    assert len(metrics["stages"]) == 2
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in stages\.0\.steps"):
        FitRun(_cfg(base_model, [dict(RESUME_STAGES[0], steps=9), RESUME_STAGES[1]]), boundary,
               resume=True)
    # A new type for the stage not started renumbers the unnamed stage before it ("reconstruct"
    # -> "reconstruct1"): names change nothing computed, the resume takes it.
    renamed = tmp_path / "renamed"
    _stopped_between_stages(base_model, renamed, monkeypatch)
    retyped = [RESUME_STAGES[0], {"type": "reconstruct", "steps": 3, "weights_batch_size": 64}]
    assert [s["name"] for s in FitRun(_cfg(base_model, retyped), renamed, resume=True,
                                      echo=_quiet).run()["stages"]] == ["reconstruct", "reconstruct2"]
    inside = tmp_path / "inside"
    _interrupted_run(_cfg(base_model, RESUME_STAGES), inside, (1, 3))
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in stages\.1\.optim\.lr"):
        FitRun(_cfg(base_model, changed), inside, resume=True)


def test_train_base_keeps_an_earlier_model(tmp_path):
    """train-base never replaces a trained model without overwrite, and a run that diverges
    leaves the model and its config.yaml as they were."""
    from nern_fast.train.errors import TrainingDiverged as Diverged
    quick = {**BASE, "train_base": {"epochs": 0.1}}
    out = tmp_path / "base"
    train_base(load_config(data=quick), out, echo=_quiet)
    before = {name: (out / name).read_bytes() for name in ("model.pt", "config.yaml")}
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_base(load_config(data=quick), out, echo=_quiet)
    diverging = load_config(data=quick, overrides=["train_base.optim.lr=1e12", "seed=3"])
    with pytest.raises(Diverged, match="lower train_base.optim.lr"):
        train_base(diverging, out, echo=_quiet, overwrite=True)
    assert {name: (out / name).read_bytes() for name in before} == before
    train_base(load_config(data=quick, overrides=["seed=3"]), out, echo=_quiet, overwrite=True)
    assert (out / "model.pt").read_bytes() != before["model.pt"]
    assert "seed: 3" in (out / "config.yaml").read_text()


def test_resume_refuses_a_network_file_trained_again(base_model, tmp_path):
    """The checkpoint records the network file's digest: a file replaced under the same name (a
    train-base run again) is refused on --resume instead of continuing against another network."""
    import shutil
    from nern_fast.config import ConfigError
    network = tmp_path / "model.pt"
    shutil.copy(base_model, network)
    out = tmp_path / "run"
    _interrupted_run(_cfg(network, RESUME_STAGES), out, (0, 5))
    data = torch.load(network, weights_only=True)
    weights = next(v for v in data.values() if isinstance(v, dict) and any(
        isinstance(t, torch.Tensor) and t.is_floating_point() for t in v.values()))
    name = next(k for k, t in weights.items() if isinstance(t, torch.Tensor) and t.is_floating_point())
    weights[name] = weights[name] + 1
    torch.save(data, network)
    with pytest.raises(ConfigError, match="not the network this run started from"):
        FitRun(_cfg(network, RESUME_STAGES), out, resume=True, echo=_quiet)
    shutil.copy(base_model, network)  # the original back: the run continues
    FitRun(_cfg(network, RESUME_STAGES), out, resume=True, echo=_quiet).run()


@pytest.mark.parametrize("stop_at", [(1, 2), "between"])
def test_resume_continues_a_predictor_of_an_earlier_stages_width(base_model, tmp_path, monkeypatch, stop_at):
    """A stage continuing the predictor of a stage that made a new one of its own width resumes
    with that width (it was rebuilt with predictor.hidden, and the saved state did not fit)."""
    stages = [{"type": "reconstruct", "steps": 4, "weights_batch_size": 64, "predictor": "new", "hidden": 8},
              {"type": "reconstruct", "steps": 4, "weights_batch_size": 64}]
    full = tmp_path / "full"
    FitRun(_cfg(base_model, stages), full, echo=_quiet).run()
    part = tmp_path / "part"
    if stop_at == "between":
        _stopped_between_stages(base_model, part, monkeypatch, stages)
    else:
        _interrupted_run(_cfg(base_model, stages), part, stop_at)
    metrics = FitRun(_cfg(base_model, stages), part, resume=True, echo=_quiet).run()
    assert metrics["stages"][-1]["hidden"] == 8
    a, b = _params(full), _params(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_evaluations_are_kept_across_a_resume_and_reported(base_model, tmp_path):
    """Every eval_every evaluation is kept in metrics.json (NeRN reports the best of its test
    evaluations), also those before a Ctrl-C and resume; report.md names each stage's best."""
    stages = [{**RESUME_STAGES[0], "eval_every": 3}, {**RESUME_STAGES[1], "eval_every": 4}]
    full = tmp_path / "full"
    expected = FitRun(_cfg(base_model, stages), full, echo=_quiet).run()
    steps = [[e[0] for e in s["evaluations"]] for s in expected["stages"]]
    assert steps == [[3, 6, 9, 10], [4, 8]]
    assert all(s["evaluations"][-1][1] == s["accuracy"] for s in expected["stages"])
    part = tmp_path / "part"
    _interrupted_run(_cfg(base_model, stages), part, (0, 7))
    resumed = FitRun(_cfg(base_model, stages), part, resume=True, echo=_quiet).run()
    assert [s["evaluations"] for s in resumed["stages"]] == [s["evaluations"] for s in expected["stages"]]
    report = (part / "report.md").read_text()
    best = max(expected["stages"][0]["evaluations"], key=lambda e: (e[1], -e[0]))
    assert f"- reconstruct: best of 4 test evaluations {best[1]:.2f} % at step {best[0]} of 10" in report


def test_runtime_pins_the_thread_state_when_the_config_leaves_it(monkeypatch):
    """threads unset still calls torch.set_num_threads (with torch's count): that call also turns
    MKL's dynamic threads off, which a permutation computation does as a side effect, so without it
    a run that computed its permutations and one that read them from the cache (every resumed run)
    differ in the last bits."""
    from nern_fast.train import setup
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    setup.apply_runtime(load_config(data={**BASE, "threads": None}))
    assert calls == [torch.get_num_threads()]
    calls.clear()
    setup.apply_runtime(load_config(data={**BASE, "threads": 1}))
    assert calls == [1]


def test_a_cached_permutation_trains_the_same_bits_as_a_computed_one(tmp_path):
    """In fresh processes (the thread state is process-wide), with the config's threads unset as in
    every shipped config: a run that reads its crossfilter permutations from OUT/permutations (as
    --resume does) equals one that computed them. Before apply_runtime pinned the thread state the
    two differed in the last bits on a 2-core machine (so a resumed run was not exact)."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml
    if (os.cpu_count() or 1) < 2:
        pytest.skip("MKL's dynamic threads change nothing on one core")
    stages = [{"type": "reconstruct", "steps": 3, "weights_batch_size": 256},
              {"type": "distill", "steps": 3, "reconstruction_weight": 0.0, "kd_weight": 1.0,
               "gradients": "full"}]
    data = {**BASE, "stages": stages, "model": {"arch": "cifar_resnet8", "kwargs": {"width": 8},
                                                "checkpoint": None}}
    data.pop("threads")
    data["predictor"] = {**BASE["predictor"], "hidden": 32, "permutation": "crossfilter"}
    data["data"] = {**BASE["data"], "batch_size": 64, "num_workers": 0}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    def run(*argv):
        proc = subprocess.run([sys.executable, "-m", "nern_fast", *argv], capture_output=True,
                              text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    wide = tmp_path / "base8"
    run("train-base", "--config", str(config), "--set", "threads=1", "--out", str(wide))
    ckpt = f"model.checkpoint={wide / 'model.pt'}"
    computed, cached = tmp_path / "computed", tmp_path / "cached"
    run("fit", "--config", str(config), "--set", ckpt, "--out", str(computed))
    cached.mkdir()
    shutil.copytree(computed / "permutations", cached / "permutations")
    run("fit", "--config", str(config), "--set", ckpt, "--out", str(cached))
    a, b = _params(computed), _params(cached)
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k] - b[k]).abs().max().item() for k in a}

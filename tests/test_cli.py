"""The nern-fast command: train-base, fit (and --resume), eval, demo --quick, error exits."""
import json
import subprocess
import sys

import pytest
import yaml

from nern_fast.cli import build_parser, main

TINY = {
    "recipe": "tiny", "device": "cpu", "threads": 1,
    "model": {"arch": "cifar_resnet8", "kwargs": {"width": 4}},
    "data": {"dataset": "digits", "batch_size": 64},
    "train_base": {"epochs": 1},
    "predictor": {"hidden": 12, "levels": 4, "num_blocks": 3},
    "stages": [
        {"type": "reconstruct", "steps": 6, "weights_batch_size": 64},
        {"type": "distill", "steps": 4, "reconstruction_weight": 0.0, "kd_weight": 1.0,
         "weights_batch_size": 64},
    ],
    "logging": {"log_every": 2, "checkpoint_every": 3, "progress": False},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["train-base", "--config", str(config), "--out", str(root / "base")]) == 0
    assert (root / "base" / "model.pt").exists()
    return root, config


def test_subcommands_are_registered():
    text = build_parser().format_help()
    for name in ("demo", "train-base", "fit", "eval", "info"):
        assert name in text


def test_fit_eval_and_resume(trained, capsys):
    root, config = trained
    ckpt = f"model.checkpoint={root / 'base' / 'model.pt'}"
    out = root / "fit"
    assert main(["fit", "--config", str(config), "--set", ckpt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| original |" in printed and "reconstruct" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["stages"]) == 2
    # a second fit into the same folder needs --resume or --overwrite
    assert main(["fit", "--config", str(config), "--set", ckpt, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # resuming a finished run re-writes the outputs and changes nothing, and says so (it used to
    # announce "resuming at stage 2 (<the last stage's name>) step 0", a stage that does not exist)
    assert main(["fit", "--config", str(config), "--set", ckpt, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "the run is complete (all 2 stages)" in printed and "resuming" not in printed
    again = json.loads((out / "metrics.json").read_text())
    assert again["final_accuracy"] == metrics["final_accuracy"]

    report = root / "eval.json"
    assert main(["eval", "--predictor", str(out / "predictor.pt"), "--json", str(report),
                 "--per-layer"]) == 0
    printed = capsys.readouterr().out
    assert "reconstructed" in printed and "compression ratio" in printed and "layer1.0.conv1" in printed
    r = json.loads(report.read_text())
    assert r["reconstructed_accuracy"] == pytest.approx(metrics["final_accuracy"])
    assert r["original_accuracy"] == pytest.approx(metrics["original_accuracy"])
    assert r["compression_ratio"] == pytest.approx(metrics["compression_ratio"])
    assert len(r["per_layer_rmse"]) == metrics["layers"]
    assert r["stored_parameters"] == r["model_parameters"] - r["represented_parameters"] + r["predictor_parameters"]


def test_eval_from_another_folder_finds_the_relative_network_file(trained, capsys, monkeypatch):
    """fit records model.checkpoint as given (relative to the folder it ran in) and that folder:
    eval run elsewhere finds the network there; a file gone from both is a clear error."""
    root, config = trained
    monkeypatch.chdir(root)
    out = root / "fit_rel"
    assert main(["fit", "--config", str(config), "--set", "model.checkpoint=base/model.pt",
                 "--set", "stages.1.steps=1", "--out", str(out)]) == 0
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--predictor", str(out / "predictor.pt"), "--json", "r.json"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((elsewhere / "r.json").read_text())["original_accuracy"] == \
        pytest.approx(metrics["original_accuracy"])
    assert main(["eval", "--predictor", str(out / "predictor.pt"), "--checkpoint", "gone.pt"]) == 2
    assert "network file gone.pt does not exist" in capsys.readouterr().err


def test_eval_on_demand(trained, capsys):
    root, config = trained
    ckpt = f"model.checkpoint={root / 'base' / 'model.pt'}"
    out = root / "fit_od"
    assert main(["fit", "--config", str(config), "--set", ckpt, "--set", "stages.1.steps=2",
                 "--out", str(out)]) == 0
    from nern_fast.predictor import FastPredictor
    if not hasattr(FastPredictor, "attach"):
        pytest.skip("nern_fast.inference is not part of this build")
    plain, on_demand = root / "a.json", root / "b.json"
    assert main(["eval", "--predictor", str(out / "predictor.pt"), "--json", str(plain)]) == 0
    assert main(["eval", "--predictor", str(out / "predictor.pt"), "--json", str(on_demand),
                 "--on-demand"]) == 0
    a, b = json.loads(plain.read_text()), json.loads(on_demand.read_text())
    assert b["mode"] == "on_demand"
    assert b["reconstructed_accuracy"] == pytest.approx(a["reconstructed_accuracy"], abs=0.5)
    assert b["original_accuracy"] == a["original_accuracy"]
    graphed = root / "c.json"  # graphs=True is ignored on the CPU: the same evaluation
    assert main(["eval", "--predictor", str(out / "predictor.pt"), "--json", str(graphed),
                 "--on-demand", "--graphs"]) == 0
    c = json.loads(graphed.read_text())
    assert c["reconstructed_accuracy"] == b["reconstructed_accuracy"] and c["graph_replays"] == 0
    per_layer = root / "d.json"  # one decode call per layer instead of decode groups
    assert main(["eval", "--predictor", str(out / "predictor.pt"), "--json", str(per_layer),
                 "--on-demand", "--group-bytes", "0", "--workspace-bytes", "1000000"]) == 0
    d = json.loads(per_layer.read_text())
    assert d["reconstructed_accuracy"] == pytest.approx(b["reconstructed_accuracy"], abs=0.5)
    layers = len(d["per_layer_rmse"])
    assert d["decode_groups"] == layers and 1 <= b["decode_groups"] < layers  # groups by default
    assert 0 < d["peak_held_bytes"] <= b["peak_held_bytes"] and a["decode_groups"] is None


def test_error_exits(trained, tmp_path, capsys):
    root, config = trained
    assert main(["fit", "--config", str(config), "--set", "stages.0.sampler=weighted",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "stages.0.sampler" in err and "'random_weighted_batch'" in err
    assert main(["fit", "--config", str(config), "--out", str(tmp_path / "y")]) == 2
    assert "model.checkpoint" in capsys.readouterr().err
    assert main(["train-base", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "--predictor", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "--predictor", str(tmp_path / "none.pt"), "--graphs"]) == 2
    assert "add --on-demand" in capsys.readouterr().err
    assert main(["eval", "--predictor", str(tmp_path / "none.pt"), "--group-bytes", "0"]) == 2
    assert "--group-bytes applies to --on-demand" in capsys.readouterr().err
    assert main(["eval", "--predictor", str(tmp_path / "none.pt"), "--on-demand",
                 "--group-bytes", "-5"]) == 2
    assert "--group-bytes must be 0" in capsys.readouterr().err
    assert main(["eval", "--predictor", str(tmp_path / "none.pt"), "--on-demand",
                 "--workspace-bytes", "0"]) == 2
    assert "--workspace-bytes must be a positive" in capsys.readouterr().err
    assert main(["fit", "--config", str(config), "--set", "model.checkpoint=/no/such.pt",
                 "--out", str(tmp_path / "z")]) == 2
    assert "/no/such.pt" in capsys.readouterr().err


def test_outputs_are_checked_before_any_work(trained, tmp_path, capsys, monkeypatch):
    root, config = trained
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for command in ("train-base", "fit"):
        assert main([command, "--config", str(config), "--out", str(a_file)]) == 2
        assert f"--out {a_file} is a file, not a directory" in capsys.readouterr().err
    assert main(["fit", "--config", str(config), "--out", str(a_file / "run")]) == 2
    assert f"{a_file} is a file, not a directory" in capsys.readouterr().err
    # eval --json: refused before the evaluation (which would fail later: no predictor file)
    none = str(tmp_path / "none.pt")
    assert main(["eval", "--predictor", none, "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a directory; give a file name" in capsys.readouterr().err
    assert main(["eval", "--predictor", none, "--json", str(a_file / "r.json")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    monkeypatch.setattr("os.access", lambda *args, **kwargs: False)  # a read-only place (root ignores modes)
    assert main(["eval", "--predictor", none, "--json", str(tmp_path / "r.json")]) == 2
    assert f"{tmp_path} is not writable" in capsys.readouterr().err
    assert main(["train-base", "--config", str(config), "--out", str(tmp_path / "new")]) == 2
    assert f"{tmp_path} is not writable" in capsys.readouterr().err


def test_os_errors_are_one_line(tmp_path, capsys):
    assert main(["train-base", "--config", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Is a directory" in err and len(err.strip().splitlines()) == 1


def test_train_base_divergence_and_overwrite(trained, tmp_path, capsys):
    root, config = trained
    assert main(["train-base", "--config", str(config), "--set", "train_base.optim.lr=1e30",
                 "--out", str(tmp_path / "diverged")]) == 1
    assert "the loss became nan" in capsys.readouterr().err
    out = tmp_path / "again"
    out.mkdir()
    (out / "model.pt").write_bytes((root / "base" / "model.pt").read_bytes())
    assert main(["train-base", "--config", str(config), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train-base", "--config", str(config), "--out", str(out), "--overwrite"]) == 0


def test_train_base_leaves_nothing_behind_a_data_error_and_says_what_an_interrupt_kept(
        trained, tmp_path, capsys, monkeypatch):
    """A dataset that cannot be loaded used to leave an empty --out folder (with a log) behind;
    Ctrl-C printed a bare "interrupted", not that no model is saved until the end."""
    root, config = trained
    out = tmp_path / "base"
    assert main(["train-base", "--config", str(config), "--set", "data.dataset=imagenet",
                 "--set", f"data.root={tmp_path / 'no_imagenet'}", "--out", str(out)]) == 2
    assert "imagenet" in capsys.readouterr().err.lower()
    assert not out.exists()
    from nern_fast.train import base as base_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(base_module, "optimizer_step", interrupted)
    assert main(["train-base", "--config", str(config), "--out", str(out)]) == 130
    assert "no new model was saved" in capsys.readouterr().err
    assert not (out / "model.pt").exists()


def test_export_errors_are_one_line(trained, tmp_path, capsys, monkeypatch):
    root, _ = trained
    out = str(tmp_path / "x.nfc")
    source = ["export", "--predictor", str(tmp_path / "none.pt"), "--base", str(root / "base" / "model.pt")]
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for argv, message in [
        (["export", "--out", out], "give either --compressed FILE or --predictor FILE"),
        (source + ["--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
        (source + ["--out", out, "--device", "banana"], "--device: 'banana' is not one of 'cpu', 'cuda'"),
        (source + ["--out", out, "--device", "cuda"], "--device: 'cuda' asks for CUDA, but CUDA is not available"),
        (source + ["--out", out, "--model", "banana"], "--model: cannot read model 'banana'"),
        (source + ["--out", out, "--model", "cifar_resnet:depth=8,bogus=1"], "--model: "),
        (source + ["--out", out], "none.pt: no such file"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_bench_argument_errors(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--only", "foo"]) == 2
    err = capsys.readouterr().err
    assert "--only: unknown benchmark operation 'foo'; known:" in err and len(err.strip().splitlines()) == 1
    for option, value in (("--threads", "-1"), ("--threads", "x"), ("--budget", "-5"), ("--budget", "nan")):
        with pytest.raises(SystemExit) as exited:
            main(["bench", "--out", str(tmp_path), option, value])
        assert exited.value.code == 2 and f"argument {option}: expected" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_demo_quick(tmp_path):
    # A real process, as `make demo` runs it (python -m nern_fast).
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "nern_fast", "demo", "--quick", "--out", str(out),
                           "--set", "logging.progress=false", "--set", "device=cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| original |" in proc.stdout and "[demo]" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["name"] for s in metrics["stages"]] == ["reconstruct", "distill", "progressive1",
                                                      "progressive2"]
    assert (out / "base" / "model.pt").exists() and (out / "report.md").exists()


def test_an_interrupted_demo_says_how_to_continue(tmp_path, capsys, monkeypatch):
    """Ctrl-C in a demo's fit stage writes a checkpoint, but `demo` has no --resume: its message
    used to be a bare "interrupted" and a second `demo` offered only --overwrite (training the
    base network again). Both now name the fit command that continues the run, which works."""
    from nern_fast.train import fit as fit_module

    class Interrupted(fit_module.FitRun):
        def __init__(self, *args, **kwargs):
            def stop(stage, step):
                if (stage, step) == (0, 2):
                    raise KeyboardInterrupt
            super().__init__(*args, on_step=stop, **kwargs)

    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out), "--set", "logging.progress=false", "--set", "device=cpu"]
    monkeypatch.setattr(fit_module, "FitRun", Interrupted)
    assert main(argv) == 130
    resume = f"nern-fast fit --config {out / 'config.yaml'} --out {out} --resume"
    err = capsys.readouterr().err
    assert "interrupted in stage 0" in err and resume in err, err
    monkeypatch.undo()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unfinished demo run" in err and resume in err and "--overwrite" in err, err
    assert main(resume.split()[1:]) == 0
    assert json.loads((out / "metrics.json").read_text())["stages"][-1]["name"] == "progressive2"
    assert main(argv) == 2
    assert "already holds a demo run" in capsys.readouterr().err


def test_eval_set_changes_the_decode_or_is_refused(trained, tmp_path, capsys):
    """eval reads the predictor from its file: --set predictor.backend / predictor.precision decode
    it another way; any other predictor, stages, train_base or logging key used to be ignored
    without a word (a user asking for `--set predictor.backend=eager` got csrc)."""
    root, config = trained
    out = root / "fit_set"
    if not (out / "predictor.pt").exists():
        assert main(["fit", "--config", str(config), "--set", f"model.checkpoint={root / 'base' / 'model.pt'}",
                     "--set", "stages.1.steps=1", "--out", str(out)]) == 0
    predictor = str(out / "predictor.pt")
    plain, eager = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", "--predictor", predictor, "--json", str(plain)]) == 0
    assert main(["eval", "--predictor", predictor, "--json", str(eager), "--set", "predictor.backend=eager",
                 "--set", "predictor.precision=bf16"]) == 0
    a, b = json.loads(plain.read_text()), json.loads(eager.read_text())
    assert a["backend"] != "eager" and b["backend"] == "eager"
    assert b["reconstruction_rmse"] != a["reconstruction_rmse"]  # bf16 operands
    capsys.readouterr()
    for key, says in (("predictor.hidden=3", f"the predictor and its settings come from {predictor}"),
                      ("stages.0.steps=3", "only fit and train-base use it"),
                      ("logging.progress=false", "only fit and train-base use it")):
        assert main(["eval", "--predictor", predictor, "--set", key]) == 2, key
        err = capsys.readouterr().err
        assert f"--set {key.split('=')[0]}: eval does not use it ({says})" in err, err
        assert "predictor.backend" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", "--predictor", predictor, "--set", "predictor.precision=fp64"]) == 2
    assert "predictor.precision: 'fp64' is not one of" in capsys.readouterr().err


def test_eval_of_the_wrong_kind_of_file_says_what_it_is(trained, tmp_path, capsys):
    """A file of another kind given as --predictor: the error says what it holds (it used to say
    "found None" for a plain state dict, e.g. what `export --format state_dict` writes)."""
    import torch
    root, _ = trained
    plain = tmp_path / "plain.pt"
    torch.save({"conv1.weight": torch.zeros(2, 2, 3, 3)}, plain)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "weights": [1, 2]}, other)
    for path, says in ((plain, "found a plain state dict (a network's weights"),
                       (other, "found a dict without a 'format' entry (keys ['epoch', 'weights'])"),
                       (root / "base" / "model.pt", "found a network file (train-base's model.pt)")):
        assert main(["eval", "--predictor", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: expected a nern_fast.predictor file, {says}" in err, err


def test_warnings_are_one_line_messages(trained, tmp_path):
    """A warning of the library (here: cuda_graphs asked on a CPU, as the shipped decoupled config
    does) reaches a command's user as one line, without the file, line number and source line of
    the warn() call inside nern_fast (which read "compute = maybe_graphed(objective, ...")."""
    import warnings as warnings_module
    root, config = trained
    proc = subprocess.run([sys.executable, "-m", "nern_fast", "fit", "--config", str(config), "--set",
                           f"model.checkpoint={root / 'base' / 'model.pt'}", "--set", "stages.0.cuda_graphs=true",
                           "--set", "stages.1.steps=1", "--set", "device=cpu", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nern-fast: RuntimeWarning: stage 0 (reconstruct): cuda_graphs needs a CUDA device" in proc.stderr
    assert "maybe_graphed" not in proc.stderr and "fit.py" not in proc.stderr, proc.stderr
    before = warnings_module.formatwarning
    assert main(["info"]) == 0
    assert warnings_module.formatwarning is before  # restored for the caller of main()

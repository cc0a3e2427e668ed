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
    # resuming a finished run re-writes the outputs and changes nothing
    assert main(["fit", "--config", str(config), "--set", ckpt, "--out", str(out), "--resume"]) == 0
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

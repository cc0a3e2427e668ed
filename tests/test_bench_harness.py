"""The benchmark suite still works: the harness end to end on a tiny network, its formulas, its
results file, the README section it generates and the `nern-fast bench` entry point."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from nern_fast.commands.bench import BenchNotFound, find_bench_dir

sys.path.insert(0, str(find_bench_dir().parent))  # `bench` is a package of the checkout

from bench import harness, report  # noqa: E402
from bench.harness import COLUMNS, append_rows, decode_flops, peak_tflops, read_rows  # noqa: E402
from bench.nern_style import NernStyleDecoder, crossfilter_loop, infilter_loop  # noqa: E402
from bench.plans import selftest  # noqa: E402
from bench.suite import Log, Runner  # noqa: E402
from helpers import mixed_layout, random_predictor  # noqa: E402

from nern_fast.reference import reference_decode  # noqa: E402


@pytest.fixture(scope="module")
def selftest_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    torch.set_num_threads(1)
    try:
        runner = Runner(selftest(), torch.device("cpu"), out, log=Log(out / harness.LOG_FILE))
        rows = runner.run()
    finally:
        torch.set_num_threads(2)
    return out, rows


def test_selftest_plan_covers_every_operation(selftest_rows):
    out, rows = selftest_rows
    written = read_rows(out / harness.RESULTS_FILE)
    assert len(written) == len(rows) > 0
    assert {r["operation"] for r in written} == {"decode_forward", "decode_backward", "recon_step",
                                                 "distill_step", "inference_forward", "permutations"}
    assert (out / harness.LOG_FILE).read_text().count("\n") >= len(rows)
    with (out / harness.RESULTS_FILE).open() as f:
        assert tuple(next(csv.reader(f))) == COLUMNS


def test_selftest_rows_are_complete(selftest_rows):
    _, rows = selftest_rows
    # The harness's own providers never fail; a backend's failure (its own tests cover it) is an
    # "error" row with the message, and the suite goes on.
    own = {"nern_eager", "eager", "nern_joint", "nern_loop", "dense"}
    assert not [r["note"] for r in rows if r["status"] == "error" and r["provider"] in own]
    assert all(r["note"] for r in rows if r["status"] != "ok")
    by = {(r["operation"], r["provider"], r["precision"]): r for r in rows}
    for op in ("decode_forward", "decode_backward", "recon_step", "distill_step"):
        for provider in ("nern_eager", "eager"):
            r = by[(op, provider, "fp32")]
            assert r["status"] == "ok" and r["median_s"] > 0 and r["p20_s"] <= r["median_s"] <= r["p80_s"]
            assert r["speedup_vs_nern"] == pytest.approx(by[(op, "nern_eager", "fp32")]["median_s"] / r["median_s"])
    # The forward rows checked every provider against the fp32 reference, and bf16 is really bf16.
    assert by[("decode_forward", "eager", "fp32")]["note"].startswith("max rel err vs fp32 eager 0.0e+00")
    bf16_error = float(by[("decode_forward", "eager", "bf16")]["note"].split()[-1])
    assert 0 < bf16_error < 0.05
    assert by[("recon_step", "nern_joint", "fp32")]["status"] == "ok"
    assert by[("decode_forward", "eager", "fp32")]["tflops"] > 0
    assert by[("decode_forward", "eager", "fp32")]["pct_peak"] is None  # no known CPU peak
    # Memory: one fresh-process RSS probe on the first entry.
    mem = by[("decode_forward", "nern_eager", "fp32")]
    assert mem["mem_kind"] == "rss_peak_extra" and mem["peak_mem_mb"] > 0


def test_selftest_skips_carry_reasons(selftest_rows):
    _, rows = selftest_rows
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and all(r["note"] for r in skipped)
    providers = {r["provider"] for r in rows}
    assert {"nern_eager", "eager", "compile", "triton", "csrc"} <= providers  # none silently dropped
    triton = [r for r in rows if r["provider"] == "triton"]
    assert all(r["status"] == "skipped" for r in triton)  # the interpreter is never benchmarked


def test_decode_flops_match_the_spec():
    assert decode_flops(94_208, 280) == pytest.approx(57e9, rel=0.02)
    assert decode_flops(1_220_608, 1256) == pytest.approx(12.3e12, rel=0.03)
    # backward: weight grads of every layer + input grads of all but the first
    n, h = 10, 8
    fwd = decode_flops(n, h, num_blocks=3, levels=1, kernel_size=1)
    assert fwd == 2 * n * (6 * h + h * h + h)
    assert decode_flops(n, h, 3, 1, 1, backward=True) == fwd + 2 * n * (6 * h + h * h + h) + 2 * n * (h * h + h)


def test_peaks_known_only_for_listed_gpus():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == pytest.approx(494.7)
    assert peak_tflops("NVIDIA H200", "tf32") == pytest.approx(494.7)
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert peak_tflops("AMD EPYC (2 cores)", "fp32") is None


def test_cpu_device_names_carry_the_matrix_instructions(monkeypatch):
    """CPU rows name the widest instructions the GEMMs can use: a Zen 3 and a Zen 4 EPYC differ
    several-fold in bf16 but share the model name."""
    for capabilities, label in (({"avx2": True, "avx512_f": False}, "AVX2"),
                                ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, "AVX-512 BF16"),
                                ({"avx512_f": True, "amx_bf16": True}, "AMX"), ({"neon": True}, "NEON"),
                                ({}, "")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert harness.cpu_matrix_features() == label
    name = harness.device_name(torch.device("cpu"))
    assert name.endswith(" cores)") and "cores" in name
    # Side benchmarks' JSON rows: the same name, with the run's threads and an optional note.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert harness.run_device_label("cpu") == name + ", 1 thread"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert harness.run_device_label("cpu", "Triton launches stubbed") == name + ", 2 threads; Triton launches stubbed"


def test_quantiles_and_timer():
    assert harness.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    calls = []
    timing = harness.time_cpu(lambda: calls.append(1), harness.TimerSettings(warmup=2, min_repeats=4,
                                                                             max_repeats=4, min_seconds=0))
    assert timing.repeats == 4 and len(calls) == 6


def test_append_rows_refuses_a_foreign_header(tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="another header"):
        append_rows(path, [{"operation": "x"}])
    with pytest.raises(ValueError, match="not in the results schema"):
        append_rows(tmp_path / "new.csv", [{"nonsense": 1}])


def test_nern_style_decoder_equals_reference():
    layout = mixed_layout(permuted=True)
    pred = random_predictor(layout)
    nern = NernStyleDecoder(layout, pred.encoding, torch.device("cpu"), chunk_size=50)
    w, b = pred.weights(), pred.biases()
    with torch.no_grad():
        ref = reference_decode(w, b, layout, pred.encoding)
        torch.testing.assert_close(nern.decode(w, b), ref, rtol=1e-6, atol=1e-6)
        rows = torch.tensor([0, 70, 200, layout.num_kernels - 1, 5])
        torch.testing.assert_close(nern.decode_rows(w, b, rows),
                                   reference_decode(w, b, layout, pred.encoding, rows), rtol=1e-6, atol=1e-6)
    # NeRN's training-step decode: same values, gradients only through the sampled rows
    rows = torch.tensor([3, 64, 300])
    flat = nern.joint_decode(w, b, rows)
    torch.testing.assert_close(flat.detach(), ref, rtol=1e-6, atol=1e-6)
    flat.sum().backward()
    expected = torch.autograd.grad(reference_decode(w, b, layout, pred.encoding, rows).sum(), w[0])[0]
    torch.testing.assert_close(w[0].grad, expected, rtol=1e-5, atol=1e-6)


def test_nern_loops_follow_the_greedy_rule():
    # Kernels along a line at increasing angles: the chain visits them in angle order.
    angles = torch.tensor([0.0, 1.0, 0.2, 0.6, 0.4])
    kernels = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    weight = torch.zeros(5, 1, 3, 3)
    weight.view(5, 9)[:, :2] = kernels
    assert crossfilter_loop(weight) == [0, 2, 4, 3, 1]
    filter_order, channel_orders = infilter_loop(torch.randn(3, 4, 3, 3))
    assert sorted(filter_order) == [0, 1, 2] and all(sorted(c) == [0, 1, 2, 3] for c in channel_orders)


def test_report_renders_devices_apart_and_rewrites_readme(selftest_rows, tmp_path):
    out, rows = selftest_rows
    gpu = [dict(r, suite="gpu", device="NVIDIA H100 80GB HBM3", device_kind="cuda", run_id="g1")
           for r in read_rows(out / harness.RESULTS_FILE)]
    cpu = [dict(r, suite="cpu-full", run_id="c1") for r in read_rows(out / harness.RESULTS_FILE)]
    for r in gpu + cpu:  # pretend the tiny case is a headline case
        if r["layout"] == "tiny":
            r.update(layout="resnet20", hidden="180")
    text = report.render(gpu + cpu)
    assert text.index("#### CPU: ") < text.index("#### GPU: NVIDIA H100 80GB HBM3")
    assert "| decode_forward | resnet20 | 180 | fp32 | nern_eager |" in text
    assert "Not measured in this run:" in text and "`triton` skipped" in text

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    first = report.replace_section(readme.read_text(), "table one")
    assert first.startswith("# title\n\nintro\n") and first.endswith(f"{report.BEGIN}\ntable one\n{report.END}\n")
    second = report.replace_section(first + "after\n", "table two")
    assert "table one" not in second and "table two" in second and second.endswith("after\n")
    with pytest.raises(ValueError, match="broken"):
        report.replace_section(f"{report.END}\n{report.BEGIN}\n", "x")


def test_report_merge_appends_only_new_rows(selftest_rows, tmp_path):
    out, _ = selftest_rows
    target = tmp_path / "bench.csv"
    assert report.merge(target, out / harness.RESULTS_FILE) == len(read_rows(out / harness.RESULTS_FILE))
    assert report.merge(target, out / harness.RESULTS_FILE) == 0


def test_bench_command_finds_the_checkout_or_says_why(monkeypatch, tmp_path):
    assert (find_bench_dir() / "suite.py").is_file()
    import nern_fast
    monkeypatch.setattr(nern_fast, "__file__", str(tmp_path / "site" / "nern_fast" / "__init__.py"))
    with pytest.raises(BenchNotFound, match="editable mode"):
        find_bench_dir()


def test_bench_resnet18_matches_torchvision():
    """The GPU machine has no torchvision: the bench's own ResNet-18 must give the same layout."""
    torchvision = pytest.importorskip("torchvision")
    from bench.resnet18 import ResNet18
    from nern_fast import WeightLayout

    ours, theirs = ResNet18(), torchvision.models.resnet18(weights=None)
    assert WeightLayout.from_model(ours, include="nern") == WeightLayout.from_model(theirs, include="nern")
    shapes = lambda m: [(n, tuple(p.shape)) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(ours) == shapes(theirs)


@pytest.mark.parametrize("name", ["cpu-quick", "cpu-full", "gpu", "gpu-quick", "selftest"])
def test_plans_name_real_operations_layouts_and_providers(name):
    from bench.permutations import parse_conv_layout
    from bench.plans import PLANS
    from bench.registry import operation
    from bench.workloads import NETWORKS

    plan = PLANS[name]()
    assert plan.entries
    for entry in plan.entries:
        op = operation(entry.operation)
        if entry.operation == "permutations":
            parse_conv_layout(entry.layout)
        else:
            assert entry.layout in NETWORKS and entry.hidden > 0
        names = {p.name for p in op.providers()}
        assert {p for p, _ in entry.leave_out} <= names and set(entry.only or ()) <= names
        assert set(entry.precisions) <= {"fp32", "tf32", "bf16"}


def test_interleaved_timer_alternates_and_survives_a_failure():
    calls = []

    def ok(name):
        return lambda: calls.append(name)

    def broken():
        calls.append("broken")
        raise RuntimeError("boom")

    timings = harness.time_interleaved([ok("a"), broken, ok("b")], harness.TimerSettings(
        warmup=1, min_repeats=3, max_repeats=3, min_seconds=0))
    assert isinstance(timings[1], RuntimeError)
    assert timings[0].repeats == timings[2].repeats == 3
    assert calls[:3] == ["a", "broken", "b"] and calls[3:] == ["a", "b"] * 3


def test_a_case_listed_twice_is_measured_once_per_provider_and_precision(tmp_path):
    from bench.plans import Entry, Plan

    no_compile = (("compile", "not in this test"),)
    plan = Plan("unit", [Entry("decode_forward", "tiny", 8, ("fp32",), leave_out=no_compile, memory=False),
                         Entry("decode_forward", "tiny", 8, ("fp32", "bf16"), leave_out=no_compile,
                               memory=False)],
                harness.TimerSettings(warmup=0, min_repeats=1, max_repeats=1, min_seconds=0), checks=False)
    rows = Runner(plan, torch.device("cpu"), tmp_path).run()
    keys = [(r["provider"], r["precision"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert ("nern_eager", "fp32") in keys and ("eager", "bf16") in keys
    bf16 = next(r for r in rows if r["provider"] == "eager" and r["precision"] == "bf16")
    assert bf16["speedup_vs_nern"] is not None  # the baseline of the first listing still applies


def test_report_takes_each_case_from_its_newest_run():
    """A newer run of one operation updates its cases without hiding an older full run's others; a
    newer failure does not hide an older measurement."""
    from bench.results_view import newest_per_case

    def row(run_id, date, operation, provider, status="ok", median="0.5"):
        return dict(run_id=run_id, date=date, suite="cpu-full", device="cpu0", operation=operation,
                    layout="resnet20", hidden="180", batch="", variant="", provider=provider,
                    precision="fp32", status=status, median_s=median)
    rows = [row("old", "2026-01-01", "decode_forward", "csrc"), row("old", "2026-01-01", "recon_step", "csrc"),
            row("old", "2026-01-01", "distill_step", "csrc"),
            row("new", "2026-02-01", "decode_forward", "csrc", median="0.25"),
            row("new", "2026-02-01", "distill_step", "csrc", status="error", median="")]
    runs = newest_per_case(rows, "cpu0", lambda r: True)
    assert [[(r["operation"], r["median_s"]) for r in run] for run in runs] == [
        [("decode_forward", "0.25")], [("recon_step", "0.5"), ("distill_step", "0.5")]]


def test_decode_host_time_records_each_provider_and_precision(tmp_path):
    from bench import decode_host_time

    out = tmp_path / "host.jsonl"
    assert decode_host_time.main(["--device", "cpu", "--cases", "tiny:24", "--providers", "eager,nern_eager",
                                  "--precisions", "fp32,bf16", "--repeats", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # nern_eager runs at fp32 whatever the case asks: one row
    assert [(r["provider"], r["precision"]) for r in rows] == [
        ("eager", "fp32"), ("eager", "bf16"), ("nern_eager", "fp32")]
    assert all(r["host_ms"] > 0 and r["layout"] == "tiny"
               and r["device"].startswith(harness.device_name(torch.device("cpu"))) for r in rows)
    with pytest.raises(SystemExit):
        decode_host_time.main(["--cases", "tiny"])  # no hidden size: a usage error naming the case


def test_gpu_activities_leave_out_annotation_ranges():
    """A record_function range on the GPU timeline is a device event spanning a whole step: counted
    as GPU work it hides the idle gaps between kernels (the GPU-busy fraction of a profile)."""
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name="train_step", device_type=cuda, is_user_annotation=True),
              SimpleNamespace(name="train_step", device_type=cpu, is_user_annotation=True),
              SimpleNamespace(name="gemm", device_type=cuda, is_user_annotation=False),
              SimpleNamespace(name="aten::mm", device_type=cpu, is_user_annotation=False)]
    assert [e.name for e in harness.gpu_activities(events)] == ["gemm"]


def test_git_commit_marks_code_changes_not_results(tmp_path):
    import os
    import subprocess

    from bench.harness import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")})
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    clean = git_commit(tmp_path)
    assert clean and "+dirty" not in clean and clean != "unknown"
    (tmp_path / "bench" / "results" / "rows.jsonl").write_text("{}\n{}\n")  # a benchmark's new rows
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "+dirty"

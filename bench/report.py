"""The README's performance section, generated from bench.csv (never typed by hand).

``python -m bench.report`` rewrites the part of README.md between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` (appending the markers at the end when absent). Every table names its
device; CPU and GPU results are separate sections. Per device it shows, for each of NeRN's published
configurations (sweeps are in the plots), the newest measurement, one table per run they come from.

``--merge FILE`` first appends the rows of another bench.csv (e.g. a GPU session's ``$OUT``)
that the results file does not have yet.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .harness import RESULTS_FILE, append_rows, as_float, read_rows
from .results_view import devices, is_headline, newest_per_case, ok, slug

BENCH = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH / "results" / RESULTS_FILE
DEFAULT_README = BENCH.parent / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ROW_KEY = ("run_id", "operation", "provider", "variant", "layout", "hidden", "precision", "batch")
OPERATION_ORDER = ("decode_forward", "decode_backward", "recon_step", "distill_step", "inference_forward",
                   "permutations")

DEFINITIONS = """\
What the operations are (scripts in `bench/`): **decode_forward** decodes every kernel without
gradient; **decode_backward** decodes every kernel with autograd and back-propagates a fixed
gradient into all predictor parameters (full gradient); **recon_step** decodes a random subset of
4,096 kernels, MSE to the network's kernels, backward (`nern_joint` is NeRN's own step: every kernel
decoded, gradients through the 4,096); **distill_step** adds the CNN forward/backward on a batch with
a KL loss; **inference_forward** is one forward of the network built from the predictor;
**permutations** computes a NeRN permutation of one 64×64 3×3 layer. Providers: `nern_eager` is
NeRN's eager decoder (fp32, encodings precomputed, per layer chunks of 4,096 in a Python loop),
`eager` the reference decoder `reference_decode` (one chain over all kernels, at the row's
precision), `compile` is `torch.compile` of it, `triton` / `csrc` the fused backends through the
dispatcher. *vs NeRN* = NeRN-style median / this median, same case, same
run. TFLOP/s counts the decode FLOPs of NERN_SPEC §10 (recon_step: of the 4,096 kernels only; blank
where the CNN's work is not counted). Peak memory is
the extra memory one call needs above its inputs (CPU: resident size of a fresh process; GPU: peak
allocated), including a provider's own state such as NeRN's precomputed encodings."""


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _fmt(value: Optional[float], pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def _case_label(r: dict) -> str:
    label = r["layout"]
    if r["batch"]:
        label += f", batch {r['batch']}"
    return label


def run_table(run: list[dict], kind: str) -> list[str]:
    """The header line and table of one run's rows (the newest of their cases on this device)."""
    first = run[0]
    loads = sorted({r["load_avg"] for r in run if r["load_avg"]})
    load_text = ""
    if kind == "cpu" and loads:
        one_minute = [float(l.split("/")[0]) for l in loads]
        load_text = (f", 1-minute load average {min(one_minute):.1f}–{max(one_minute):.1f} during the run "
                     f"(the machine was shared with other jobs)")
    lines = [f"Plan `{first['suite']}`, {first['date'][:10]}, commit `{first['commit']}`, torch {first['torch']}"
             + (f", triton {first['triton']}" if first["triton"] else "")
             + f", {first['threads']} CPU threads{load_text}:", ""]
    head = ("| operation | network | H | precision | provider | median | p20–p80 | TFLOP/s | % peak "
            "| peak mem | vs NeRN |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    measured = [r for r in run if ok(r)]
    measured.sort(key=lambda r: (OPERATION_ORDER.index(r["operation"]) if r["operation"] in OPERATION_ORDER
                                 else 99, as_float(r["kernels"]) or 0, r["variant"], as_float(r["batch"]) or 0,
                                 r["precision"]))
    for r in measured:
        median, p20, p80 = as_float(r["median_s"]), as_float(r["p20_s"]), as_float(r["p80_s"])
        mem = as_float(r["peak_mem_mb"])
        variant = f" {r['variant']}" if r["variant"] and r["operation"] == "permutations" else ""
        lines.append("| " + " | ".join([
            r["operation"] + variant, _case_label(r), r["hidden"] or "", r["precision"], r["provider"],
            _fmt_time(median), f"{_fmt_time(p20)}–{_fmt_time(p80)}",
            _fmt(as_float(r["tflops"]), "{:.3g}"), _fmt(as_float(r["pct_peak"]), "{:.0f}%"),
            _fmt(mem, "{:,.0f} MB"), _fmt(as_float(r["speedup_vs_nern"]), "×{:.2f}")]) + " |")
    missing: dict = {}  # (status, reason) -> (providers, cases)
    for r in run:
        if r["status"] != "ok":
            providers, cases = missing.setdefault((r["status"], r["note"]), ([], []))
            case = f"{r['operation']} {r['layout']}"
            for items, item in ((providers, f"`{r['provider']}`"), (cases, case)):
                if item not in items:
                    items.append(item)
    if missing:
        lines += ["", "Not measured in this run:"]
        for (status, note), (providers, cases) in missing.items():
            where = ", ".join(cases[:4]) + (f" and {len(cases) - 4} more" if len(cases) > 4 else "")
            lines.append(f"- {', '.join(providers)} {status} ({where}): {note}")
    return lines


def device_section(rows: list[dict], kind: str, device: str) -> Optional[str]:
    """Per headline case the newest measurement on this device, one table per run it comes from
    (each *vs NeRN* is from its own run)."""
    runs = newest_per_case(rows, device, is_headline)
    if not runs:
        return None
    title = "CPU" if kind == "cpu" else "GPU"
    lines = [f"#### {title}: {device}"]
    for run in runs:
        lines += [""] + run_table(run, kind)
    return "\n".join(lines)


def render(rows: list[dict], plot_dir: Optional[Path] = None, readme_dir: Optional[Path] = None) -> str:
    parts = ["## Performance", "",
             "Generated by `python -m bench.report` from `bench/results/bench.csv`; every number names "
             "the device it was measured on.", "", DEFINITIONS]
    sections = [(kind, device, device_section(rows, kind, device)) for kind, device in devices(rows)]
    sections = [s for s in sections if s[2]]
    if not sections:
        parts += ["", "No benchmark results yet: run `nern-fast bench`."]
    for kind, device, text in sections:
        parts += ["", text]
        if plot_dir is not None:
            tag = f"{kind}-{slug(device)}"
            pngs = sorted(plot_dir.glob(f"*_{tag}.png"))
            if pngs:
                rel = [p.relative_to(readme_dir) if readme_dir else p for p in pngs]
                parts += ["", "Plots: " + ", ".join(f"[{p.stem.split('_' + tag)[0]}]({p.as_posix()})"
                                                    for p in rel)]
    if not any(kind == "cuda" for kind, _, _ in sections):
        parts += ["", "#### GPU", "", "No GPU results recorded yet (`nern-fast bench --device cuda` on a GPU "
                  "machine, then `python -m bench.report --merge OUT/bench.csv`)."]
    return "\n".join(parts) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the markers replaced (markers appended when absent)."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    start, end = text.find(BEGIN), text.find(END)
    if start == -1 and end == -1:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    if start == -1 or end == -1 or end < start:
        raise ValueError(f"README has a broken benchmark section: expected '{BEGIN}' before '{END}'")
    return text[:start] + block + text[end + len(END):]


def merge(results: Path, other: Path) -> int:
    """Append the rows of ``other`` that ``results`` lacks; returns how many."""
    have = {tuple(r[k] for k in ROW_KEY) for r in read_rows(results)}
    new = [r for r in read_rows(other) if tuple(r[k] for k in ROW_KEY) not in have]
    append_rows(results, new)
    return len(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    p.add_argument("--readme", default=str(DEFAULT_README))
    p.add_argument("--merge", action="append", default=[], metavar="FILE",
                   help="append the new rows of another bench.csv first (repeatable)")
    p.add_argument("--print", action="store_true", help="print the section instead of writing README")
    args = p.parse_args(argv)
    results, readme = Path(args.results), Path(args.readme)
    for other in args.merge:
        print(f"merged {merge(results, Path(other))} new rows from {other} into {results}")
    section = render(read_rows(results), results.parent, readme.parent)
    if args.print:
        print(section)
        return 0
    readme.write_text(replace_section(readme.read_text() if readme.exists() else "", section))
    print(f"updated the benchmark section of {readme} from {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

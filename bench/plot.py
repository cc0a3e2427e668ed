"""PNG plots from bench.csv (matplotlib, an optional dependency: ``pip install -e .[plot]``).

Per device, from that device's fullest newest run: decode time vs hidden size (ResNet-56 layout)
and vs kernel count (H=280) per provider and precision, and peak memory per provider at NeRN's
configurations. ``python -m bench.plot [--results bench/results/bench.csv] [--out DIR]``.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from .harness import RESULTS_FILE, as_float, read_rows
from .results_view import best_run, devices, is_headline, ok, slug

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / RESULTS_FILE
SWEEP_LAYOUT, SWEEP_HIDDEN = "resnet56", 280
MEMORY_OPERATIONS = ("decode_forward", "decode_backward", "recon_step", "inference_forward")


def _series(rows, x_field):
    """(provider precision) -> sorted [(x, median seconds)]."""
    series = defaultdict(dict)
    for r in rows:
        x = as_float(r[x_field])
        if x is not None:
            series[f"{r['provider']} {r['precision']}"][x] = float(r["median_s"])
    return {k: sorted(v.items()) for k, v in sorted(series.items())}


def _line_plot(plt, series, title, xlabel, path, logx=False):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("median time per call (s, log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_plot(plt, rows, title, path):
    groups = defaultdict(dict)
    for r in rows:
        mem = as_float(r["peak_mem_mb"])
        if mem is None:
            continue
        label = f"{r['operation']}\n{r['layout']} H={r['hidden']}" + (f" b={r['batch']}" if r["batch"] else "")
        groups[label][f"{r['provider']} {r['precision']}"] = mem
    if not groups:
        return False
    providers = sorted({p for g in groups.values() for p in g})
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        xs = [j + i * width for j, g in enumerate(groups.values()) if provider in g]
        ys = [g[provider] for g in groups.values() if provider in g]
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("peak extra memory (MB, log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_plots(results: Path, out_dir: Path) -> list[Path]:
    """Write the PNGs for every device in ``results``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, device in devices(rows):
        tag = f"{kind}-{slug(device)}"

        def hidden_sweep(r):
            return ok(r) and r["operation"] == "decode_forward" and r["layout"] == SWEEP_LAYOUT

        def kernel_sweep(r):
            return ok(r) and r["operation"] == "decode_forward" and as_float(r["hidden"]) == SWEEP_HIDDEN

        for name, predicate, x_field, xlabel, logx in (
                ("decode_hidden", hidden_sweep, "hidden", "hidden size H (ResNet-56 layout)", False),
                ("decode_kernels", kernel_sweep, "kernels", f"kernels decoded (H={SWEEP_HIDDEN})", True)):
            run = best_run(rows, device, predicate)
            if run is None:
                continue
            series = _series([r for r in run if predicate(r)], x_field)
            if not any(len(points) > 1 for points in series.values()):
                continue
            path = out_dir / f"{name}_{tag}.png"
            _line_plot(plt, series, f"decode forward, {device} ({run[0]['date'][:10]}, "
                                    f"{run[0]['threads']} threads)", xlabel, path, logx)
            written.append(path)

        def memory(r):
            return ok(r) and is_headline(r) and r["operation"] in MEMORY_OPERATIONS and r["peak_mem_mb"]

        run = best_run(rows, device, memory)
        if run is not None:
            path = out_dir / f"memory_{tag}.png"
            kind_text = "GPU allocated" if kind == "cuda" else "resident (fresh process)"
            if _memory_plot(plt, [r for r in run if memory(r)],
                            f"peak extra memory, {kind_text}, {device} ({run[0]['date'][:10]})", path):
                written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(DEFAULT_RESULTS))
    p.add_argument("--out", default=None, help="directory for the PNGs (default: next to the results)")
    args = p.parse_args(argv)
    results = Path(args.results)
    if not results.exists():
        print(f"no results file at {results}; run `nern-fast bench` first")
        return 2
    try:
        paths = make_plots(results, Path(args.out) if args.out else results.parent)
    except ImportError:
        print("matplotlib is not installed: pip install -e .[plot]")
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

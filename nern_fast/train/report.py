"""The outputs of a fit: ``metrics.json``, ``report.md`` (a table) and ``accuracy.png``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def write_metrics(out_dir: Path, metrics: dict) -> Path:
    from ..io import atomic_write_text
    return atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def stage_table(metrics: dict) -> str:
    """A Markdown table: the original network, then every stage."""
    head = ("| stage | type | hidden | compression ratio | accuracy (%) | Δ vs original | "
            "reconstruction RMSE | steps | seconds |")
    lines = [head, "|" + "---|" * 9]
    orig = metrics.get("original_accuracy")
    lines.append(f"| original | - | - | - | {_fmt(orig)} | - | - | - | - |")
    for s in metrics.get("stages", []):
        delta = None if orig is None or s.get("accuracy") is None else s["accuracy"] - orig
        lines.append(f"| {s['name']} | {s['type']} | {_fmt(s.get('hidden'))} | "
                     f"{_fmt(s.get('compression_ratio'), 4)} | {_fmt(s.get('accuracy'))} | "
                     f"{'-' if delta is None else f'{delta:+.2f}'} | "
                     f"{_fmt(s.get('reconstruction_rmse'), 6)} | {_fmt(s.get('steps'))} | "
                     f"{_fmt(s.get('seconds'), 1)} |")
    return "\n".join(lines)


def best_evaluations(metrics: dict) -> list[str]:
    """Lines naming each stage's best test evaluation where it had several (``eval_every``):
    NeRN's published accuracies are the best of its test evaluations, the table's the final one."""
    lines = []
    for s in metrics.get("stages", []):
        evaluations = s.get("evaluations") or []
        if len(evaluations) > 1:
            step, acc = max(evaluations, key=lambda e: (e[1], -e[0]))
            lines.append(f"- {s.get('name')}: best of {len(evaluations)} test evaluations "
                         f"{_fmt(acc)} % at step {step} of {s.get('steps')}")
    if lines:
        lines = ["Best test evaluations (NeRN reports the best of its per-epoch evaluations; the "
                 "table shows each stage's final accuracy):", ""] + lines + [""]
    return lines


def write_report(out_dir: Path, metrics: dict, plot_note: Optional[str] = None) -> Path:
    lines = [f"# nern-fast fit: {metrics.get('recipe', '')}", "",
             f"- network: {metrics.get('model')} on {metrics.get('dataset')} "
             f"({metrics.get('represented_parameters')} represented conv weights in "
             f"{metrics.get('layers')} layers, {metrics.get('kernels')} kernels)",
             f"- device: {metrics.get('device')}; decode backend: {metrics.get('backend')}",
             f"- original accuracy {_fmt(metrics.get('original_accuracy'))} %, final "
             f"{_fmt(metrics.get('final_accuracy'))} % at compression ratio "
             f"{_fmt(metrics.get('compression_ratio'), 4)} (predictor parameters / represented "
             f"weights), reconstruction RMSE {_fmt(metrics.get('reconstruction_rmse'), 6)}",
             f"- total time {_fmt(metrics.get('seconds'), 1)} s", "", stage_table(metrics), ""]
    lines += best_evaluations(metrics)
    if plot_note:
        lines += [plot_note, ""]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_plot(out_dir: Path, metrics: dict) -> Optional[str]:
    """``accuracy.png``: accuracy after every stage against the original. Returns a note when
    the plot cannot be made (matplotlib missing), None when written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "accuracy.png was not written: matplotlib is not installed (pip install matplotlib)."
    stages = [s for s in metrics.get("stages", []) if s.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(stages) + 2), 3.6))
    names = [s["name"] for s in stages]
    values = [s["accuracy"] for s in stages]
    ax.bar(range(len(stages)), values, color="#4c72b0")
    orig = metrics.get("original_accuracy")
    if orig is not None:
        ax.axhline(orig, color="#c44e52", linestyle="--", label=f"original {orig:.2f} %")
        ax.legend(loc="lower right")
    for i, (v, s) in enumerate(zip(values, stages)):
        ax.text(i, v, f"{v:.2f}\nCR {s.get('compression_ratio', 0):.2f}", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(range(len(stages)), names, rotation=20)
    low = min(values + ([orig] if orig is not None else [])) if values else 0
    ax.set_ylim(max(0.0, low - 5), 100.5 if low > 50 else None)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{metrics.get('model')} on {metrics.get('dataset')}: accuracy by stage")
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "accuracy.png", dpi=120)
    plt.close(fig)
    return None


def write_outputs(out_dir: Path, metrics: dict) -> None:
    write_metrics(out_dir, metrics)
    note = write_plot(out_dir, metrics)
    write_report(out_dir, metrics, note)

"""Reports of a study: mean ± std tables, the headline, the label-efficiency curve and overlays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.study.config import _NAMES, LOWER_IS_BETTER, METRICS, StudyConfig


def summarize(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float, str], tuple[float, float, int]]:
    """(method, fraction, metric) -> (mean, std, n) over seeds."""
    groups: dict[tuple[str, float, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], float(r["fraction"]), r["metric"]), []).append(float(r["value"]))
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def markdown_table(records: Sequence[dict[str, Any]], metric: str) -> str:
    """Methods x label fractions, cells ``mean ± std`` of ``metric`` over seeds."""
    stats = summarize(records)
    methods = list(dict.fromkeys(r["method"] for r in records))
    fractions = sorted({float(r["fraction"]) for r in records})
    arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    lines = [f"{metric} ({arrow})", "", "| method | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for m in methods:
        cells = []
        for f in fractions:
            s = stats.get((m, f, metric))
            cells.append("–" if s is None else f"{s[0]:.3f} ± {s[1]:.3f}" if s[2] > 1 else f"{s[0]:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(records: Sequence[dict[str, Any]], task: str, target_fraction: float = 0.05) -> str:
    """``lora vs best of scratch/lora_random at 5 % labels: +0.xx IoU`` (the fraction nearest 5 %)."""
    metric = METRICS[task][0]
    stats = summarize(records)
    fractions = sorted({float(r["fraction"]) for r in records})
    if not fractions:
        return "no results"
    f = min(fractions, key=lambda x: abs(math.log(x / target_fraction)))
    methods = {r["method"] for r in records}
    ours = "lora" if "lora" in methods else next((m for m in ("full", "frozen") if m in methods), None)
    controls = [m for m in ("scratch", "lora_random") if m in methods] or [m for m in ("unet",) if m in methods]
    if ours is None or not controls:
        return f"headline needs lora (or full/frozen) and scratch or lora_random; have {sorted(methods)}"
    sign = -1 if metric in LOWER_IS_BETTER else 1
    best = max(controls, key=lambda m: sign * stats[(m, f, metric)][0])
    delta = stats[(ours, f, metric)][0] - stats[(best, f, metric)][0]
    return (f"{ours} vs best of {'/'.join(controls)} ({best}) at {f:.0%} labels: {delta:+.3f} {_NAMES.get(metric, metric)}"
            f" ({stats[(ours, f, metric)][0]:.3f} vs {stats[(best, f, metric)][0]:.3f}"
            f"{', lower is better' if sign < 0 else ''})")


def shown_section(gt: np.ndarray) -> int:
    """The evaluation section the overlays show: the one with the most labelled objects (foreground
    voxels), so a reader sees the task, not an empty section."""
    return int(np.argmax((np.asarray(gt) > 0).reshape(gt.shape[0], -1).sum(axis=1)))


def write_reports(out: Path, records: Sequence[dict[str, Any]], cfg: StudyConfig, pretraining: dict[str, Any],
                  shown: dict[tuple[str, float], np.ndarray], ev_raw: np.ndarray, ev_gt: np.ndarray) -> None:
    """``results.md``, ``label_efficiency.png`` and ``overlays.png`` from the records."""
    from ssl_em.utils.io import atomic_write_text
    from ssl_em.utils.plotting import pyplot, save_figure

    metrics = [m for m in METRICS[cfg.task] if any(r["metric"] == m for r in records)]
    pre = (f"Pretraining: {pretraining.get('method', '-')} on {pretraining.get('architecture', pretraining.get('encoder'))}"
           f", {pretraining.get('steps', 0)} steps in {pretraining.get('seconds', 0)} s (separate from the "
           f"fine-tuning budget).")
    text = [f"# Label efficiency: {cfg.task}, {cfg.family} family", "",
            f"Fine-tuning budget {cfg.steps} steps per run (+ {cfg.sweep_share:.0%} per swept rate), best "
            f"validation weights (every {cfg.val_every} steps), {cfg.seeds} seed(s), patch {tuple(cfg.patch_shape)}, "
            f"batch {cfg.batch_size}, voxel size {cfg.voxel_size} nm.", pre, ""]
    for m in metrics:
        text += [markdown_table(records, m), ""]
    text.append(headline(records, cfg.task))
    atomic_write_text(out / "results.md", "\n".join(text) + "\n")

    plt = pyplot()
    stats = summarize(records)
    metric = metrics[0] if metrics else METRICS[cfg.task][0]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m in dict.fromkeys(r["method"] for r in records):
        fs = sorted(f for (mm, f, k) in stats if mm == m and k == metric)
        ax.errorbar(fs, [stats[(m, f, metric)][0] for f in fs], yerr=[stats[(m, f, metric)][1] for f in fs],
                    marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    fractions = sorted({float(r["fraction"]) for r in records})
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of z-sections labelled")
    ax.set_ylabel(metric)
    ax.set_title(f"{cfg.task}: label efficiency ({cfg.family})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "label_efficiency.png", dpi=100)

    if not shown:
        return
    f0 = min(f for _, f in shown)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    cands = [m for m, f in shown if f == f0]
    best = max(cands, key=lambda m: sign * stats.get((m, f0, metric), (-math.inf * sign,))[0])
    z = shown_section(ev_gt)
    panels = [("raw", None), ("ground truth", ev_gt[z]), (f"{best}", shown[(best, f0)])]
    if "scratch" in cands and best != "scratch":
        panels.append(("scratch", shown[("scratch", f0)]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, seg) in zip(axes[0], panels):
        ax.imshow(ev_raw[z], cmap="gray", interpolation="nearest")
        if seg is not None:
            ax.imshow(np.ma.masked_where(seg == 0, seg % 7 + 1), cmap="tab10", alpha=0.5, vmin=0, vmax=10,
                      interpolation="nearest")
        ax.set_title(f"{name}" + ("" if seg is None or name == "ground truth" else f" ({f0:.0%} labels)"), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{cfg.task}, evaluation section {z} (the most objects)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "overlays.png", dpi=100)

"""Reports of a study: mean ± std tables, the headline, the label-efficiency curve and overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.study.config import _NAMES, ADAPTER, LOWER_IS_BETTER, METRICS, STUDY_METHODS, StudyConfig


def regime_of(record: dict[str, Any]) -> str:
    """A record's label regime (``"4 patches"``, ``"5% sections"``; older records: their fraction)."""
    return record.get("regime") or f"{float(record['fraction']):.0%} sections"


def regimes(records: Sequence[dict[str, Any]]) -> list[str]:
    """The regimes of ``records``, scarcest first (fewest labelled voxels; fraction where not recorded)."""
    xs = labelled_voxels(records)
    fractions = {regime_of(r): float(r.get("fraction") or 0) for r in records}
    return sorted(fractions, key=lambda g: xs.get(g, fractions[g]))


def labelled_voxels(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Regime -> mean labelled voxels over its runs (the label-efficiency curve's x)."""
    out: dict[str, list[float]] = {}
    for r in records:
        if r.get("labelled_voxels"):
            out.setdefault(regime_of(r), []).append(float(r["labelled_voxels"]))
    return {k: float(np.mean(v)) for k, v in out.items()}


def summarize(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(method, regime, metric) -> (mean, std, n) over seeds."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], regime_of(r), r["metric"]), []).append(float(r["value"]))
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def markdown_table(records: Sequence[dict[str, Any]], metric: str) -> str:
    """Methods x label regimes (scarcest first), cells ``mean ± std`` of ``metric`` over seeds."""
    stats = summarize(records)
    methods = list(dict.fromkeys(r["method"] for r in records))
    columns = regimes(records)
    arrow = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    lines = [f"{metric} ({arrow})", "", "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for m in methods:
        cells = []
        for c in columns:
            s = stats.get((m, c, metric))
            cells.append("–" if s is None else f"{s[0]:.3f} ± {s[1]:.3f}" if s[2] > 1 else f"{s[0]:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_step(step_records: Sequence[dict[str, Any]], metric: str) -> dict[tuple[str, str, int], list[float]]:
    """(regime, method, step) -> the values of ``metric`` over seeds, in the records' order."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for r in step_records:
        if r["metric"] == metric:
            groups.setdefault((r["regime"], r["method"], int(r["step"])), []).append(float(r["value"]))
    return groups


def steps_table(step_records: Sequence[dict[str, Any]], metric: str) -> str:
    """Regime x method rows, fine-tuning steps as columns, cells ``mean ± std`` of ``metric`` over seeds
    (the last column is each run's own end: its best-validation or last weights)."""
    groups = _by_step(step_records, metric)
    steps = sorted({k[2] for k in groups})
    rows = list(dict.fromkeys((g, m) for g, m, _ in groups))
    lines = [f"{metric} after N fine-tuning steps (one run per seed, scored at each N; the last column is its end: best-validation weights where validated)", "",
             "| regime | method | " + " | ".join(str(n) for n in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for g, m in rows:
        cells = []
        for n in steps:
            v = groups.get((g, m, n))
            cells.append("–" if v is None else f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        lines.append(f"| {g} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PRETRAINED = tuple(m for m, (_, pretrained) in ADAPTER.items() if pretrained)  # start from the pretrained encoder
# what the pretrained ones must beat: the same networks at random init, and what users pick instead
CONTROLS = tuple(m for m in STUDY_METHODS if m not in PRETRAINED)


def headline(records: Sequence[dict[str, Any]], task: str) -> str:
    """``full (best of full/lora) vs best of scratch/unet/rf (unet) on 1 patch: +0.xx IoU (a ± s vs b ± s)``:
    the best pretrained method against the best method without pretraining (the same networks at random
    init and what users pick instead), at the scarcest regime where both sides have results."""
    metric = METRICS[task][0]
    stats = summarize(records)
    methods = {r["method"] for r in records}
    ours = [m for m in PRETRAINED if m in methods]
    controls = [m for m in CONTROLS if m in methods]
    if not ours or not controls:
        return (f"headline needs a pretrained method ({'/'.join(PRETRAINED)}) and a control "
                f"({'/'.join(CONTROLS)}); have {sorted(methods)}")
    both = [g for g in regimes(records)
            if any((m, g, metric) in stats for m in ours) and any((c, g, metric) in stats for c in controls)]
    if not both:
        return "no regime where a pretrained method and a control both have results"
    g = both[0]
    sign = -1 if metric in LOWER_IS_BETTER else 1

    def best_of(names: list[str]) -> str:
        return max((m for m in names if (m, g, metric) in stats), key=lambda m: sign * stats[(m, g, metric)][0])

    mine, theirs = best_of(ours), best_of(controls)
    (a, sa, _), (b, sb, _) = stats[(mine, g, metric)], stats[(theirs, g, metric)]
    which = f" (best of {'/'.join(ours)})" if len(ours) > 1 else ""
    return (f"{mine}{which} vs best of {'/'.join(controls)} ({theirs}) on {g}: {sign * (a - b):+.3f} "
            f"{_NAMES.get(metric, metric)} ({a:.3f} ± {sa:.3f} vs {b:.3f} ± {sb:.3f}"
            f"{', lower is better' if sign < 0 else ''})")


def summary_lines(records: Sequence[dict[str, Any]], task: str, out: Path) -> list[str]:
    """Three lines a person reads first: who won at the scarcest label regime (mean ± std over seeds),
    whether pretraining paid there beyond the seed spread, and where the files are."""
    metric = METRICS[task][0]
    stats = summarize(records)
    sign = -1 if metric in LOWER_IS_BETTER else 1
    name = _NAMES.get(metric, metric)
    g = regimes(records)[0] if regimes(records) else None
    here = {m: stats[(m, g, metric)] for m in {r["method"] for r in records} if (m, g, metric) in stats}
    if not here:
        return [f"no {name} results yet", "", f"files: {out}"]
    winner = max(here, key=lambda m: sign * here[m][0])
    mean, std, n = here[winner]
    first = f"winner on {g}: {winner}, {name} {mean:.3f} ± {std:.3f} over {n} seed(s)"
    ours = [m for m in PRETRAINED if m in here]
    controls = [m for m in CONTROLS if m in here]
    if ours and controls:
        mine = max(ours, key=lambda m: sign * here[m][0])
        theirs = max(controls, key=lambda m: sign * here[m][0])
        (a, sa, _), (b, sb, _) = here[mine], here[theirs]
        margin = sign * (a - b)
        verdict = ("pretraining pays here, beyond the seed spread" if margin > sa + sb else
                   "pretraining is ahead, but within the seed spread" if margin > 0 else
                   "pretraining does not pay here")
        second = f"{verdict}: {mine} {a:.3f} ± {sa:.3f} vs best control {theirs} {b:.3f} ± {sb:.3f} ({margin:+.3f})"
    else:
        second = "no pretrained method and control to compare"
    return [first, second, f"files: {out / 'results.md'}, {out / 'overlays.png'}, {out / 'label_efficiency.png'}"]


def shown_section(gt: np.ndarray) -> int:
    """The evaluation section the overlays show: the one with the most labelled objects (foreground
    voxels), so a reader sees the task, not an empty section."""
    return int(np.argmax((np.asarray(gt) > 0).reshape(gt.shape[0], -1).sum(axis=1)))


def write_reports(out: Path, records: Sequence[dict[str, Any]], cfg: StudyConfig, pretraining: dict[str, Any],
                  shown: dict[tuple[str, str], np.ndarray], ev_raw: np.ndarray, ev_gt: np.ndarray,
                  step_records: Sequence[dict[str, Any]] = ()) -> None:
    """``results.md``, ``label_efficiency.png``, ``overlays.png`` and, with ``step_records`` of more than one
    step, ``steps.png`` (the metric against fine-tuning steps) from the records."""
    from ssl_em.utils.io import atomic_write_text
    from ssl_em.utils.plotting import pyplot, save_figure

    metrics = [m for m in METRICS[cfg.task] if any(r["metric"] == m for r in records)]
    if "architecture" in pretraining and not pretraining.get("steps"):  # a given encoder: how it was pretrained
        pre = (f"Encoder {pretraining['encoder']} ({pretraining['architecture']}), pretrained before the study: "
               f"{pretraining.get('encoder_method', '-')}, {pretraining.get('encoder_steps', '?')} steps in "
               f"{pretraining.get('encoder_seconds', '?')} s on {', '.join(pretraining.get('encoder_data', ['?']))}.")
    else:
        pre = (f"Pretraining: {pretraining.get('method', '-')} on "
               f"{pretraining.get('architecture', pretraining.get('encoder'))}, {pretraining.get('steps', 0)} steps in "
               f"{pretraining.get('seconds', 0)} s (separate from the fine-tuning budget).")
    text = [f"# Label efficiency: {cfg.task}, {cfg.family} family", "",
            f"Fine-tuning budget {cfg.steps} steps per run (+ {cfg.sweep_share:.0%} per swept rate), best "
            f"validation weights (every {cfg.val_every} steps), {cfg.seeds} seed(s), crop {tuple(cfg.crop_shape)}, "
            f"batch {cfg.batch_size}, voxel size {cfg.voxel_size} nm.", pre, ""]
    for m in metrics:
        text += [markdown_table(records, m), ""]
    text.append(headline(records, cfg.task))
    metric = metrics[0] if metrics else METRICS[cfg.task][0]
    several_steps = len({r["step"] for r in step_records}) > 1
    if several_steps:
        text += ["", steps_table(step_records, metric)]
    atomic_write_text(out / "results.md", "\n".join(text) + "\n")

    plt = pyplot()
    stats = summarize(records)
    if several_steps:
        save_steps_figure(step_records, metric, cfg, out / "steps.png")
    xs = labelled_voxels(records)
    fig, ax = plt.subplots(figsize=(5.8, 3.9))
    order = [g for g in regimes(records) if g in xs]
    for m in dict.fromkeys(r["method"] for r in records):
        gs = [g for g in order if (m, g, metric) in stats]
        ax.errorbar([xs[g] for g in gs], [stats[(m, g, metric)][0] for g in gs],
                    yerr=[stats[(m, g, metric)][1] for g in gs], marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xticks([xs[g] for g in order], [g.replace(" sections", "\nsections").replace(" patch", "\npatch")
                                           for g in order], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("labelled voxels (painted patches, then whole sections)")
    ax.set_ylabel(metric)
    ax.set_title(f"{cfg.task}: label efficiency ({cfg.family})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "label_efficiency.png", dpi=100)

    if not shown:
        return
    g0 = next(g for g in regimes(records) + [g for _, g in shown] if any(gg == g for _, gg in shown))
    methods = [m for m, g in shown if g == g0]
    z = shown_section(ev_gt)
    panels = [("raw", None), ("ground truth", ev_gt[z])] + [(m, shown[(m, g0)]) for m in methods]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4), squeeze=False)
    for ax, (name, seg) in zip(axes[0], panels):
        ax.imshow(ev_raw[z], cmap="gray", interpolation="nearest")
        if seg is not None:
            ax.imshow(np.ma.masked_where(seg == 0, seg % 7 + 1), cmap="tab10", alpha=0.5, vmin=0, vmax=10,
                      interpolation="nearest")
        score = stats.get((name, g0, metric))
        extra = "" if score is None else f" {metric} {score[0]:.2f}"
        ax.set_title(name + extra, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{cfg.task}, trained on {g0}; evaluation section {z} (the most objects)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out / "overlays.png", dpi=100)


def save_steps_figure(step_records: Sequence[dict[str, Any]], metric: str, cfg: StudyConfig, path: Path) -> None:
    """One panel per label regime: ``metric`` (mean ± std over seeds) against fine-tuning steps, per method."""
    from ssl_em.utils.plotting import pyplot, save_figure

    plt = pyplot()
    groups = _by_step(step_records, metric)
    names = list(dict.fromkeys(g for g, _, _ in groups))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], names):
        for m in dict.fromkeys(mm for gg, mm, _ in groups if gg == g):
            steps = sorted(n for gg, mm, n in groups if (gg, mm) == (g, m))
            values = [groups[(g, m, n)] for n in steps]
            ax.errorbar(steps, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o",
                        capsize=3, label=m)
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("fine-tuning steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{cfg.task}: {metric} against fine-tuning steps ({cfg.family}, batch {cfg.batch_size})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)

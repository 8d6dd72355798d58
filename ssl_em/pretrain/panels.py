"""PNG panels people look at: reconstructions during pretraining and loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.utils.plotting import pyplot, save_figure


def _as_volume(x: Any) -> np.ndarray:
    """(1, C, D, H, W) / (C, D, H, W) / (D, H, W) tensor or array -> float32 (D, H, W), first channel."""
    arr = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    while arr.ndim > 3:
        arr = arr[0]
    return arr


def save_reconstruction_panel(
    panel: dict[str, Any], path: str | Path, title: str = "", n_slices: int = 3
) -> Path:
    """Rows = z-slices, columns = the panel's entries (e.g. input, masked input, reconstruction)."""
    plt = pyplot()
    columns = {name: _as_volume(v) for name, v in panel.items()}
    depth = next(iter(columns.values())).shape[0]
    zs = np.unique(np.linspace(0, depth - 1, min(n_slices, depth)).round().astype(int))
    fig, axes = plt.subplots(len(zs), len(columns), figsize=(2.6 * len(columns), 2.6 * len(zs)), squeeze=False)
    reference = columns[next(iter(columns))]
    vmin, vmax = np.percentile(reference, [0.5, 99.5])
    for col, (name, vol) in enumerate(columns.items()):
        for row, z in enumerate(zs):
            ax = axes[row, col]
            ax.imshow(vol[z], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"z={z}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=100)
    return path


def save_curve(series: dict[str, tuple[list[float], list[float]]], path: str | Path, *, xlabel: str,
               ylabel: str, title: str = "", logy: bool = False) -> Path:
    """Plot named (x, y) series to a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=100)
    return path

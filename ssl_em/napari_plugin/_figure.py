"""README's picture of the plugin: the widget panel (rendered by Qt, no OpenGL needed) beside the section
it was trained on: raw with the painting, the foreground probability and the instances it produced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _widget_pixels(widget: Any) -> np.ndarray:
    image = widget.native.grab().toImage().convertToFormat(4)  # QImage.Format_RGB32
    ptr = image.bits()
    ptr.setsize(image.height() * image.bytesPerLine())
    buf = np.frombuffer(ptr, np.uint8).reshape(image.height(), image.bytesPerLine() // 4, 4)
    return buf[:, : image.width(), [2, 1, 0]].copy()  # BGRA -> RGB


def save_widget_figure(widget: Any, viewer: Any, path: str | Path) -> Path:
    widget.native.setFixedWidth(460)  # a readable panel; the status line wraps
    from skimage.color import label2rgb

    from ssl_em.utils.plotting import pyplot, save_figure

    plt = pyplot()
    raw = np.asarray(viewer.layers[widget.image.value].data)
    painted = np.asarray(viewer.layers[widget.labels.value].data)
    probs = np.asarray(viewer.layers[f"{widget.image.value} probability"].data)
    inst = np.asarray(viewer.layers[f"{widget.image.value} instances"].data)
    z = int(np.argmax((painted > 0).reshape(painted.shape[0], -1).sum(1)))
    img = raw[z].astype(np.float32) / max(float(raw.max()), 1.0)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6), gridspec_kw={"width_ratios": [1.1, 1, 1, 1]})
    axes[0].imshow(_widget_pixels(widget))
    axes[0].set_title("ssl-em widget in napari")
    axes[1].imshow(label2rgb(painted[z], img, alpha=0.45, bg_label=0, colors=["cyan", "orange"]))
    axes[1].set_title(f"painted z={z}: background (1), mitochondria (2)")
    axes[2].imshow(img, cmap="gray")
    axes[2].imshow(probs[z], cmap="magma", alpha=0.55, vmin=0, vmax=1)
    axes[2].set_title(f"probability after {widget.session.total_steps} LoRA steps")
    axes[3].imshow(label2rgb(inst[z], img, alpha=0.4, bg_label=0))
    axes[3].set_title("instances")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    return save_figure(fig, Path(path), dpi=70)

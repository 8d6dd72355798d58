"""Figures people look at, written as PNG atomically (headless: the Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Write ``fig`` as PNG to a temporary sibling, rename it to ``path``, and close the figure."""
    from ssl_em.utils.io import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", **{"dpi": 100, **savefig_kwargs})
    finally:
        pyplot().close(fig)
    return path

"""Sample data: the built-in synthetic ssTEM phantom (raw and mitochondria), at its voxel size."""

from __future__ import annotations

from typing import Any


def phantom_sample() -> list[tuple[Any, dict, str]]:
    from ssl_em.data.phantom import make_phantom

    ph = make_phantom((24, 192, 192), seed=0)
    scale = list(ph.voxel_size)
    return [(ph.raw, {"name": "phantom raw", "scale": scale}, "image"),
            (ph.mito.astype("uint32"), {"name": "phantom mitochondria (truth)", "scale": scale, "visible": False},
             "labels")]

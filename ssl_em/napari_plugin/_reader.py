"""napari reader: any volume spec ssl-em opens, lazily (dask), OME-Zarr pyramids as multiscale layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ssl_em.errors import SslEmError


def _as_dask(vol: Any) -> Any:
    import dask.array as da

    chunks = vol.chunks or tuple(min(n, c) for n, c in zip(vol.shape, (1,) * (vol.ndim - 2) + (512, 512)))
    return da.from_array(vol, chunks=chunks, asarray=True, fancy=False)


def read_volume(path: str) -> list[tuple[Any, dict, str]]:
    """Layer data for ``path``: an image, or labels for integer arrays ssl-em wrote as labels / instances;
    OME-Zarr levels as one multiscale layer; the voxel size (nm) as the scale."""
    from ssl_em.data.volume import open_volume

    base = open_volume(path)
    levels = int(base._backend().extra.get("levels") or 1)
    vols = [base] + [open_volume(f"{path.rstrip('/')}@{k}") for k in range(1, levels)]
    data = [_as_dask(v) for v in vols]
    scale = list(base.voxel_size) if base.voxel_size_known else [1.0, 1.0, 1.0]
    if base.ndim == 4:  # (c, z, y, x): channels as the first axis
        scale = [1.0, *scale]
    labels = base.dtype.kind in "iu" and ("instances" in Path(path).name or "labels" in Path(path).name)
    meta = {"name": Path(path.rstrip("/")).name, "scale": scale, "multiscale": len(data) > 1,
            "metadata": {"ssl_em_spec": path, "voxel_size": scale[-3:]}}
    return [(data if len(data) > 1 else data[0], meta, "labels" if labels else "image")]


def napari_get_reader(path: str | list[str]) -> Callable | None:
    if isinstance(path, list):
        return None
    try:
        from ssl_em.data.volume import open_volume

        open_volume(path)
    except (SslEmError, OSError):
        return None  # not a volume ssl-em reads: let another reader try
    return read_volume

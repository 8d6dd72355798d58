"""Convert any volume spec to OME-Zarr with an anisotropy-aware multiscale pyramid.

Output format: **NGFF v0.4 multiscales on zarr v2** (``dimension_separator "/"``, Blosc-zstd by default), chosen
because it is what most viewers and libraries read today (neuroglancer, napari-ome-zarr, webKnossos,
BigDataViewer/n5-zarr, ome-zarr-py). :func:`ssl_em.data.volume.open_volume` reads both this and
NGFF v0.5 on zarr v3.

Pyramid: each level halves only the axes whose voxel size is at most half the coarsest axis (so a
50x4x4 nm ssTEM stack goes 50x8x8, 50x16x16, 50x32x32, then 100x64x64 once near-isotropic).
Raw data is mean-pooled; ``labels=True`` uses mode pooling (most frequent id per 2x2(x2) block, ties
to the first voxel) so no new ids appear. Each level records its scale and the half-voxel translation
that pooling introduces. Work goes block by block (chunk-aligned (z, y, x) blocks, each read once), so
memory stays bounded by a few blocks whatever the volume size; the store is written to a temporary
sibling and renamed into place only when complete.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.data.formats import parse_voxel
from ssl_em.data.volume import open_volume, spec_path
from ssl_em.errors import ArgumentParser, VolumeError
from ssl_em.utils.io import atomic_path, check_output, writer_attrs

DEFAULT_CHUNKS = (32, 128, 128)
_BLOCK_BYTES = 64 * 2**20  # target size of one in-memory block of work


def level_factors(voxel_size: Sequence[float], shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Downsampling factors (z, y, x) for the next level: halve the axes at most half as coarse as the
    coarsest, all axes once near-isotropic. Axes of size 1 (a single section) are never halved and do
    not count towards the rule."""
    active = [a for a in range(3) if shape is None or shape[a] > 1]
    coarsest = max((voxel_size[a] for a in active), default=1.0)
    fine = [a for a in active if voxel_size[a] * 2 <= coarsest]
    return tuple(2 if a in (fine or active) else 1 for a in range(3))  # type: ignore[return-value]


def plan_pyramid(shape: Sequence[int], voxel_size: Sequence[float], chunks: Sequence[int],
                 levels: int | None = None) -> list[tuple[tuple[int, ...], tuple[float, ...], tuple[int, ...]]]:
    """List (shape, voxel_size, factors-from-previous) per level; ``levels=None`` stops once the axes
    that would be halved all fit in one chunk (further levels would not reduce the chunk count)."""
    plan = [(tuple(shape), tuple(float(v) for v in voxel_size), (1, 1, 1))]
    while levels is None or len(plan) < levels:
        shp, vs, _ = plan[-1]
        f = level_factors(vs, shp)
        halved = [a for a in range(3) if f[a] == 2]
        if not halved or len(plan) >= 16 or (levels is None and all(shp[a] <= chunks[a] for a in halved)):
            break
        plan.append((tuple(math.ceil(s / k) for s, k in zip(shp, f)), tuple(v * k for v, k in zip(vs, f)), f))
    return plan


def _pool(block: np.ndarray, f: tuple[int, int, int], labels: bool) -> np.ndarray:
    """Pool a (z, y, x) block by ``f``; edges are padded by repetition so partial windows are valid."""
    pad = [(0, (-s) % k) for s, k in zip(block.shape, f)]
    if any(p[1] for p in pad):
        block = np.pad(block, pad, mode="edge")
    z, y, x = (s // k for s, k in zip(block.shape, f))
    # (z, fz, y, fy, x, fx) -> (z, y, x, fz*fy*fx): one window per output voxel on the last axis
    win = block.reshape(z, f[0], y, f[1], x, f[2]).transpose(0, 2, 4, 1, 3, 5).reshape(z, y, x, -1)
    if not labels:
        out = win.mean(axis=-1, dtype=np.float64)
        if np.issubdtype(block.dtype, np.integer):
            info = np.iinfo(block.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(block.dtype)
    # mode pooling: count each window element's matches (k <= 8, so k^2 compares are cheap and exact)
    counts = (win[..., :, None] == win[..., None, :]).sum(-1)
    return np.take_along_axis(win, counts.argmax(-1)[..., None], -1)[..., 0]


def _blocks(shape: Sequence[int], chunks: Sequence[int], itemsize: int, factor: Sequence[int] = (1, 1, 1)
            ) -> Iterator[tuple[slice, ...]]:
    """Chunk-aligned output blocks (z, y, x) of about _BLOCK_BYTES of *input* each (input = block x factor)."""
    per = list(chunks)
    # grow in x, then y, then z while the input block stays under budget: rows of chunks read well
    for axis in (2, 1, 0):
        while per[axis] < shape[axis] and np.prod([p * 2 if a == axis else p for a, p in enumerate(per)]) \
                * np.prod(factor) * itemsize <= _BLOCK_BYTES:
            per[axis] *= 2
    for z in range(0, shape[0], per[0]):
        for y in range(0, shape[1], per[1]):
            for x in range(0, shape[2], per[2]):
                yield tuple(slice(o, min(o + p, s)) for o, p, s in zip((z, y, x), per, shape))


def convert(src_spec: Any, dst: str | Path, voxel_size: Any = None, chunks: Sequence[int] = DEFAULT_CHUNKS,
            levels: int | None = None, dtype: Any = None, labels: bool = False, progress: bool = True,
            name: str | None = None, compression: str = "zstd", overwrite: bool = False,
            fill_missing: bool = False) -> Path:
    """Write ``src_spec`` (any :func:`open_volume` spec) to ``dst`` as an OME-Zarr multiscale image.

    Args:
        voxel_size: (z, y, x) nm; overrides the source metadata. A source without one gets (1, 1, 1)
            and ``"voxel_size_known": false`` in the multiscales metadata, which open_volume honours.
        chunks: (z, y, x) chunk shape, clipped to the volume.
        levels: number of levels including full resolution; None = auto (see :func:`plan_pyramid`).
        dtype: cast level 0 to this dtype (e.g. ``uint8``); None keeps the source dtype.
        labels: mode pooling instead of mean pooling (for integer label volumes).
        compression: Blosc "zstd" (default), "lz4" (faster decode) or "none" (raw EM intensities compress
            to only ~0.97x; uncompressed chunks decode fastest for random-crop training).
        overwrite: replace an existing ``dst`` that ssl-em wrote; a folder ssl-em did not write, or one
            that is, holds or sits inside the source, is never replaced (one-line ConfigError).
        fill_missing: read chunks absent from a zarr source as its fill value (else VolumeError).
    Returns the path of the finished store. Only (z, y, x) sources are accepted.
    """
    import numcodecs
    import zarr
    from tqdm.auto import tqdm

    check_output(dst, [p for p in [spec_path(src_spec)] if p is not None], overwrite=overwrite,
                 writer="ssl_em.data.convert")
    vol = open_volume(src_spec, voxel_size, fill_missing=fill_missing)
    if vol.axes != "zyx":
        raise VolumeError(f"{vol.spec}: convert handles (z, y, x) volumes; this one has axes {vol.axes!r}")
    out_dtype = np.dtype(dtype) if dtype is not None else vol.dtype
    if labels and not np.issubdtype(out_dtype, np.integer):
        raise VolumeError(f"{vol.spec}: --labels needs an integer dtype, got {out_dtype}")
    chunks = tuple(min(int(c), s) for c, s in zip(_parse_chunks(chunks), vol.shape))
    plan = plan_pyramid(vol.shape, vol.voxel_size, chunks, levels)
    dst = Path(dst)
    total = sum(len(list(_blocks(shp, chunks, out_dtype.itemsize, f))) for shp, _, f in plan)
    # EM intensities barely compress (~0.97x) so favour decode speed: no shuffle for 1-byte data
    # (bit-shuffle roughly halved random-crop throughput in benchmarks/data_throughput.py); labels
    # (multi-byte ids) compress well with a byte shuffle.
    if compression not in {"zstd", "lz4", "none"}:
        raise VolumeError(f"compression {compression!r} must be one of zstd, lz4, none")
    shuffle = numcodecs.Blosc.NOSHUFFLE if out_dtype.itemsize == 1 else numcodecs.Blosc.SHUFFLE
    compressor = None if compression == "none" else numcodecs.Blosc(cname=compression, clevel=3, shuffle=shuffle)

    with atomic_path(dst, is_dir=True) as tmp, tqdm(total=total, desc=f"convert {dst.name}", unit="block",
                                                     disable=not progress) as bar:
        root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=2)
        arrays = []
        for level, (shp, _, f) in enumerate(plan):
            arr = root.create_array(str(level), shape=shp, chunks=chunks, dtype=out_dtype, compressors=compressor,
                                    fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"},
                                    config={"write_empty_chunks": True})  # complete: an absent chunk is an error
            src = vol if level == 0 else arrays[-1]
            for box in _blocks(shp, chunks, out_dtype.itemsize, f):
                if level == 0:
                    data = np.asarray(src[box]).astype(out_dtype, copy=False)
                else:
                    in_box = tuple(slice(s.start * k, min(s.stop * k, n)) for s, k, n in zip(box, f, src.shape))
                    data = _pool(np.asarray(src[in_box]), f, labels)
                arr[box] = data
                bar.update()
            arrays.append(arr)
        root.attrs.update(writer_attrs("ssl_em.data.convert"))
        root.attrs.update(ngff_attrs(plan, name or dst.name.removesuffix(".zarr").removesuffix(".ome"),
                                     labels, vol.spec, vol.voxel_size_known))
    return dst


def ngff_attrs(plan: list, name: str, labels: bool, source: str, voxel_size_known: bool) -> dict[str, Any]:
    """NGFF v0.4 ``multiscales`` for a pyramid plan: per-level scale (nm) and pooling translation."""
    datasets, shift = [], np.zeros(3)
    for level, (_, vs, f) in enumerate(plan):
        if level:
            prev = np.asarray(plan[level - 1][1])
            shift = shift + (np.asarray(f) - 1) * prev / 2  # window centre moves by (f - 1)/2 old voxels
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [float(v) for v in vs]}]
        if np.any(shift):
            transforms.append({"type": "translation", "translation": [float(t) for t in shift]})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    return {"multiscales": [{
        "version": "0.4", "name": name, "axes": axes, "datasets": datasets,
        "type": "mode" if labels else "mean",
        "metadata": {"writer": "ssl_em.data.convert", "source": source, "labels": labels,
                     "voxel_size_known": voxel_size_known},
    }]}


def _parse_chunks(value: Any) -> tuple[int, int, int]:
    vals = [int(v) for v in (value.split(",") if isinstance(value, str) else value)]
    if len(vals) != 3 or min(vals) < 1:
        raise VolumeError(f"chunks {value!r} must be three positive integers (z, y, x)")
    return tuple(vals)  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    """``ssl-em convert SRC DST.ome.zarr [--voxel-size 50,4,4] [--chunks 32,128,128] [--levels N] [--labels]``."""
    p = ArgumentParser(prog="ssl-em convert", description="Convert a volume spec to OME-Zarr "
                                "(NGFF 0.4, zarr v2) with an anisotropy-aware pyramid.")
    p.add_argument("src", help="any volume spec: f.h5:/raw, stack.tif, slices/, f.npz:raw, a.zarr/arr, ...")
    p.add_argument("dst", help="output folder, e.g. out.ome.zarr (written atomically: complete or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if an earlier ssl-em convert wrote it")
    p.add_argument("--voxel-size", default=None, help="nm as Z,Y,X (overrides file metadata)")
    p.add_argument("--chunks", default=",".join(map(str, DEFAULT_CHUNKS)), help="chunk shape Z,Y,X")
    p.add_argument("--levels", type=int, default=None, help="pyramid levels incl. full res (default: auto)")
    p.add_argument("--dtype", default=None, help="cast to this dtype, e.g. uint8")
    p.add_argument("--labels", action="store_true", help="label volume: mode pooling instead of mean")
    p.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "none"],
                   help="chunk compression (Blosc); 'none' reads fastest, raw EM compresses little")
    p.add_argument("--fill-missing", action="store_true",
                   help="read chunks absent from a zarr SRC as its fill value (default: an error)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    vs = parse_voxel(a.voxel_size, "--voxel-size") if a.voxel_size else None
    out = convert(a.src, a.dst, voxel_size=vs, chunks=_parse_chunks(a.chunks), levels=a.levels, dtype=a.dtype,
                  labels=a.labels, progress=not a.no_progress, compression=a.compression,
                  overwrite=a.overwrite, fill_missing=a.fill_missing)
    for level in range(_count_levels(out)):
        v = open_volume(f"{out}@{level}")
        print(f"{out}@{level}: shape {v.shape}, voxel {tuple(round(x, 3) for x in v.voxel_size)} nm")
    return 0


def _count_levels(path: Path) -> int:
    import zarr

    return len(zarr.open_group(str(path), mode="r").attrs["multiscales"][0]["datasets"])


__all__ = ["DEFAULT_CHUNKS", "convert", "level_factors", "main", "ngff_attrs", "plan_pyramid"]

"""The format readers behind :func:`ssl_em.data.volume.open_volume`: zarr v2/v3 and OME-Zarr, HDF5,
N5, TIFF, folders of slices, npz and npy.

Each reader returns a :class:`Backend`: the array's facts (shape, dtype, chunks, voxel size and axes
from the file's metadata) and a ``read(box)`` that reads only that box. A decoder failure deep inside
a library becomes a one-line VolumeError naming the file and the box (:func:`wrap_read`).
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.errors import VolumeError

Box = tuple[slice, ...]
_VOXEL_ATTRS = ("resolution", "voxel_size", "pixelResolution")
_UNIT_TO_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1e3, "um": 1e3, "µm": 1e3, "micron": 1e3,
               "angstrom": 0.1, "millimeter": 1e6, "mm": 1e6, "picometer": 1e-3}
_SLICE_SUFFIXES = {".png", ".tif", ".tiff"}

@dataclass
class Backend:
    """What a format reader hands the Volume: raw array facts plus a box reader."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[Box], np.ndarray]
    chunks: tuple[int, ...] | None = None
    voxel_size: tuple[float, float, float] | None = None  # from metadata, nm, (z, y, x)
    axes: str | None = None  # from metadata (OME-Zarr axes), else inferred
    extra: dict[str, Any] = field(default_factory=dict)

def parse_voxel(value: Any, where: str) -> tuple[float, float, float]:
    """(z, y, x) nm from three numbers or one (isotropic): a sequence, or text such as "50,4,4", "50 4 4",
    "50x4x4" or "50;4;4"; anything else is a one-line VolumeError naming ``where``."""
    original = value
    if isinstance(value, str):
        value = [v for v in re.split(r"[,;x\s]+", value.strip()) if v]
    try:
        vals = np.atleast_1d(np.asarray(value, dtype=float)).ravel()
    except (TypeError, ValueError):
        vals = np.array([])
    if vals.size == 1:
        vals = np.repeat(vals, 3)
    if vals.size != 3 or not np.all(np.isfinite(vals)) or np.any(vals <= 0):
        raise VolumeError(f"{where}: voxel size {original!r} must be three positive numbers (z, y, x nm), "
                          "e.g. 50,4,4")
    return tuple(float(v) for v in vals)  # type: ignore[return-value]


def voxel_from_attrs(attrs: Any, where: str, *, reverse: bool = False) -> tuple[float, float, float] | None:
    """Read resolution/voxel_size/pixelResolution (list or {"dimensions": [...], "unit": ...}) in nm."""
    for name in _VOXEL_ATTRS:
        if name not in attrs:
            continue
        value, scale = attrs[name], 1.0
        if isinstance(value, dict):  # N5/BigCAT style {"dimensions": [x, y, z], "unit": "um"}
            scale = _UNIT_TO_NM.get(str(value.get("unit", "nm")).lower(), 1.0)
            value = value.get("dimensions")
        try:
            vals = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=float))][-3:]
        except (TypeError, ValueError):
            raise VolumeError(f"{where}: attribute {name!r} = {attrs[name]!r} is not a voxel size (numbers in "
                              "z, y, x or x, y, z order); fix or remove it, or pass --voxel-size") from None
        if reverse:
            vals = vals[::-1]
        return parse_voxel([v * scale for v in vals], f"{where} attribute {name!r}")
    return None

def wrap_read(fn: Callable[[Box], np.ndarray], where: str, chunks: Any = None) -> Callable[[Box], np.ndarray]:
    """Turn a decoder failure deep inside a library into a one-line VolumeError naming file + box."""

    def read(box: Box) -> np.ndarray:
        try:
            return fn(box)
        except VolumeError:
            raise
        except Exception as err:  # noqa: BLE001 - codec errors have no common base class
            lo = tuple(s.start for s in box)
            hi = tuple(s.stop for s in box)
            grid = ""
            if chunks:
                first = tuple(a // c for a, c in zip(lo, chunks))
                last = tuple((b - 1) // c for b, c in zip(hi, chunks))
                grid = f" (chunk grid {first}..{last})"
            msg = str(err).splitlines()[0] if str(err) else ""
            raise VolumeError(f"{where}: cannot read box {lo}..{hi}{grid}: "
                              f"{type(err).__name__}: {msg}") from err

    return read


def array_backend(arr: Any, voxel_size: Any = None, source: str | None = None) -> Backend:
    return Backend(tuple(arr.shape), arr.dtype, lambda box: np.asarray(arr[box]), None, voxel_size,
                    extra={"voxel_size_source": source} if voxel_size is not None else {})

# -- zarr / OME-Zarr ---------------------------------------------------------------------------------
def _ome_multiscales(attrs: Any, where: str = "") -> list[dict] | None:
    """The OME-Zarr ``multiscales`` list (NGFF 0.5 under "ome", <= 0.4 at the top), each entry checked
    to be an object with a non-empty ``datasets`` list of objects with a ``path``: malformed metadata is a
    one-line VolumeError naming the group and the key, never an AttributeError deep inside."""
    ome = attrs.get("ome") if "ome" in attrs else None
    if ome is not None and not isinstance(ome, dict):
        raise VolumeError(f"{where}: OME-Zarr attribute 'ome' must be an object, got {type(ome).__name__}")
    ms = (ome or {}).get("multiscales") if ome is not None else attrs.get("multiscales")
    if ms is None:
        return None
    key = "ome.multiscales" if ome is not None else "multiscales"
    if not isinstance(ms, list) or not ms:
        raise VolumeError(f"{where}: OME-Zarr metadata {key!r} must be a non-empty list of multiscale objects, "
                          f"got {ms!r:.80}")
    for i, entry in enumerate(ms):
        datasets = entry.get("datasets") if isinstance(entry, dict) else None
        if not isinstance(datasets, list) or not datasets:
            raise VolumeError(f"{where}: OME-Zarr {key}[{i}] has no 'datasets' list (each level needs "
                              f"{{\"path\": ...}}); got {entry!r:.80}")
        for j, d in enumerate(datasets):
            if not isinstance(d, dict) or not isinstance(d.get("path"), str):
                raise VolumeError(f"{where}: OME-Zarr {key}[{i}].datasets[{j}] needs a 'path' string, got {d!r:.80}")
    return ms


def _ome_level(ms: dict, level: int, where: str) -> tuple[str, tuple[float, float, float] | None, str]:
    """Dataset path, voxel size (nm, z y x) and axes string for one multiscale level."""
    datasets = ms["datasets"]  # checked by _ome_multiscales: a non-empty list of {"path": ...}
    if not 0 <= level < len(datasets):
        raise VolumeError(f"{where}: no multiscale level {level}; levels are 0..{len(datasets) - 1}")
    axes_meta = ms.get("axes") or [{"name": n} for n in "zyx"[-3:]]
    if not isinstance(axes_meta, list):
        raise VolumeError(f"{where}: OME-Zarr multiscales 'axes' must be a list, got {axes_meta!r:.80}")
    axes_meta = [{"name": a} if isinstance(a, str) else a if isinstance(a, dict) else {"name": "?"} for a in axes_meta]
    scale = np.ones(len(axes_meta))
    for what, transforms in ((f"datasets[{level}]", datasets[level].get("coordinateTransformations") or []),
                             ("multiscales", ms.get("coordinateTransformations") or [])):
        for t in transforms if isinstance(transforms, list) else [transforms]:
            if not isinstance(t, dict) or t.get("type") != "scale" or "scale" not in t:
                continue
            try:
                factor = np.asarray(t["scale"], dtype=float).ravel()
            except (TypeError, ValueError):
                factor = np.array([])
            if factor.size != len(axes_meta):
                raise VolumeError(f"{where}: OME-Zarr {what} 'scale' {t['scale']!r:.60} needs one number per axis "
                                  f"({len(axes_meta)}: {[a.get('name') for a in axes_meta]})")
            scale = scale * factor
    spatial = [i for i, a in enumerate(axes_meta) if a.get("type") == "space" or a.get("name") in ("z", "y", "x")]
    axes = "".join("c" if a.get("type") == "channel" or a.get("name") == "c" else
                   "t" if a.get("type") == "time" else str(a.get("name", "?"))[:1] for a in axes_meta)
    vs = None
    if len(spatial) >= 2:
        vals = [scale[i] * _UNIT_TO_NM.get(str(axes_meta[i].get("unit", "nanometer")).lower(), 1.0) for i in spatial]
        vals = ([vals[0]] if len(vals) == 2 else []) + vals  # 2-D image: z voxel = y voxel
        vs = parse_voxel(vals[-3:], f"{where} multiscales scale")
    return datasets[level]["path"], vs, axes


def open_zarr(root: str, key: str, level: int | None, fill_missing: bool = False) -> Backend:
    import zarr

    where = f"{root}/{key}" if key else root
    meta_files = [".zarray", ".zgroup", "zarr.json"]
    node_dir = Path(root, key)
    if not node_dir.exists():
        raise VolumeError(f"{where}: no such array or group in {root}")
    for name in meta_files:
        f = node_dir / name
        if f.exists():
            try:
                json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise VolumeError(f"{f}: unreadable zarr metadata (bad JSON: {err})") from None
    try:
        node = zarr.open(store=zarr.storage.LocalStore(root, read_only=True), path=key, mode="r")
    except Exception as err:  # noqa: BLE001 - zarr raises many kinds for missing/odd metadata
        raise VolumeError(f"{where}: not a readable zarr array or group ({type(err).__name__}: {err})") from None

    vs, axes, source, n_levels = None, None, None, None
    if isinstance(node, zarr.Group):
        ms = _ome_multiscales(node.attrs, where)
        if ms:
            n_levels = len(ms[0].get("datasets") or [])
            path, vs, axes = _ome_level(ms[0], level or 0, where)
            source = "ome-zarr"
            if (ms[0].get("metadata") or {}).get("voxel_size_known") is False:  # written by convert() unscaled
                vs, source = None, None
            node = node[path]
        else:
            arrays = sorted(name for name, _ in node.arrays())
            if len(arrays) != 1:
                raise VolumeError(f"{where}: is a zarr group, name one of its arrays: {arrays or 'none'}"
                                  + (f"; groups: {sorted(n for n, _ in node.groups())}" if not arrays else ""))
            node = node[arrays[0]]
    elif level is not None and level != 0:
        raise VolumeError(f"{where}: '@{level}' needs an OME-Zarr multiscale group, this is an array")
    if vs is None:
        vs = voxel_from_attrs(node.attrs, where)
        source = "attributes" if vs is not None else None
    arr = node
    chunks = tuple(arr.chunks)
    fill = fill_missing or _sparse_by_design(arr)
    if _stored_raw(arr):  # uncompressed: chunk files are the array's bytes, read straight into the crop
        read = _read_raw_chunks(arr, Path(root, arr.path), where, fill)
    else:
        read = (lambda box: arr[box]) if fill else _read_present(arr, root, where)
    return Backend(tuple(arr.shape), np.dtype(arr.dtype), wrap_read(read, where, chunks), chunks,
                    vs, axes,
                    extra={"voxel_size_source": source, "levels": n_levels})


def _missing_chunk(where: str, key: str, index: tuple[int, ...], grid: tuple[int, ...]) -> VolumeError:
    return VolumeError(f"{where}: chunk {key} (box {tuple(i * g for i, g in zip(index, grid))}) is missing from the "
                       "store; if absent chunks mean the fill value (zarr's write_empty_chunks=False), pass "
                       "--fill-missing (fill_missing=True)")


def _stored_raw(arr: Any) -> bool:
    """Chunks stored as plain C-order bytes of the full chunk shape (no compressor, filter or sharding,
    native byte order), so one file read is one chunk: zarr's per-chunk machinery costs ~10x a memcpy."""
    meta = arr.metadata
    dtype = np.dtype(arr.dtype)
    if dtype.hasobject or getattr(arr, "shards", None) or not dtype.isnative:
        return False
    if meta.zarr_format == 2:
        return meta.compressor is None and not meta.filters and meta.order == "C"
    codecs = [type(c).__name__ for c in meta.codecs]
    endian = getattr(meta.codecs[0], "endian", None) if codecs else None
    native = endian is None or getattr(endian, "value", endian) == sys.byteorder
    return codecs == ["BytesCodec"] and native


def _read_raw_chunks(arr: Any, folder: Path, where: str, fill: bool) -> Callable[[Box], np.ndarray]:
    """``read(box)`` of an uncompressed store: each touched chunk file is read once (``os.read``, no
    pathlib or buffered-file objects: per-chunk overhead is what this path exists to cut) and its overlap
    copied into the output; an absent chunk is the fill value (``fill``) or a VolumeError."""
    chunks, dtype = tuple(arr.chunks), np.dtype(arr.dtype)
    nbytes = math.prod(chunks) * dtype.itemsize
    fill_value = arr.fill_value if arr.fill_value is not None else 0
    encode = arr.metadata.encode_chunk_key
    prefix = os.fspath(folder) + os.sep
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)

    def read(box: Box) -> np.ndarray:
        out = np.empty(tuple(s.stop - s.start for s in box), dtype)
        ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(box, chunks)]
        for index in itertools.product(*ranges):
            key = encode(index)
            src, dst = [], []
            for i, s, c in zip(index, box, chunks):
                lo, hi = max(s.start, i * c), min(s.stop, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - s.start, hi - s.start))
            try:
                fd = os.open(prefix + key, flags)
            except FileNotFoundError:
                if not fill:
                    raise _missing_chunk(where, key, index, chunks) from None
                out[tuple(dst)] = fill_value
                continue
            try:
                data = os.read(fd, nbytes + 1)
            finally:
                os.close(fd)
            if len(data) != nbytes:
                raise VolumeError(f"{where}: chunk {key} holds {len(data)} bytes, an uncompressed chunk of "
                                  f"{chunks} {dtype} needs {nbytes} (truncated or rewritten)")
            out[tuple(dst)] = np.frombuffer(data, dtype).reshape(chunks)[tuple(src)]
        return out

    return read


def _sparse_by_design(arr: Any) -> bool:
    """ssl-em's own sparse outputs (predictions skip masked-out blocks) mark absent chunks as fill."""
    from ssl_em.utils.io import WRITER_KEY

    return (dict(arr.attrs).get(WRITER_KEY) or {}).get("absent_chunks") == "fill"


def _read_present(arr: Any, root: str, where: str) -> Callable[[Box], np.ndarray]:
    """``arr[box]`` after checking that every stored chunk (shard) the box touches exists on disk."""
    grid = tuple(arr.shards or arr.chunks)
    folder = Path(root, arr.path)
    present: set[tuple[int, ...]] = set()  # positive answers only: a chunk may appear later, not vanish

    def read(box: Box) -> np.ndarray:
        ranges = [range(s.start // g, (s.stop - 1) // g + 1) for s, g in zip(box, grid)]
        for index in itertools.product(*ranges):
            if index in present:
                continue
            key = arr.metadata.encode_chunk_key(index)
            if not (folder / key).exists():
                raise _missing_chunk(where, key, index, grid)
            present.add(index)
        return arr[box]

    return read


# -- HDF5 ----------------------------------------------------------------------------------------------
def open_h5(file: str, key: str | None) -> Backend:
    import h5py

    if not Path(file).exists():
        raise VolumeError(f"{file}: no such file")
    try:
        f = h5py.File(file, "r")
    except OSError as err:
        raise VolumeError(f"{file}: not a readable HDF5 file ({err})") from None
    datasets: list[str] = []
    f.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
    if not key:
        if len(datasets) != 1:
            raise VolumeError(f"{file}: name a dataset as {file}:/KEY; available: {datasets or 'none'}")
        key = datasets[0]
    key = key.lstrip("/")
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise VolumeError(f"{file}: no dataset {key!r}; available: {datasets or 'none'}")
    ds = f[key]
    where = f"{file}:/{key}"
    vs = voxel_from_attrs(ds.attrs, where) or voxel_from_attrs(f.attrs, file)
    return Backend(ds.shape, ds.dtype, wrap_read(lambda box: ds[box], where, ds.chunks), ds.chunks, vs,
                    extra={"voxel_size_source": "attributes" if vs else None, "file": f})


# -- N5 (small reader per the N5 file-system spec: zarr 3 has no N5 store) -------------------------------
_N5_DTYPES = {t: np.dtype(t).newbyteorder(">") for t in
              ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64")}


def _n5_decompress(data: bytes, compression: dict, where: str) -> bytes:
    kind = compression.get("type", "raw")
    if kind == "raw":
        return data
    if kind == "gzip":
        import zlib

        # N5 writes gzip by default and a zlib stream when "useZlib" is set; wbits=47 accepts both
        return zlib.decompress(data, 47) if compression.get("useZlib") else gzip.decompress(data)
    if kind in {"zstd", "blosc", "bzip2", "xz", "lz4"}:
        import numcodecs

        codec = {"zstd": "zstd", "blosc": "blosc", "bzip2": "bz2", "xz": "lzma", "lz4": "lz4"}[kind]
        try:
            return bytes(numcodecs.get_codec({"id": codec}).decode(data))
        except Exception as err:  # noqa: BLE001
            raise VolumeError(f"{where}: cannot decode N5 {kind} block ({err})") from None
    raise VolumeError(f"{where}: unsupported N5 compression {kind!r}")


def open_n5(root: str, key: str) -> Backend:
    ds_dir = Path(root, key)
    where = f"{root}/{key}" if key else root
    attrs_file = ds_dir / "attributes.json"
    if not attrs_file.exists():
        subs = sorted(p.parent.relative_to(root).as_posix() for p in Path(root).rglob("attributes.json")
                      if "dimensions" in p.read_text(errors="ignore"))
        raise VolumeError(f"{where}: no N5 dataset here; datasets: {subs or 'none'}")
    try:
        attrs = json.loads(attrs_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VolumeError(f"{attrs_file}: unreadable N5 metadata (bad JSON: {err})") from None
    if "dimensions" not in attrs:
        subs = sorted(p.parent.relative_to(ds_dir).as_posix() for p in ds_dir.rglob("attributes.json")
                      if p.parent != ds_dir)
        raise VolumeError(f"{where}: is an N5 group, name one of its datasets: {subs or 'none'}")
    if attrs.get("dataType") not in _N5_DTYPES:
        raise VolumeError(f"{attrs_file}: unsupported N5 dataType {attrs.get('dataType')!r}")
    # N5 lists dimensions fastest-first (x, y, z); numpy order is the reverse
    shape = tuple(int(d) for d in attrs["dimensions"][::-1])
    block = tuple(int(b) for b in attrs["blockSize"][::-1])
    dtype = _N5_DTYPES[attrs["dataType"]]
    compression = attrs.get("compression") or {"type": attrs.get("compressionType", "raw")}

    def read_block(grid: tuple[int, ...]) -> np.ndarray:
        path = ds_dir.joinpath(*(str(g) for g in grid[::-1]))
        full = tuple(min(b, s - g * b) for g, b, s in zip(grid, block, shape))
        if not path.exists():  # N5 datasets are sparse: a missing block is fill (0)
            return np.zeros(full, dtype.newbyteorder("="))
        raw = path.read_bytes()
        mode, nd = np.frombuffer(raw[:4], ">u2")
        dims = tuple(int(d) for d in np.frombuffer(raw[4:4 + 4 * nd], ">u4"))[::-1]
        offset = 4 + 4 * nd + (4 if mode == 1 else 0)
        data = np.frombuffer(_n5_decompress(raw[offset:], compression, f"{where} block {grid}"), dtype)
        return data[: int(np.prod(dims))].reshape(dims).astype(dtype.newbyteorder("="))

    def read(box: Box) -> np.ndarray:
        out = np.zeros(tuple(s.stop - s.start for s in box), dtype.newbyteorder("="))
        ranges = [range(s.start // b, (s.stop - 1) // b + 1) for s, b in zip(box, block)]
        for grid in np.ndindex(*(len(r) for r in ranges)):
            g = tuple(r[i] for r, i in zip(ranges, grid))
            data = read_block(g)
            src, dst = [], []
            for gi, b, s, n in zip(g, block, box, data.shape):
                lo, hi = max(s.start, gi * b), min(s.stop, gi * b + n)
                src.append(slice(lo - gi * b, hi - gi * b))
                dst.append(slice(lo - s.start, hi - s.start))
            out[tuple(dst)] = data[tuple(src)]
        return out

    vs = voxel_from_attrs(attrs, where, reverse=True)
    return Backend(shape, dtype.newbyteorder("="), wrap_read(read, where, block), block, vs,
                    extra={"voxel_size_source": "attributes" if vs else None})


# -- TIFF, slice folders, npz -----------------------------------------------------------------------------
def open_tiff(path: Path) -> Backend:
    import tifffile

    try:
        return array_backend(tifffile.memmap(path, mode="r"))  # uncompressed, contiguous: truly lazy
    except Exception:  # noqa: BLE001 - compressed or tiled: fall through to page reads
        pass
    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
    except Exception as err:  # noqa: BLE001
        raise VolumeError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})") from None
    shape, pages = tuple(series.shape), tif.pages
    if len(shape) == 3 and len(pages) >= shape[0] and tuple(pages[0].shape) == shape[1:]:
        def read(box: Box) -> np.ndarray:  # one page per z: decode only the planes asked for
            return np.stack([pages[z].asarray()[box[1:]] for z in range(box[0].start, box[0].stop)])

        return Backend(shape, series.dtype, wrap_read(read, str(path)), (1, *shape[1:]))
    cached = _cached_loader(lambda: series.asarray())
    return Backend(shape, series.dtype, wrap_read(lambda box: cached()[box], str(path)))


def _cached_loader(fn: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    return lru_cache(maxsize=1)(fn)


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def open_slices(folder: Path) -> Backend:
    files = [p for p in folder.iterdir() if p.suffix.lower() in _SLICE_SUFFIXES and not p.name.startswith(".")]
    if not files:
        raise VolumeError(f"{folder}: folder holds no .png/.tif/.tiff slices")

    def order(p: Path) -> tuple[int, str]:
        digits = re.findall(r"\d+", p.stem)
        return (int(digits[-1]) if digits else -1, p.name)

    files.sort(key=order)
    first = _read_image(files[0])
    if first.ndim != 2:
        raise VolumeError(f"{files[0]}: slice has shape {first.shape}; expected a 2-D grayscale image")

    def read(box: Box) -> np.ndarray:
        planes = []
        for z in range(box[0].start, box[0].stop):
            img = _read_image(files[z])
            if img.shape != first.shape:
                raise VolumeError(f"{files[z]}: slice shape {img.shape} differs from {files[0].name} {first.shape}")
            planes.append(img[box[1:]])
        return np.stack(planes)

    return Backend((len(files), *first.shape), first.dtype, wrap_read(read, str(folder)), (1, *first.shape))


@lru_cache(maxsize=8)
def _npz_member(file: str, key: str, mtime: float) -> np.ndarray:
    """npz members are compressed: decompress one array once per process (keyed by mtime) and keep it."""
    with np.load(file, allow_pickle=False) as d:
        arr = d[key]
    arr.setflags(write=False)
    return arr


def open_npz(file: str, key: str | None) -> Backend:
    if not Path(file).exists():
        raise VolumeError(f"{file}: no such file")
    try:
        with np.load(file, allow_pickle=False) as d:
            keys = list(d.files)
            res = np.asarray(d["resolution_nm"], dtype=float) if "resolution_nm" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise VolumeError(f"{file}: not a readable .npz archive, truncated or corrupt ({err})") from None
    arrays = [k for k in keys if k != "resolution_nm"]
    if not key:
        if len(arrays) != 1:
            raise VolumeError(f"{file}: name an array as {file}:KEY; available: {arrays}")
        key = arrays[0]
    if key not in keys:
        raise VolumeError(f"{file}: no array {key!r}; available: {arrays}")
    mtime = os.path.getmtime(file)
    # shape/dtype from the member header without decompressing the data
    with zipfile.ZipFile(file) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
    vs = parse_voxel(res, f"{file}:resolution_nm") if res is not None else None
    return Backend(tuple(shape), np.dtype(dtype), wrap_read(lambda box: _npz_member(file, key, mtime)[box], file),
                   None, vs, extra={"voxel_size_source": "resolution_nm" if vs else None})

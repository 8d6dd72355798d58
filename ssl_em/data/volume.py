"""Lazy, voxel-size-aware EM volumes behind one small handle: :func:`open_volume` -> :class:`Volume`.

Spec forms (a ``str`` or path; a :class:`Volume` is returned as is; a numpy array is wrapped in memory)::

    a.zarr   a.zarr/grp/arr          zarr v2 or v3 array (or a group holding exactly one array)
    a.ome.zarr   a.ome.zarr@2        OME-Zarr multiscale group (NGFF 0.4 on zarr v2, 0.5 on zarr v3), level 2
    f.h5:/ds   f.hdf5:ds   f.hdf     HDF5 dataset (the key may be left out where the file holds one)
    a.n5/ds                          N5 dataset (raw/gzip/zstd/blosc blocks, read per the N5 spec)
    f.tif   f.tiff                   multi-page TIFF (memory-mapped, else read page by page)
    folder/                          PNG/TIFF slices, ordered by the number in the file name, read lazily
    f.npz:key                        npz member (decompressed once per process on first access, then cached)
    f.npy                            ``np.load(mmap_mode="r")``

Axis order is (z, y, x) and voxel sizes are (z, y, x) in nanometres. A 4-D array is ``"czyx"``
(channel first). A 2-D image is presented as a single-section ``(1, y, x)`` volume so every consumer
sees 3-D; the file itself is untouched. Voxel size comes from: the ``voxel_size`` argument > OME-Zarr
``coordinateTransformations`` > ``resolution``/``voxel_size``/``pixelResolution`` attributes (zarr, h5:
z, y, x order; N5: x, y, z order by N5 convention, reversed here) > an npz member ``resolution_nm`` >
(1, 1, 1) with ``voxel_size_known = False``.

A zarr chunk that is absent from the store is an error by default (``fill_missing=True`` reads it as the
fill value, as zarr does): a copy cut short or a lost file would otherwise train and predict on zeros.
Stores ssl-em wrote sparsely on purpose (predictions: masked-out blocks) say so and read as filled.

Slicing (``vol[z0:z1, y0:y1, x0:x1]``, ints, steps, ``...``) reads only the bounding box of the request.
A Volume pickles to ``(spec, voxel_size)`` and reopens its file on first access in the receiving
process (and after a fork), so it can go to DataLoader workers of either start method.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import re
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
class _Backend:
    """What a format reader hands the Volume: raw array facts plus a box reader."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[Box], np.ndarray]
    chunks: tuple[int, ...] | None = None
    voxel_size: tuple[float, float, float] | None = None  # from metadata, nm, (z, y, x)
    axes: str | None = None  # from metadata (OME-Zarr axes), else inferred
    extra: dict[str, Any] = field(default_factory=dict)


class Volume:
    """A lazy (z, y, x) or (c, z, y, x) EM volume; see the module docstring for spec forms.

    Attributes: ``spec`` (str), ``shape``, ``dtype``, ``ndim``, ``voxel_size`` (z, y, x nm),
    ``voxel_size_known``, ``voxel_size_source`` ("argument", "ome-zarr", "attributes", "resolution_nm"
    or "default"), ``axes`` ("zyx" or "czyx"), ``chunks`` (storage chunk shape or None).
    """

    def __init__(self, spec: str | os.PathLike | np.ndarray, voxel_size: Any = None,
                 fill_missing: bool = False) -> None:
        self._array = np.asarray(spec) if isinstance(spec, np.ndarray) else None
        self.fill_missing = bool(fill_missing)
        self.spec = f"<array {self._array.shape} {self._array.dtype}>" if self._array is not None else str(spec)
        self._voxel_arg = _parse_voxel(voxel_size, self.spec) if voxel_size is not None else None
        self._backend_obj: _Backend | None = None
        self._pid = -1
        self._describe()  # open now so errors surface at open_volume time, not in a worker

    # -- opening ----------------------------------------------------------------------------------
    def _backend(self) -> _Backend:
        # h5py / file handles must not cross a fork: reopen in a new process
        if self._backend_obj is None or self._pid != os.getpid():
            self._backend_obj = (_array_backend(self._array) if self._array is not None
                                 else _open_backend(self.spec, self.fill_missing))
            self._pid = os.getpid()
        return self._backend_obj

    def _describe(self) -> None:
        b = self._backend()
        raw_ndim = len(b.shape)
        self._expand = raw_ndim == 2  # 2-D image -> (1, y, x)
        if raw_ndim == 2:
            shape, axes, chunks = (1, *b.shape), "zyx", (1, *b.chunks) if b.chunks else None
        elif raw_ndim == 3 and b.shape[-1] in (3, 4) and min(b.shape[:2]) > 4 * b.shape[-1]:
            raise VolumeError(f"{self.spec}: array of shape {tuple(b.shape)} looks like one RGB(A) image (y, x, c), "
                              f"not (z, y, x): pick one channel, e.g. array[..., 0], or save it as greyscale")
        elif raw_ndim == 3:
            shape, axes, chunks = b.shape, "zyx", b.chunks
        elif raw_ndim == 4 and (b.axes == "czyx" or (b.axes is None and b.shape[0] <= 4)):
            shape, axes, chunks = b.shape, "czyx", b.chunks
        elif raw_ndim == 4 and b.axes is None and b.shape[-1] <= 4:
            raise VolumeError(f"{self.spec}: 4-D array of shape {tuple(b.shape)} looks channels-last (z, y, x, c): "
                              f"pick one channel, e.g. np.save('ch0.npy', array[..., 0]) and use ch0.npy, or pass "
                              f"array[..., 0] (or np.moveaxis(array, -1, 0) for (c, z, y, x)) from Python")
        elif raw_ndim == 4:
            why = f"axes {b.axes!r}" if b.axes else f"first axis {b.shape[0]} > 4 is not a channel axis"
            raise VolumeError(f"{self.spec}: 4-D array of shape {tuple(b.shape)} is not a (c, z, y, x) volume ({why})")
        else:
            raise VolumeError(f"{self.spec}: {raw_ndim}-D array of shape {tuple(b.shape)}; expected 2-D, 3-D or 4-D")
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype = np.dtype(b.dtype)
        self.ndim = len(self.shape)
        self.axes = axes
        self.chunks = tuple(int(c) for c in chunks) if chunks else None
        vs = self._voxel_arg or b.voxel_size
        self.voxel_size_known = vs is not None
        self.voxel_size: tuple[float, float, float] = tuple(vs) if vs is not None else (1.0, 1.0, 1.0)
        if b.extra.get("voxel_size_source") and self._voxel_arg is None:
            self.voxel_size_source = b.extra["voxel_size_source"]
        else:
            self.voxel_size_source = "argument" if self._voxel_arg else "default"

    # -- pickling: a small handle that reopens lazily --------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = {"spec": self.spec, "voxel_size": self._voxel_arg, "fill_missing": self.fill_missing}
        if self._array is not None:  # nothing to reopen: the data travels
            state["array"] = self._array
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._array = state.get("array")
        self.spec = state["spec"]
        self._voxel_arg = state["voxel_size"]
        self.fill_missing = state.get("fill_missing", False)
        self._backend_obj, self._pid = None, -1
        self._described = False

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not yet set, i.e. metadata of an unpickled handle
        if name in {"shape", "dtype", "ndim", "axes", "chunks", "voxel_size", "voxel_size_known",
                    "voxel_size_source", "_expand"} and not self.__dict__.get("_described", True):
            self.__dict__["_described"] = True
            self._describe()
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # -- reading ------------------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> np.ndarray:
        """Numpy basic indexing; reads only the bounding box of the request from storage."""
        box, local = _normalise_index(key, self.shape, self.spec)
        if any(s.stop <= s.start for s in box):
            return np.zeros(tuple(max(0, s.stop - s.start) for s in box), self.dtype)[local]
        read_box = box[1:] if self._expand else box
        data = np.asarray(self._backend().read(read_box))
        if self._expand:
            data = data[None]
        return data[local]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data.astype(dtype, copy=False) if dtype is not None else data

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        vs = "x".join(f"{v:g}" for v in self.voxel_size) + (" nm" if self.voxel_size_known else " (unknown)")
        return (f"Volume({self.spec!r}, shape={self.shape}, dtype={self.dtype}, axes={self.axes!r}, "
                f"voxel_size={vs}, chunks={self.chunks})")


def open_volume(spec: str | os.PathLike | np.ndarray | Volume, voxel_size: Any = None,
                fill_missing: bool = False) -> Volume:
    """Open ``spec`` lazily; ``voxel_size`` (z, y, x nm, or one number) overrides file metadata;
    ``fill_missing`` reads absent zarr chunks as the fill value instead of raising VolumeError."""
    if isinstance(spec, Volume):
        if voxel_size is None and fill_missing == spec.fill_missing:
            return spec
        return Volume(spec._array if spec._array is not None else spec.spec,
                      voxel_size if voxel_size is not None else spec._voxel_arg, fill_missing)
    return Volume(spec, voxel_size, fill_missing)


# -- index handling --------------------------------------------------------------------------------
def _normalise_index(key: Any, shape: tuple[int, ...], spec: str) -> tuple[Box, tuple[Any, ...]]:
    """Split a basic numpy index into a storage box (step 1) and a local index applied after reading."""
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        raise VolumeError(f"{spec}: an index can hold only one '...'")
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    if len(key) > len(shape):
        raise VolumeError(f"{spec}: too many indices ({len(key)}) for a volume of shape {shape}")
    key = key + (slice(None),) * (len(shape) - len(key))
    box, local = [], []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"{spec}: index {int(k)} out of range for axis of size {n}")
            box.append(slice(i, i + 1))
            local.append(0)
        elif isinstance(k, slice):
            r = range(*k.indices(n))
            if len(r) == 0:
                box.append(slice(0, 0))
                local.append(slice(None))
                continue
            lo, hi = min(r[0], r[-1]), max(r[0], r[-1]) + 1
            box.append(slice(lo, hi))
            end = r[-1] - lo + (1 if r.step > 0 else -1)
            local.append(slice(r[0] - lo, None if end < 0 else end, r.step))
        else:
            raise VolumeError(f"{spec}: unsupported index {k!r}; use ints, slices and '...'")
    return tuple(box), tuple(local)


# -- helpers ------------------------------------------------------------------------------------------
def _parse_voxel(value: Any, where: str) -> tuple[float, float, float]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,x\s]+", value.strip()) if v]
    vals = np.atleast_1d(np.asarray(value, dtype=float)).ravel()
    if vals.size == 1:
        vals = np.repeat(vals, 3)
    if vals.size != 3 or not np.all(np.isfinite(vals)) or np.any(vals <= 0):
        raise VolumeError(f"{where}: voxel size {value!r} must be three positive numbers (z, y, x nm)")
    return tuple(float(v) for v in vals)  # type: ignore[return-value]


def _voxel_from_attrs(attrs: Any, where: str, *, reverse: bool = False) -> tuple[float, float, float] | None:
    """Read resolution/voxel_size/pixelResolution (list or {"dimensions": [...], "unit": ...}) in nm."""
    for name in _VOXEL_ATTRS:
        if name not in attrs:
            continue
        value, scale = attrs[name], 1.0
        if isinstance(value, dict):  # N5/BigCAT style {"dimensions": [x, y, z], "unit": "um"}
            scale = _UNIT_TO_NM.get(str(value.get("unit", "nm")).lower(), 1.0)
            value = value.get("dimensions")
        vals = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=float))][-3:]
        if reverse:
            vals = vals[::-1]
        return _parse_voxel([v * scale for v in vals], f"{where} attribute {name!r}")
    return None


def _wrap_read(fn: Callable[[Box], np.ndarray], where: str, chunks: Any = None) -> Callable[[Box], np.ndarray]:
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


def _array_backend(arr: Any, voxel_size: Any = None, source: str | None = None) -> _Backend:
    return _Backend(tuple(arr.shape), arr.dtype, lambda box: np.asarray(arr[box]), None, voxel_size,
                    extra={"voxel_size_source": source} if voxel_size is not None else {})


_STORE_SPEC = r"^(.*\.(?:zarr|n5))(?:/(.*?))?/?(?:@(\d+))?$"  # root.zarr[/key][@level]
_H5_SPEC = r"^(.*\.(?:h5|hdf5|hdf))(?::(.*))?$"  # file.h5[:key]
_NPZ_SPEC = r"^(.*\.npz)(?::(.*))?$"  # file.npz[:key]


def spec_path(spec: Any) -> Path | None:
    """The file or store folder a volume spec reads (None for in-memory arrays): what an output may
    not be, contain or sit inside."""
    if isinstance(spec, Volume):
        spec = None if spec._array is not None else spec.spec
    if not isinstance(spec, (str, os.PathLike)):
        return None
    text = os.fspath(spec)
    for pattern, flags in ((_STORE_SPEC, 0), (_H5_SPEC, re.IGNORECASE), (_NPZ_SPEC, re.IGNORECASE)):
        m = re.match(pattern, text, flags=flags)
        if m:
            return Path(m.group(1))
    return Path(text)


def _open_backend(spec: str, fill_missing: bool = False) -> _Backend:
    """Dispatch on the spec's form; every user mistake becomes a one-line VolumeError."""
    level = None
    m = re.match(_STORE_SPEC, spec)
    if m:
        root, key, level = m.group(1), m.group(2) or "", m.group(3)
        if not Path(root).exists():
            raise VolumeError(f"{root}: no such file or directory")
        if root.endswith(".n5"):
            return _open_n5(root, key)
        return _open_zarr(root, key, int(level) if level is not None else None, fill_missing)
    m = re.match(_H5_SPEC, spec, flags=re.IGNORECASE)
    if m:
        return _open_h5(m.group(1), m.group(2))
    m = re.match(_NPZ_SPEC, spec, flags=re.IGNORECASE)
    if m:
        return _open_npz(m.group(1), m.group(2))
    path = Path(spec)
    if not path.exists():
        raise VolumeError(f"{spec}: no such file or directory")
    suffix = path.suffix.lower()
    if path.is_dir():  # a zarr / N5 store without the usual suffix, else a folder of slices
        if any((path / m).exists() for m in (".zarray", ".zgroup", "zarr.json")):
            return _open_zarr(spec, "", None, fill_missing)
        if (path / "attributes.json").exists():
            return _open_n5(spec, "")
        return _open_slices(path)
    if suffix == ".npy":
        try:
            return _array_backend(np.load(path, mmap_mode="r", allow_pickle=False))
        except ValueError as err:
            raise VolumeError(f"{spec}: not a readable .npy array ({err})") from None
    if suffix in {".tif", ".tiff"}:
        return _open_tiff(path)
    raise VolumeError(f"{spec}: unknown volume format {suffix or '(no suffix)'!r}; expected .zarr, .ome.zarr, "
                      ".h5/.hdf5/.hdf, .n5, .tif/.tiff, .npz, .npy or a folder of slices")


# -- zarr / OME-Zarr ---------------------------------------------------------------------------------
def _ome_multiscales(attrs: Any) -> list[dict] | None:
    if "ome" in attrs and isinstance(attrs["ome"], dict):  # NGFF 0.5 (zarr v3)
        return attrs["ome"].get("multiscales")
    return attrs.get("multiscales")  # NGFF <= 0.4


def _ome_level(ms: dict, level: int, where: str) -> tuple[str, tuple[float, float, float] | None, str]:
    """Dataset path, voxel size (nm, z y x) and axes string for one multiscale level."""
    datasets = ms.get("datasets") or []
    if not 0 <= level < len(datasets):
        raise VolumeError(f"{where}: no multiscale level {level}; levels are 0..{len(datasets) - 1}")
    axes_meta = ms.get("axes") or [{"name": n} for n in "zyx"[-3:]]
    axes_meta = [{"name": a} if isinstance(a, str) else a for a in axes_meta]
    scale = np.ones(len(axes_meta))
    for transforms in (datasets[level].get("coordinateTransformations") or [],
                       ms.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and "scale" in t:
                scale = scale * np.asarray(t["scale"], dtype=float)
    spatial = [i for i, a in enumerate(axes_meta) if a.get("type") == "space" or a.get("name") in ("z", "y", "x")]
    axes = "".join("c" if a.get("type") == "channel" or a.get("name") == "c" else
                   "t" if a.get("type") == "time" else str(a.get("name", "?"))[:1] for a in axes_meta)
    vs = None
    if len(spatial) >= 2:
        vals = [scale[i] * _UNIT_TO_NM.get(str(axes_meta[i].get("unit", "nanometer")).lower(), 1.0) for i in spatial]
        vals = ([vals[0]] if len(vals) == 2 else []) + vals  # 2-D image: z voxel = y voxel
        vs = _parse_voxel(vals[-3:], f"{where} multiscales scale")
    return datasets[level]["path"], vs, axes


def _open_zarr(root: str, key: str, level: int | None, fill_missing: bool = False) -> _Backend:
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
        ms = _ome_multiscales(node.attrs)
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
        vs = _voxel_from_attrs(node.attrs, where)
        source = "attributes" if vs is not None else None
    arr = node
    chunks = tuple(arr.chunks)
    read = (lambda box: arr[box]) if fill_missing or _sparse_by_design(arr) else _read_present(arr, root, where)
    return _Backend(tuple(arr.shape), np.dtype(arr.dtype), _wrap_read(read, where, chunks), chunks,
                    vs, axes,
                    extra={"voxel_size_source": source, "levels": n_levels})


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
                raise VolumeError(f"{where}: chunk {key} (box {tuple(i * g for i, g in zip(index, grid))}) is missing "
                                  "from the store; if absent chunks mean the fill value (zarr's write_empty_chunks="
                                  "False), pass --fill-missing (fill_missing=True)")
            present.add(index)
        return arr[box]

    return read


# -- HDF5 ----------------------------------------------------------------------------------------------
def _open_h5(file: str, key: str | None) -> _Backend:
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
    vs = _voxel_from_attrs(ds.attrs, where) or _voxel_from_attrs(f.attrs, file)
    return _Backend(ds.shape, ds.dtype, _wrap_read(lambda box: ds[box], where, ds.chunks), ds.chunks, vs,
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


def _open_n5(root: str, key: str) -> _Backend:
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

    vs = _voxel_from_attrs(attrs, where, reverse=True)
    return _Backend(shape, dtype.newbyteorder("="), _wrap_read(read, where, block), block, vs,
                    extra={"voxel_size_source": "attributes" if vs else None})


# -- TIFF, slice folders, npz -----------------------------------------------------------------------------
def _open_tiff(path: Path) -> _Backend:
    import tifffile

    try:
        return _array_backend(tifffile.memmap(path, mode="r"))  # uncompressed, contiguous: truly lazy
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

        return _Backend(shape, series.dtype, _wrap_read(read, str(path)), (1, *shape[1:]))
    cached = _cached_loader(lambda: series.asarray())
    return _Backend(shape, series.dtype, _wrap_read(lambda box: cached()[box], str(path)))


def _cached_loader(fn: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    return lru_cache(maxsize=1)(fn)


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _open_slices(folder: Path) -> _Backend:
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

    return _Backend((len(files), *first.shape), first.dtype, _wrap_read(read, str(folder)), (1, *first.shape))


@lru_cache(maxsize=8)
def _npz_member(file: str, key: str, mtime: float) -> np.ndarray:
    """npz members are compressed: decompress one array once per process (keyed by mtime) and keep it."""
    with np.load(file, allow_pickle=False) as d:
        arr = d[key]
    arr.setflags(write=False)
    return arr


def _open_npz(file: str, key: str | None) -> _Backend:
    if not Path(file).exists():
        raise VolumeError(f"{file}: no such file")
    try:
        with np.load(file, allow_pickle=False) as d:
            keys = list(d.files)
            res = np.asarray(d["resolution_nm"], dtype=float) if "resolution_nm" in keys else None
    except (OSError, ValueError) as err:
        raise VolumeError(f"{file}: not a readable .npz archive ({err})") from None
    arrays = [k for k in keys if k != "resolution_nm"]
    if not key:
        if len(arrays) != 1:
            raise VolumeError(f"{file}: name an array as {file}:KEY; available: {arrays}")
        key = arrays[0]
    if key not in keys:
        raise VolumeError(f"{file}: no array {key!r}; available: {arrays}")
    mtime = os.path.getmtime(file)
    # shape/dtype from the member header without decompressing the data
    import zipfile

    with zipfile.ZipFile(file) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
    vs = _parse_voxel(res, f"{file}:resolution_nm") if res is not None else None
    return _Backend(tuple(shape), np.dtype(dtype), lambda box: _npz_member(file, key, mtime)[box], None, vs,
                    extra={"voxel_size_source": "resolution_nm" if vs else None})


# -- CLI ---------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    """``ssl-em info SPEC [--voxel-size Z,Y,X]``: print what a volume spec resolves to."""
    parser = argparse.ArgumentParser(prog="ssl-em info", description="Print shape, dtype, axes, voxel size "
                                     "and chunks of a volume spec (see ssl_em.data.volume for spec forms).")
    parser.add_argument("spec", nargs="+", help="volume spec(s), e.g. a.ome.zarr@1, f.h5:/raw, f.npz:raw")
    parser.add_argument("--voxel-size", default=None, help="override, nm as Z,Y,X")
    args = parser.parse_args(argv)
    for spec in args.spec:
        vol = open_volume(spec, args.voxel_size)
        vs = ", ".join(f"{v:g}" for v in vol.voxel_size)
        size = int(np.prod(vol.shape)) * vol.dtype.itemsize
        print(f"{vol.spec}\n  shape       {vol.shape}  ({size / 2**20:.1f} MiB)\n  dtype       {vol.dtype}\n"
              f"  axes        {vol.axes}\n  voxel size  ({vs}) nm  [{vol.voxel_size_source}"
              f"{'' if vol.voxel_size_known else ', not in the file: pass --voxel-size'}]\n"
              f"  chunks      {vol.chunks or 'none (not chunked)'}")
        levels = vol._backend().extra.get("levels")
        if levels:
            print(f"  levels      {levels} (OME-Zarr multiscale; open level k as SPEC@k)")
    return 0

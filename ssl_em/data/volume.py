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

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.data.formats import (
    Backend, array_backend, open_h5, open_n5, open_npz, open_slices, open_tiff, open_zarr, parse_voxel,
)
from ssl_em.errors import ArgumentParser, ConfigError, VolumeError

Box = tuple[slice, ...]



def check_voxel_dtype(dtype: Any, where: str) -> None:
    """Voxels are numbers (bool, integers, floats): object, string, structured or complex arrays are refused."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        what = "Python objects" if dtype.hasobject else f"dtype {dtype}"
        raise VolumeError(f"{where}: holds {what}, not voxel intensities or labels; save a numeric array, e.g. "
                          "np.save(path, np.asarray(volume, dtype=np.uint8))")


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
        self._voxel_arg = parse_voxel(voxel_size, self.spec) if voxel_size is not None else None
        self._backend_obj: Backend | None = None
        self._pid = -1
        self._describe()  # open now so errors surface at open_volume time, not in a worker

    # -- opening ----------------------------------------------------------------------------------
    def _backend(self) -> Backend:
        # h5py / file handles must not cross a fork: reopen in a new process
        if self._backend_obj is None or self._pid != os.getpid():
            self._backend_obj = (array_backend(self._array) if self._array is not None
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
        elif raw_ndim == 4 and b.axes is None and b.shape[0] <= 4 and b.shape[-1] <= 4:
            raise VolumeError(f"{self.spec}: 4-D array of shape {tuple(b.shape)} could be channels first (c, z, y, x) or "
                              f"last (z, y, x, c) and names no axes: pass one channel (array[0] or array[..., 0]), or "
                              f"np.moveaxis(array, -1, 0) for channels last")
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
        check_voxel_dtype(b.dtype, self.spec)
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

def _open_backend(spec: str, fill_missing: bool = False) -> Backend:
    """Dispatch on the spec's form; every user mistake becomes a one-line VolumeError."""
    level = None
    m = re.match(_STORE_SPEC, spec)
    if m:
        root, key, level = m.group(1), m.group(2) or "", m.group(3)
        if not Path(root).exists():
            raise VolumeError(f"{root}: no such file or directory")
        if root.endswith(".n5"):
            return open_n5(root, key)
        return open_zarr(root, key, int(level) if level is not None else None, fill_missing)
    m = re.match(_H5_SPEC, spec, flags=re.IGNORECASE)
    if m:
        return open_h5(m.group(1), m.group(2))
    m = re.match(_NPZ_SPEC, spec, flags=re.IGNORECASE)
    if m:
        return open_npz(m.group(1), m.group(2))
    path = Path(spec)
    if not path.exists():
        raise VolumeError(f"{spec}: no such file or directory")
    suffix = path.suffix.lower()
    if path.is_dir():  # a zarr / N5 store without the usual suffix, else a folder of slices
        if any((path / m).exists() for m in (".zarray", ".zgroup", "zarr.json")):
            return open_zarr(spec, "", None, fill_missing)
        if (path / "attributes.json").exists():
            return open_n5(spec, "")
        return open_slices(path)
    if suffix == ".npy":
        try:
            with open(path, "rb") as f:  # the header first: an object array cannot be memory-mapped
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                dtype = read_header(f)[2]
            check_voxel_dtype(dtype, spec)
            return array_backend(np.load(path, mmap_mode="r", allow_pickle=False))
        except ValueError as err:
            raise VolumeError(f"{spec}: not a readable .npy array ({err})") from None
    if suffix in {".tif", ".tiff"}:
        return open_tiff(path)
    raise VolumeError(f"{spec}: unknown volume format {suffix or '(no suffix)'!r}; expected .zarr, .ome.zarr, "
                      ".h5/.hdf5/.hdf, .n5, .tif/.tiff, .npz, .npy or a folder of slices")

# -- one way from a spec or array to something sliceable -------------------------------------------
def as_volume(spec: Any, voxel_size: Any = None, fill_missing: bool = False, what: str = "input") -> Any:
    """A volume-like from ``spec``: strings and paths go through :func:`open_volume`; arrays with
    ``shape``, ``dtype`` and slicing (numpy, zarr, h5py, :class:`Volume`, :class:`Region`) pass through."""
    if isinstance(spec, (str, os.PathLike)):
        return open_volume(spec, voxel_size=voxel_size, fill_missing=fill_missing)
    if all(hasattr(spec, a) for a in ("shape", "dtype", "__getitem__")):
        return spec
    raise VolumeError(f"{what} {type(spec).__name__} is not a volume: pass a path/spec or an array with "
                      ".shape, .dtype and slicing")


def volume_name(vol: Any) -> str:
    return str(getattr(vol, "spec", None) or f"<{type(vol).__name__} {tuple(vol.shape)}>")


def voxel_size_of(vol: Any, override: Sequence[float] | None = None) -> tuple[float, float, float] | None:
    """Voxel size (z, y, x) in nm: the override, else ``vol.voxel_size`` where the volume knows it."""
    vs = override if override is not None else getattr(vol, "voxel_size", None)
    if vs is None or (override is None and getattr(vol, "voxel_size_known", True) is False):  # a (1,1,1) default
        return None
    vs = tuple(float(v) for v in vs)
    if len(vs) != 3 or min(vs) <= 0:
        raise ConfigError(f"voxel size {vs} of {volume_name(vol)} must be three positive numbers (z, y, x) in nm")
    return vs  # type: ignore[return-value]


class Region:
    """A (z, y, x) box of a volume, itself volume-like and lazy: ``shape`` is ``(*lead, *box size)``
    (leading channel axes of a (c, z, y, x) volume kept), numpy slicing (ints, slices with steps,
    ``...``) reads relative to the box's origin and only what it asks for; ``voxel_size`` passes through."""

    def __init__(self, vol: Any, box: Box | None = None) -> None:
        full = tuple(int(n) for n in vol.shape[-3:])
        box = tuple(slice(0, n) for n in full) if box is None else tuple(box)
        starts = tuple(int(b.start or 0) for b in box)
        stops = tuple(int(b.stop if b.stop is not None else n) for b, n in zip(box, full))
        if len(box) != 3 or any(not 0 <= a <= b <= n for a, b, n in zip(starts, stops, full)):
            raise VolumeError(f"{volume_name(vol)}: box {box} is not a (z, y, x) box inside shape {full}")
        self.vol, self.offset = vol, starts
        self.box = tuple(slice(a, b) for a, b in zip(starts, stops))
        self.shape = (*(int(n) for n in vol.shape[:-3]), *(b - a for a, b in zip(starts, stops)))
        self.dtype = getattr(vol, "dtype", None)
        self.spec = volume_name(vol)
        self.voxel_size = getattr(vol, "voxel_size", None)
        self.voxel_size_known = getattr(vol, "voxel_size_known", self.voxel_size is not None)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (len(self.shape) - len(key) + 1) + key[i + 1:]
        key = key + (slice(None),) * (len(self.shape) - len(key))
        nlead = len(self.shape) - 3
        moved = []
        for k, o, n in zip(key[nlead:], self.offset, self.shape[nlead:]):
            if isinstance(k, (int, np.integer)):
                moved.append(o + range(n)[k])
            else:
                r = range(*k.indices(n))
                end = o + r[-1] + (1 if r.step > 0 else -1) if r else o
                moved.append(slice(o + r[0], end if end >= 0 else None, r.step) if r else slice(o, o))
        return np.asarray(self.vol[(*key[:nlead], *moved)])

# -- CLI ---------------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    """``ssl-em info SPEC [--voxel-size Z,Y,X]``: print what a volume spec resolves to."""
    parser = ArgumentParser(prog="ssl-em info", description="Print shape, dtype, axes, voxel size "
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

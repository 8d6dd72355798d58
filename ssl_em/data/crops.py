"""Intensity normalisation, crop samplers and crop datasets over (lazy) EM volumes.

A *volume* here is anything with ``.shape`` and numpy slicing (a numpy array, an
:class:`ssl_em.data.volume.Volume`, an h5py/zarr array); strings and paths are opened with
:func:`ssl_em.data.volume.open_volume`. Axis order is (z, y, x) and voxel sizes are nanometres.

Randomness: every crop draws from ``np.random.default_rng((seed, epoch, index))``, so the same
seed gives the same crops whatever the number of DataLoader workers, and no worker-seeding
hook is needed. With persistent workers the epoch must come from the main process: use
:class:`EpochSampler` (Lightning calls its ``set_epoch``) which folds the epoch into the index.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from ssl_em.errors import ConfigError, LabelError, VolumeError

Box = tuple[slice, ...]
NormMode = Literal["percentile", "range", "fixed"]


# --------------------------------------------------------------------------- volumes


def as_volume(spec: Any, voxel_size: Sequence[float] | None = None, fill_missing: bool = False) -> Any:
    """A volume-like from a spec: strings/paths go through ``open_volume``; arrays pass through."""
    if isinstance(spec, (str, os.PathLike)):
        from ssl_em.data.volume import open_volume  # lazy: only file specs need the readers

        return open_volume(spec, voxel_size=voxel_size, fill_missing=fill_missing)
    if not (hasattr(spec, "shape") and hasattr(spec, "__getitem__")):
        raise VolumeError(f"{type(spec).__name__} is not a volume: need a path/spec or an array with .shape")
    return spec


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
    """A box of a volume, itself volume-like: ``.shape`` is the box's (z, y, x) and slicing with a
    box of slices (start/stop set) reads relative to the box's origin. Leading channel axes of
    the underlying volume (labels of shape (C, z, y, x)) are passed through."""

    def __init__(self, vol: Any, box: Box | None = None) -> None:
        full = tuple(vol.shape[-3:])
        box = tuple(slice(0, n) for n in full) if box is None else tuple(box)
        self.vol, self.offset = vol, tuple(int(b.start or 0) for b in box)
        self.shape = tuple(int((b.stop if b.stop is not None else n) - o) for b, n, o in zip(box, full, self.offset))
        self.lead = (slice(None),) * (len(vol.shape) - 3)
        self.dtype = getattr(vol, "dtype", None)
        self.spec = volume_name(vol)

    def __getitem__(self, box: Box) -> np.ndarray:
        moved = tuple(slice(o + s.start, o + s.stop) for s, o in zip(box, self.offset))
        return np.asarray(self.vol[self.lead + moved])


def _check_not_constant(region: Region, name: str) -> None:
    """A blank or constant volume teaches nothing; say so before any training step."""
    sample = sample_blocks(region, 1 << 18)
    if sample.size and sample.min() == sample.max():
        raise VolumeError(f"{name}: every sampled voxel of its training region is {sample.flat[0]}: a blank "
                          "or constant volume (wrong array, or a region outside the data?)")


def check_same_grid(x: Any, vol: Any, override: Sequence[float] | None, what: str) -> None:
    """Labels (or a mask) must lie on the raw's voxel grid; equal shapes alone do not show it."""
    theirs = getattr(x, "voxel_size", None) if getattr(x, "voxel_size_known", False) else None
    ours = voxel_size_of(vol, override)
    if theirs is not None and ours is not None and not np.allclose(theirs, ours, rtol=1e-3):
        raise LabelError(f"{volume_name(x)}: {what} voxel size {tuple(theirs)} nm differs from the raw's "
                         f"{tuple(ours)} nm: resample one onto the other's grid first")


def _check_has_labels(labels: Region, ignore_value: int | None, name: str) -> None:
    """Labels with no labelled foreground in the training region would train a model to say background."""
    for z in range(labels.shape[0]):  # section by section, stopping at the first labelled foreground
        section = labels[(slice(z, z + 1), slice(0, labels.shape[1]), slice(0, labels.shape[2]))]
        if np.any((section != 0) & (section != ignore_value) if ignore_value is not None else section != 0):
            return
    raise LabelError(f"{name}: no labelled foreground in the training region ({labels.shape} voxels are all 0"
                     f"{' or the ignore value' if ignore_value is not None else ''}): wrong labels array or key?")


# --------------------------------------------------------------------------- normalisation


def _dtype_range(dtype: np.dtype) -> tuple[float, float]:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    if dtype == np.bool_:
        return 0.0, 1.0
    return 0.0, 1.0  # floats: taken as already in 0..1


def _check_finite(x: np.ndarray, name: str) -> None:
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        raise VolumeError(f"{name} holds {n_nan} NaN and {n_inf} inf values; fix or mask them before normalising")


@dataclass(frozen=True)
class Normalization:
    """Map raw intensities ``low..high`` to ``0..1`` (float32).

    ``mode``: "percentile" (robust ``percentiles`` of a bounded random sample of the volume),
    "range" (the dtype's range: uint8 -> /255; floats taken as 0..1) or "fixed" (``low``/``high``
    as given). ``clip`` clamps the result to 0..1. ``low``/``high`` are the fitted values that a
    checkpoint records (``to_dict``) so prediction normalises exactly like training.
    """

    mode: NormMode = "percentile"
    low: float | None = None
    high: float | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    clip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("percentile", "range", "fixed"):
            raise ConfigError(f"normalization mode {self.mode!r} is not one of percentile, range, fixed")
        if self.mode == "fixed" and (self.low is None or self.high is None):
            raise ConfigError("normalization mode 'fixed' needs both low and high")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"normalization percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")

    @property
    def fitted(self) -> bool:
        return self.low is not None and self.high is not None

    def fit(self, volume: Any, sample_voxels: int = 1 << 21, seed: int = 0) -> Normalization:
        """Return a copy with ``low``/``high`` set from ``volume`` (any volume-like or spec).

        Percentiles come from random blocks totalling at most ``sample_voxels`` voxels (the whole
        volume only when it is that small), so fitting a terabyte volume reads megabytes.
        """
        if self.mode == "fixed":
            return self
        vol = as_volume(volume)
        if self.mode == "range":
            return replace(self, low=_dtype_range(np.dtype(vol.dtype))[0], high=_dtype_range(np.dtype(vol.dtype))[1])
        sample = sample_blocks(vol, sample_voxels, seed)
        _check_finite(sample, volume_name(vol))
        low, high = np.percentile(sample, self.percentiles)
        return replace(self, low=float(low), high=float(high))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` (any shape, any real dtype) -> float32 with ``low`` at 0 and ``high`` at 1."""
        x = np.asarray(x)
        _check_finite(x, "input")
        low, high = (self.low, self.high) if self.fitted else (None, None)
        if low is None:
            if self.mode != "range":
                raise ConfigError(f"Normalization(mode={self.mode!r}) is not fitted: call .fit(volume) first")
            low, high = _dtype_range(x.dtype)
        scale = np.float32(1.0 / max(high - low, 1e-12))  # a constant volume maps to 0, not NaN
        out = (x.astype(np.float32) - np.float32(low)) * scale
        return np.clip(out, 0.0, 1.0, out=out) if self.clip else out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"normalization record has unknown keys {sorted(unknown)}")
        d = dict(d)
        if "percentiles" in d:
            d["percentiles"] = tuple(float(v) for v in d["percentiles"])
        return cls(**d)


def sample_blocks(vol: Any, sample_voxels: int, seed: int = 0, block: Sequence[int] = (8, 64, 64)) -> np.ndarray:
    """Flat array of at most ~``sample_voxels`` voxels read from random blocks of ``vol``."""
    shape = tuple(vol.shape[-3:])
    lead = (slice(None),) * (len(vol.shape) - 3)
    if math.prod(vol.shape) <= sample_voxels:
        return np.asarray(vol[lead + tuple(slice(0, n) for n in shape)]).ravel()
    blk = tuple(min(b, n) for b, n in zip(block, shape))
    n_blocks = max(1, sample_voxels // math.prod(vol.shape[:-3] + blk))
    rng = np.random.default_rng(seed)
    parts = [np.asarray(vol[lead + uniform_box(shape, blk, rng)]).ravel() for _ in range(n_blocks)]
    return np.concatenate(parts)


# --------------------------------------------------------------------------- samplers


def _check_fits(shape: Sequence[int], patch: Sequence[int], name: str = "volume") -> None:
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ConfigError(f"patch_shape {tuple(patch)} must be three positive sizes (z, y, x)")
    if any(p > s for p, s in zip(patch, shape)):
        raise ConfigError(f"patch_shape {tuple(patch)} does not fit {name} of shape {tuple(shape)} (z, y, x)")


def uniform_box(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator) -> Box:
    """A uniformly placed box of size ``patch`` inside ``shape``."""
    return tuple(slice(s, s + p) for s, p in ((int(rng.integers(0, n - p + 1)), p) for n, p in zip(shape, patch)))


@dataclass
class UniformSampler:
    """Every valid position equally likely."""

    def __call__(self, shape, patch_shape, rng, labels=None, mask=None) -> Box:
        return uniform_box(shape, patch_shape, rng)


@dataclass
class ForegroundSampler:
    """With probability ``p_foreground`` redraw (at most ``max_tries`` times) until at least
    ``min_fraction`` of the crop's labels are foreground (> 0 and not ``ignore_value``); after
    the cap, or for the other draws, the crop is uniform. Rare structures (synapses ~0.6 % of
    voxels) otherwise almost never appear in a batch."""

    min_fraction: float = 0.01
    p_foreground: float = 0.5
    max_tries: int = 20
    ignore_value: int | None = None

    def __call__(self, shape, patch_shape, rng, labels=None, mask=None) -> Box:
        box = uniform_box(shape, patch_shape, rng)
        if labels is None or rng.random() >= self.p_foreground:
            return box
        for i in range(self.max_tries):
            if i:
                box = uniform_box(shape, patch_shape, rng)
            lab = np.asarray(labels[box])
            fg = lab > 0 if self.ignore_value is None else (lab > 0) & (lab != self.ignore_value)
            if fg.mean() >= self.min_fraction:
                break
        return box


def _is_labelled(x: np.ndarray, from_mask: bool, ignore_value: int | None) -> np.ndarray:
    """Labelled voxels: ``mask > 0``, else ``labels != ignore_value`` (over leading label channels)."""
    x = x > 0 if from_mask else x != ignore_value
    return x.reshape(-1, *x.shape[-3:]).any(axis=0) if x.ndim > 3 else x


def labelled_slices(vol: Any, from_mask: bool, ignore_value: int | None = None, axis: int = 0) -> np.ndarray:
    """Indices along ``axis`` of the slices of ``vol`` (a mask, or labels) holding a labelled voxel, read
    in slabs of 16."""
    n, other = vol.shape[-3:][axis], tuple(a for a in range(3) if a != axis)
    lead = (slice(None),) * (len(vol.shape) - 3)
    has = []
    for s in range(0, n, 16):
        box = tuple(slice(s, min(n, s + 16)) if a == axis else slice(0, m) for a, m in enumerate(vol.shape[-3:]))
        has.append(_is_labelled(np.asarray(vol[lead + box]), from_mask, ignore_value).any(axis=other))
    return np.flatnonzero(np.concatenate(has))


@dataclass
class LabelledSliceSampler:
    """For sparse annotation (a few labelled sections): only boxes holding labelled voxels.

    Labelled = ``mask > 0`` where a mask is given, else ``labels != ignore_value`` (with neither,
    crops are uniform). A labelled slice along ``axis`` is drawn first, then a box containing it;
    sparse labels within a slice (scribbles) get up to ``max_tries`` in-plane redraws. A
    ``p_foreground`` share of the boxes is then moved in-plane (at most ``max_tries`` times) until its
    labelled voxels include foreground: a few sections of a rare structure (mitochondria ~5 %,
    synapses ~0.6 % of voxels) otherwise give batches of background only, and a short run learns to
    predict nothing (nnU-Net oversamples foreground likewise).
    """

    ignore_value: int | None = None
    axis: int = 0
    max_tries: int = 10
    p_foreground: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:  # the cache is keyed by object id: valid in one process only
        return {**self.__dict__, "_cache": {}}

    def _is_labelled(self, x: np.ndarray, from_mask: bool) -> np.ndarray:
        return _is_labelled(x, from_mask, self.ignore_value)

    def _slices(self, vol: Any, from_mask: bool) -> np.ndarray:
        """Indices along ``axis`` of slices with any labelled voxel (read once per volume)."""
        if id(vol) not in self._cache:  # holding vol keeps its id unique
            self._cache[id(vol)] = (vol, labelled_slices(vol, from_mask, self.ignore_value, self.axis))
        return self._cache[id(vol)][1]

    def __call__(self, shape, patch_shape, rng, labels=None, mask=None) -> Box:
        from_mask = mask is not None
        src = mask if from_mask else labels
        if src is None or (not from_mask and self.ignore_value is None):
            return uniform_box(shape, patch_shape, rng)
        slices = self._slices(src, from_mask)
        if slices.size == 0:
            raise LabelError(f"{volume_name(src)} has no labelled voxels to sample crops from")
        a, p, n = self.axis, patch_shape[self.axis], shape[self.axis]
        s = int(rng.choice(slices))
        start = int(rng.integers(max(0, s - p + 1), min(s, n - p) + 1))
        for _ in range(self.max_tries):
            box = list(uniform_box(shape, patch_shape, rng))
            box[a] = slice(start, start + p)
            if self._is_labelled(np.asarray(src[tuple(box)]), from_mask).any():
                break
        if labels is not None and self.p_foreground > 0 and rng.random() < self.p_foreground:
            found = tuple(box)
            for _ in range(self.max_tries):
                if self._labelled_foreground(labels, src, tuple(box), from_mask):
                    return tuple(box)
                moved = list(uniform_box(shape, patch_shape, rng))
                moved[a] = box[a]
                box = moved
            return found  # no labelled foreground nearby: keep the box that holds labelled voxels
        return tuple(box)

    def _labelled_foreground(self, labels: Any, src: Any, box: Box, from_mask: bool) -> bool:
        labelled = self._is_labelled(np.asarray(src[box]), from_mask)
        lab = np.asarray(labels[box])
        fg = (lab > 0) if self.ignore_value is None else (lab > 0) & (lab != self.ignore_value)
        return bool((fg.reshape(-1, *labelled.shape).any(axis=0) & labelled).any())


# --------------------------------------------------------------------------- sparse labels, splits


def _excluded(exclude: Any, axis: int) -> set[int]:
    if exclude is None:
        return set()
    if isinstance(exclude, slice):
        return set(range(exclude.start or 0, exclude.stop))
    if isinstance(exclude, tuple) and exclude and isinstance(exclude[0], slice):  # a box
        return _excluded(exclude[axis], 0)
    return {int(i) for i in exclude}


def sparse_slices(
    n: int, n_slices: int | None = None, fraction: float | None = None, seed: int = 0, exclude: Any = None
) -> np.ndarray:
    """Sorted indices of the slices chosen for labelling (reproducible from ``seed``, at least one)."""
    if (n_slices is None) == (fraction is None):
        raise ConfigError("give exactly one of n_slices or fraction for sparse labels")
    allowed = np.array(sorted(set(range(n)) - _excluded(exclude, 0)), dtype=np.int64)
    k = int(n_slices) if n_slices is not None else max(1, round(float(fraction) * allowed.size))
    if not 1 <= k <= allowed.size:
        raise ConfigError(f"cannot label {k} slices: {allowed.size} of {n} are available")
    return np.sort(np.random.default_rng(seed).choice(allowed, size=k, replace=False))


def sparse_slice_mask(
    shape: Sequence[int],
    n_slices: int | None = None,
    *,
    fraction: float | None = None,
    seed: int = 0,
    axis: int = 0,
    exclude: Any = None,
) -> np.ndarray:
    """Bool mask of ``shape``: True on ``n_slices`` (or ``fraction`` of the) slices along ``axis``.

    ``exclude``: slice indices never chosen (ints, a slice, or a box whose ``axis`` entry is used),
    e.g. the evaluation region. Returned as a read-only broadcast view: no memory per voxel (but
    pickling materialises it: for DataLoader workers use :class:`SliceMask` with
    :func:`sparse_slices`).
    """
    chosen = sparse_slices(shape[axis], n_slices, fraction, seed, _excluded(exclude, axis))
    line = np.zeros(shape[axis], dtype=bool)
    line[chosen] = True
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(line.reshape(view), tuple(shape))


def check_disjoint(a: Box, b: Box, names: tuple[str, str] = ("train", "eval")) -> None:
    """Raise ConfigError if boxes ``a`` and ``b`` (slices with start/stop) share a voxel."""
    if all(max(x.start, y.start) < min(x.stop, y.stop) for x, y in zip(a, b)):
        fmt = lambda box: "[" + ", ".join(f"{s.start}:{s.stop}" for s in box) + "]"  # noqa: E731
        raise ConfigError(f"{names[0]} box {fmt(a)} and {names[1]} box {fmt(b)} overlap: evaluation would leak")


def split_regions(shape: Sequence[int], eval_fraction: float, axis: int = 0, min_size: int = 1,
                  gap: int = 0) -> tuple[Box, Box]:
    """Split ``shape`` along ``axis`` into (train_box, eval_box); eval is the last part, ``gap``
    slices (e.g. half a patch: no training crop reaches into the scored region's context) between.

    Each part has at least ``min_size`` slices (e.g. the patch depth); the boxes never overlap.
    """
    n = shape[axis]
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval fraction {eval_fraction} must be between 0 and 1")
    n_eval = max(min_size, math.ceil(n * eval_fraction))
    if n - n_eval - gap < min_size:
        raise ConfigError(f"axis {axis} of {n} voxels is too small to hold two parts of at least {min_size} "
                          f"with a gap of {gap}")
    full = [slice(0, m) for m in shape]
    train, ev = list(full), list(full)
    train[axis], ev[axis] = slice(0, n - n_eval - gap), slice(n - n_eval, n)
    check_disjoint(tuple(train), tuple(ev))
    return tuple(train), tuple(ev)


# --------------------------------------------------------------------------- datasets


@dataclass
class _Source:
    raw: Region
    labels: Region | None
    mask: Region | None
    norm: Normalization
    voxel_size: tuple[float, float, float] | None


def _listify(x: Any, n: int, what: str, shared: bool = False) -> list:
    """One entry per volume; ``shared`` values (a normalisation) may be given once for all."""
    if x is None or (shared and not isinstance(x, (list, tuple))):
        return [x] * n
    if isinstance(x, (list, tuple)) and not (isinstance(x, tuple) and x and isinstance(x[0], slice)):
        if len(x) != n:
            raise ConfigError(f"{len(x)} {what} given for {n} raw volumes")
        return list(x)
    if n != 1:
        raise ConfigError(f"one {what} given for {n} raw volumes: pass a list")
    return [x]


class CropDataset(Dataset):
    """Random crops of ``patch_shape`` (z, y, x) from one or more volumes, optionally with labels.

    ``raw``: a volume-like or spec, or a list of them (picked with probability ∝ their size).
    ``labels``/``masks``: matching lists (entries may be None); labels may have leading channels.
    ``regions``: per volume, the box crops are drawn from (e.g. the train part of a split).
    ``normalization``: a fitted Normalization shared by all volumes, or an unfitted one / None
    (percentile) fitted per volume on its region, or a list with one per volume.
    ``ignore_value``: label value meaning 'unlabelled' (mask 0 there, and the label set to 0 so
    a loss never sees it as a class).
    ``require_labels``: labels with no foreground (nonzero, not ``ignore_value``) in a region are a
    LabelError (a training set that can only teach "background"); False for validation sets.

    Item: ``{"raw": float32 (1, D, H, W)}`` plus, with labels, ``"label"`` (C or 1, D, H, W;
    int64, float32 for float labels) and ``"mask"`` float32 (1, D, H, W), 1 = supervise.
    """

    def __init__(
        self,
        raw: Any,
        patch_shape: Sequence[int],
        *,
        labels: Any = None,
        masks: Any = None,
        regions: Any = None,
        sampler: Any = None,
        augment: Any = None,
        samples_per_epoch: int = 1000,
        normalization: Normalization | Sequence[Normalization] | None = None,
        seed: int = 0,
        ignore_value: int | float | None = None,
        voxel_size: Sequence[float] | None = None,
        require_labels: bool = True,
    ) -> None:
        raws = raw if isinstance(raw, (list, tuple)) else [raw]
        n = len(raws)
        if n == 0:
            raise ConfigError("CropDataset needs at least one raw volume")
        self.patch_shape = tuple(int(p) for p in patch_shape)
        self.sampler = sampler if sampler is not None else UniformSampler()
        self.augment, self.seed, self.ignore_value = augment, int(seed), ignore_value
        self.require_labels = require_labels
        self.samples_per_epoch, self.epoch = int(samples_per_epoch), 0
        parts = zip(
            raws, *(_listify(x, n, what) for x, what in ((labels, "labels"), (masks, "masks"), (regions, "regions"))),
            _listify(normalization, n, "normalizations", shared=True),
        )
        self.sources = [self._source(r, lab, m, box, norm, voxel_size) for r, lab, m, box, norm in parts]
        sizes = np.array([math.prod(s.raw.shape) for s in self.sources], dtype=np.float64)
        self.weights = sizes / sizes.sum()

    def _source(self, raw, labels, mask, box, norm, voxel_size) -> _Source:
        vol = as_volume(raw, voxel_size)
        name = volume_name(vol)
        if len(vol.shape) != 3:
            raise VolumeError(f"{name}: raw must be 3-D (z, y, x), got shape {tuple(vol.shape)}")
        region = Region(vol, box)
        _check_fits(region.shape, self.patch_shape, name)
        _check_not_constant(region, name)
        regions: list[Region | None] = []
        for what, x in (("labels", labels), ("mask", mask)):
            if x is None:
                regions.append(None)
                continue
            x = as_volume(x)
            if tuple(x.shape[-3:]) != tuple(vol.shape) or (what == "mask" and len(x.shape) != 3):
                raise LabelError(
                    f"{volume_name(x)}: {what} shape {tuple(x.shape)} does not match raw {name} "
                    f"shape {tuple(vol.shape)}"
                )
            check_same_grid(x, vol, voxel_size, what)
            regions.append(Region(x, box))
        if regions[0] is not None and self.require_labels:
            _check_has_labels(regions[0], self.ignore_value, regions[0].spec)
        norm = norm if norm is not None else Normalization()
        if not norm.fitted:
            norm = norm.fit(region, seed=self.seed)
        return _Source(region, regions[0], regions[1], norm, voxel_size_of(vol, voxel_size))

    # metadata a checkpoint records
    @property
    def voxel_sizes(self) -> list[tuple[float, float, float] | None]:
        return [s.voxel_size for s in self.sources]

    @property
    def normalizations(self) -> list[Normalization]:
        return [s.norm for s in self.sources]

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """New crops each epoch (for num_workers=0 or non-persistent workers; else EpochSampler)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        # indices past len() carry the epoch (EpochSampler), so workers need no shared state
        extra, i = divmod(int(index), self.samples_per_epoch)
        return np.random.default_rng((self.seed, self.epoch + extra, i))

    def _pick(self, rng: np.random.Generator) -> _Source:
        if len(self.sources) == 1:
            return self.sources[0]
        return self.sources[int(rng.choice(len(self.sources), p=self.weights))]

    def _read(self, src: _Source, box: Box) -> dict[str, np.ndarray]:
        raw = src.raw[box]
        try:
            sample = {"raw": src.norm(raw)}
        except VolumeError as err:
            raise VolumeError(f"{src.raw.spec} crop {box}: {err}") from None
        if src.labels is None:
            return sample
        label = src.labels[box]
        mask = np.ones(raw.shape, np.float32) if src.mask is None else (src.mask[box] > 0).astype(np.float32)
        if self.ignore_value is not None:
            ignored = label == self.ignore_value
            mask *= ~(ignored.reshape(-1, *raw.shape).any(axis=0))
            label = np.where(ignored, 0, label)
        sample["label"] = label.astype(np.float32 if np.issubdtype(label.dtype, np.floating) else np.int64)
        sample["mask"] = mask
        return sample

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        src = self._pick(rng)
        box = self.sampler(src.raw.shape, self.patch_shape, rng, labels=src.labels, mask=src.mask)
        sample = self._read(src, box)
        if self.augment is not None:
            sample = self.augment(sample, rng)
        return {k: _tensor(v) for k, v in sample.items()}


def _tensor(x: np.ndarray) -> torch.Tensor:
    """(D, H, W) -> (1, D, H, W) contiguous tensor; (C, D, H, W) stays."""
    x = np.ascontiguousarray(x)
    if any(st < 0 for st in x.strides):  # numpy calls a flipped size-1 axis contiguous; torch refuses it
        x = x.copy()
    return torch.from_numpy(x[None] if x.ndim == 3 else x)


class TwoViewDataset(CropDataset):
    """Two crops of one region for contrastive learning, augmented independently.

    View 2 is view 1 moved by a random shift of ``min_shift`` to ``max_shift`` voxels per axis, either
    sign (default 0 to a quarter of the patch: the views share ``patch - |shift|`` voxels per axis).
    A shift of a patch or more along z gives *z-section positives*: the same (y, x) region seen in
    sections that do not overlap, e.g. ``min_shift=(8, 0, 0), max_shift=(16, 8, 8)`` with 8-section
    patches (the pair then shares structure that continues across sections, not voxels). Item:
    ``view1``/``view2`` float32 (1, D, H, W); ``overlap1``/``overlap2`` int64 (3, 2): the shared region
    as [start, stop) per axis (z, y, x) in each view's own coordinates (after flips and rotations;
    elastic and misalignment move it by a few pixels at most); along an axis the views do not share,
    the whole extent.
    """

    def __init__(
        self, raw: Any, patch_shape: Sequence[int], *, max_shift: Sequence[int] | int | None = None,
        min_shift: Sequence[int] | int = 0, **kw: Any
    ) -> None:
        kw.pop("labels", None)
        super().__init__(raw, patch_shape, **kw)
        p = np.array(self.patch_shape)
        lo = np.broadcast_to(np.asarray(min_shift, dtype=np.int64), (3,))
        hi = (np.maximum(p // 4, lo) if max_shift is None
              else np.broadcast_to(np.asarray(max_shift, dtype=np.int64), (3,)))
        if np.any(lo < 0) or np.any(hi < lo):
            raise ConfigError(f"two-view shifts need 0 <= min_shift <= max_shift per axis, "
                              f"got {_ints(lo)} and {_ints(hi)}")
        for src in self.sources:
            room = np.array(src.raw.shape) - p
            if np.any(room < lo):
                raise ConfigError(f"{src.raw.spec} region {_ints(src.raw.shape)} leaves room for view shifts of "
                                  f"{_ints(room)} voxels around a {_ints(p)} patch, less than min_shift {_ints(lo)}")
        self.min_shift, self.max_shift = _ints(lo), _ints(hi)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        src = self._pick(rng)
        p, room = np.array(self.patch_shape), np.array(src.raw.shape) - np.array(self.patch_shape)
        hi = np.minimum(self.max_shift, room)
        # per axis: a magnitude from min_shift to hi, either sign (min 0 keeps the original draw)
        shift = np.array([int(rng.integers(-b, b + 1)) if a == 0
                          else int(rng.integers(a, b + 1)) * int(rng.choice((-1, 1)))
                          for a, b in zip(self.min_shift, hi)])
        union = p + np.abs(shift)
        box = self.sampler(src.raw.shape, tuple(int(u) for u in union), rng, labels=None, mask=src.mask)
        both = src.norm(src.raw[box])  # read once, cut two views
        s1 = np.maximum(0, -shift)
        s2 = s1 + shift
        shared = np.maximum(p - np.abs(shift), 0)
        out: dict[str, torch.Tensor] = {}
        for i, s in ((1, s1), (2, s2)):
            view = both[tuple(slice(a, a + n) for a, n in zip(s, p))]
            other = s2 if i == 1 else s1
            start = np.where(shared > 0, np.maximum(s, other) - s, 0)
            overlap = np.stack([start, start + np.where(shared > 0, shared, p)], axis=1).astype(np.int64)  # (3, 2)
            sample = {"raw": view, "overlap": overlap}
            if self.augment is not None:
                sample = self.augment(sample, rng)
            out[f"view{i}"] = _tensor(sample["raw"])
            out[f"overlap{i}"] = torch.from_numpy(np.ascontiguousarray(sample["overlap"]))
        return out


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


class EpochSampler(DistributedSampler):
    """Indices ``epoch * n + i`` for ``i`` in 0..n-1 (order does not matter: crops are random).

    Lightning calls ``set_epoch`` on a DataLoader's sampler each epoch; folding the epoch into the
    index gives fresh crops per epoch even with persistent workers, whose dataset copies never see
    ``dataset.set_epoch``. Under DDP each rank takes every ``world``-th index (rank and world are
    read when iterating); it subclasses DistributedSampler only so Lightning keeps it instead of
    wrapping it in one that would hide ``set_epoch``.
    """

    def __init__(self, n: int, start: int = 0) -> None:
        # no super().__init__ (it needs a process group); keep the attributes readers expect
        self.n, self.epoch, self.shuffle, self.drop_last, self.seed = int(n), 0, False, False, 0
        self.start = int(start)  # positions of this rank to skip once: resuming mid-epoch

    num_replicas = property(lambda self: self._world()[1])
    rank = property(lambda self: self._world()[0])

    @staticmethod
    def _world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rank, world = self._world()
        per_rank = -(-self.n // world)  # equal counts on every rank (a few repeats, as DistributedSampler)
        start, self.start = min(self.start, per_rank), 0
        return iter(self.epoch * self.n + (rank + k * world) % self.n for k in range(start, per_rank))

    def __len__(self) -> int:
        return -(-self.n // self._world()[1])


class SliceMask:
    """Volume-like bool mask that is True on chosen slices along ``axis`` (sparse annotation).

    Like :func:`sparse_slice_mask` but pickles as the slice list, not a voxel array, so it is
    cheap to send to DataLoader workers for any volume size.
    """

    def __init__(self, shape: Sequence[int], slices: Sequence[int], axis: int = 0) -> None:
        self.shape, self.axis, self.dtype = tuple(int(n) for n in shape), int(axis), np.dtype(bool)
        self.line = np.zeros(self.shape[axis], dtype=bool)
        self.line[np.asarray(slices, dtype=np.int64)] = True
        self.spec = f"<{int(self.line.sum())} labelled slices of {self.shape}>"

    def __getitem__(self, box: Box) -> np.ndarray:
        box = tuple(box) + (slice(None),) * (3 - len(box))
        sizes = [len(range(*b.indices(n))) for b, n in zip(box, self.shape)]
        view = [1, 1, 1]
        view[self.axis] = sizes[self.axis]
        return np.broadcast_to(self.line[box[self.axis]].reshape(view), sizes)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[tuple(slice(0, n) for n in self.shape)], dtype=dtype)

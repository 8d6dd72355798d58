"""Crop datasets over (lazy) EM volumes: :class:`CropDataset` (raw, labels, masks) and
:class:`TwoViewDataset` (two overlapping views for contrastive learning).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_em.data.normalize import Normalization, sample_blocks
from ssl_em.data.samplers import UniformSampler, check_fits
from ssl_em.data.volume import Box, Region, as_volume, volume_name, voxel_size_of
from ssl_em.errors import ConfigError, LabelError, VolumeError


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
    for z in range(labels.shape[-3]):  # section by section, stopping at the first labelled foreground
        section = labels[..., z:z + 1, :, :]
        if np.any((section != 0) & (section != ignore_value) if ignore_value is not None else section != 0):
            return
    raise LabelError(f"{name}: no labelled foreground in the training region ({tuple(labels.shape)} voxels are all 0"
                     f"{' or the ignore value' if ignore_value is not None else ''}): wrong labels array or key?")


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
    """Random crops of ``crop_shape`` (z, y, x) from one or more volumes, optionally with labels.

    ``raw``: a volume-like or spec, or a list of them (picked with probability ∝ their size).
    ``labels``/``masks``: matching lists (entries may be None); labels may have leading channels.
    ``regions``: per volume, the box crops are drawn from (e.g. the train part of a split).
    ``normalization``: a fitted Normalization shared by all volumes, or an unfitted one / None
    (percentile) fitted per volume on its region, or a list with one per volume.
    ``ignore_value``: label value meaning 'unlabelled' (mask 0 there, and the label set to 0 so
    a loss never sees it as a class).
    ``require_labels``: labels with no foreground (nonzero, not ``ignore_value``) in a region are a
    LabelError (a training set that can only teach "background"); False for validation sets.
    ``label_transform``: ``(label, mask) -> (target, target_mask)`` of one augmented crop, e.g. a task's
    affinities (``Task.crop_targets``); it runs here, in the DataLoader workers (torch-em's
    ``label_transform``), so the training step only moves tensors.

    Item: ``{"raw": float32 (1, D, H, W)}`` plus, with labels, ``"label"`` (C or 1, D, H, W;
    int64, float32 for float labels) and ``"mask"`` float32 (1, D, H, W), 1 = supervise; with a
    ``label_transform``, ``"target"`` and ``"target_mask"`` (K, D, H, W) in their place.
    """

    def __init__(
        self,
        raw: Any,
        crop_shape: Sequence[int],
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
        label_transform: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        raws = raw if isinstance(raw, (list, tuple)) else [raw]
        n = len(raws)
        if n == 0:
            raise ConfigError("CropDataset needs at least one raw volume")
        self.crop_shape = tuple(int(p) for p in crop_shape)
        self.sampler = sampler if sampler is not None else UniformSampler()
        self.augment, self.seed, self.ignore_value = augment, int(seed), ignore_value
        self.require_labels, self.label_transform = require_labels, label_transform
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
        check_fits(region.shape, self.crop_shape, name)
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
        label = src.labels[(..., *box)]
        mask = np.ones(raw.shape, np.float32) if src.mask is None else (src.mask[(..., *box)] > 0).astype(np.float32)
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
        box = self.sampler(src.raw.shape, self.crop_shape, rng, labels=src.labels, mask=src.mask)
        sample = self._read(src, box)
        if self.augment is not None:
            sample = self.augment(sample, rng)
        if self.label_transform is not None and "label" in sample:  # in the worker, after augmentation
            sample["target"], sample["target_mask"] = self.label_transform(sample.pop("label"), sample.pop("mask"))
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
        self, raw: Any, crop_shape: Sequence[int], *, max_shift: Sequence[int] | int | None = None,
        min_shift: Sequence[int] | int = 0, **kw: Any
    ) -> None:
        kw.pop("labels", None)
        super().__init__(raw, crop_shape, **kw)
        p = np.array(self.crop_shape)
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
        p, room = np.array(self.crop_shape), np.array(src.raw.shape) - np.array(self.crop_shape)
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

"""Where crops come from: samplers return a (z, y, x) box of a patch inside a region.

``UniformSampler`` (every position alike), ``ForegroundSampler`` (rare structures oversampled),
``LabelledSliceSampler`` (sparse annotation: only boxes that hold labelled voxels), and
:class:`EpochSampler`, the DataLoader index sampler that folds the epoch into the crop index so
persistent workers draw fresh crops each epoch. A sampler is called as
``sampler(shape, crop_shape, rng, labels=None, mask=None) -> box``; labels may have leading channels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ssl_em.data.volume import Box, volume_name
from ssl_em.errors import ConfigError, LabelError


def check_fits(shape: Sequence[int], patch: Sequence[int], name: str = "volume") -> None:
    if len(patch) != 3 or any(p < 1 for p in patch):
        raise ConfigError(f"crop_shape {tuple(patch)} must be three positive sizes (z, y, x)")
    if any(p > s for p, s in zip(patch, shape)):
        raise ConfigError(f"crop_shape {tuple(patch)} does not fit {name} of shape {tuple(shape)} (z, y, x)")


def uniform_box(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator) -> Box:
    """A uniformly placed box of size ``patch`` inside ``shape``."""
    return tuple(slice(s, s + p) for s, p in ((int(rng.integers(0, n - p + 1)), p) for n, p in zip(shape, patch)))


@dataclass
class UniformSampler:
    """Every valid position equally likely."""

    def __call__(self, shape, crop_shape, rng, labels=None, mask=None) -> Box:
        return uniform_box(shape, crop_shape, rng)


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

    def __call__(self, shape, crop_shape, rng, labels=None, mask=None) -> Box:
        box = uniform_box(shape, crop_shape, rng)
        if labels is None or rng.random() >= self.p_foreground:
            return box
        for i in range(self.max_tries):
            if i:
                box = uniform_box(shape, crop_shape, rng)
            lab = np.asarray(labels[(..., *box)])
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

    def __call__(self, shape, crop_shape, rng, labels=None, mask=None) -> Box:
        from_mask = mask is not None
        src = mask if from_mask else labels
        if src is None or (not from_mask and self.ignore_value is None):
            return uniform_box(shape, crop_shape, rng)
        slices = self._slices(src, from_mask)
        if slices.size == 0:
            raise LabelError(f"{volume_name(src)} has no labelled voxels to sample crops from")
        a, p, n = self.axis, crop_shape[self.axis], shape[self.axis]
        s = int(rng.choice(slices))
        start = int(rng.integers(max(0, s - p + 1), min(s, n - p) + 1))
        for _ in range(self.max_tries):
            box = list(uniform_box(shape, crop_shape, rng))
            box[a] = slice(start, start + p)
            if self._is_labelled(np.asarray(src[(..., *box)]), from_mask).any():
                break
        if labels is not None and self.p_foreground > 0 and rng.random() < self.p_foreground:
            found = tuple(box)
            for _ in range(self.max_tries):
                if self._labelled_foreground(labels, src, tuple(box), from_mask):
                    return tuple(box)
                moved = list(uniform_box(shape, crop_shape, rng))
                moved[a] = box[a]
                box = moved
            return found  # no labelled foreground nearby: keep the box that holds labelled voxels
        return tuple(box)

    def _labelled_foreground(self, labels: Any, src: Any, box: Box, from_mask: bool) -> bool:
        labelled = self._is_labelled(np.asarray(src[(..., *box)]), from_mask)
        lab = np.asarray(labels[(..., *box)])
        fg = (lab > 0) if self.ignore_value is None else (lab > 0) & (lab != self.ignore_value)
        return bool((fg.reshape(-1, *labelled.shape).any(axis=0) & labelled).any())


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

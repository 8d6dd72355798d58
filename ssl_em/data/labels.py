"""Sparse labels and the regions they may come from: chosen sections (:func:`sparse_slices`,
:class:`SliceMask`), painted patches (:func:`paint_patches`), and the one split of a volume into
disjoint training and evaluation boxes (:func:`split_regions`, with a ``gap``; :func:`check_disjoint`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssl_em.data.volume import Box
from ssl_em.errors import ConfigError


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
                  gap: int = 0, *, what: str = "volume", setting: str = "eval_fraction") -> tuple[Box, Box]:
    """Split ``shape`` along ``axis`` into (train_box, eval_box); eval is the last part, ``gap``
    slices (e.g. half a patch: no training crop reaches into the scored region's context) between.

    Each part has at least ``min_size`` slices (e.g. the patch depth); the boxes never overlap. Errors
    name ``what`` (the volume) and ``setting`` (the fraction's name where the user set it).
    """
    n = shape[axis]
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"{setting}={eval_fraction} must lie in (0, 1)")
    n_eval = max(min_size, math.ceil(n * eval_fraction))
    if n - n_eval - gap < min_size:
        name = "zyx"[axis] if len(shape) == 3 else f"axis {axis}"
        raise ConfigError(
            f"{what}: {setting}={eval_fraction} cannot split its {n} voxels along {name} into two parts of at "
            f"least {min_size} (the patch){f' with a gap of {gap}' if gap else ''}: use a smaller crop_shape, "
            f"a smaller {setting} or a larger volume")
    full = [slice(0, m) for m in shape]
    train, ev = list(full), list(full)
    train[axis], ev[axis] = slice(0, n - n_eval - gap), slice(n - n_eval, n)
    check_disjoint(tuple(train), tuple(ev))
    return tuple(train), tuple(ev)


def sections_for_fraction(n_sections: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted z indices that keep labels: ``fraction`` of ``n_sections`` (at least one), per ``seed``."""
    return sparse_slices(int(n_sections), fraction=float(fraction), seed=int(seed))


def paint_patches(labels: np.ndarray, region: Box, n: int, size: int, seed: int) -> np.ndarray:
    """A mask (z, y, x) uint8 of ``n`` painted patches, as a person paints them in a viewer: ``size`` x
    ``size`` squares (clipped to ``region``) inside ``region``, each on a different z-section, each
    centred (as far as the region allows) on a foreground pixel drawn at random: people paint around
    the objects they see, not at a random place that happens to clip one. Drawn per ``seed``. Raises
    ConfigError when ``region`` has fewer than ``n`` sections with foreground."""
    rng = np.random.default_rng(int(seed) + 7919 * int(n))
    zs, ys, xs = region
    sy, sx = min(size, ys.stop - ys.start), min(size, xs.stop - xs.start)
    fg = np.asarray(labels[region]) > 0
    sections = [int(zs.start + z) for z in np.flatnonzero(fg.reshape(fg.shape[0], -1).any(1))]
    if len(sections) < n:
        raise ConfigError(f"{n} painted patches need {n} sections with foreground in the training region; "
                          f"it has {len(sections)}")
    mask = np.zeros(labels.shape, np.uint8)
    for z in rng.choice(sections, size=n, replace=False):
        plane = fg[z - zs.start]
        fy, fx = np.argwhere(plane)[rng.integers(0, int(plane.sum()))]
        y = int(np.clip(fy - sy // 2, 0, plane.shape[0] - sy))
        x = int(np.clip(fx - sx // 2, 0, plane.shape[1] - sx))
        mask[z, ys.start + y: ys.start + y + sy, xs.start + x: xs.start + x + sx] = 1
    return mask


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
        box = tuple(box)
        box = box[1:] if box and box[0] is Ellipsis else box  # 3-D: a leading '...' selects nothing
        box = box + (slice(None),) * (3 - len(box))
        sizes = [len(range(*b.indices(n))) for b, n in zip(box, self.shape)]
        view = [1, 1, 1]
        view[self.axis] = sizes[self.axis]
        return np.broadcast_to(self.line[box[self.axis]].reshape(view), sizes)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self[tuple(slice(0, n) for n in self.shape)], dtype=dtype)

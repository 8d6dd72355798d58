"""Disjoint training / validation / evaluation regions and reproducible sparse z-labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ssl_em.data.crops import Box, check_disjoint, sparse_slices, split_regions
from ssl_em.errors import ConfigError


@dataclass(frozen=True)
class Regions:
    """Boxes (z, y, x) of the labelled volume: ``train`` (fine-tuning), ``evaluation`` (scores only),
    and inside ``train`` the sweep's ``fit`` part and its ``val`` part (a y-slab)."""

    train: Box
    evaluation: Box
    fit: Box
    val: Box


def plan_regions(shape: Sequence[int], patch_shape: Sequence[int], eval_fraction: float = 0.3,
                 val_fraction: float = 0.2, axis: int = 1) -> Regions:
    """Split ``shape`` (z, y, x) along ``axis`` (in-plane: every region keeps all z-sections, so
    sparse z-labels exist in each) as ``[fit | val] | gap | evaluation`` with the data module's
    :func:`split_regions`.

    The gap is half a patch, so no training crop reaches within half a receptive field of the
    region it is scored on; every part is at least one patch wide. Raises ConfigError when the
    volume is too small.
    """
    p = int(patch_shape[axis])
    if len(shape) != 3 or any(int(s) < int(q) for s, q in zip(shape, patch_shape)):
        raise ConfigError(f"volume {tuple(shape)} is smaller than the patch {tuple(patch_shape)} (z, y, x)")
    train, ev = split_regions(shape, eval_fraction, axis=axis, min_size=p, gap=-(-p // 2))
    n_train = train[axis].stop
    fit, val = split_regions([n_train if a == axis else int(n) for a, n in enumerate(shape)], val_fraction,
                             axis=axis, min_size=p)
    check_disjoint(fit, val, ("validation", "fine-tuning"))
    return Regions(train, ev, fit, val)


def label_sections(n_sections: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted z indices that keep labels: ``fraction`` of ``n_sections`` (at least one), per ``seed``."""
    return sparse_slices(int(n_sections), fraction=float(fraction), seed=int(seed))


def _trim(box: Box, max_voxels: int, axis: int = 2, at_least: int = 1) -> Box:
    """Centre-crop ``box`` along ``axis`` (x) to at most ``max_voxels`` (evaluation cost bound), but
    never below ``at_least`` voxels there (a crop or window must still fit)."""
    sizes = [b.stop - b.start for b in box]
    if math.prod(sizes) <= max_voxels:
        return box
    keep = min(sizes[axis], max(at_least, max_voxels // math.prod(s for i, s in enumerate(sizes) if i != axis)))
    start = box[axis].start + (sizes[axis] - keep) // 2
    out = list(box)
    out[axis] = slice(start, start + keep)
    return tuple(out)


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

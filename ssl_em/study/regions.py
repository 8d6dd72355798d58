"""Disjoint training / validation / evaluation regions of the study's labelled volume."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


from ssl_em.data.labels import check_disjoint, split_regions
from ssl_em.data.volume import Box
from ssl_em.errors import ConfigError


@dataclass(frozen=True)
class Regions:
    """Boxes (z, y, x) of the labelled volume: ``train`` (fine-tuning), ``evaluation`` (scores only),
    and inside ``train`` the sweep's ``fit`` part and its ``val`` part (a y-slab)."""

    train: Box
    evaluation: Box
    fit: Box
    val: Box


def plan_regions(shape: Sequence[int], crop_shape: Sequence[int], eval_slab: float = 0.3,
                 val_slab: float = 0.2, axis: int = 1, what: str = "the labelled volume",
                 evaluation_shape: Sequence[int] | None = None) -> Regions:
    """Split ``shape`` (z, y, x) along ``axis`` (in-plane: every region keeps all z-sections, so
    sparse z-labels exist in each) as ``[fit | val] | gap | evaluation`` with the data module's
    :func:`split_regions`.

    The gap is half a patch, so no training crop reaches within half a receptive field of the
    region it is scored on; every part is at least one patch wide. With ``evaluation_shape`` (a separate
    evaluation volume, e.g. a dataset's own test volume) the whole of ``shape`` trains (``[fit | val]``)
    and ``evaluation`` is all of that other volume. ``val_slab`` 0: no validation part (an empty ``val``
    slab; ``fit`` is the whole training region). Raises ConfigError when the volume is too small.
    """
    p = int(crop_shape[axis])
    short = [f"{'zyx'[i]} {int(s)} < {int(q)}" for i, (s, q) in enumerate(zip(shape, crop_shape)) if int(s) < int(q)]
    if len(shape) != 3 or short:
        raise ConfigError(f"{what}: shape {tuple(int(s) for s in shape)}, read as (z, y, x), is smaller than the "
                          f"smallest crop {tuple(int(q) for q in crop_shape)} ({', '.join(short) or 'not 3-D'}): "
                          "check the axis order (an image stack, not channels) or give a smaller crop")
    if evaluation_shape is not None:
        train, ev = tuple(slice(0, int(n)) for n in shape), tuple(slice(0, int(n)) for n in evaluation_shape)
    else:
        train, ev = split_regions(shape, eval_slab, axis=axis, min_size=p, gap=-(-p // 2), what=what,
                                  setting="eval_slab")
    n_train = train[axis].stop
    if val_slab == 0:  # no validation slab: every run keeps its last weights
        fit, val = train, tuple(slice(n_train, n_train) if a == axis else b for a, b in enumerate(train))
        return Regions(train, ev, fit, val)
    fit, val = split_regions([n_train if a == axis else int(n) for a, n in enumerate(shape)], val_slab,
                             axis=axis, min_size=p, what="the training region", setting="val_slab")
    check_disjoint(fit, val, ("validation", "fine-tuning"))
    return Regions(train, ev, fit, val)


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

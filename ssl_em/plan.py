"""A training plan from the data, like nnU-Net's fingerprint: working spacing, crop, batch, network shape.

Why: the study used to train on 8 x 64 x 64 crops at 4.6 nm, about 0.3 um in-plane, the width of one
mitochondrion, so a network never saw an object with its surroundings. The plan picks

* the **working spacing**: in-plane, the task's scale (mitochondria and synapses ~9 nm, membranes and
  neurons at full resolution) or the pretrained encoder's spacing where one is given, reached by an
  integer in-plane downsampling (never upsampled); z stays as acquired;
* the **crop**: at least ``min_context_nm`` (1.2 um) in-plane at that spacing, rounded to the network's
  stride; its depth from the anisotropy (thin crops when z is >= 4x coarser than x);
* the **batch** from a voxel budget per step, the **network shape** (in-plane-only poolings while z is
  coarser) and a **step budget**.

Every field can be overridden; :meth:`Plan.describe` prints it and results record it. Scores are
always computed on the original voxel grid (predictions are resampled back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ssl_em.errors import ConfigError


def is_anisotropic(voxel_size: Sequence[float] | None) -> bool:
    """z more than twice as coarse as the finest in-plane side (ssTEM): the one rule for in-plane
    augmentation and in-plane instance boundaries (nnU-Net's layout rule uses the same 2x). Unknown
    (None): serial sections, the common case (3-D boundaries would mark whole section faces of ssTEM
    objects; in-plane ones on isotropic data miss the faces parallel to the sections); fine-tuning
    gives the task the data's voxel size where the data module knows it."""
    if voxel_size is None:
        return True
    return float(voxel_size[0]) > 2 * min(float(v) for v in voxel_size[1:])


# in-plane working spacing per task (nm): mitochondria and clefts are resolved at ~9 nm
TASK_SPACING_NM = {"mito": 9.0, "synapse": 9.0, "membrane": None, "neuron": None}


@dataclass(frozen=True)
class Plan:
    voxel_size: tuple[float, float, float]  # of the data, (z, y, x) nm
    spacing: tuple[float, float, float]  # working spacing (z, y, x) nm
    downsample: int  # in-plane factor from voxel_size to spacing (1 = none)
    crop_shape: tuple[int, int, int]  # crop at the working spacing, (z, y, x) voxels
    batch_size: int
    steps: int
    anisotropic_levels: int  # poolings that are in-plane only
    reasons: dict[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        ctx = tuple(round(p * s) for p, s in zip(self.crop_shape, self.spacing))
        return (f"plan: voxel {_fmt(self.voxel_size)} nm -> working spacing {_fmt(self.spacing)} nm "
                f"(in-plane x1/{self.downsample}), crop {tuple(self.crop_shape)} = {ctx} nm, batch "
                f"{self.batch_size}, {self.steps} steps, "
                + ("2-D crops, every pooling in-plane; " if self.crop_shape[0] == 1 else
                   f"{self.anisotropic_levels} in-plane-only poolings; ")
                + "; ".join(f"{k}: {v}" for k, v in self.reasons.items()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(v: Sequence[float]) -> str:
    return "x".join(f"{x:g}" for x in v)


def make_plan(voxel_size: Sequence[float], task: str, shape: Sequence[int] | None = None, *,
              encoder_voxel_size: Sequence[float] | None = None, stride: Sequence[int] = (2, 8, 8),
              min_context_nm: float = 1200.0, max_crop: int = 256, voxels_per_step: int = 1 << 18,
              steps: int | None = None, downsample: int | None = None, **overrides: Any) -> Plan:
    """The plan for data at ``voxel_size`` (z, y, x nm) and ``task``; ``shape`` (z, y, x voxels of the
    labelled volume) bounds the crop; ``stride`` is the network's total stride (crops are multiples
    of it); ``downsample`` forces the in-plane factor (1: native); ``overrides`` replace any other
    field (``crop_shape``, ``batch_size``, ...)."""
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or min(vs) <= 0 or not all(map(math.isfinite, vs)):
        raise ConfigError(f"voxel size {voxel_size} must be three positive numbers (z, y, x) in nm")
    if task not in TASK_SPACING_NM:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASK_SPACING_NM)}")
    unknown = set(overrides) - set(Plan.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown plan fields {sorted(unknown)}; choose from {', '.join(Plan.__dataclass_fields__)}")
    reasons: dict[str, str] = {}
    xy = min(vs[1:])
    if encoder_voxel_size is not None:
        target = float(min(encoder_voxel_size[1:]))
        reasons["spacing"] = f"the encoder's pretraining spacing {target:g} nm in-plane"
    elif TASK_SPACING_NM[task] is not None:
        target = TASK_SPACING_NM[task]
        reasons["spacing"] = f"{task} resolved at ~{target:g} nm in-plane"
    else:
        target = xy
        reasons["spacing"] = f"{task} needs full resolution"
    down = max(1, int(round(target / xy)))
    if target < xy / 1.5:
        reasons["spacing"] += f", finer than the data's {xy:g} nm: kept at the data's (never upsampled)"
    if downsample is not None:
        down = int(downsample)
        if down < 1:
            raise ConfigError(f"downsample {downsample} must be a positive integer")
        reasons["spacing"] = f"in-plane x1/{down} as asked"
    spacing = (vs[0], vs[1] * down, vs[2] * down)
    aniso = spacing[0] / min(spacing[1:])
    sz, sy, sx = (int(s) for s in stride)
    px = min(max_crop, max(4 * sy, sy * math.ceil(min_context_nm / min(spacing[1:]) / sy)))
    # z >= 4x coarser: the thinnest crop the network takes (2-D where it can): more places per step teach
    # more than neighbouring sections of one place (measured: benchmarks/unet_baseline.py, docs/guide.md)
    depth = 1 if aniso >= 4 else 8 if aniso >= 2 else 16
    depth = max(sz, sz * round(depth / sz))
    reasons["crop"] = (f">= {min_context_nm / 1000:g} um in-plane; depth {depth} for anisotropy {aniso:.1f}")
    patch = [depth, px, px]
    if shape is not None:  # the working-grid volume bounds the crop
        work = (int(shape[0]), int(shape[1]) // down, int(shape[2]) // down)
        for i, (n, s) in enumerate(zip(work, (sz, sy, sx))):
            if patch[i] > n:
                patch[i] = max(s, s * (n // s))
                reasons["crop"] += f"; axis {'zyx'[i]} clipped to the volume ({n})"
    batch = batch_for(patch, voxels_per_step)
    levels = min(3, max(0, round(math.log2(aniso)))) if aniso > 1 else 0  # in-plane poolings until ~isotropic
    plan = Plan(vs, spacing, down, tuple(patch), batch, int(steps if steps is not None else 1000), levels, reasons)
    if "crop_shape" in overrides and "batch_size" not in overrides:  # the voxel budget of the crop asked for
        overrides["batch_size"] = batch_for(overrides["crop_shape"], voxels_per_step)
    return replace(plan, **overrides) if overrides else plan


def batch_for(patch: Sequence[int], voxels_per_step: int = 1 << 18) -> int:
    """Crops per step from a voxel budget per step (2 to 16)."""
    return int(min(16, max(2, round(voxels_per_step / math.prod(patch)))))


def downsample(volume: np.ndarray, factor: int, labels: bool = False) -> np.ndarray:
    """In-plane ``factor`` downsampling of a (z, y, x) volume: the block mean (float32) for intensities,
    the block's most frequent value for labels (ids are never averaged; same centre as the mean);
    trailing voxels that do not fill a block are dropped."""
    if factor == 1:
        return volume
    z, y, x = volume.shape
    y2, x2 = y // factor * factor, x // factor * factor
    if labels:
        blocks = np.asarray(volume[:, :y2, :x2]).reshape(z, y2 // factor, factor, x2 // factor, factor)
        blocks = blocks.transpose(0, 1, 3, 2, 4).reshape(z, y2 // factor, x2 // factor, factor * factor)
        counts = np.zeros(blocks.shape, np.uint16)
        for k in range(blocks.shape[-1]):  # how often each voxel's value occurs in its block
            counts += blocks == blocks[..., k:k + 1]
        return np.take_along_axis(blocks, counts.argmax(-1)[..., None], -1)[..., 0]
    v = np.asarray(volume[:, :y2, :x2], dtype=np.float32).reshape(z, y2 // factor, factor, x2 // factor, factor)
    return v.mean(axis=(2, 4), dtype=np.float32)


def upsample(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Probabilities (C, z, y', x') on the working grid back onto the original (z, y, x) ``shape``
    (linear in-plane interpolation, edges held)."""
    from scipy import ndimage as ndi

    c, z, y, x = probs.shape
    if (y, x) == tuple(shape[1:]):
        return probs
    zoom = (1, 1, shape[1] / y, shape[2] / x)
    out = ndi.zoom(probs.astype(np.float32, copy=False), zoom, order=1, mode="nearest", grid_mode=True)
    return out[:, :, : shape[1], : shape[2]]


class DownsampledVolume:
    """A lazy (z, y, x) volume seen at an in-plane ``factor`` coarser grid (:func:`downsample` per box
    read): pretraining crops at the working spacing without resampling whole volumes."""

    def __init__(self, vol: Any, factor: int) -> None:
        self.vol, self.factor = vol, int(factor)
        z, y, x = (int(n) for n in vol.shape[-3:])
        self.shape = (z, y // self.factor, x // self.factor)
        self.dtype = np.dtype(np.float32)
        vs = getattr(vol, "voxel_size", None)
        self.voxel_size = None if vs is None else (vs[0], vs[1] * self.factor, vs[2] * self.factor)
        self.voxel_size_known = getattr(vol, "voxel_size_known", vs is not None)
        self.spec = f"{getattr(vol, 'spec', type(vol).__name__)} (in-plane x1/{self.factor})"

    def __getitem__(self, box: Any) -> np.ndarray:
        box = tuple(box) + (slice(None),) * (3 - len(box))
        full = [slice(*s.indices(n)[:2]) for s, n in zip(box, self.shape)]
        f = self.factor
        src = np.asarray(self.vol[full[0], full[1].start * f: full[1].stop * f, full[2].start * f: full[2].stop * f])
        return downsample(src, f)

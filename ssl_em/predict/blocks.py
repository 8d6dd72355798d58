"""Blockwise dense prediction of volumes larger than memory: resumable, chunk-aligned, exact tiling.

Geometry (all per axis, voxels, order z, y, x)::

    block   = the output core of one task = one zarr chunk of the result (written exactly once)
    overlap = context shared by neighbouring input regions; a block is predicted from the
              region  block + overlap  (halo overlap//2 before, the rest after), read lazily
    window  = what the model sees at once (default: the whole region, one forward per block);
              a smaller window tiles the region with stride window - overlap and the tiles are
              blended with ``blend`` weights, normalised by their sum

Only the core of each region is kept, so with a halo at least the model's receptive-field radius
the result equals one forward over the whole volume, and no chunk depends on its neighbours:
tasks are independent, memory is one region per task however large the volume, and a resumed or
distributed run gives the same bytes. Regions at the volume's edge are shifted inside it (the
model then sees the true border, as a whole-volume forward does); reflection padding is used only
where the volume is smaller than the window.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ssl_em.data.normalize import Normalization, default_normalization
from ssl_em.errors import ConfigError
from ssl_em.predict.store import BlockId, mark_done
from ssl_em.utils.precision import autocast, resolve_device
from ssl_em.utils.shapes import Triple


@dataclass(frozen=True)
class BlockPlan:
    """The block grid over a volume of spatial ``shape`` (z, y, x); picklable, pure geometry."""

    shape: Triple
    block: Triple
    overlap: Triple
    window: Triple

    def __post_init__(self) -> None:
        if min(self.block) < 1 or min(self.overlap) < 0:
            raise ConfigError(f"block {self.block} must be >= 1 and overlap {self.overlap} >= 0 per axis")
        if any(w <= o for w, o, r in zip(self.window, self.overlap, self.region) if w < r):
            raise ConfigError(f"window {self.window} must exceed overlap {self.overlap} to tile a region")

    @property
    def region(self) -> Triple:
        """Input read per block: block + overlap."""
        return tuple(b + o for b, o in zip(self.block, self.overlap))  # type: ignore[return-value]

    @property
    def grid(self) -> Triple:
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block))  # type: ignore[return-value]

    def blocks(self) -> Iterator[BlockId]:
        return itertools.product(*(range(g) for g in self.grid))  # type: ignore[return-value]

    def core(self, idx: BlockId) -> tuple[slice, slice, slice]:
        """The output box of block ``idx`` (the last block along an axis may be shorter)."""
        return tuple(  # type: ignore[return-value]
            slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(idx, self.block, self.shape)
        )

    def region_box(self, idx: BlockId) -> tuple[slice, slice, slice]:
        """The input box read for block ``idx``: core + halo, shifted to lie inside the volume."""
        out = []
        for i, b, o, s in zip(idx, self.block, self.overlap, self.shape):
            size = min(b + o, s)
            start = min(max(i * b - o // 2, 0), s - size)
            out.append(slice(start, start + size))
        return tuple(out)  # type: ignore[return-value]

    def window_starts(self, padded: Sequence[int]) -> list[Triple]:
        """Starts of the model windows tiling a (padded) region; the last one is flush with its end."""
        axes = []
        for n, w, o in zip(padded, self.window, self.overlap):
            step = max(w - o, 1)
            starts = list(range(0, max(n - w, 0) + 1, step))
            if starts[-1] + w < n:
                starts.append(n - w)
            axes.append(starts)
        return list(itertools.product(*axes))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8)
def blend_weights(window: Triple, mode: str) -> np.ndarray:
    """(D, H, W) float32 importance map: separable Gaussian (sigma = window/8, as MONAI) or ones."""
    if mode == "constant":
        return np.ones(window, np.float32)
    axes = []
    for n in window:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        g = np.exp(-0.5 * (x / max(0.125 * n, 1e-6)) ** 2)
        axes.append(g / g.max())
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = np.maximum(w, 1e-3).astype(np.float32)  # never zero: every voxel keeps a weight
    w.flags.writeable = False  # cached and shared between calls
    return w


def resolve_normalization(normalization: Any, source: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A raw -> float32 callable. Unfitted ``Normalization`` records are fitted on the whole source
    once (never per block: per-block statistics would make blocks disagree at their seams)."""
    if normalization is None:
        return default_normalization
    if isinstance(normalization, dict):
        normalization = Normalization.from_dict(normalization)
    if not callable(normalization):
        raise ConfigError(f"normalization={normalization!r} must be None, a dict or a callable")
    if hasattr(normalization, "fit") and getattr(normalization, "fitted", True) is False:
        normalization = normalization.fit(source)
    return normalization


@dataclass
class BlockJob:
    """Everything one worker needs to predict blocks except the model; picklable when the source is."""

    plan: BlockPlan
    src: Any  # (z, y, x) or (c, z, y, x) array-like
    out_path: str  # folder of the output zarr array
    normalization: Callable[[np.ndarray], np.ndarray]
    blend: str = "gaussian"
    activation: str | None = None
    out_dtype: str = "float32"
    mask: Any = None
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    flips: tuple[int, ...] = ()  # spatial axes (0 z, 1 y, 2 x) mirrored at test time, outputs averaged
    _out: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_out": None}  # reopen the zarr array in the worker

    @property
    def out(self) -> Any:
        if self._out is None:
            import zarr

            self._out = zarr.open_array(self.out_path, mode="r+")
        return self._out

    # --- stage 1: read (I/O, no model) -------------------------------------------------------
    def load(self, idx: BlockId) -> np.ndarray | None:
        """Normalised input region (C, *padded) float32 for block ``idx``; None if the mask is empty."""
        if self.mask is not None and not self._mask_any(idx):
            return None
        box = self.plan.region_box(idx)
        raw = np.asarray(self.src[box] if len(self.src.shape) == 3 else self.src[(slice(None), *box)])
        x = np.asarray(self.normalization(raw), dtype=np.float32)
        x = x[None] if x.ndim == 3 else x
        pad = [(0, 0)] + [(0, max(w - n, 0)) for w, n in zip(self.plan.window, x.shape[1:])]
        if any(p[1] for p in pad):  # only a volume smaller than the window gets padded
            x = np.pad(x, pad, mode="reflect" if min(x.shape[1:]) > 1 else "edge")
        return x

    def _mask_any(self, idx: BlockId) -> bool:
        core = self.plan.core(idx)
        # the mask may be coarser than the source by an integer factor per axis
        box = tuple(
            slice(c.start * m // s, max(-(-c.stop * m // s), c.start * m // s + 1))
            for c, m, s in zip(core, self.mask.shape[-3:], self.plan.shape)
        )
        return bool(np.any(np.asarray(self.mask[box])))

    # --- stage 2: predict (model) ------------------------------------------------------------
    def run_model(self, model: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Model output (C_out, *padded) float32 for each input region, windows blended."""
        import torch

        device = torch.device(resolve_device(self.device))
        tiles = [(i, s) for i, x in enumerate(inputs) for s in self.plan.window_starts(x.shape[1:])]
        acc: list[np.ndarray | None] = [None] * len(inputs)
        single = all(len(self.plan.window_starts(x.shape[1:])) == 1 for x in inputs)
        wsum = [] if single else [np.zeros(x.shape[1:], np.float32) for x in inputs]
        weight = None if single else blend_weights(self.plan.window, self.blend)
        win = self.plan.window
        for b0 in range(0, len(tiles), self.batch_size):
            batch = tiles[b0 : b0 + self.batch_size]
            boxes = [tuple(slice(s, s + w) for s, w in zip(st, win)) for _, st in batch]
            xb = torch.from_numpy(np.stack([inputs[i][(slice(None), *bx)] for (i, _), bx in zip(batch, boxes)]))
            with torch.inference_mode(), autocast(self.precision, device.type):
                yb = self._mirrored_mean(model, xb.to(device))
            yb = yb.float().cpu().numpy()
            if yb.ndim != 5 or yb.shape[2:] != xb.shape[2:]:
                raise ConfigError(
                    f"model output {tuple(yb.shape)} must be (B, C, *window) for input {tuple(xb.shape)}: "
                    "blockwise prediction needs a dense model that keeps the spatial shape"
                )
            for (i, _), bx, y in zip(batch, boxes, yb):
                if single:
                    acc[i] = y
                    continue
                if acc[i] is None:
                    acc[i] = np.zeros((y.shape[0], *inputs[i].shape[1:]), np.float32)
                acc[i][(slice(None), *bx)] += y * weight  # type: ignore[index]
                wsum[i][bx] += weight
        if not single:
            acc = [a / w for a, w in zip(acc, wsum)]  # type: ignore[operator]
        return acc  # type: ignore[return-value]

    def _mirrored_mean(self, model: Any, x: Any) -> Any:
        """The activated output, averaged over every mirroring of ``flips`` (2^k forwards), each mirrored
        back: test-time augmentation with symmetries EM has (nnU-Net mirrors likewise)."""
        total = None
        subsets = [c for k in range(len(self.flips) + 1) for c in itertools.combinations(self.flips, k)]
        for axes in subsets:
            dims = [2 + a for a in axes]
            y = activate(model(x.flip(dims) if dims else x), self.activation).float()
            y = y.flip(dims) if dims else y
            total = y if total is None else total + y
        return total / len(subsets)

    # --- stage 3: write (I/O) ----------------------------------------------------------------
    def store(self, idx: BlockId, pred: np.ndarray | None) -> None:
        """Crop the core, write the block's chunk, then mark it done (the marker comes last)."""
        if pred is not None:  # a skipped block stays at the fill value 0 without being stored
            core = self.plan.core(idx)
            region = self.plan.region_box(idx)
            local = tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, region))
            self.out[(slice(None), *core)] = to_dtype(pred[(slice(None), *local)], self.out_dtype)
        mark_done(self.out_path, idx)

    def run(self, model: Any, ids: Sequence[BlockId]) -> list[BlockId]:
        """Read, predict and write ``ids`` in one go (one dask task or one local step)."""
        inputs = [(idx, self.load(idx)) for idx in ids]
        todo = [(idx, x) for idx, x in inputs if x is not None]
        preds = dict(zip((i for i, _ in todo), self.run_model(model, [x for _, x in todo]))) if todo else {}
        for idx in ids:
            self.store(idx, preds.get(idx))
        return list(ids)


def activate(y: Any, activation: str | None) -> Any:
    if activation is None:
        return y
    if activation == "sigmoid":
        return y.sigmoid()
    if activation == "softmax":
        return y.softmax(dim=1)
    raise ConfigError(f"activation={activation!r} is not one of None, 'sigmoid', 'softmax'")


def to_dtype(pred: np.ndarray, out_dtype: str) -> np.ndarray:
    """float32 as is; uint8 maps probabilities [0, 1] to 0..255 (rounded, clipped)."""
    if out_dtype == "uint8":
        return np.clip(np.rint(pred * 255.0), 0, 255).astype(np.uint8)
    return pred.astype(out_dtype, copy=False)


def describe(obj: Any) -> Any:
    """A JSON-able description of a source/mask/normalisation for the parameter hash."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, (os.PathLike,)):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    spec = getattr(obj, "spec", None)
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        desc = {"array": type(obj).__name__, "shape": list(obj.shape), "dtype": str(obj.dtype)}
        if type(obj) is np.ndarray:  # in memory: hashing it is cheap next to predicting it
            data = memoryview(np.ascontiguousarray(obj)).cast("B")
            desc["blake2b"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        return desc
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def source_voxel_size(src: Any) -> tuple[float, float, float] | None:
    vs = getattr(src, "voxel_size", None)
    if vs is None or not getattr(src, "voxel_size_known", True):
        return None
    return tuple(float(v) for v in vs)  # type: ignore[return-value]

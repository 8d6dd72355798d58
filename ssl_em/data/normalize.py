"""Intensity normalisation of raw EM: one fitted, serialisable record used by training and prediction.

:class:`Normalization` maps raw ``low..high`` to ``0..1`` float32; its fitted values travel with every
exported model, so prediction normalises exactly as training did. Statistics come from a bounded random
sample of the volume (:func:`sample_blocks`), never per crop or per block: per-block statistics would
make neighbouring blocks disagree at their seams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

from ssl_em.data.samplers import uniform_box
from ssl_em.data.volume import as_volume, volume_name
from ssl_em.errors import ConfigError, VolumeError

NormMode = Literal["percentile", "range", "fixed"]


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


def default_normalization(raw: np.ndarray) -> np.ndarray:
    """Integers to [0, 1] by their dtype's maximum (uint8 -> /255); floats unchanged."""
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / np.float32(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32, copy=False)

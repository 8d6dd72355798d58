"""What masked objectives (MAE, SparK, their contrastive combinations) share: how many units stay
visible, and the reconstruction targets (raw, low-passed, normalised per unit)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur_3d", "standardize", "visible_count"]


def visible_count(units: int, mask_ratio: float) -> int:
    """Units left visible out of ``units`` at ``mask_ratio``: at least one, and at least one masked."""
    if units <= 1:
        return 1
    return max(1, min(units - 1, round(units * (1 - mask_ratio))))


def standardize(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Zero mean, unit variance along ``dim`` (image MAE's per-patch "normalized" target)."""
    return (t - t.mean(dim, keepdim=True)) / (t.var(dim, keepdim=True) + 1e-6).sqrt()


def gaussian_blur_3d(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, C, D, H, W)``; ``sigma`` (z, y, x) in voxels, 0 = leave axis
    (the "lowpass" target: shot noise is unpredictable). Edges are replicate-padded so a crop border
    does not darken the target."""
    channels = x.shape[1]
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        radius = max(1, math.ceil(3 * s))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = (k / k.sum()).to(x.dtype)
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        weight = k.reshape(1, 1, *shape).expand(channels, 1, *shape)  # depthwise (C, 1, kz, ky, kx)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis (x) first
        x = F.conv3d(F.pad(x, pad, mode="replicate"), weight, groups=channels)
    return x

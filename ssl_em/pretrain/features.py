"""Encoder features for the joint-embedding objectives and the probes: one feature map per crop
(a ViT's token grid, a U-Net's bottleneck or its full-resolution decoder features) and one vector
per view, pooled over the whole crop or over the region two views share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.errors import ConfigError

FEATURES = ("auto", "tokens", "bottleneck", "dense")
REGIONS = ("overlap", "full")


def feature_map(encoder: nn.Module, x: torch.Tensor, feature: str = "auto") -> torch.Tensor:
    """Encoder features of ``x`` (B, C_in, D, H, W) as a map ``(B, C, d, h, w)``.

    ``"tokens"`` / ``"bottleneck"``: ``forward_features`` (B, N, C) reshaped to ``grid_size`` (the ViT's
    patch tokens or the U-Net's bottleneck voxels); ``"dense"``: ``forward_dense`` (U-Net decoder,
    full resolution); ``"auto"``: tokens for encoders without ``forward_dense``, else bottleneck.
    """
    if feature not in FEATURES:
        raise ConfigError(f"feature {feature!r} is not one of {FEATURES}")
    if feature == "dense":
        if not hasattr(encoder, "forward_dense"):
            raise ConfigError(f"feature='dense' needs an encoder with forward_dense; {type(encoder).__name__} has none")
        return encoder.forward_dense(x)
    tokens = encoder.forward_features(x)  # (B, N, C), (z, y, x) raster order
    d, h, w = encoder.grid_size(x.shape)
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], d, h, w)


def region_weights(boxes: torch.Tensor, in_shape: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """(B, 1, d, h, w) 0/1 weights of the feature cells whose centres lie in each sample's voxel box.

    ``boxes`` (B, 3, 2) int: [start, stop) per axis (z, y, x) in input voxels; a box thinner than a
    cell still selects the cell holding its centre, so no sample is left without a cell.
    """
    weights = []
    for axis, (n_in, n_cells) in enumerate(zip(in_shape, grid)):
        stride = n_in / n_cells
        centres = (torch.arange(n_cells, device=boxes.device, dtype=torch.float32) + 0.5) * stride  # (n,)
        lo, hi = boxes[:, axis, :1].float(), boxes[:, axis, 1:].float()  # (B, 1) each
        inside = (centres >= lo) & (centres < hi)  # (B, n)
        nearest = ((lo + hi) / 2 / stride).floor().clamp(0, n_cells - 1).long()  # cell holding the box centre
        fallback = F.one_hot(nearest[:, 0], n_cells).bool()
        weights.append(torch.where(inside.any(1, keepdim=True), inside, fallback).float())
    wz, wy, wx = weights
    return torch.einsum("bi,bj,bk->bijk", wz, wy, wx)[:, None]


def pool_features(fmap: torch.Tensor, boxes: torch.Tensor | None = None, in_shape: Sequence[int] | None = None
                  ) -> torch.Tensor:
    """Average a feature map (B, C, d, h, w) to (B, C): everywhere, or inside ``boxes`` (see region_weights)."""
    if boxes is None:
        return fmap.mean(dim=(2, 3, 4))
    w = region_weights(boxes, in_shape if in_shape is not None else fmap.shape[-3:], fmap.shape[-3:]).to(fmap.dtype)
    return (fmap * w).sum(dim=(2, 3, 4)) / w.sum(dim=(2, 3, 4))

"""Segmentation heads over any encoder of the ssl-em contract, and the model that joins them.

``SegmentationModel(encoder, head)`` maps ``(B, C, D, H, W)`` voxels to ``(B, K, D, H, W)`` logits.
The head is stored as the attribute ``head`` so ``add_adapter(..., modules_to_save=("head",))`` trains
it; heads never keep a reference to the encoder (that would put the encoder inside ``head``).

Heads:
- :class:`UNETRDecoder3D`: UNETR-style decoder over several ViT blocks' token grids, upsampled in
  stages whose per-axis factors multiply to ``patch_size`` (anisotropic patches upsample z less),
  plus a convolutional path from the raw input: a head on 8x8-voxel patch tokens alone cannot draw
  voxel-level boundaries, the raw path restores them.
- :class:`LinearHead3D`: a 1x1x1 conv on the last tokens, trilinearly upsampled (a linear probe).
- :class:`DenseHead`: a 1x1x1 conv on ``encoder.forward_dense`` features (U-Net decoders).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.models.layers import pointwise_conv3d
from ssl_em.utils.shapes import Triple

__all__ = ["DenseHead", "LinearHead3D", "SegmentationModel", "UNETRDecoder3D", "build_segmentation_model"]


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return sorted(out, reverse=True)


def stage_factors(patch_size: Sequence[int]) -> list[Triple]:
    """Per-stage (z, y, x) upsampling factors, coarse to fine, whose product is ``patch_size``.

    ``(2, 8, 8) -> [(2, 2, 2), (1, 2, 2), (1, 2, 2)]``: the short axis upsamples at the coarse
    stages, so the fine stages (large, cheap-to-keep-thin tensors) stay in-plane, as anisotropic
    U-Nets pool z only at depth.
    """
    per_axis = [_prime_factors(int(p)) for p in patch_size]
    n = max(1, *(len(f) for f in per_axis))
    per_axis = [f + [1] * (n - len(f)) for f in per_axis]
    return [(per_axis[0][s], per_axis[1][s], per_axis[2][s]) for s in range(n)]


def _groups(ch: int) -> int:
    # >= 2 channels per group: a 1-voxel coarse level still has a defined variance
    return next((g for g in (8, 4, 2) if ch % g == 0 and ch // g >= 2), 1)


class ConvBlock3D(nn.Module):
    """Two 3x3x3 conv + GroupNorm + GELU with a residual: ``(B, in, D, H, W) -> (B, out, D, H, W)``.

    GroupNorm, not BatchNorm/InstanceNorm: fine-tuning runs at batch 1-2 and coarse levels can be
    a single voxel, where InstanceNorm is undefined.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.shortcut = nn.Conv3d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else nn.Identity()
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + self.shortcut(x))


class UpBlock3D(nn.Module):
    """Transposed conv by a per-axis ``factor`` (kernel = stride, no overlap) then a ConvBlock3D."""

    def __init__(self, in_ch: int, out_ch: int, factor: Triple) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_ch, out_ch, factor, stride=factor)
        self.block = ConvBlock3D(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.up(x))


def _encoder_depth(encoder: nn.Module) -> int:
    for attr in ("blocks", "stages"):
        blocks = getattr(encoder, attr, None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            return len(blocks)
    info = getattr(encoder, "feature_info", None)
    if info:
        return len(info)
    raise ConfigError(f"cannot tell the depth of {type(encoder).__name__}; pass feature_indices explicitly")


class UNETRDecoder3D(nn.Module):
    """UNETR decoder: intermediate ViT token grids -> voxel logits at the input resolution.

    Args:
        encoder: read once for ``embed_dim``, ``patch_size``, ``in_chans`` and its depth; not stored.
        out_channels: K, logits per voxel.
        feature_indices: block indices (shallow to deep, negatives allowed) whose outputs feed the
            decoder; default: ``S`` evenly spaced blocks ending at the last, ``S`` = number of
            upsampling stages (log2 of the largest patch side: 3 for 8-voxel, 4 for 16-voxel patches).
        decoder_channels: channels at each level, coarse to fine (``S + 1`` values), or an int base
            ``b`` giving ``b * 2**min(S - level, 3)``.
        raw_skip: add the conv path from the raw input at full resolution.

    The deepest feature enters at the token grid; the k-th deepest is lifted by k transposed
    convs to level k (UNETR's "PrUp" path); the raw input joins the last level.
    Input to ``forward``: the list of ``(B, embed_dim, d, h, w)`` features and the raw ``x``.
    """

    input_kind = "intermediates"

    def __init__(
        self,
        encoder: nn.Module,
        out_channels: int,
        feature_indices: Sequence[int] | None = None,
        decoder_channels: int | Sequence[int] = 16,
        raw_skip: bool = True,
    ) -> None:
        super().__init__()
        embed_dim = int(encoder.embed_dim)
        self.patch_size: Triple = tuple(int(p) for p in encoder.patch_size)  # type: ignore[assignment]
        self.factors = stage_factors(self.patch_size)
        n_up = len(self.factors)
        depth = _encoder_depth(encoder)
        if feature_indices is None:
            n = min(n_up, depth)
            feature_indices = [round((i + 1) * depth / n) - 1 for i in range(n)]
        self.feature_indices = sorted(i % depth for i in feature_indices)
        if not 1 <= len(self.feature_indices) <= n_up:
            raise ConfigError(
                f"UNETRDecoder3D takes 1 to {n_up} feature_indices for patch {self.patch_size}, got {feature_indices}"
            )
        if isinstance(decoder_channels, int):
            ch = [decoder_channels * 2 ** min(n_up - lvl, 3) for lvl in range(n_up + 1)]
        else:
            ch = [int(c) for c in decoder_channels]
            if len(ch) != n_up + 1:
                raise ConfigError(f"decoder_channels needs {n_up + 1} values (levels coarse to fine), got {ch}")
        self.channels = ch
        self.raw_skip = raw_skip
        in_chans = int(getattr(encoder, "in_chans", 1))
        self.config: dict[str, Any] = dict(
            type="unetr", out_channels=out_channels, feature_indices=self.feature_indices,
            decoder_channels=ch, raw_skip=raw_skip,
        )

        self.bottom = ConvBlock3D(embed_dim, ch[0])
        # skip k (k = 1 .. n_feat-1) lifts the k-th deepest feature by k stages to level k
        self.skips = nn.ModuleList(
            nn.Sequential(*(UpBlock3D(embed_dim if s == 0 else ch[k], ch[k], self.factors[s]) for s in range(k)))
            for k in range(1, len(self.feature_indices))
        )
        self.raw = ConvBlock3D(in_chans, ch[-1]) if raw_skip else None
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(ch[lvl - 1], ch[lvl], self.factors[lvl - 1], stride=self.factors[lvl - 1])
            for lvl in range(1, n_up + 1)
        )
        has_skip = [lvl < len(self.feature_indices) or (lvl == n_up and raw_skip) for lvl in range(n_up + 1)]
        self.blocks = nn.ModuleList(
            ConvBlock3D(ch[lvl] * (2 if has_skip[lvl] else 1), ch[lvl]) for lvl in range(1, n_up + 1)
        )
        self.out = nn.Conv3d(ch[-1], out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``features``: ``len(feature_indices)`` tensors (B, embed_dim, d, h, w), shallow to deep;
        ``x``: raw input (B, C, D, H, W) -> logits (B, K, D, H, W)."""
        grid = tuple(s // p for s, p in zip(x.shape[-3:], self.patch_size))
        for f in features:
            if tuple(f.shape[-3:]) != grid:
                raise ConfigError(
                    f"UNETRDecoder3D expects features on the token grid {grid}, got {tuple(f.shape[-3:])}; "
                    "use head='dense' for encoders with pyramid features (U-Net)"
                )
        deep_first = list(reversed(features))
        y = self.bottom(deep_first[0])
        for lvl in range(1, len(self.factors) + 1):
            y = self.ups[lvl - 1](y)
            if lvl < len(deep_first):
                y = torch.cat([y, self.skips[lvl - 1](deep_first[lvl])], dim=1)
            elif lvl == len(self.factors) and self.raw is not None:
                y = torch.cat([y, self.raw(x)], dim=1)
            y = self.blocks[lvl - 1](y)
        return self.out(y)


class LinearHead3D(nn.Module):
    """Linear probe: 1x1x1 conv on the last block's tokens, trilinearly upsampled to the input size."""

    input_kind = "intermediates"

    def __init__(self, encoder: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.feature_indices = [-1]
        self.conv = nn.Conv3d(int(encoder.embed_dim), out_channels, 1)
        self.config: dict[str, Any] = dict(type="linear", out_channels=out_channels)

    def forward(self, features: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, d, h, w) last tokens -> logits (B, K, D, H, W) at ``x``'s size."""
        y = self.conv(features[-1])
        return F.interpolate(y, size=x.shape[-3:], mode="trilinear", align_corners=False)


class DenseHead(nn.Module):
    """1x1x1 conv on full-resolution decoder features from ``encoder.forward_dense`` (U-Net)."""

    input_kind = "dense"

    def __init__(self, encoder: nn.Module, out_channels: int) -> None:
        super().__init__()
        if not hasattr(encoder, "forward_dense"):
            raise ConfigError(f"{type(encoder).__name__} has no forward_dense; use head='unetr' or 'linear'")
        channels = getattr(encoder, "dense_dim", None)
        if channels is None:
            raise ConfigError(f"{type(encoder).__name__} does not say its dense_dim (forward_dense channels)")
        self.feature_indices: list[int] = []
        self.conv = pointwise_conv3d(channels, out_channels)
        self.config: dict[str, Any] = dict(type="dense", out_channels=out_channels)

    def forward(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_dec, D, H, W) -> logits (B, K, D, H, W)."""
        return self.conv(features)


class SegmentationModel(nn.Module):
    """``encoder`` + ``head``: ``forward(x (B, C, D, H, W)) -> logits (B, K, D, H, W)``."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        # read once: after peft injection the head may sit behind a wrapper
        self.input_kind: str = head.input_kind
        self.feature_indices: list[int] = list(head.feature_indices)
        # timm-style encoders can skip the blocks after the last index and the final norm
        params = inspect.signature(encoder.forward_intermediates).parameters
        self._intermediates_kw = {"intermediates_only": True} if "intermediates_only" in params else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_kind == "dense":
            return self.head(self.encoder.forward_dense(x), x)
        feats = self.encoder.forward_intermediates(x, indices=self.feature_indices, output_fmt="NCDHW",
                                                   **self._intermediates_kw)
        if isinstance(feats, tuple):  # timm style (final, intermediates)
            feats = feats[1]
        return self.head(feats, x)


def build_segmentation_model(
    encoder: nn.Module, head: str = "auto", out_channels: int = 1, **head_kwargs: Any
) -> SegmentationModel:
    """Encoder + a head by name: ``"unetr"``, ``"linear"``, ``"dense"`` or ``"auto"`` (dense for
    encoders with ``forward_dense``, else UNETR). ``head_kwargs`` go to the head's constructor."""
    if head == "auto":
        head = "dense" if hasattr(encoder, "forward_dense") else "unetr"
    heads = {"unetr": UNETRDecoder3D, "linear": LinearHead3D, "dense": DenseHead}
    if head not in heads:
        raise ConfigError(f"unknown head {head!r}; choose one of auto, {', '.join(heads)}")
    if out_channels < 1:
        raise ConfigError(f"out_channels must be >= 1, got {out_channels}")
    return SegmentationModel(encoder, heads[head](encoder, out_channels, **head_kwargs))

"""Residual 3-D U-Net encoder family for few-label EM segmentation on modest hardware.

A U-Net whose decoder is part of the encoder module, so fine-tuning starts from a whole pretrained
network (SparK-style masked pretraining trains both halves, see :mod:`ssl_em.pretrain.spark`).

Layout for ``widths=(8, 16, 32, 64)``, ``anisotropic_levels=2`` (ssTEM: z sections ~10x thicker):

    stage 0  full res        residual blocks of two (1,3,3) convs       -> skip 0
    stage 1  pool (1,2,2)    two (1,3,3) convs                           -> skip 1
    stage 2  pool (1,2,2)    (3,3,3) + (3,3,3)                           -> skip 2
    stage 3  pool (2,2,2)    (3,3,3) + (3,3,3)   bottleneck, embed_dim=64
    decoder: ConvTranspose3d up, add the skip, one residual block per level -> (B, 8, D, H, W)

The first ``anisotropic_levels`` poolings are in-plane only and the stages before them use in-plane
(1,3,3) kernels, as nnU-Net does wherever the spacing is anisotropic: z context comes from the coarser
levels, and the full-resolution convs, which dominate the CPU cost, are 3x cheaper. FIB-SEM with
isotropic voxels uses ``anisotropic_levels=0``. Skips are added, not concatenated (half the
decoder cost on CPU). Every block takes an optional visibility ``mask`` so masked pretraining runs the
encoder as a sparse CNN: features are re-masked after every conv and normalisation statistics are taken
over visible voxels only, so masked regions neither leak through convolutions nor bias the norms.
Conv3d modules have stable names (``conv1``, ``conv2``, ``shortcut``) for peft LoRA targeting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_em.errors import ConfigError

from ssl_em.models.layers import UNetContract, resize_mask
from ssl_em.models.pretrained import timm_default_cfgs
from ssl_em.models.registry import build_encoder, register_encoder
from ssl_em.utils.shapes import Triple

__all__ = ["MaskedGroupNorm", "ResBlock3d", "ResidualUNet3D"]


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics can be restricted to visible voxels.

    ``forward(x, mask)`` with ``mask`` (B, 1, D, H, W) in {0, 1} (1 = visible) normalises each
    (sample, group) by the mean and variance over visible voxels only; without a mask it is plain
    ``F.group_norm``. Statistics over masked zeros would shrink the variance with the mask ratio and
    shift the features the decoder sees between pretraining and fine-tuning (SparK's sparse BN argument).
    Values at masked positions are garbage; callers re-mask after the activation.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if mask is None:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        b, c = x.shape[:2]
        g = self.num_groups
        dims = tuple(range(2, x.ndim))
        # per-channel sums reduce over space in any memory format (a (B, G, -1) view would copy a
        # channels_last_3d tensor); one masked pass, two reductions, one affine pass (addcmul)
        xm = x * mask
        s1 = xm.sum(dims).reshape(b, g, -1).sum(-1)  # (B, G)
        s2 = xm.square().sum(dims).reshape(b, g, -1).sum(-1)
        n = (mask.sum(dims) * (c // g)).clamp_min(1.0)  # visible voxels per (sample, group): (B, 1)
        mean = s1 / n
        rstd = torch.rsqrt((s2 / n - mean.square()).clamp_min(0.0) + self.eps)  # (B, G)
        scale = rstd.repeat_interleave(c // g, 1) * self.weight  # (B, C)
        shift = self.bias - mean.repeat_interleave(c // g, 1) * scale
        shape = (b, c) + (1,) * (x.ndim - 2)
        return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


def _norm(kind: str, channels: int, groups: int) -> MaskedGroupNorm:
    if kind == "instance":
        return MaskedGroupNorm(channels, channels)
    if kind == "group":
        g = min(groups, channels)
        while channels % g:
            g -= 1
        return MaskedGroupNorm(g, channels)
    raise ConfigError(f"unet3d norm={kind!r} is not supported; use 'group' or 'instance'")


def _pad(kernel: Triple) -> Triple:
    return (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)


class ResBlock3d(nn.Module):
    """Residual block: conv1-norm-act-conv2-norm, + shortcut, act.

    Both convs use ``kernel`` ((1,3,3) in-plane at anisotropic levels, else (3,3,3)).
    With ``mask`` (B, 1, D, H, W, 1 = visible) features are zeroed at masked voxels after every
    activation, which makes the block a sparse convolution over visible voxels.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: Triple, norm: str, groups: int, act: str) -> None:
        super().__init__()
        from timm.layers import get_act_layer

        try:
            act_layer = get_act_layer(act)
        except KeyError:
            act_layer = None
        if act_layer is None:
            raise ConfigError(f"unet3d act={act!r} is not an activation timm knows (e.g. 'relu', 'gelu', 'silu')")
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel, padding=_pad(kernel), bias=False)
        self.norm1 = _norm(norm, out_ch, groups)
        self.conv2 = nn.Conv3d(out_ch, out_ch, kernel, padding=_pad(kernel), bias=False)
        self.norm2 = _norm(norm, out_ch, groups)
        self.shortcut = nn.Conv3d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x), mask))
        if mask is not None:
            y = y * mask
        y = self.norm2(self.conv2(y), mask)
        y = self.act(y + self.shortcut(x))
        return y if mask is None else y * mask


class _Stage(nn.Module):
    """Optional max-pool then ``depth`` residual blocks at one resolution."""

    def __init__(self, in_ch: int, out_ch: int, depth: int, pool: Triple | None, kernel: Triple, **kw: Any) -> None:
        super().__init__()
        self.pool = nn.MaxPool3d(pool, pool) if pool is not None else nn.Identity()
        self.blocks = nn.ModuleList(
            ResBlock3d(in_ch if i == 0 else out_ch, out_ch, kernel, **kw) for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pool(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return x


class ResidualUNet3D(UNetContract, nn.Module):
    """Residual 3-D U-Net following the ssl-em encoder contract (CONTRIBUTING.md).

    Args:
        in_chans: input channels (1 for EM).
        widths: channels per stage, shallow to deep; ``len(widths) - 1`` poolings by 2.
        blocks_per_stage: residual blocks per encoder stage (int or one per stage).
        decoder_blocks: residual blocks per decoder level.
        anisotropic_levels: the first N poolings are (1,2,2) and the stages before them use (1,3,3)
            convs; 0 = isotropic (FIB-SEM); ``len(widths)`` = a 2-D U-Net run section by section.
        norm: "group" (``norm_groups`` groups) or "instance"; both support visible-only statistics.
        norm_groups: groups for ``norm="group"``.
        act: activation name understood by ``timm.layers.get_act_layer`` ("relu", "gelu", "silu", ...).
        out_channels: 0 -> no head, ``forward`` returns the dense decoder features; else a 1x1x1 conv head.

    Shapes: input (B, in_chans, D, H, W) with (D, H, W) divisible by ``patch_size``;
    ``forward_dense`` -> (B, widths[0], D, H, W); ``forward_features`` -> (B, N, embed_dim) with N the
    number of bottleneck voxels.
    """

    def __init__(
        self,
        in_chans: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks_per_stage: int | Sequence[int] = 1,
        decoder_blocks: int = 1,
        anisotropic_levels: int = 2,
        norm: str = "group",
        norm_groups: int = 8,
        act: str = "relu",
        out_channels: int = 0,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        n = len(widths)
        depths = (blocks_per_stage,) * n if isinstance(blocks_per_stage, int) else tuple(blocks_per_stage)
        if n < 1 or min(widths) < 1:
            raise ConfigError(f"unet3d widths={widths} must be one or more positive channel counts")
        if len(depths) != n or min(depths) < 1 or decoder_blocks < 1:
            raise ConfigError(f"unet3d blocks_per_stage={blocks_per_stage} needs {n} counts >= 1 (one per width)")
        if not 0 <= anisotropic_levels <= n:
            raise ConfigError(f"unet3d anisotropic_levels={anisotropic_levels} must be in [0, {n}] for {n} stages")
        # complete kwargs: every unet3d name rebuilds this model from them (variants overwrite the name)
        self.encoder_config: dict[str, Any] = {"architecture": "unet3d_small", "kwargs": dict(
            in_chans=in_chans, widths=list(widths), blocks_per_stage=list(depths), decoder_blocks=decoder_blocks,
            anisotropic_levels=anisotropic_levels, norm=norm, norm_groups=norm_groups, act=act,
            out_channels=out_channels,
        )}
        kw = dict(norm=norm, groups=norm_groups, act=act)
        # pool factor of stage i (i >= 1) and its first-conv kernel
        self.pools: list[Triple] = [(1, 2, 2) if i <= anisotropic_levels else (2, 2, 2) for i in range(1, n)]
        kernels: list[Triple] = [(1, 3, 3) if i < anisotropic_levels else (3, 3, 3) for i in range(n)]
        self.stages = nn.ModuleList(
            _Stage(in_chans if i == 0 else widths[i - 1], widths[i], depths[i], None if i == 0 else self.pools[i - 1],
                   kernels[i], **kw)
            for i in range(n)
        )
        # decoder level i (0..n-2) upsamples stage i+1 to stage i and refines the sum with the skip
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(widths[i + 1], widths[i], self.pools[i], self.pools[i]) for i in range(n - 1)
        )
        self.decoder = nn.ModuleList(_Stage(widths[i], widths[i], decoder_blocks, None, kernels[i], **kw)
                                     for i in range(n - 1))
        self.head = nn.Conv3d(widths[0], out_channels, 1) if out_channels > 0 else None
        self.decoder_modules = ("ups", "decoder")  # what add_adapter(train_decoder=True) trains in full
        self.widths = widths
        self.embed_dim = self.num_features = widths[-1]
        self.dense_dim = widths[0]
        self.stage_strides: list[Triple] = [(1, 1, 1)]
        for p in self.pools:
            s = self.stage_strides[-1]
            self.stage_strides.append((s[0] * p[0], s[1] * p[1], s[2] * p[2]))
        self.patch_size: Triple = self.stage_strides[-1]
        self.in_chans = in_chans

    # --- contract -------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in (*self.stages, *self.decoder):
            s.grad_checkpointing = enable

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ConfigError(f"{self.architecture} expects (B, {self.in_chans}, D, H, W) input, got {tuple(x.shape)}")
        self.grid_size(x.shape)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Stage outputs, shallow to deep: [(B, widths[i], D/s_i, H/s_i, W/s_i)].

        ``mask`` (B, 1, d, h, w), 1 = visible, at any resolution that divides every stage (usually the
        bottleneck grid or coarser): the encoder then sees only visible voxels (sparse-conv semantics).
        """
        self._check(x)
        full = x.shape[-3:]
        feats = []
        for stage, stride in zip(self.stages, self.stage_strides):
            m = None
            if mask is not None:
                m = resize_mask(mask.to(x.dtype), [a // s for a, s in zip(full, stride)])
                if not feats:  # masked input voxels never enter the network
                    x = x * m
            x = stage(x, m)
            feats.append(x)
        return feats

    def forward_decoder(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Dense decoder features (B, widths[0], D, H, W) from the stage outputs of ``forward_encoder``."""
        x = feats[-1]
        for i in range(len(feats) - 2, -1, -1):
            x = self.decoder[i](self.ups[i](x) + feats[i])
        return x


# --- registered variants ----------------------------------------------------------------------
default_cfgs = timm_default_cfgs()  # shipped weights (ssl_em/weights/) as timm pretrained configs


def _create_unet3d(variant: str, pretrained: bool = False, defaults: dict[str, Any] | None = None,
                   **kwargs: Any) -> ResidualUNet3D:
    """timm's variant helper signature; ``defaults`` (the variant's) are merged under ``kwargs`` (the user's)."""
    model = build_encoder(ResidualUNet3D, variant, dict(defaults or {}), pretrained, **kwargs)
    return model  # type: ignore[return-value]


_SIZES: dict[str, dict[str, Any]] = {
    "test": dict(widths=(4, 8), blocks_per_stage=1, norm_groups=2),
    "tiny": dict(widths=(8, 16, 32, 64), blocks_per_stage=1),  # ~0.3 M parameters
    "small": dict(widths=(16, 32, 64, 128), blocks_per_stage=1),  # ~1.2 M
    "base": dict(widths=(32, 64, 128, 256), blocks_per_stage=(1, 2, 2, 2)),  # ~9 M
    # the plain U-Net baseline's depth and widths (ssl_em.models.unet), ~1.7 M
    "sections": dict(widths=(16, 32, 64, 128, 256), blocks_per_stage=1, anisotropic_levels=5),
}


@register_encoder
def unet3d_test(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """Two-stage toy for tests (~3 k parameters), anisotropic: patch (1, 2, 2)."""
    return _create_unet3d("unet3d_test", pretrained, defaults=dict(_SIZES["test"], anisotropic_levels=1), **kwargs)


@register_encoder
def unet3d_test_iso(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """Two-stage isotropic toy for tests: patch (2, 2, 2)."""
    return _create_unet3d("unet3d_test_iso", pretrained, defaults=dict(_SIZES["test"], anisotropic_levels=0), **kwargs)


@register_encoder
def unet3d_tiny(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """ssTEM, ~0.3 M parameters, CPU-friendly; patch (2, 8, 8)."""
    return _create_unet3d("unet3d_tiny", pretrained, defaults=dict(_SIZES["tiny"], anisotropic_levels=2), **kwargs)


@register_encoder
def unet3d_tiny_iso(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """Isotropic (FIB-SEM), ~0.3 M parameters; patch (8, 8, 8)."""
    return _create_unet3d("unet3d_tiny_iso", pretrained, defaults=dict(_SIZES["tiny"], anisotropic_levels=0), **kwargs)


@register_encoder
def unet3d_small(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """ssTEM, ~1.2 M parameters; patch (2, 8, 8)."""
    return _create_unet3d("unet3d_small", pretrained, defaults=dict(_SIZES["small"], anisotropic_levels=2), **kwargs)


@register_encoder
def unet3d_small_iso(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """Isotropic (FIB-SEM), ~1.2 M parameters; patch (8, 8, 8)."""
    return _create_unet3d("unet3d_small_iso", pretrained,
                          defaults=dict(_SIZES["small"], anisotropic_levels=0), **kwargs)


@register_encoder
def unet2d_small(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """ssTEM whose sections are >= 4x thicker than its pixels, where the plan trains on single sections:
    every pooling and kernel in-plane (a 2-D U-Net applied section by section), 5 stages of 16-256
    channels as the plain U-Net baseline; patch (1, 16, 16), ~1.7 M parameters."""
    return _create_unet3d("unet2d_small", pretrained, defaults=_SIZES["sections"], **kwargs)


@register_encoder
def unet3d_base(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """ssTEM, ~9 M parameters (GPU pretraining); patch (2, 8, 8)."""
    return _create_unet3d("unet3d_base", pretrained, defaults=dict(_SIZES["base"], anisotropic_levels=2), **kwargs)


@register_encoder
def unet3d_base_iso(pretrained: bool = False, **kwargs: Any) -> ResidualUNet3D:
    """Isotropic (FIB-SEM), ~9 M parameters; patch (8, 8, 8)."""
    return _create_unet3d("unet3d_base_iso", pretrained, defaults=dict(_SIZES["base"], anisotropic_levels=0), **kwargs)

"""The U-Net people write, as ssl-em's convolutional encoder family (pretrained, adapted, or from scratch).

Ronneberger et al.'s U-Net as users train it: two conv-BatchNorm-ReLU per level, max-pooling,
transposed-conv upsampling, concatenated skips, widths doubling from 16. It is both the network the
``unet`` and ``scratch`` controls train from random init and the encoder ssl-em pretrains and adapts:
one implementation, so a pretrained-vs-scratch comparison differs only in the starting weights.

Poolings and kernels follow nnU-Net's rule (:func:`layout`): an axis is pooled, and gets a 3-wide
kernel, while its spacing is within 2x of the finest; so serial-section EM (z >= 4x coarser) gets an
in-plane network and near-isotropic FIB-SEM a 3-D one. The plan passes its spacing and crop; the
resulting ``pools`` and ``kernels`` are recorded in ``encoder_config``, so a saved encoder rebuilds
exactly. Every block takes an optional visibility ``mask`` (SparK): features are zeroed at masked
voxels after every conv and BatchNorm statistics come from visible voxels only
(:class:`MaskedBatchNorm3d`). Conv3d names are stable (``conv1``, ``conv2``) for peft targeting.

Why this network and not ssl-em's former residual U-Net (GroupNorm, added skips, one block per level):
with the same depth and widths, trained from scratch on the same labels and steps, the residual one
learnt far less on VNC mitochondria (``benchmarks/results/vnc_mito_unet2d_patches.md``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.models.layers import UNetContract, resize_mask
from ssl_em.models.pretrained import timm_default_cfgs
from ssl_em.models.registry import build_encoder, register_encoder
from ssl_em.utils.shapes import Triple

__all__ = ["MaskedBatchNorm3d", "UNet", "layout"]


def layout(spacing: Sequence[float], crop_shape: Sequence[int], levels: int = 4) -> tuple[list[Triple], list[Triple]]:
    """nnU-Net's rule for the kernels of ``levels + 1`` levels and the ``levels`` poolings between them, on
    crops of ``crop_shape`` (z, y, x) at ``spacing`` (nm): an axis is pooled while its spacing is within 2x
    of the finest (among axes of more than one voxel) and it still has 2 or more voxels (an even count);
    it gets a 3-wide kernel under the same spacing rule when it has more than one voxel."""
    sp, size = [float(v) for v in spacing], [int(n) for n in crop_shape]
    kernels: list[Triple] = []
    pools: list[Triple] = []
    for level in range(levels + 1):
        finest = min(s for s, n in zip(sp, size) if n > 1) if max(size) > 1 else min(sp)  # a 1-voxel axis is no axis
        kernels.append(tuple(3 if s <= 2 * finest and n > 1 else 1 for s, n in zip(sp, size)))  # type: ignore[misc]
        if level == levels:
            break
        pool = tuple(2 if s <= 2 * finest and n >= 2 and n % 2 == 0 else 1 for s, n in zip(sp, size))
        pools.append(pool)  # type: ignore[arg-type]
        sp = [s * p for s, p in zip(sp, pool)]
        size = [n // p for n, p in zip(size, pool)]
    return kernels, pools


def full_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B, 1, D, H, W) mask repeated over ``like``'s channels, in its dtype and memory layout: a product with a
    one-channel mask broadcast over channels-last bf16 features runs ~10x slower than one with a full one."""
    if mask.shape == like.shape and mask.dtype == like.dtype:
        return mask
    return torch.empty_like(like).copy_(mask.expand_as(like))


class _VisibleBatchNorm(torch.autograd.Function):
    """BatchNorm (then ReLU) over the visible voxels of a 0/1 mask, ``n`` of them, zero at masked voxels; returns
    the output and the visible voxels' per-channel mean and biased variance (fp32, for the running statistics).

    Written as one autograd node on ATen's fused batch-norm kernels: composed of elementwise products and
    sums, autograd made some twenty passes over each feature map (forward and backward) where native
    BatchNorm makes four, and masked pretraining cost 1.5x a fine-tuning step.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, eps: float, relu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xm = x * mask
        # statistics over every voxel of xm (masked ones are 0) by the fused kernel, rescaled to the visible ones
        _, mean_all, invstd_all = torch.native_batch_norm(xm, None, None, None, None, True, 0.0, 0.0)
        mean_all, invstd_all = mean_all.to(weight.dtype), invstd_all.to(weight.dtype)  # fp32 under bf16 autocast
        ratio = (xm.numel() // xm.shape[1]) / n
        mean = mean_all * ratio
        var = ((invstd_all.pow(-2) + mean_all.square()) * ratio - mean.square()).clamp_min(0.0)
        out = torch.batch_norm(xm, weight, bias, mean, var, False, 0.0, eps, True)  # the affine with those statistics
        if relu:
            out.relu_()
        out.mul_(mask)
        ctx.save_for_backward(xm, out, mask, weight, mean, var, n)
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        xm, out, mask, weight, mean, var, n = ctx.saved_tensors
        # gradient reaching the normalised values: visible voxels only (and, after ReLU, where it passed)
        grad = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad * mask
        # eval-mode kernel with the visible statistics: w * invstd * grad, sum(grad * xhat) and sum(grad)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad, xm, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        # the statistics' own gradient, -(w * invstd / n) * (sum(grad) + xhat * sum(grad * xhat)) on visible voxels,
        # is affine in xm: one more pass of the same kernel
        invstd = (var + ctx.eps).rsqrt()
        a = weight * invstd / n
        slope, offset = -a * invstd * grad_w, -a * (grad_b - mean * invstd * grad_w)
        ones = torch.ones_like(var)
        grad_x += torch.batch_norm(xm, slope, offset, torch.zeros_like(var), ones, False, 0.0, 0.0, True).mul_(mask)
        return grad_x, None, None, grad_w, grad_b, None, None


class MaskedBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm whose batch statistics can be restricted to visible voxels (SparK's sparse BatchNorm).

    ``forward(x, mask)`` with ``mask`` (B, 1, D, H, W) in {0, 1} (1 = visible), in training, normalises
    each channel by the mean and variance over the batch's visible voxels, updates the running
    statistics with them and returns zeros at masked voxels; statistics over masked zeros would shrink
    the variance by the mask ratio and shift what the layers after it see between pretraining and
    fine-tuning. Without a mask, or in eval mode, it is plain BatchNorm. ``relu=True`` applies a ReLU
    after it (in one pass with the masking).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:  # type: ignore[override]
        if mask is None or not self.training:
            out = super().forward(x)
            return F.relu(out, inplace=True) if relu else out
        weight = self.weight if self.affine else torch.ones_like(self.running_var, dtype=torch.float32)
        bias = self.bias if self.affine else torch.zeros_like(weight)
        n = mask[:, :1].sum(dtype=weight.dtype).clamp_min(2.0)  # visible voxels over the batch (one channel)
        out, mean, var = _VisibleBatchNorm.apply(x, full_mask(mask, x), n, weight, bias, self.eps, relu)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
                self.num_batches_tracked.add_(1)
        return out


class ConvBlock(nn.Module):
    """conv1-BN-ReLU-conv2-BN-ReLU at one resolution; with ``mask`` a sparse block over visible voxels."""

    def __init__(self, in_ch: int, out_ch: int, kernel: Triple) -> None:
        super().__init__()
        pad = tuple(k // 2 for k in kernel)
        self.conv1 = nn.Conv3d(in_ch, out_ch, kernel, padding=pad, bias=False)
        self.bn1 = MaskedBatchNorm3d(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, kernel, padding=pad, bias=False)
        self.bn2 = MaskedBatchNorm3d(out_ch)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv1(x)
        if mask is not None:
            mask = full_mask(mask, x)  # once for both convs: they have the same channels
        x = self.bn1(x, mask, relu=True)
        return self.bn2(self.conv2(x), mask, relu=True)


class UNet(UNetContract, nn.Module):
    """The plain U-Net under the ssl-em encoder contract (CONTRIBUTING.md).

    Args:
        in_chans: input channels (1 for EM).
        widths: channels per level, shallow to deep (``len(widths) - 1`` poolings).
        spacing, crop_shape: the plan's working spacing (z, y, x nm) and crop, from which :func:`layout`
            derives ``pools`` and ``kernels`` when those are not given.
        pools, kernels: explicit poolings (one per level boundary) and kernels (one per level); a saved
            encoder records them, so it rebuilds whatever spacing it was planned for.
        out_channels: 0 -> no head, ``forward`` returns the dense decoder features; else a 1x1x1 conv head.

    Shapes: input (B, in_chans, D, H, W) with (D, H, W) divisible by ``patch_size`` (the total pooling);
    ``forward_dense`` -> (B, widths[0], D, H, W); ``forward_features`` -> (B, N, embed_dim) bottleneck tokens.
    """

    def __init__(self, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64, 128, 256),
                 spacing: Sequence[float] | None = None, crop_shape: Sequence[int] | None = None,
                 pools: Sequence[Sequence[int]] | None = None, kernels: Sequence[Sequence[int]] | None = None,
                 out_channels: int = 0) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        n = len(widths)
        if n < 2 or min(widths) < 1 or in_chans < 1:
            raise ConfigError(f"unet widths {list(widths)} need two or more positive channel counts")
        if pools is None or kernels is None:
            if spacing is None or crop_shape is None:
                raise ConfigError("unet needs spacing and crop_shape (the plan's) or explicit pools and kernels")
            planned_kernels, planned_pools = layout(spacing, crop_shape, n - 1)
            kernels = kernels if kernels is not None else planned_kernels
            pools = pools if pools is not None else planned_pools
        self.pools_zyx: list[Triple] = [tuple(int(v) for v in p) for p in pools]  # type: ignore[misc]
        self.kernels_zyx: list[Triple] = [tuple(int(v) for v in k) for k in kernels]  # type: ignore[misc]
        kernels_zyx = self.kernels_zyx
        if len(self.pools_zyx) != n - 1 or len(kernels_zyx) != n or any(len(t) != 3 for t in (*self.pools_zyx, *kernels_zyx)):
            raise ConfigError(f"unet with {n} widths needs {n - 1} pools and {n} kernels of three (z, y, x) sizes")
        if any(v not in (1, 2) for p in self.pools_zyx for v in p) or any(k % 2 == 0 for t in kernels_zyx for k in t):
            raise ConfigError(f"unet pools {self.pools_zyx} must be 1 or 2 per axis, kernels {kernels_zyx} odd")
        self.encoder_config: dict[str, Any] = {"architecture": "unet_small", "kwargs": dict(
            in_chans=in_chans, widths=list(widths), pools=[list(p) for p in self.pools_zyx],
            kernels=[list(k) for k in kernels_zyx], out_channels=out_channels)}
        self.stages = nn.ModuleList(ConvBlock(in_chans if i == 0 else widths[i - 1], widths[i], kernels_zyx[i])
                                    for i in range(n))
        self.pools = nn.ModuleList(nn.MaxPool3d(p) for p in self.pools_zyx)
        self.ups = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], p, p) for i, p in enumerate(self.pools_zyx))
        self.decoder = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], kernels_zyx[i]) for i in range(n - 1))
        self.head = nn.Conv3d(widths[0], out_channels, 1) if out_channels > 0 else None
        self.decoder_modules = ("ups", "decoder")  # what add_adapter(train_decoder=True) trains in full
        self.widths, self.in_chans = widths, in_chans
        self.embed_dim = self.num_features = widths[-1]
        self.dense_dim = widths[0]
        self.stage_strides: list[Triple] = [(1, 1, 1)]
        for p in self.pools_zyx:
            self.stage_strides.append(tuple(a * b for a, b in zip(self.stage_strides[-1], p)))  # type: ignore[arg-type]
        self.patch_size: Triple = self.stage_strides[-1]
        # channels-last weights make oneDNN run every conv, BatchNorm and pooling channels-last: fine-tuning
        # and pretraining steps ~20 % faster on CPU (benchmarks/unet_speed.py); saved weights are contiguous
        self.to(memory_format=torch.channels_last_3d)

    # --- contract -------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Not needed at these sizes (BatchNorm running statistics would also be updated twice)."""

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Level outputs, shallow to deep: [(B, widths[i], D/s_i, H/s_i, W/s_i)].

        ``mask`` (B, 1, d, h, w), 1 = visible, at a resolution every level divides (the bottleneck grid or
        coarser): the encoder then sees only visible voxels (sparse-conv semantics, SparK).
        """
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ConfigError(f"{self.architecture} expects (B, {self.in_chans}, D, H, W) input, got {tuple(x.shape)}")
        self.grid_size(x.shape)
        x = x.contiguous(memory_format=torch.channels_last_3d)  # as the weights (a no-op for one channel)
        full = x.shape[-3:]
        feats: list[torch.Tensor] = []
        for i, (stage, stride) in enumerate(zip(self.stages, self.stage_strides)):
            m = None if mask is None else resize_mask(mask.to(x.dtype), [a // s for a, s in zip(full, stride)])
            if i == 0 and m is not None:
                x = x * m  # masked input voxels never enter the network
            x = stage(x if i == 0 else self.pools[i - 1](x), m)
            feats.append(x)
        return feats

    def forward_decoder(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Dense decoder features (B, widths[0], D, H, W) from the level outputs of ``forward_encoder``."""
        x = feats[-1]
        for i in range(len(feats) - 2, -1, -1):
            x = self.decoder[i](torch.cat([feats[i], self.ups[i](x)], 1))
        return x


# --- registered variants ----------------------------------------------------------------------
default_cfgs = timm_default_cfgs()  # shipped weights (ssl_em/weights/) as timm pretrained configs

# default layouts when no plan is given: serial-section EM (z >= 4x coarser: every pooling and kernel
# in-plane) and near-isotropic FIB-SEM (3-D)
SECTIONS = dict(spacing=(50.0, 9.2, 9.2), crop_shape=(1, 128, 128))
ISOTROPIC = dict(spacing=(8.0, 8.0, 8.0), crop_shape=(32, 64, 64))


def _create_unet(variant: str, pretrained: bool = False, defaults: dict[str, Any] | None = None, **kwargs: Any) -> UNet:
    """timm's variant helper signature; ``defaults`` (the variant's) are merged under ``kwargs`` (the user's)."""
    defaults = dict(defaults or {})
    if "patch_shape" in kwargs:  # the crop's old name (scripts written before it was renamed)
        warnings.warn(f"{variant}(patch_shape=...) is now crop_shape; patch_shape will be removed", DeprecationWarning,
                      stacklevel=3)
        kwargs.setdefault("crop_shape", kwargs.pop("patch_shape"))
    if {"pools", "kernels", "spacing", "crop_shape"} & set(kwargs):  # a plan's or a saved layout
        defaults = {k: v for k, v in defaults.items() if k not in ("spacing", "crop_shape")}
    model = build_encoder(UNet, variant, defaults, pretrained, **kwargs)
    # record the resolved layout, not the spacing it came from: the saved encoder rebuilds the same
    # network whatever crop it is later fine-tuned on
    kw = model.encoder_config["kwargs"]
    for key in ("spacing", "crop_shape"):
        kw.pop(key, None)
    kw.update(pools=[list(p) for p in model.pools_zyx], kernels=[list(k) for k in model.kernels_zyx])
    return model  # type: ignore[return-value]


@register_encoder
def unet_test(pretrained: bool = False, **kwargs: Any) -> UNet:
    """Two-level toy for tests (~2 k parameters), in-plane: patch (1, 2, 2)."""
    return _create_unet("unet_test", pretrained, defaults=dict(widths=(4, 8), **SECTIONS), **kwargs)


@register_encoder
def unet_small(pretrained: bool = False, **kwargs: Any) -> UNet:
    """The plain U-Net users train (16-256 channels, 4 poolings, ~1.9 M parameters); in-plane by default
    (serial sections, patch (1, 16, 16)); the plan's ``spacing``/``crop_shape`` make it 3-D for FIB-SEM."""
    return _create_unet("unet_small", pretrained, defaults=dict(widths=(16, 32, 64, 128, 256), **SECTIONS), **kwargs)


@register_encoder
def unet_small_iso(pretrained: bool = False, **kwargs: Any) -> UNet:
    """``unet_small`` for near-isotropic voxels (FIB-SEM): 3-D kernels and poolings, ~5.6 M; patch 16."""
    return _create_unet("unet_small_iso", pretrained,
                        defaults=dict(widths=(16, 32, 64, 128, 256), **ISOTROPIC), **kwargs)


@register_encoder
def unet_base(pretrained: bool = False, **kwargs: Any) -> UNet:
    """Twice ``unet_small``'s widths (32-512 channels, ~7.8 M parameters; GPU pretraining), in-plane."""
    return _create_unet("unet_base", pretrained, defaults=dict(widths=(32, 64, 128, 256, 512), **SECTIONS), **kwargs)

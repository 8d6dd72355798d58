"""Masked image modelling for convolutional U-Nets (SparK, Tian et al. ICLR 2023) and a denoising sibling.

SparK in 3-D, on :class:`ssl_em.models.unet3d.ResidualUNet3D`:

1. mask units of ``mask_unit`` voxels (default: the U-Net's total downsampling, so each bottleneck voxel
   is wholly visible or wholly masked) are hidden at random, ``mask_ratio`` of them per sample;
2. the encoder runs as a sparse CNN: input and features are zeroed at masked voxels after every block,
   and normalisation statistics come from visible voxels only (``MaskedGroupNorm``), so nothing about the
   masked voxels (not even their number) reaches the visible features;
3. "densify": at every stage the masked positions are filled with a learnable per-stage mask token
   (zero-initialised) before the U-Net's own decoder runs densely;
4. a 1x1x1 conv predicts the target; the loss is the MSE over masked voxels only.

Because the whole U-Net (decoder included) is trained, fine-tuning starts from a complete network.
:class:`MaskedInpainting3D` is the dense variant (``sparse=False``): the masked units are zeroed in the
input and the network runs as it will be fine-tuned (dense convolutions, batch statistics over every
voxel), with the same loss on the masked voxels.
:class:`Denoising3D` trains the same U-Net to restore corrupted input (Noise2Void blind spots or
additive Gaussian noise) as a cheaper, mask-free alternative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.models.layers import pointwise_conv3d, resize_mask
from ssl_em.pretrain.targets import gaussian_blur_3d, standardize, visible_count
from ssl_em.utils.shapes import Triple, to_triple

TARGETS = ("raw", "normalized", "lowpass")

__all__ = ["Denoising3D", "MaskedInpainting3D", "SparKMasked3D", "masked_mse"]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over voxels where ``mask`` (B, 1, D, H, W) is 1, averaged over channels."""
    err = (pred - target).square().mean(1, keepdim=True)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


class SparKMasked3D(nn.Module):
    """SparK masked image modelling for a U-Net encoder with ``forward_encoder(x, mask)``/``forward_decoder``.

    Args:
        encoder: a U-Net with ``forward_encoder(x, mask)`` / ``forward_decoder``, ``widths``, ``dense_dim``,
            ``patch_size`` and ``in_chans`` (:class:`~ssl_em.models.unet.UNet`,
            :class:`~ssl_em.models.unet3d.ResidualUNet3D`).
        mask_ratio: fraction of mask units hidden per sample.
        mask_unit: (z, y, x) voxels per mask unit; a multiple of ``encoder.patch_size`` (default equal).
        target: "raw" (the input), "normalized" (input normalised per mask unit, MAE's norm_pix_loss) or
            "lowpass" (input blurred by ``lowpass_sigma``, which removes unpredictable shot noise).
        lowpass_sigma: Gaussian sigma (z, y, x) in voxels for ``target="lowpass"``.
        sparse: True (SparK): the encoder sees only visible units, masked units are filled with mask tokens
            before the decoder; False (dense inpainting): masked units are zeros in the input of a dense
            network.

    ``forward(x)`` with x (B, C, D, H, W) returns ``(loss, pred, mask)``: pred (B, C, D, H, W), mask
    (B, 1, D, H, W) with 1 = masked (hidden from the encoder), as in MAE.
    """

    def __init__(
        self,
        encoder: nn.Module,
        mask_ratio: float = 0.6,
        mask_unit: int | Sequence[int] | None = None,
        target: str = "raw",
        lowpass_sigma: float | Sequence[float] = (0.0, 1.0, 1.0),
        sparse: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"spark mask_ratio={mask_ratio} must be in (0, 1)")
        if target not in TARGETS:
            raise ConfigError(f"spark target={target!r} is not one of {TARGETS}")
        patch = tuple(encoder.patch_size)
        unit = to_triple(mask_unit if mask_unit is not None else patch, "spark mask_unit")
        if any(u % p for u, p in zip(unit, patch)):
            raise ConfigError(f"spark mask_unit {unit} must be a multiple of the encoder downsampling {patch}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.mask_unit: Triple = unit
        self.target = target
        sigma = (lowpass_sigma,) * 3 if isinstance(lowpass_sigma, (int, float)) else tuple(lowpass_sigma)
        if len(sigma) != 3 or min(sigma) < 0:
            raise ConfigError(f"spark lowpass_sigma={lowpass_sigma} must be one or three (z, y, x) values >= 0")
        self.lowpass_sigma = tuple(float(v) for v in sigma)
        self.sparse = bool(sparse)
        # per-stage mask tokens filling masked positions before the decoder ("densify"); a dense network
        # has features everywhere already
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, w, 1, 1, 1)) for w in encoder.widths
                                            ) if self.sparse else None
        self.pred = pointwise_conv3d(encoder.dense_dim, encoder.in_chans)

    def unit_grid(self, shape: Sequence[int]) -> Triple:
        """Mask-unit grid for a (..., D, H, W) input; ConfigError if the unit does not divide it."""
        self.encoder.grid_size(shape)
        shape = tuple(shape[-3:])
        if any(s % u for s, u in zip(shape, self.mask_unit)):
            raise ConfigError(f"crop {shape} is not divisible by the spark mask_unit {self.mask_unit}")
        return tuple(s // u for s, u in zip(shape, self.mask_unit))  # type: ignore[return-value]

    def random_visible(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, gd, gh, gw) float, 1 = visible: exactly round((1 - ratio) * units) visible units per sample."""
        b = x.shape[0]
        grid = self.unit_grid(x.shape)
        n = grid[0] * grid[1] * grid[2]
        keep = visible_count(n, self.mask_ratio)
        rank = torch.rand(b, n, device=x.device).argsort(1).argsort(1)  # a random permutation's ranks
        return (rank < keep).to(x.dtype).reshape(b, 1, *grid)

    def make_target(self, x: torch.Tensor) -> torch.Tensor:
        """The voxels to reconstruct, (B, C, D, H, W)."""
        if self.target == "raw":
            return x
        if self.target == "lowpass":
            return gaussian_blur_3d(x, self.lowpass_sigma)
        u = self.mask_unit  # normalise each mask unit to zero mean, unit variance
        t = rearrange(x, "b c (d u) (h v) (w s) -> b c d h w (u v s)", u=u[0], v=u[1], s=u[2])
        t = standardize(t)
        return rearrange(t, "b c d h w (u v s) -> b c (d u) (h v) (w s)", u=u[0], v=u[1], s=u[2])

    def forward_pred(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Sparse encoder on visible units, densify with mask tokens, dense decoder -> (B, C, D, H, W)."""
        return self.decode(self.encoder.forward_encoder(x, visible), visible)

    def decode(self, feats: Sequence[torch.Tensor], visible: torch.Tensor) -> torch.Tensor:
        """Stage outputs of the sparse encoder -> densified with mask tokens -> dense decoder -> prediction."""
        if not self.sparse:
            return self.pred(self.encoder.forward_decoder(feats))
        dense = []
        for f, token in zip(feats, self.mask_tokens):
            hidden = 1.0 - resize_mask(visible.to(f.dtype), f.shape[-3:])  # (B, 1, d, h, w)
            # f is already zero where masked. The token term as an outer product (B, d, h, w, 1) @ (1, C) comes
            # out channels-last like f, and its gradient is a matrix product, not a broadcast product and a sum
            fill = (hidden.permute(0, 2, 3, 4, 1) @ token.to(f.dtype).reshape(1, -1)).permute(0, 4, 1, 2, 3)
            dense.append(f + fill)
        return self.pred(self.encoder.forward_decoder(dense))

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, D, H, W) -> (loss, pred (B, C, D, H, W), mask (B, 1, D, H, W), 1 = masked).

        ``visible`` (B, 1, gd, gh, gw) overrides the random mask (1 = visible), e.g. for tests.
        """
        if visible is None:
            visible = self.random_visible(x)
        return self.forward_with_features(x, visible)[:3]

    def forward_with_features(self, x: torch.Tensor, visible: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """As :meth:`forward` with a given ``visible``, plus the encoder's stage outputs."""
        if self.sparse:
            feats = self.encoder.forward_encoder(x, visible)
        else:
            feats = self.encoder.forward_encoder(x * resize_mask(visible.to(x.dtype), x.shape[-3:]))
        pred = self.decode(feats, visible)
        mask = 1.0 - resize_mask(visible.to(x.dtype), x.shape[-3:])
        return masked_mse(pred, self.make_target(x), mask), pred, mask, feats

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Panels for a PNG: input, masked input, target, prediction, prediction pasted into the masked units."""
        # not self(x): subclasses take two views
        _, pred, mask, _ = self.forward_with_features(x, self.random_visible(x))
        target = self.make_target(x)
        return {"input": x, "masked input": x * (1 - mask), "target": target, "prediction": pred,
                "visible + prediction": target * (1 - mask) + pred * mask}


class MaskedInpainting3D(SparKMasked3D):
    """Dense masked inpainting: :class:`SparKMasked3D` with ``sparse=False`` (masked units zeroed in the
    input of the dense network, MSE on the masked voxels)."""

    def __init__(self, encoder: nn.Module, **kwargs) -> None:
        super().__init__(encoder, sparse=False, **kwargs)


class Denoising3D(nn.Module):
    """Restore corrupted input with the whole U-Net (no sparse encoder needed).

    Args:
        encoder: a U-Net with ``forward_dense``, ``dense_dim`` and ``in_chans``.
        mode: "blindspot" (Noise2Void: ``ratio`` of voxels replaced by a random in-plane neighbour within
            ``radius``; loss on those voxels only, so the identity cannot solve it and pixel-independent
            noise is not learnt) or "gaussian" (add N(0, ``sigma``^2) to the normalised input; loss on all).
        ratio: fraction of blind-spot voxels.
        radius: in-plane neighbourhood radius for blind-spot replacement, voxels.
        sigma: Gaussian noise std in units of the (normalised) input.

    ``forward(x)`` returns ``(loss, pred, mask)`` with mask (B, 1, D, H, W), 1 = voxels in the loss.
    """

    def __init__(self, encoder: nn.Module, mode: str = "blindspot", ratio: float = 0.02, radius: int = 2,
                 sigma: float = 0.5) -> None:
        super().__init__()
        if mode not in ("blindspot", "gaussian"):
            raise ConfigError(f"denoising mode={mode!r} is not 'blindspot' or 'gaussian'")
        if not 0.0 < ratio < 1.0 or radius < 1 or sigma <= 0:
            raise ConfigError(f"denoising needs 0 < ratio < 1, radius >= 1, sigma > 0 (got {ratio}, {radius}, {sigma})")
        self.encoder, self.mode, self.ratio, self.radius, self.sigma = encoder, mode, ratio, radius, sigma
        self.pred = pointwise_conv3d(encoder.dense_dim, encoder.in_chans)

    def corrupt(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrupted x, mask of voxels in the loss), both (B, ., D, H, W)."""
        if self.mode == "gaussian":
            return x + self.sigma * torch.randn_like(x), torch.ones_like(x[:, :1])
        b, c, d, h, w = x.shape
        mask = (torch.rand(b, 1, d, h, w, device=x.device) < self.ratio).to(x.dtype)
        idx = mask.flatten().nonzero().squeeze(1)  # flat (b, 1, d, h, w) indices of blind spots
        r = self.radius
        offset = torch.randint(-r, r, (2, idx.numel()), device=x.device)
        offset += (offset >= 0).long()  # in [-r, r] without 0: never the voxel itself
        y0, x0 = (idx // w) % h, idx % w
        y, xx = y0 + offset[0], x0 + offset[1]
        y = torch.where((y < 0) | (y >= h), y0 - offset[0], y).clamp(0, h - 1)  # reflect at the border
        xx = torch.where((xx < 0) | (xx >= w), x0 - offset[1], xx).clamp(0, w - 1)
        src = idx + (y - y0) * w + (xx - x0)  # same sample and z, shifted in-plane
        flat = x.reshape(b, c, -1).clone()
        per = d * h * w
        bi, pos, spos = idx // per, idx % per, src % per
        flat[bi, :, pos] = flat[bi, :, spos]
        return flat.reshape_as(x), mask

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noisy, mask = self.corrupt(x)
        pred = self.pred(self.encoder.forward_dense(noisy))
        return masked_mse(pred, x, mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Panels: input, corrupted input, restored (prediction)."""
        noisy, _ = self.corrupt(x)
        return {"input": x, "corrupted": noisy, "prediction": self.pred(self.encoder.forward_dense(noisy))}

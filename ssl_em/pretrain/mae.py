"""Masked autoencoder (He et al. 2022) on 3-D EM patches, after facebookresearch/mae ``models_mae.py``.

The encoder (any token encoder with ``patchify_embed`` / ``forward_tokens``, e.g. the 3-D ViT) sees
only the visible ~25 % of patch tokens; a light transformer decoder fills in mask tokens and
predicts every voxel of the masked patches; the loss is MSE on masked patches only.

Reconstruction target (``target``):
  ``"raw"``         the input intensities of each patch;
  ``"normalized"``  each patch standardised by its own mean / std (the image-MAE default);
  ``"lowpass"``     the input smoothed by a separable 3-D Gaussian (sigma in voxels per z, y, x).
On ssTEM with small patches a per-patch-normalised target is mostly shot noise: see ``DEFAULT_TARGET``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange, repeat
from timm.models.vision_transformer import Block
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.models.layers import sincos_pos_embed_3d
from ssl_em.models.vit3d import init_weights
from ssl_em.pretrain.targets import gaussian_blur_3d, standardize, visible_count
from ssl_em.utils.shapes import Triple

__all__ = ["DEFAULT_TARGET", "MaskedAutoencoder3D"]

# On ssTEM a per-patch-normalised target never leaves the predict-zero level and raw and lowpass tie on a
# probe of the frozen tokens (``benchmarks/mae_targets.py``; figures in README), so the default is the
# target without an extra hyper-parameter.
DEFAULT_TARGET = "raw"


class MaskedAutoencoder3D(nn.Module):
    """MAE around a 3-D token encoder.

    Args:
        encoder: has ``patch_size`` (z, y, x), ``embed_dim``, ``in_chans``, ``patchify_embed(x) ->
            (tokens, grid)`` and ``forward_tokens(tokens) -> tokens`` (the ViT in ssl_em.models).
        decoder_dim / decoder_depth / decoder_heads: the decoder transformer (MAE: light, 8 blocks of
            512 for ViT-L; a few narrow blocks suffice for small 3-D crops).
        mask_ratio: fraction of patches hidden; ``round(N * (1 - mask_ratio))`` stay visible.
        masking: ``"random"`` (independent patches) or ``"tube"`` (the same (y, x) positions hidden
            through all z, so thin sections cannot be copied from the section above).
        target: ``"raw"``, ``"normalized"`` or ``"lowpass"`` (module docstring).
        lowpass_sigma: Gaussian sigma (z, y, x) in voxels for ``"lowpass"``; keep z small on
            anisotropic data, where one z step is already 5-10 in-plane pixels.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        masking: str = "random",
        target: str = DEFAULT_TARGET,
        lowpass_sigma: float | Sequence[float] = (0.5, 1.5, 1.5),
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if not (hasattr(encoder, "patchify_embed") and hasattr(encoder, "forward_tokens")):
            raise ConfigError(f"MaskedAutoencoder3D needs a token encoder with patchify_embed/forward_tokens; "
                              f"{type(encoder).__name__} has none (convolutional encoders: use method 'spark')")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio {mask_ratio} must be between 0 and 1 (exclusive)")
        if masking not in ("random", "tube"):
            raise ConfigError(f"masking {masking!r} is not one of 'random', 'tube'")
        if target not in ("raw", "normalized", "lowpass"):
            raise ConfigError(f"target {target!r} is not one of 'raw', 'normalized', 'lowpass'")
        if decoder_dim % decoder_heads or decoder_dim % 2:
            raise ConfigError(f"decoder_dim {decoder_dim} must be even and divisible by decoder_heads {decoder_heads}")
        sigma = (float(lowpass_sigma),) * 3 if isinstance(lowpass_sigma, (int, float)) else tuple(lowpass_sigma)
        if len(sigma) != 3 or min(sigma) < 0:
            raise ConfigError(f"lowpass_sigma {lowpass_sigma} must be one or three (z, y, x) non-negative voxel sigmas")
        self.encoder = encoder
        self.patch_size: Triple = tuple(encoder.patch_size)  # type: ignore[assignment]
        self.in_chans = int(getattr(encoder, "in_chans", 1))
        self.mask_ratio, self.masking, self.target = mask_ratio, masking, target
        self.lowpass_sigma = sigma
        self.decoder_dim = decoder_dim
        patch_voxels = math.prod(self.patch_size) * self.in_chans

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_voxels)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_weights)  # the encoder keeps its own (possibly pretrained) weights
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- patches --------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, N, pz*py*px*C)``, tokens in the encoder's (z, y, x) raster order."""
        pz, py, px = self.patch_size
        return rearrange(x, "b c (d pz) (h py) (w px) -> b (d h w) (pz py px c)", pz=pz, py=py, px=px)

    def unpatchify(self, patches: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``(B, N, pz*py*px*C) -> (B, C, D, H, W)`` for a token grid (d, h, w)."""
        pz, py, px = self.patch_size
        d, h, w = grid
        return rearrange(patches, "b (d h w) (pz py px c) -> b c (d pz) (h py) (w px)",
                         d=d, h=h, w=w, pz=pz, py=py, px=px)

    # ---- masking ----------------------------------------------------------------------------
    def random_masking(self, tokens: torch.Tensor, grid: Sequence[int]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens by argsort of noise (MAE).

        ``tokens (B, N, C) -> (visible (B, L, C), mask (B, N) with 1 = hidden, ids_restore (B, N))``.
        Tube masking gives all z-tokens of one (y, x) the same noise, so sorting keeps whole tubes.
        """
        B, N, C = tokens.shape
        d, h, w = grid
        if self.masking == "tube":
            len_keep = visible_count(h * w, self.mask_ratio) * d
            noise = repeat(torch.rand(B, h * w, device=tokens.device), "b (h w) -> b (d h w)", d=d, h=h, w=w)
        else:
            len_keep = visible_count(N, self.mask_ratio)
            noise = torch.rand(B, N, device=tokens.device)  # (B, N) in [0, 1)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # inverse permutation
        ids_keep = ids_shuffle[:, :len_keep]  # (B, L)
        visible = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, C))  # (B, L, C)
        mask = torch.ones(B, N, device=tokens.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to raster order: (B, N)
        return visible, mask, ids_restore

    # ---- the three stages ---------------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Triple]:
        """``x (B, C, D, H, W) -> (latent (B, L, C_enc), mask (B, N), ids_restore (B, N), grid)``."""
        tokens, grid = self.encoder.patchify_embed(x)  # (B, N, C_enc), position already added
        visible, mask, ids_restore = self.random_masking(tokens, grid)
        return self.encoder.forward_tokens(visible), mask, ids_restore, grid

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``latent (B, L, C_enc) -> pred (B, N, pz*py*px*C)`` for every patch, raster order."""
        x = self.decoder_embed(latent)  # (B, L, Cd)
        B, L, Cd = x.shape
        N = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, N - L, Cd)], dim=1)  # (B, N, Cd), shuffled
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, Cd))  # (B, N, Cd), raster order
        x = x + sincos_pos_embed_3d(grid, Cd, device=x.device)[None].to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))  # (B, N, P)

    def target_patches(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction target, patchified: ``(B, N, pz*py*px*C)`` in float32."""
        x = x.float()
        if self.target == "lowpass":
            x = gaussian_blur_3d(x, self.lowpass_sigma)
        t = self.patchify(x)
        if self.target == "normalized":
            t = standardize(t)
        return t

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the voxels of masked patches only (float32 even under autocast)."""
        per_patch = (pred.float() - self.target_patches(x)).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, C, D, H, W) -> (loss, pred (B, N, pz*py*px*C), mask (B, N), 1 = masked)``."""
        return self.forward_with_latent(x)[:3]

    def forward_with_latent(self, x: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`forward`, plus the encoder output ``latent (B, L, C_enc)`` of the visible tokens."""
        latent, mask, ids_restore, grid = self.forward_encoder(x)
        pred = self.forward_decoder(latent, ids_restore, grid)
        return self.forward_loss(x, pred, mask), pred, mask, latent

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-volume reconstruction for viewing: ``(recon (B, C, D, H, W), mask (B, 1, D, H, W))``.

        Visible patches are pasted from the input; masked ones come from the prediction (for the
        ``"normalized"`` target re-scaled with each patch's true mean / std, as in MAE's demo).
        """
        _, pred, mask, _ = self.forward_with_latent(x)  # not self(x): subclasses take two views
        pred = pred.float()
        patches = self.patchify(x.float())  # (B, N, P)
        if self.target == "normalized":
            mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        grid = self.encoder.grid_size(x.shape)
        m = mask[..., None]  # (B, N, 1)
        recon = self.unpatchify(patches * (1 - m) + pred * m, grid)
        mask_vol = self.unpatchify(m.expand_as(patches), grid)[:, :1]  # (B, 1, D, H, W), same for every channel
        return recon, mask_vol

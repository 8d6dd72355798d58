"""Masked modelling + SimCLR in one objective: each view is masked, reconstructed, and its visible
features are pulled towards the other view's (in the spirit of CMAE, Huang et al. 2023).

Masked modelling alone learns local texture fast but its features separate structures late; the
contrastive term asks the visible features of two masked views of one region to agree, which masking
makes a harder positive pair than augmentation alone. Both terms share one encoder pass per view:

* ``mae_simclr`` (:class:`MAESimCLR3D`): a token encoder (3-D ViT) sees the visible ~25 % of each view's
  patches; the pooled visible tokens feed the projection head;
* ``spark_simclr`` (:class:`SparKSimCLR3D`): a U-Net sees each view's visible mask units (SparK); its
  bottleneck, averaged over visible cells, feeds the projection head.

Loss: ``(reconstruction(view1) + reconstruction(view2)) / 2 + contrastive_weight * NT-Xent``. The two
terms are kept in ``last_terms`` (logged as ``train/reconstruction`` / ``train/contrastive``).
``contrastive_weight`` 0.01 (default) brings the NT-Xent term (~3 at the start, batch 8) to the scale
of a raw-target MSE (~0.05); how the weight and the pairing were chosen, with the probe figures per
seed: docs/guide.md (Pretraining).
Features are pooled over each view's visible part of the whole crop, not over the overlap box: the
two masks hide different units, so the shared box holds different visible features anyway.
Checkpoints, reconstruction panels and ``export-encoder`` work as for the masked objective alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.models.layers import resize_mask
from ssl_em.pretrain.heads import ProjectionHead
from ssl_em.pretrain.losses import nt_xent_loss
from ssl_em.pretrain.mae import MaskedAutoencoder3D
from ssl_em.pretrain.spark import SparKMasked3D

__all__ = ["InpaintingSimCLR3D", "MAESimCLR3D", "SparKSimCLR3D"]


class _ContrastiveTerm(nn.Module):
    """Projection head + NT-Xent on pooled features of two views; checks its arguments once."""

    def __init__(self, feature_dim: int, contrastive_weight: float, temperature: float, hidden_dim: int,
                 out_dim: int) -> None:
        super().__init__()
        if contrastive_weight < 0 or temperature <= 0:
            raise ConfigError(f"contrastive_weight {contrastive_weight} must be >= 0 and temperature {temperature} > 0")
        self.weight, self.temperature = float(contrastive_weight), float(temperature)
        self.head = ProjectionHead(feature_dim, hidden_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (2B, C): view 1 then view 2 -> NT-Xent of their projections."""
        z1, z2 = self.head(h).chunk(2)
        return nt_xent_loss(z1, z2, self.temperature)


def _combine(module: Any, reconstruction: torch.Tensor, h: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    contrastive = module.contrast(h)
    module.last_terms = {"reconstruction": reconstruction.detach(), "contrastive": contrastive.detach()}
    h1, h2 = h.chunk(2)
    return reconstruction + module.contrast.weight * contrastive, h1, h2


class MAESimCLR3D(MaskedAutoencoder3D):
    """MAE on both views + SimCLR on their pooled visible tokens (see the module docstring).

    Args:
        encoder: a token encoder (3-D ViT).
        contrastive_weight: weight of the NT-Xent term (0 = MAE on two views).
        temperature, hidden_dim, out_dim: NT-Xent temperature and the projection head.
        **mae_kwargs: :class:`~ssl_em.pretrain.mae.MaskedAutoencoder3D` arguments (``mask_ratio``, ``target``...).
    """

    two_views = True

    def __init__(self, encoder: nn.Module, contrastive_weight: float = 0.01, temperature: float = 0.1,
                 hidden_dim: int = 512, out_dim: int = 128, **mae_kwargs: Any) -> None:
        super().__init__(encoder, **mae_kwargs)
        self.contrast = _ContrastiveTerm(encoder.embed_dim, contrastive_weight, temperature, hidden_dim, out_dim)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, overlap1: torch.Tensor | None = None,
                overlap2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (B, C, D, H, W) -> (loss, h1 (B, embed_dim), h2): mean visible token of each view."""
        reconstruction, _, _, latent = self.forward_with_latent(torch.cat([view1, view2]))  # visible tokens only
        return _combine(self, reconstruction, latent.mean(dim=1))


class SparKSimCLR3D(SparKMasked3D):
    """SparK on both views + SimCLR on their bottlenecks averaged over visible cells.

    Args:
        encoder: a U-Net (:class:`~ssl_em.models.unet3d.ResidualUNet3D`).
        contrastive_weight, temperature, hidden_dim, out_dim: as :class:`MAESimCLR3D`.
        **spark_kwargs: :class:`~ssl_em.pretrain.spark.SparKMasked3D` arguments.
    """

    two_views = True

    def __init__(self, encoder: nn.Module, contrastive_weight: float = 0.01, temperature: float = 0.1,
                 hidden_dim: int = 512, out_dim: int = 128, **spark_kwargs: Any) -> None:
        super().__init__(encoder, **spark_kwargs)
        self.contrast = _ContrastiveTerm(int(encoder.embed_dim), contrastive_weight, temperature, hidden_dim, out_dim)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, overlap1: torch.Tensor | None = None,
                overlap2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (B, C, D, H, W) -> (loss, h1 (B, embed_dim), h2): visible bottleneck mean of each view."""
        x = torch.cat([view1, view2])
        visible = self.random_visible(x)
        reconstruction, _, _, feats = self.forward_with_features(x, visible)
        cells = resize_mask(visible, feats[-1].shape[-3:])  # (2B, 1, d, h, w), 1 = visible
        h = (feats[-1] * cells).sum(dim=(2, 3, 4)) / cells.sum(dim=(2, 3, 4)).clamp_min(1.0)
        return _combine(self, reconstruction, h)


class InpaintingSimCLR3D(SparKSimCLR3D):
    """Dense masked inpainting (:class:`~ssl_em.pretrain.spark.MaskedInpainting3D`) on both views + SimCLR
    on their bottlenecks averaged over visible cells."""

    def __init__(self, encoder: nn.Module, **kwargs: Any) -> None:
        super().__init__(encoder, sparse=False, **kwargs)

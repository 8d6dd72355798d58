"""Projection heads of the joint-embedding objectives: SimCLR's MLP and DINO's prototype head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.errors import ConfigError


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, activation: Callable[[], nn.Module],
         batch_norm: bool = False, *, what: str) -> nn.Sequential:
    """``num_layers`` Linear layers ``in -> hidden -> ... -> out``, (BatchNorm +) activation between them.
    With BatchNorm the hidden layers have no bias (the norm's shift replaces it)."""
    if num_layers < 1:
        raise ConfigError(f"{what} num_layers={num_layers} must be >= 1")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == num_layers - 1
        layers.append(nn.Linear(a, b, bias=last or not batch_norm))
        if not last:
            layers += [nn.BatchNorm1d(b)] if batch_norm else []
            layers.append(activation())
    return nn.Sequential(*layers)


class ProjectionHead(nn.Module):
    """SimCLR MLP ``in_dim -> hidden_dim -> ... -> out_dim`` with BatchNorm + ReLU between layers.

    ``(B, in_dim) -> (B, out_dim)``. BatchNorm needs a batch of two or more in training mode.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, num_layers: int = 2,
                 batch_norm: bool = True) -> None:
        super().__init__()
        self.layers = _mlp(in_dim, hidden_dim, out_dim, num_layers, lambda: nn.ReLU(inplace=True), batch_norm,
                           what="projection head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DINOHead(nn.Module):
    """DINO head: GELU MLP to a ``bottleneck_dim`` code, L2-normalised, then a weight-normalised linear
    layer to ``out_dim`` prototypes (Caron et al. 2021). ``(B, in_dim) -> (B, out_dim)`` logits.

    The last layer's norm is fixed to 1 (``norm_last_layer``), which DINO found stabilises ViT training.

    ``standardize_input`` (default) first standardises each input feature over the batch (batch
    statistics in training and evaluation alike, no affine, no running statistics; a batch needs two or
    more rows). Why: crop-averaged features of a freshly initialised encoder on EM differ little from
    crop to crop, so a component shared by every crop dominates the head's output, the teacher's centre
    equals every sample's logits, centring leaves a uniform teacher and the loss sits at log K with
    nothing to learn (measured on the phantom with both encoder families). Standardising keeps only what
    differs between crops; DINO's BatchNorm head for convnets serves the same purpose.
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 num_layers: int = 3, norm_last_layer: bool = True, standardize_input: bool = True) -> None:
        super().__init__()
        self.standardize = (nn.BatchNorm1d(in_dim, affine=False, track_running_stats=False) if standardize_input
                            else nn.Identity())
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, num_layers, nn.GELU, what="DINO head")
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)  # the norm g
        self.last_layer.parametrizations.weight.original0.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or (isinstance(self.standardize, nn.BatchNorm1d) and x.shape[0] < 2):
            raise ConfigError(f"DINO head needs (B, C) features, B>=2 when standardising over the batch; "
                              f"got {tuple(x.shape)}")
        return self.last_layer(F.normalize(self.mlp(self.standardize(x)), dim=-1))

"""Masked segmentation losses: BCE, soft Dice, clDice; ``mask`` 0 = ignore, so sparse labels work.

All take logits and targets ``(B, C, D, H, W)`` and a float mask broadcastable to them (1 = labelled,
0 = ignored; fractional values weight voxels). Ignored voxels contribute nothing: neither their
logits (replaced, not multiplied, so a NaN there stays out) nor their targets. An all-ignored
batch gives 0 (with a graph, so ``backward`` works) instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BCEDiceLoss", "CLDiceLoss", "bce_loss", "cldice_loss", "dice_loss", "soft_skeleton"]


def _prep(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
    mask = torch.ones_like(logits) if mask is None else mask.to(logits.dtype).expand_as(logits)
    keep = mask > 0
    # where() not multiply: values in ignored voxels (even NaN) must not reach the loss or its gradient
    logits = torch.where(keep, logits, torch.zeros_like(logits))
    target = torch.where(keep, target.to(logits.dtype), torch.zeros_like(logits))
    return logits, target, torch.where(keep, mask, torch.zeros_like(mask))


def bce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
             pos_weight: float | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over labelled voxels (weighted by ``mask``)."""
    logits, target, mask = _prep(logits, target, mask)
    pw = None if pos_weight is None else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw)
    return (loss * mask).sum() / mask.sum().clamp_min(1e-8)


def _channel_mean(values: torch.Tensor, labelled: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of per-channel ``values`` over channels with labelled voxels; 0 (on ``anchor``'s graph) if none."""
    if not bool(labelled.any()):
        return anchor.sum() * 0.0
    return values[labelled].mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
              smooth: float = 1.0) -> torch.Tensor:
    """``1 - mean_c (2 sum(p t m) + s) / (sum(p m) + sum(t m) + s)``, p = sigmoid(logits).

    Sums run over the batch and all voxels of a channel (batch Dice: stable when a crop holds no
    foreground); channels with no labelled voxel are left out of the mean.
    """
    logits, target, mask = _prep(logits, target, mask)
    p = torch.sigmoid(logits) * mask
    dims = (0, *range(2, logits.ndim))
    inter = (p * target).sum(dims)
    denom = p.sum(dims) + (target * mask).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return _channel_mean(1 - dice, mask.sum(dims) > 0, logits)


def _axes(voxel_size: Sequence[float] | None) -> tuple[bool, bool, bool]:
    """Which axes the skeleton's min/max pooling spans: those within 2x of the finest voxel side.

    Anisotropic ssTEM (50 x 4 x 4 nm) skeletonises in-plane only: one z step is ten xy steps,
    and eroding along z would wipe out any structure thinner than three sections.
    """
    if voxel_size is None:
        return (True, True, True)
    finest = min(float(v) for v in voxel_size)
    return tuple(float(v) <= 2 * finest for v in voxel_size)  # type: ignore[return-value]


def _erode(x: torch.Tensor, axes: tuple[bool, bool, bool]) -> torch.Tensor:
    # min over the 6-neighbourhood (a cross): the min of three 1-D min-pools, as in Shit et al.
    outs = []
    for ax, on in enumerate(axes):
        if on:
            k = [1, 1, 1]
            k[ax] = 3
            outs.append(-F.max_pool3d(-x, k, 1, [v // 2 for v in k]))
    return torch.stack(outs).amin(0)


def _dilate(x: torch.Tensor, axes: tuple[bool, bool, bool]) -> torch.Tensor:
    k = [3 if on else 1 for on in axes]
    return F.max_pool3d(x, k, 1, [v // 2 for v in k])


def soft_skeleton(x: torch.Tensor, iterations: int = 10, voxel_size: Sequence[float] | None = None) -> torch.Tensor:
    """Soft morphological skeleton of probabilities ``x`` (B, C, D, H, W) in [0, 1] (Shit et al. 2021)."""
    axes = _axes(voxel_size)
    skel = F.relu(x - _dilate(_erode(x, axes), axes))
    for _ in range(iterations):
        x = _erode(x, axes)
        delta = F.relu(x - _dilate(_erode(x, axes), axes))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def cldice_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                iterations: int = 10, voxel_size: Sequence[float] | None = None,
                smooth: float = 1.0) -> torch.Tensor:
    """Soft clDice: ``1 - 2 Tprec Tsens / (Tprec + Tsens)`` per channel, mean over labelled channels.

    ``Tprec = sum(S(p) t) / sum(S(p))``, ``Tsens = sum(S(t) p) / sum(S(t))`` with S the soft
    skeleton. Both p and t are zeroed outside the mask *before* skeletonising, so ignored voxels
    cannot leak into labelled ones through the pooling.
    """
    logits, target, mask = _prep(logits, target, mask)
    p = torch.sigmoid(logits) * mask
    t = target * mask
    sp, st = soft_skeleton(p, iterations, voxel_size), soft_skeleton(t, iterations, voxel_size)
    dims = (0, *range(2, logits.ndim))
    tprec = ((sp * t).sum(dims) + smooth) / (sp.sum(dims) + smooth)
    tsens = ((st * p).sum(dims) + smooth) / (st.sum(dims) + smooth)
    cl = 2 * tprec * tsens / (tprec + tsens)
    return _channel_mean(1 - cl, mask.sum(dims) > 0, logits)


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + dice_weight * Dice``, masked (the default for blob-like targets)."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, pos_weight: float | None = None) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight, self.pos_weight = bce_weight, dice_weight, pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.bce_weight * bce_loss(logits, target, mask, self.pos_weight)
        if self.dice_weight:
            loss = loss + self.dice_weight * dice_loss(logits, target, mask)
        return loss


class CLDiceLoss(nn.Module):
    """``(1 - alpha) * (BCE + Dice) + alpha * clDice`` for thin, tubular structures (membranes, neurites)."""

    def __init__(self, alpha: float = 0.5, iterations: int = 10, voxel_size: Sequence[float] | None = None) -> None:
        super().__init__()
        self.alpha, self.iterations = alpha, iterations
        self.voxel_size = None if voxel_size is None else tuple(voxel_size)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        base = bce_loss(logits, target, mask) + dice_loss(logits, target, mask)
        cl = cldice_loss(logits, target, mask, self.iterations, self.voxel_size)
        return (1 - self.alpha) * base + self.alpha * cl

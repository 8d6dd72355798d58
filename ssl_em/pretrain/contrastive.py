"""Joint-embedding pretraining for 3-D EM: SimCLR (NT-Xent) and DINO (self-distillation, no negatives).

Each method is a composition of small parts, as in lightly:

* views: :class:`ssl_em.data.crops.TwoViewDataset` (two overlapping, independently augmented crops,
  with the shared box of each view in ``overlap1``/``overlap2``);
* :func:`ssl_em.pretrain.features.pool_features`: encoder -> feature map -> one vector per view, averaged over the whole crop or
  only over the region both views show (``region="overlap"``: the positive pair then describes the same
  tissue, not merely neighbouring tissue);
* heads (:mod:`ssl_em.pretrain.heads`), losses (:mod:`ssl_em.pretrain.losses`), and here
  :func:`momentum_update` and :func:`cosine_schedule` for the teacher.

Objectives follow the two-view contract used by :class:`ssl_em.pretrain.module.Pretraining`:
``two_views = True`` and ``forward(view1, view2, overlap1=None, overlap2=None) -> (loss, h1, h2)`` with
``h1``/``h2`` (B, C) the pooled encoder features (what the collapse monitor watches). Methods with a
teacher also have ``update_teacher(progress)``, called after every optimiser step with progress in [0, 1].

Both encoder families work: a ViT's patch tokens (``forward_features``) are reshaped to their grid; a
U-Net gives its bottleneck (``feature="bottleneck"``) or its full-resolution decoder features
(``feature="dense"``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.pretrain.features import FEATURES, REGIONS, feature_map, pool_features
from ssl_em.pretrain.heads import DINOHead, ProjectionHead
from ssl_em.pretrain.losses import DINOLoss, nt_xent_loss

__all__ = ["DINO3D", "SimCLR3D", "cosine_schedule", "momentum_update"]


# ---- momentum ----------------------------------------------------------------------------------------
@torch.no_grad()
def momentum_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for parameters; buffers are copied.

    Both modules must have the same structure (the teacher is a deep copy of the student).
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ConfigError(f"momentum_update: teacher has {len(t_params)} parameters, student {len(s_params)}")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def cosine_schedule(progress: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress >= 1)."""
    p = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * p) + 1) / 2


# ---- objectives --------------------------------------------------------------------------------------
class _TwoViewObjective(nn.Module):
    """Shared plumbing: which features, which region, encoder -> (B, C)."""

    two_views = True

    def __init__(self, encoder: nn.Module, feature: str, region: str) -> None:
        super().__init__()
        if feature not in FEATURES:
            raise ConfigError(f"feature {feature!r} is not one of {FEATURES}")
        if region not in REGIONS:
            raise ConfigError(f"region {region!r} is not one of {REGIONS}")
        if feature == "auto":
            feature = "bottleneck" if hasattr(encoder, "forward_dense") else "tokens"
        self.encoder, self.feature, self.region = encoder, feature, region
        self.feature_dim = int(encoder.dense_dim if feature == "dense" else encoder.embed_dim)

    def embed(self, encoder: nn.Module, x: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, C, D, H, W) -> pooled features (B, feature_dim)."""
        fmap = feature_map(encoder, x, self.feature)
        return pool_features(fmap, boxes if self.region == "overlap" else None, x.shape[-3:])


class SimCLR3D(_TwoViewObjective):
    """SimCLR (Chen et al. 2020): pooled encoder features -> MLP projection -> NT-Xent over the batch.

    Args:
        encoder: any ssl-em encoder (ViT or U-Net).
        hidden_dim / out_dim / num_layers: the projection head.
        temperature: NT-Xent temperature (0.1-0.2 for small batches).
        feature: "auto", "tokens", "bottleneck" or "dense" (:func:`feature_map`).
        region: "overlap" (pool over the voxels both views show) or "full" (the whole crop).
    """

    def __init__(self, encoder: nn.Module, hidden_dim: int = 512, out_dim: int = 128, num_layers: int = 2,
                 temperature: float = 0.1, feature: str = "auto", region: str = "overlap") -> None:
        super().__init__(encoder, feature, region)
        if temperature <= 0:
            raise ConfigError(f"temperature {temperature} must be > 0")
        self.temperature = temperature
        self.head = ProjectionHead(self.feature_dim, hidden_dim, out_dim, num_layers)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, overlap1: torch.Tensor | None = None,
                overlap2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (B, C, D, H, W), overlaps (B, 3, 2) -> (loss, h1 (B, F), h2 (B, F)) with F = feature_dim."""
        h = self.embed(self.encoder, torch.cat([view1, view2]), _cat(overlap1, overlap2))
        z1, z2 = self.head(h).chunk(2)
        h1, h2 = h.chunk(2)
        return nt_xent_loss(z1, z2, self.temperature), h1, h2


class DINO3D(_TwoViewObjective):
    """DINO (Caron et al. 2021) with two global views: a momentum teacher, centring and sharpening.

    Args:
        encoder: the student encoder; the teacher is a frozen deep copy updated by EMA.
        out_dim / hidden_dim / bottleneck_dim / standardize_input: :class:`DINOHead` (small ``out_dim``
            for small data; keep ``standardize_input`` unless the features already differ across crops).
        student_temp, teacher_temp, warmup_teacher_temp, warmup_fraction: temperatures; the teacher's
            rises linearly from ``warmup_teacher_temp`` over the first ``warmup_fraction`` of training.
        center_momentum: EMA of the teacher centre.
        momentum, momentum_end: teacher EMA momentum, cosine-scheduled from the first to the second.
        feature, region: as for :class:`SimCLR3D`.

    The teacher's modules are ``teacher_backbone`` / ``teacher_head`` (export takes ``encoder.``; pass
    ``--prefix objective.teacher_backbone.`` to ``ssl-em export-encoder`` to export the teacher instead).
    """

    def __init__(self, encoder: nn.Module, out_dim: int = 4096, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_fraction: float = 0.0, center_momentum: float = 0.9, momentum: float = 0.996,
                 momentum_end: float = 1.0, standardize_input: bool = True, feature: str = "auto",
                 region: str = "overlap") -> None:
        super().__init__(encoder, feature, region)
        if not 0.0 <= momentum <= momentum_end <= 1.0:
            raise ConfigError(f"DINO momentum {momentum} -> {momentum_end} must satisfy 0 <= start <= end <= 1")
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise ConfigError("DINO temperatures must be > 0")
        self.head = DINOHead(self.feature_dim, out_dim, hidden_dim, bottleneck_dim, standardize_input=standardize_input)
        self.teacher_backbone = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.criterion = DINOLoss(out_dim, student_temp, center_momentum)
        self.teacher_temp, self.warmup_teacher_temp, self.warmup_fraction = teacher_temp, warmup_teacher_temp, warmup_fraction
        self.momentum_start, self.momentum_end = momentum, momentum_end
        self.register_buffer("progress", torch.zeros(()))  # fraction of training done, saved for resume

    def train(self, mode: bool = True) -> DINO3D:
        super().train(mode)
        self.teacher_backbone.eval()  # no drop-path / dropout in the teacher
        self.teacher_head.eval()
        return self

    def current_teacher_temp(self) -> float:
        p = float(self.progress)
        if self.warmup_fraction > 0 and p < self.warmup_fraction:
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * p / self.warmup_fraction
        return self.teacher_temp

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, overlap1: torch.Tensor | None = None,
                overlap2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (B, C, D, H, W), overlaps (B, 3, 2) -> (loss, h1 (B, F), h2 (B, F)) student features."""
        x, boxes = torch.cat([view1, view2]), _cat(overlap1, overlap2)
        h = self.embed(self.encoder, x, boxes)
        student = self.head(h)
        with torch.no_grad():
            teacher = self.teacher_head(self.embed(self.teacher_backbone, x, boxes))
        b = view1.shape[0]
        loss = self.criterion(student.reshape(2, b, -1), teacher.reshape(2, b, -1), self.current_teacher_temp())
        h1, h2 = h.chunk(2)
        return loss, h1, h2

    @torch.no_grad()
    def update_teacher(self, progress: float) -> float:
        """EMA step after an optimiser step; ``progress`` in [0, 1]; returns the momentum used."""
        self.progress.fill_(progress)
        m = cosine_schedule(progress, self.momentum_start, self.momentum_end)
        momentum_update(self.teacher_backbone, self.encoder, m)
        momentum_update(self.teacher_head, self.head, m)
        return m


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])

"""Joint-embedding pretraining for 3-D EM: SimCLR (NT-Xent) and DINO (self-distillation, no negatives).

Each method is a composition of small parts, as in lightly:

* views: :class:`ssl_em.data.crops.TwoViewDataset` (two overlapping, independently augmented crops,
  with the shared box of each view in ``overlap1``/``overlap2``);
* :func:`pool_features`: encoder -> feature map -> one vector per view, averaged over the whole crop or
  only over the region both views show (``region="overlap"``: the positive pair then describes the same
  tissue, not merely neighbouring tissue);
* heads (:class:`ProjectionHead`, :class:`DINOHead`), losses (:func:`nt_xent_loss`, :class:`DINOLoss`),
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
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.errors import ConfigError

__all__ = [
    "DINO3D", "DINOHead", "DINOLoss", "ProjectionHead", "SimCLR3D", "cosine_schedule", "feature_map",
    "momentum_update", "nt_xent_loss", "pool_features",
]

FEATURES = ("auto", "tokens", "bottleneck", "dense")
REGIONS = ("overlap", "full")


# ---- features ------------------------------------------------------------------------------------
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


# ---- heads -----------------------------------------------------------------------------------------
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


# ---- losses ----------------------------------------------------------------------------------------
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent (SimCLR) loss of two batches of embeddings ``(B, D)``: row i of each is a positive pair.

    Each of the 2B embeddings is classified against the other 2B - 1 (cosine similarity / temperature);
    the target is its partner; the loss is the mean cross-entropy over all 2B anchors (float32).
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ConfigError(f"nt_xent_loss needs two (B>=2, D) batches of equal shape, got {tuple(z1.shape)}, "
                          f"{tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    logits = z @ z.T / temperature  # (2B, 2B)
    logits.fill_diagonal_(float("-inf"))  # an embedding is not its own negative
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(logits, target)


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher distribution and the student's, across views.

    ``forward(student (V, B, K), teacher (V, B, K), teacher_temp) -> loss``; pairs with the same view are
    skipped. The centre (an EMA of teacher logits, ``center_momentum``) is updated after each call in
    training mode; centring avoids one prototype dominating, sharpening avoids the uniform collapse.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float = 0.04) -> torch.Tensor:
        t = F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1).detach()  # (V, B, K)
        log_s = F.log_softmax(student.float() / self.student_temp, dim=-1)  # (V, B, K)
        total, pairs = student.new_zeros((), dtype=torch.float32), 0
        for i in range(t.shape[0]):
            for j in range(log_s.shape[0]):
                if i != j:
                    total = total - (t[i] * log_s[j]).sum(-1).mean()
                    pairs += 1
        if self.training:
            self.update_center(teacher)
        return total / max(pairs, 1)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        batch_center = teacher.float().reshape(-1, teacher.shape[-1]).mean(0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center /= torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


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

"""Losses of the joint-embedding objectives: NT-Xent (SimCLR) and DINO's cross-entropy to a centred,
sharpened teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.errors import ConfigError


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

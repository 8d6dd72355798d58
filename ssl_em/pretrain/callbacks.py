"""Training callbacks for self-supervised pretraining: representation-collapse monitor.

Joint-embedding methods can collapse (every crop mapped to one point, or to a low-dimensional
subspace) while the loss still looks reasonable. Two cheap statistics of pooled encoder features
catch it:

* ``collapse/std``: the per-dimension standard deviation of L2-normalised embeddings, averaged over
  dimensions and multiplied by ``sqrt(d)``: ~1 for embeddings spread over the sphere, 0 when
  collapsed (lightly's ``std_of_l2_normalized``, rescaled so the value does not depend on ``d``);
* ``collapse/effective_rank``: ``exp(entropy(s / sum(s)))`` of the singular values ``s`` of the
  embedding matrix (Roy & Vetterli 2007; RankMe, Garrido et al. 2023): 1 when every embedding lies on
  one line, up to ``min(n, d)``.
"""

from __future__ import annotations

import warnings
from collections import deque

import lightning as L
import torch

__all__ = ["CollapseMonitor", "effective_rank", "normalized_std"]


def normalized_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised ``z`` (n, d), times ``sqrt(d)``: 0 collapsed, ~1 spread out."""
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


def effective_rank(z: torch.Tensor, eps: float = 1e-12) -> float:
    """``exp`` of the Shannon entropy of the normalised singular values of ``z`` (n, d)."""
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum().clamp_min(eps)
    return float(torch.exp(-(p * (p + eps).log()).sum()))


class CollapseMonitor(L.Callback):
    """Log ``collapse/std`` and ``collapse/effective_rank`` of pooled features; warn when they collapse.

    Embeddings come from ``pl_module.last_embeddings`` (two-view objectives store their pooled features
    there) or, for other objectives, from ``pl_module.encoder`` on the batch's ``raw`` crops (no grad,
    every ``every_n_steps``). The last ``window`` embeddings are pooled so the rank is not capped by a
    small batch.

    Args:
        every_n_steps: how often to compute and log.
        window: most recent embeddings kept (rows of the matrix).
        warn_std: warn when ``collapse/std`` drops below this *and* below half its first value in the run
            (crop-averaged features of some encoders start close together, e.g. a masked U-Net bottleneck
            over large crops at ~0.03: collapse is shrinking, not starting low).
        warn_rank: warn when ``collapse/effective_rank`` drops below this (1 = a single direction).
    """

    def __init__(self, every_n_steps: int = 10, window: int = 256, warn_std: float = 0.05,
                 warn_rank: float = 1.5) -> None:
        super().__init__()
        self.every_n_steps, self.warn_std, self.warn_rank = max(int(every_n_steps), 1), warn_std, warn_rank
        self.buffer: deque[torch.Tensor] = deque()
        self.window = int(window)
        self.warned = False
        self.last: dict[str, float] = {}
        self.first_std: float | None = None

    def _embeddings(self, pl_module: L.LightningModule, batch: dict) -> torch.Tensor | None:
        emb = getattr(pl_module, "last_embeddings", None)
        if emb is not None:
            return emb
        if not isinstance(batch, dict) or "raw" not in batch:
            return None
        from ssl_em.pretrain.features import feature_map, pool_features

        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            emb = pool_features(feature_map(pl_module.encoder, batch["raw"]))
        pl_module.train(was_training)
        return emb

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        two_view = getattr(pl_module, "last_embeddings", None) is not None
        if not two_view and step % self.every_n_steps:  # only the encoder pass of other objectives costs
            return
        emb = self._embeddings(pl_module, batch)
        if emb is None:
            return
        self.buffer.append(emb.detach().float().cpu())
        while sum(e.shape[0] for e in self.buffer) - self.buffer[0].shape[0] >= self.window:
            self.buffer.popleft()
        if step % self.every_n_steps:
            return
        z = torch.cat(list(self.buffer))[-self.window:]
        if z.shape[0] < 2:
            return
        self.last = {"collapse/std": normalized_std(z), "collapse/effective_rank": effective_rank(z)}
        pl_module.log_dict(self.last, on_step=True, on_epoch=False, batch_size=z.shape[0])
        std, rank = self.last["collapse/std"], self.last["collapse/effective_rank"]
        self.first_std = std if self.first_std is None else self.first_std
        shrunk = std < self.warn_std and std < 0.5 * self.first_std
        crossed = [f"normalised std {std:.3f} < {self.warn_std} and < half its first value"] if shrunk else []
        crossed += [f"effective rank {rank:.2f} < {self.warn_rank}"] if rank < self.warn_rank else []
        if crossed and not self.warned and trainer.is_global_zero:
            warnings.warn(f"representation collapse at step {step}: {', '.join(crossed)} over {z.shape[0]} embeddings; "
                          "lower the learning rate, raise the "
                          "teacher temperature / centring (DINO) or the batch size (SimCLR)", stacklevel=2)
            self.warned = True

"""Self-supervised pretraining as a LightningModule: one encoder, one objective, AdamW + warmup-cosine.

The objective is a plain ``nn.Module`` wrapping the encoder (``MaskedAutoencoder3D`` for ViTs,
``SparKMasked3D`` for U-Nets, ...) whose ``forward(x)`` returns ``(loss, pred, mask)``; this module
only adds optimisation, logging, reconstruction panels and self-describing checkpoints.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ssl_em.errors import ConfigError

# method name -> "module:Class"; each class takes the encoder as first argument
OBJECTIVES: dict[str, str] = {
    "mae": "ssl_em.pretrain.mae:MaskedAutoencoder3D",
    "spark": "ssl_em.pretrain.spark:SparKMasked3D",
}


def build_objective(method: str, encoder: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    if method not in OBJECTIVES:
        raise ConfigError(f"pretraining method {method!r} is not one of {sorted(OBJECTIVES)}")
    module_name, class_name = OBJECTIVES[method].split(":")
    return getattr(importlib.import_module(module_name), class_name)(encoder, **kwargs)


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # norms, biases, position embeddings and mask tokens are not regularised (as in MAE/timm)
    return param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "mask_token" in name


class Pretraining(L.LightningModule):
    """Pretrain a registered encoder with a self-supervised objective.

    Args:
        encoder: registered encoder name (``ssl-em models`` lists them).
        encoder_kwargs: overrides for the encoder's constructor (e.g. ``img_size``).
        init_from: an exported encoder (path or shipped name) to continue pretraining from.
        method: objective name (``mae`` for ViTs, ``spark`` for U-Nets).
        method_kwargs: the objective's arguments (``mask_ratio``, ``target``, ...).
        lr: peak learning rate after warm-up.
        weight_decay: AdamW weight decay (not applied to norms, biases, position embeddings).
        warmup_steps: linear warm-up steps before the cosine decay to ``min_lr_ratio * lr``.
        panel_every_n_steps: write a reconstruction PNG this often (0 disables).
    """

    def __init__(
        self,
        encoder: str = "vit3d_tiny_patch2x16",
        encoder_kwargs: dict[str, Any] | None = None,
        init_from: str | None = None,
        method: str = "mae",
        method_kwargs: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.05,
        panel_every_n_steps: int = 200,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from ssl_em.models import create_encoder, load_encoder

        if init_from:
            net = load_encoder(init_from)
            if net.encoder_config["architecture"] != encoder:
                encoder = net.encoder_config["architecture"]
                self.hparams.encoder = encoder
        else:
            net = create_encoder(encoder, **(encoder_kwargs or {}))
        self.objective = build_objective(method, net, **(method_kwargs or {}))
        self.data_description: dict[str, Any] = {}

    @property
    def encoder(self) -> torch.nn.Module:
        return self.objective.encoder

    def forward(self, x: torch.Tensor):
        return self.objective(x)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss, _, _ = self.objective(batch["raw"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage} loss is {loss.item()} at step {self.global_step}")
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=stage == "val",
                 batch_size=batch["raw"].shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        every = self.hparams.panel_every_n_steps
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            self.write_panel(batch["raw"][:1].detach())
        return loss

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    @torch.no_grad()
    def write_panel(self, x: torch.Tensor, path: str | Path | None = None) -> Path | None:
        """Save input / masked input / reconstruction for a few z-slices of ``x`` (1, C, D, H, W)."""
        if path is None:
            if self.trainer is None or self.trainer.log_dir is None:
                return None
            path = Path(self.trainer.log_dir) / "panels" / f"step_{self.global_step:06d}.png"
        from ssl_em.pretrain.panels import save_reconstruction_panel

        was_training = self.training
        self.eval()
        panel = self.objective.reconstruct(x)
        self.train(was_training)
        return save_reconstruction_panel(panel, path, title=f"{self.hparams.method} step {self.global_step}")

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.objective.named_parameters():
            if param.requires_grad:
                (no_decay if _no_weight_decay(name, param) else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # fused AdamW is one kernel per step instead of one per tensor (CUDA and recent CPU builds)
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), fused=True)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total // 2)
        floor = self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "describe"):
            self.data_description = datamodule.describe()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what export-encoder needs to write a self-describing encoder (see ssl_em.models.export)
        checkpoint["ssl_em"] = {
            "encoder_config": self.encoder.encoder_config,
            "encoder_prefix": "objective.encoder.",
            "method": self.hparams.method,
            "method_kwargs": dict(self.hparams.method_kwargs or {}),
            "global_step": int(self.global_step),
            "data": self.data_description,
        }

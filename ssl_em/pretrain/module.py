"""Self-supervised pretraining as a LightningModule: one encoder, one objective, AdamW + warmup-cosine.

The objective is a plain ``nn.Module`` wrapping the encoder (``MaskedAutoencoder3D`` for ViTs,
``SparKMasked3D`` for U-Nets, ...) whose ``forward(x)`` returns ``(loss, pred, mask)``; this module
only adds optimisation, logging, reconstruction panels and self-describing checkpoints.
Two-view objectives (``two_views = True``: SimCLR, DINO in :mod:`ssl_em.pretrain.contrastive`) take
the datamodule's ``view1``/``view2``/``overlap1``/``overlap2`` (``EMDataModule(two_views=True)``) and
return ``(loss, h1, h2)`` pooled features; an ``update_teacher(progress)`` method runs after each
optimiser step (momentum teachers).
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ssl_em.errors import ConfigError
from ssl_em.utils.optim import SkipNonFiniteGradients, adamw_warmup_cosine, check_optimizer_settings

# method name -> "module:Class"; each class takes the encoder as first argument
OBJECTIVES: dict[str, str] = {
    "mae": "ssl_em.pretrain.mae:MaskedAutoencoder3D",
    "spark": "ssl_em.pretrain.spark:SparKMasked3D",
    "denoise": "ssl_em.pretrain.spark:Denoising3D",
    "simclr": "ssl_em.pretrain.contrastive:SimCLR3D",
    "dino": "ssl_em.pretrain.contrastive:DINO3D",
    "mae_simclr": "ssl_em.pretrain.combined:MAESimCLR3D",
    "spark_simclr": "ssl_em.pretrain.combined:SparKSimCLR3D",
    "inpaint": "ssl_em.pretrain.spark:MaskedInpainting3D",
    "inpaint_simclr": "ssl_em.pretrain.combined:InpaintingSimCLR3D",
}


def objective_class(method: str) -> type[torch.nn.Module]:
    if method not in OBJECTIVES:
        raise ConfigError(f"pretraining method {method!r} is not one of {sorted(OBJECTIVES)}")
    module_name, class_name = OBJECTIVES[method].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_objective(method: str, encoder: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    return objective_class(method)(encoder, **kwargs)


def needs_two_views(method: str) -> bool:
    """Whether ``method`` trains on two views of each crop (the data module's ``two_views``)."""
    return bool(getattr(objective_class(method), "two_views", False))


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # norms, biases, position embeddings and mask tokens are not regularised (as in MAE/timm)
    return param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "mask_token" in name


class Pretraining(SkipNonFiniteGradients, L.LightningModule):
    """Pretrain a registered encoder with a self-supervised objective.

    Args:
        encoder: registered encoder name (``ssl-em models`` lists them).
        encoder_kwargs: overrides for the encoder's constructor (e.g. ``img_size``).
        init_from: an exported encoder (path or shipped name) to continue pretraining from.
        method: objective name (``mae`` for ViTs, ``spark`` for U-Nets, ``simclr`` / ``dino`` for either,
            ``mae_simclr`` / ``spark_simclr`` combined; two-view methods need ``data.init_args.two_views: true``).
        method_kwargs: the objective's arguments (``mask_ratio``, ``target``, ...).
        lr: peak learning rate after warm-up.
        weight_decay: AdamW weight decay (not applied to norms, biases, position embeddings).
        warmup_steps: linear warm-up steps before the cosine decay to ``min_lr_ratio * lr``.
        panel_every_n_steps: write a reconstruction PNG this often (0 disables).
        seed: seeds the per-step masks (see ``_step_rng``).
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
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_optimizer_settings(lr, weight_decay, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        from ssl_em.models import create_encoder, load_encoder

        if init_from:
            net = load_encoder(init_from).train()  # load_encoder returns eval mode; Lightning keeps modes as found
            if net.encoder_config["architecture"] != encoder:
                encoder = net.encoder_config["architecture"]
                self.hparams.encoder = encoder
        else:
            net = create_encoder(encoder, **(encoder_kwargs or {}))
        self.objective = build_objective(method, net, **(method_kwargs or {}))
        self.data_description: dict[str, Any] = {}
        self._panel_dir: Path | None = None
        self.last_embeddings: torch.Tensor | None = None  # (2B, C) pooled features of the last two-view batch

    @property
    def encoder(self) -> torch.nn.Module:
        return self.objective.encoder

    def forward(self, x: torch.Tensor):
        return self.objective(x)

    @property
    def two_views(self) -> bool:
        return bool(getattr(self.objective, "two_views", False))

    @contextlib.contextmanager
    def _step_rng(self, stage: str, batch_idx: int):
        """Draw masks and dropout from a seed fixed by (seed, stage, step, rank), not from the global
        RNG stream: a resumed run draws exactly what the uninterrupted run drew, and validation sees
        the same masks at every evaluation, so its curve compares like with like."""
        index = self.global_step if stage == "train" else batch_idx
        seed = ((self.hparams.seed * 1_000_003 + int(index)) * 2 + (stage == "val")) * 4099 + self.global_rank
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed % 2**63)
            yield

    def _step(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int) -> torch.Tensor:
        with self._step_rng(stage, batch_idx):
            loss, size = self._objective_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage} loss is {loss.item()} at step {self.global_step}")
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=stage == "val",
                 batch_size=size)
        for name, value in getattr(self.objective, "last_terms", {}).items():  # parts of a combined loss
            self.log(f"{stage}/{name}", value, on_step=stage == "train", on_epoch=stage == "val", batch_size=size)
        return loss

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of ``batch`` without logging (precision measurement, ``ssl_em.fit``)."""
        return self._objective_loss(batch)[0]

    def _objective_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        if self.two_views:
            if "view1" not in batch:
                raise ConfigError(f"method {self.hparams.method!r} needs two views per crop: set "
                                  "data.init_args.two_views: true")
            loss, h1, h2 = self.objective(batch["view1"], batch["view2"], batch.get("overlap1"), batch.get("overlap2"))
            self.last_embeddings = torch.cat([h1, h2]).detach()
            size = batch["view1"].shape[0]
        else:
            loss, _, _ = self.objective(batch["raw"])
            size = batch["raw"].shape[0]
        return loss, size

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train", batch_idx)
        every = self.hparams.panel_every_n_steps
        panel_due = every and self.global_step % every == 0 and self.trainer.is_global_zero
        if panel_due and hasattr(self.objective, "reconstruct"):
            self.write_panel(batch["view1" if self.two_views else "raw"][:1].detach())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        update = getattr(self.objective, "update_teacher", None)
        if update is not None:  # after the optimiser step: EMA of the student into the teacher
            total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
            momentum = update(min(self.global_step / total, 1.0))
            self.log("train/teacher_momentum", momentum, on_step=True, on_epoch=False)

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val", batch_idx)

    @torch.no_grad()
    def write_panel(self, x: torch.Tensor, path: str | Path | None = None, title: str | None = None) -> Path | None:
        """Save input / masked input / reconstruction for a few z-slices of ``x`` (1, C, D, H, W)."""
        if path is None:
            if self._panel_dir is None:
                return None
            path = self._panel_dir / f"step_{self.global_step:06d}.png"
        from ssl_em.pretrain.panels import save_reconstruction_panel

        was_training = self.training
        self.eval()
        panel = self.objective.reconstruct(x)
        self.train(was_training)
        if not isinstance(panel, dict):  # MAE: (reconstruction, mask volume)
            recon, mask = panel
            panel = {"input": x, "masked input": x * (1 - mask), "reconstruction": recon}
        return save_reconstruction_panel(panel, path, title=title or f"{self.hparams.method} step {self.global_step}")

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.objective.named_parameters():
            if param.requires_grad:
                (no_decay if _no_weight_decay(name, param) else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return adamw_warmup_cosine(self.trainer, groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                   warmup_steps=self.hparams.warmup_steps, min_lr_ratio=self.hparams.min_lr_ratio)

    def on_fit_start(self) -> None:
        # trainer.log_dir is a collective under DDP: read it here on every rank, not on rank 0 alone
        log_dir = self.trainer.log_dir
        self._panel_dir = Path(log_dir) / "panels" if log_dir else None
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "describe"):
            self.data_description = datamodule.describe()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what export-encoder needs to write a self-describing encoder (see ssl_em.pretrain.export_encoder)
        checkpoint["ssl_em"] = {
            "encoder_config": self.encoder.encoder_config,
            "encoder_prefix": "objective.encoder.",
            "method": self.hparams.method,
            "method_kwargs": dict(self.hparams.method_kwargs or {}),
            "global_step": int(self.global_step),
            "data": self.data_description,
        }

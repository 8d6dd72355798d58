"""Few-label fine-tuning as a LightningModule: encoder (+ adapter) + head, trained on a task.

The same module serves every method compared in the label-efficiency study:

=============  ==============================  ==========================
method         encoder weights                 what trains
=============  ==============================  ==========================
lora, dora...  pretrained (``pretrained``)     adapter + head
frozen         pretrained                      head only
full           pretrained                      everything
scratch        random init                     everything
lora_random    random init                     adapter + head (control)
=============  ==============================  ==========================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ssl_em.errors import ConfigError
from ssl_em.utils.optim import adamw_warmup_cosine

# study method -> (adapter method, use pretrained weights)
STUDY_METHODS: dict[str, tuple[str, bool]] = {
    "lora": ("lora", True),
    "dora": ("dora", True),
    "frozen": ("frozen", True),
    "full": ("full", True),
    "scratch": ("full", False),
    "lora_random": ("lora", False),
}


class FineTuning(L.LightningModule):
    """Fine-tune an encoder for a segmentation task from (sparse) labels.

    Args:
        task: ``mito``, ``synapse``, ``neuron`` or ``membrane`` (``ssl_em.adapters.list_tasks()``).
        encoder: registered encoder name; its weights come from ``pretrained`` when given.
        pretrained: an exported encoder (folder, ``encoder.safetensors`` / ``.json``, or shipped
            name); None trains from random init (the ``scratch`` / ``lora_random`` baselines).
        encoder_kwargs: constructor overrides when building from ``encoder`` (no ``pretrained``).
        head: ``auto`` (dense head for U-Nets, UNETR decoder for ViTs), ``unetr``, ``linear``, ``dense``.
        adapter: ``lora``, ``dora``, ``loha``, ``lokr``, ``ia3``, ``frozen`` or ``full``.
        adapter_kwargs: rank ``r``, ``alpha``, ``targets``, ... (see ``add_adapter``).
        task_kwargs: the task's constructor arguments (thresholds, offsets, ...).
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with warm-up then cosine decay.
        grad_checkpointing: trade compute for activation memory in the encoder.
    """

    def __init__(
        self,
        task: str = "mito",
        encoder: str = "unet3d_tiny",
        pretrained: str | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        head: str = "auto",
        adapter: str = "lora",
        adapter_kwargs: dict[str, Any] | None = None,
        task_kwargs: dict[str, Any] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.05,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from ssl_em.adapters import add_adapter, build_segmentation_model, get_task
        from ssl_em.models import create_encoder, load_encoder

        self.task = get_task(task, **(task_kwargs or {}))
        if pretrained:
            net = load_encoder(pretrained)
        else:
            net = create_encoder(encoder, **(encoder_kwargs or {}))
        if grad_checkpointing:
            net.set_grad_checkpointing(True)
        self.encoder_config = dict(net.encoder_config)
        base = build_segmentation_model(net, head, out_channels=self.task.num_outputs)
        # base weights are final here (loaded above), so adapter injection comes after them
        self.model = add_adapter(base, method=adapter, **(adapter_kwargs or {}))
        self.data_description: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (B, 1, D, H, W) normalised to 0..1 -> logits (B, K, D, H, W)."""
        return self.model(x)

    # ---- targets -------------------------------------------------------------------------------
    def _targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["label"].detach().cpu().numpy()
        masks = batch["mask"].detach().cpu().numpy() if "mask" in batch else np.ones(labels.shape, np.float32)
        targets, target_masks = [], []
        for lab, m in zip(labels, masks):
            lab, m = lab.reshape(lab.shape[-3:]), m.reshape(m.shape[-3:])
            if not (m > 0).any():  # a crop without labelled voxels contributes nothing
                targets.append(np.zeros((self.task.num_outputs, *lab.shape), np.float32))
                target_masks.append(np.zeros((self.task.num_outputs, *lab.shape), np.float32))
                continue
            t, tm = self.task.make_targets(lab.astype(np.int64), m)
            targets.append(t)
            target_masks.append(tm)
        device = batch["raw"].device
        return torch.from_numpy(np.stack(targets)).to(device), torch.from_numpy(np.stack(target_masks)).to(device)

    def training_step(self, batch, batch_idx):
        target, mask = self._targets(batch)
        loss = self.task.loss(self(batch["raw"]).float(), target, mask)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["raw"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        target, mask = self._targets(batch)
        logits = self(batch["raw"]).float()
        loss = self.task.loss(logits, target, mask)
        # foreground IoU of channel 0 on supervised voxels (a quick, task-agnostic signal)
        pred = logits[:, :1] > 0
        truth = target[:, :1] > 0.5
        keep = mask[:, :1] > 0
        inter = (pred & truth & keep).sum()
        union = ((pred | truth) & keep).sum()
        n = batch["raw"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log("val/iou", inter.float() / union.clamp(min=1).float(), prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"adapter {self.hparams.adapter!r} left no trainable parameter")
        return adamw_warmup_cosine(self.trainer, params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                   warmup_steps=self.hparams.warmup_steps, min_lr_ratio=self.hparams.min_lr_ratio)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "describe"):
            self.data_description = datamodule.describe()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ssl_em"] = {
            "task": self.hparams.task,
            "encoder_config": self.encoder_config,
            "adapter": self.hparams.adapter,
            "global_step": int(self.global_step),
            "data": self.data_description,
        }

    # ---- inference / export --------------------------------------------------------------------
    @torch.no_grad()
    def predict_probabilities(self, raw: torch.Tensor) -> torch.Tensor:
        """Normalised raw (B, 1, D, H, W) -> probabilities (B, K, D, H, W)."""
        self.eval()
        return torch.sigmoid(self(raw).float())

    def export(self, out_dir: str | Path) -> Path:
        """Save only adapter + head weights (safetensors) with a sidecar naming the base encoder."""
        from ssl_em.adapters import save_adapter

        base = self.hparams.pretrained or self.hparams.encoder
        metadata = {"task": self.hparams.task, "task_kwargs": dict(self.hparams.task_kwargs or {}),
                    "head": self.hparams.head, "data": self.data_description}
        return save_adapter(self.model, out_dir, base, metadata)

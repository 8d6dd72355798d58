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
import torch

from ssl_em.adapters.losses import dice_loss
from ssl_em.errors import ConfigError, check_fraction
from ssl_em.utils.optim import SkipNonFiniteGradients, adamw_warmup_cosine, check_optimizer_settings


def default_grad_checkpointing(adapter: str) -> bool:
    """Gradient checkpointing by default for the peft adapters (memory is why one picks them), not
    for ``full`` (speed) or ``frozen`` (the encoder keeps no activations for backward anyway)."""
    return adapter not in ("full", "frozen")


class FineTuning(SkipNonFiniteGradients, L.LightningModule):
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
        encoder_lr_scale: the encoder path's own weights (a U-Net's contracting half, a ViT's blocks;
            not adapters, heads or the decoder path) train at ``lr * encoder_lr_scale``: below 1 a
            pretrained encoder moves less than the layers that learn the task.
        grad_checkpointing: trade compute for activation memory in the encoder; None = on for the
            peft adapters (:func:`default_grad_checkpointing`), whose point is a small footprint: a
            frozen conv still saves its input for backward, so without it LoRA holds as many
            activations as full fine-tuning (``benchmarks/finetune_memory.py`` measures both).
        calibrate_on_fit_end: when ``fit`` ends, tasks with post-processing settings (synapse threshold
            and minimum cleft size, neuron threshold: ``Task.calibrate``) choose them on the data module's
            labelled validation part (its training labels without one; ``calibration_region``), before
            the export, so the folder carries them.
        export_on_fit_end: when ``fit`` ends, write a deployable folder (:meth:`export`) that
            ``ssl-em predict --model FOLDER`` runs.
        export_dir: that folder; None = ``<trainer.log_dir>/model``.
    """

    def __init__(
        self,
        task: str = "mito",
        encoder: str = "unet_small",
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
        encoder_lr_scale: float = 1.0,
        grad_checkpointing: bool | None = None,
        calibrate_on_fit_end: bool = True,
        export_on_fit_end: bool = True,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_optimizer_settings(lr, weight_decay, warmup_steps, min_lr_ratio)
        check_fraction(encoder_lr_scale, "encoder_lr_scale", allow_zero=False, allow_one=True)
        self.save_hyperparameters()
        from ssl_em.adapters import add_adapter, build_segmentation_model, get_task
        from ssl_em.models import create_encoder, load_encoder

        self.task = get_task(task, **(task_kwargs or {}))
        self.encoder_voxel_size: list[float] | None = None  # what the pretrained encoder saw (z, y, x) nm
        self.data_description: dict[str, Any] = {}
        if pretrained:
            net = load_encoder(pretrained).train()  # load_encoder returns eval mode (drop-path, norms)
            self.encoder_voxel_size = (net.pretrained_metadata.get("metadata") or {}).get("voxel_size")
        else:
            net = create_encoder(encoder, **(encoder_kwargs or {}))
        if grad_checkpointing if grad_checkpointing is not None else default_grad_checkpointing(adapter):
            net.set_grad_checkpointing(True)
        self.encoder_config = dict(net.encoder_config)
        base = build_segmentation_model(net, head, out_channels=self.task.num_outputs)
        # base weights are final here (loaded above), so adapter injection comes after them
        self.model = add_adapter(base, method=adapter, **(adapter_kwargs or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (B, 1, D, H, W) normalised to 0..1 -> logits (B, K, D, H, W)."""
        return self.model(x)

    # ---- targets -------------------------------------------------------------------------------
    def _targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "target" in batch:  # computed in the DataLoader workers (EMDataModule.use_targets)
            return batch["target"], batch["target_mask"]
        masks = batch["mask"].detach().cpu().numpy() if "mask" in batch else None
        target, mask = self.task.batch_targets(batch["label"].detach().cpu().numpy(), masks)
        device = batch["raw"].device
        return torch.from_numpy(target).to(device), torch.from_numpy(mask).to(device)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of ``batch`` without logging (precision measurement, ``ssl_em.fit``)."""
        target, mask = self._targets(batch)
        return self.task.loss(self(batch["raw"]).float(), target, mask)

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):  # Lightning would train on with NaN weights and exit normally
            raise FloatingPointError(f"train loss is {loss.item()} at step {self.global_step}")
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
        # soft Dice of the probabilities: still ranks runs (rates, checkpoints) before any voxel crosses 0.5
        soft = 1 - dice_loss(logits[:, :1], target[:, :1], mask[:, :1], smooth=1e-6)
        self.log("val/soft_dice", soft, batch_size=n)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"adapter {self.hparams.adapter!r} left no trainable parameter")
        scale = float(self.hparams.get("encoder_lr_scale", 1.0))
        if scale != 1.0:
            slow = {id(p) for p in self.encoder_path_parameters()}
            params = [{"params": [p for p in params if id(p) not in slow]},
                      {"params": [p for p in params if id(p) in slow], "lr": self.hparams.lr * scale}]
        return adamw_warmup_cosine(self.trainer, params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                   warmup_steps=self.hparams.warmup_steps, min_lr_ratio=self.hparams.min_lr_ratio)

    def encoder_path_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable weights of the encoder path itself: the encoder's parameters outside its
        ``decoder_modules``, adapter layers and modules peft trains in full."""
        base = getattr(self.model, "base_model", self.model)
        encoder = base.encoder
        decoder = tuple(getattr(encoder, "decoder_modules", ()))
        return [p for n, p in encoder.named_parameters()
                if p.requires_grad and not n.startswith(tuple(f"{d}." for d in decoder))
                and "lora_" not in n and "modules_to_save" not in n and "original_module" not in n]

    def setup(self, stage: str) -> None:
        # after the data module's setup (shapes checked there): hand it this task's rules before step 1
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage != "fit" or datamodule is None:
            return
        from ssl_em.models.pretrained import check_voxel_size

        data_voxel = getattr(datamodule, "voxel_size", None)
        volumes = getattr(datamodule, "volumes", None) or ["volume"]
        check_voxel_size(data_voxel, self.encoder_voxel_size, what=f"fine-tuning data {volumes[0]}")
        if data_voxel is not None and getattr(self.task, "voxel_size", False) is None:
            # the task draws boundaries by the data's anisotropy; unset in a recipe, it comes from the data
            self.task.voxel_size = list(data_voxel)
        if hasattr(datamodule, "check_labels"):  # label values outside the task's set: one line, before step 1
            datamodule.check_labels(self.task.check_values)
        if hasattr(datamodule, "use_targets"):  # after voxel_size: the workers' copy of the task has it
            datamodule.use_targets(self.task.crop_targets)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "describe"):
            self.data_description = datamodule.describe()

    def on_fit_end(self) -> None:
        if self.hparams.get("calibrate_on_fit_end", True) and self.trainer.is_global_zero:  # rank 0 exports
            self.calibrate(getattr(self.trainer, "datamodule", None))
        if not self.hparams.export_on_fit_end:
            return
        # trainer.log_dir broadcasts rank 0's value under DDP (a collective): every rank reads it
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        out = Path(self.hparams.export_dir or Path(log_dir) / "model")
        if self.trainer.is_global_zero:
            self.export(out)
            print(f"fine-tuned model: {out} (ssl-em predict --model {out} --input ... --output ...)")
        self.trainer.strategy.barrier("ssl_em_export")  # no rank leaves before the folder is complete

    def calibrate(self, datamodule: Any) -> dict[str, float]:
        """``Task.calibrate`` on ``datamodule.calibration_region()`` (predicted in blocks of the training
        crop, as ``ssl-em predict`` does); {} where the task has nothing to choose or there are no labels."""
        if not self.task.calibrates or not hasattr(datamodule, "calibration_region"):
            return {}
        region = datamodule.calibration_region()
        if region is None:
            return {}
        from ssl_em.predict.blockwise import predict_in_memory

        raw, labels, mask = region
        probs = predict_in_memory(self.model, raw, datamodule.crop_shape, device=str(self.device))
        settings = self.task.calibrate(probs, labels, mask, getattr(datamodule, "voxel_size", None))
        print("post-processing chosen on the labels: "
              + (", ".join(f"{k} {v:g}" for k, v in settings.items()) or "no foreground there, defaults kept"))
        return settings

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
        """Write a self-contained folder for ``ssl-em predict --model``: adapter + head weights
        (safetensors), a sidecar with task, head, normalisation, voxel size and the base encoder,
        plus the base encoder itself for random-init runs (see :mod:`ssl_em.adapters.io`)."""
        from ssl_em.adapters.io import save_finetuned

        return save_finetuned(self, out_dir)

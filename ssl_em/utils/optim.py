"""AdamW with linear warm-up then cosine decay, shared by pretraining and fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ssl_em.errors import check_fraction, check_positive


def check_optimizer_settings(lr: float, weight_decay: float, warmup_steps: int, min_lr_ratio: float) -> None:
    """One-line errors naming the setting, at construction rather than inside torch at the first step."""
    check_positive(lr, "lr")
    check_positive(weight_decay, "weight_decay", allow_zero=True)
    check_positive(warmup_steps, "warmup_steps", allow_zero=True)
    check_fraction(min_lr_ratio, "min_lr_ratio", allow_zero=True, allow_one=True)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Multiplier of the peak rate at each step: linear warm-up, then cosine down to ``min_lr_ratio``."""
    total = max(int(total_steps), 1)
    warmup = min(int(warmup_steps), total // 2)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return schedule


def adamw_warmup_cosine(trainer: Any, params: Iterable, *, lr: float, warmup_steps: int, min_lr_ratio: float,
                        **adamw_kwargs: Any) -> dict[str, Any]:
    """``configure_optimizers`` output for a Lightning ``trainer``.

    Fused AdamW (one kernel per step instead of one per tensor) unless gradients are clipped:
    Lightning cannot clip gradients a fused optimizer unscales internally under mixed precision.
    """
    fused = not getattr(trainer, "gradient_clip_val", None)
    optimizer = torch.optim.AdamW(params, lr=lr, fused=fused, **adamw_kwargs)
    total = trainer.estimated_stepping_batches if trainer is not None else 1
    if not math.isfinite(total):  # max_steps=-1 and max_epochs=-1: no horizon for the cosine
        total = 10**9
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total, min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def gradients_finite(grads: list[torch.Tensor]) -> bool:
    """Whether every entry of ``grads`` is finite: one fused norm per tensor and one host sync."""
    return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())


class SkipNonFiniteGradients:
    """LightningModule mixin: an optimiser step whose gradients are not all finite is skipped (as
    ``torch.amp.GradScaler`` does), counted in ``skipped_steps`` and logged as ``train/skipped_steps``.

    Why: on CPUs with native bf16, oneDNN's bf16 weight gradient of some 3-D convolutions (torch 2.14,
    small deep-level feature maps) intermittently returns NaN for a few weights although
    inputs and loss are finite (``benchmarks/bf16_conv_nan.py``); one such step would turn every weight
    NaN through AdamW. ``max_consecutive_skips`` skipped steps in a row mean a real divergence:
    FloatingPointError. Ranks decide together, so every rank skips the same steps.
    """

    skipped_steps: int = 0
    _consecutive_skips: int = 0
    max_consecutive_skips: int = 20

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = gradients_finite(grads)
        # one decision for all ranks: under FSDP each rank holds only its shard's gradients
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):  # type: ignore[attr-defined]
            self._consecutive_skips = 0
            return
        optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left as they are
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)  # type: ignore[attr-defined]
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(f"gradients were not finite in {self._consecutive_skips} optimiser steps in a "
                                     f"row (step {self.global_step})")  # type: ignore[attr-defined]

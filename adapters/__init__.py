"""Few-label adaptation: peft adapters, segmentation heads, masked losses and task definitions.

Installed as ``ssl_em.adapters`` (``from ssl_em import adapters``). Names load lazily so importing
the package does not import torch or peft.

Typical use (load pretrained weights BEFORE ``add_adapter``)::

    from ssl_em import adapters, load_encoder
    task = adapters.get_task("mito")
    model = adapters.build_segmentation_model(load_encoder("run/encoder"), "auto", task.num_outputs)
    model = adapters.add_adapter(model, "lora", r=8)          # encoder frozen, LoRA + head train
    ...                                                        # train on task.loss(model(x), y, mask)
    adapters.save_adapter(model, "run/mito-lora", "run/encoder", {"task": "mito"})
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "AdaptedModel": "peft_adapters", "ADAPTER_METHODS": "peft_adapters", "add_adapter": "peft_adapters",
    "base_weights_sha256": "peft_adapters", "count_trainable": "peft_adapters", "merge_adapter": "peft_adapters",
    "resolve_targets": "peft_adapters",
    "DenseHead": "heads", "LinearHead3D": "heads", "SegmentationModel": "heads", "UNETRDecoder3D": "heads",
    "build_segmentation_model": "heads",
    "BCEDiceLoss": "losses", "CLDiceLoss": "losses", "bce_loss": "losses", "cldice_loss": "losses",
    "dice_loss": "losses", "soft_skeleton": "losses",
    "Task": "tasks", "get_task": "tasks", "list_tasks": "tasks",
    "save_adapter": "io", "load_adapter": "io", "read_adapter_sidecar": "io", "load_segmentation_model": "io",
    "FinetunedModel": "io", "save_finetuned": "io", "is_finetuned_folder": "io", "load_finetuned": "io",
}

if TYPE_CHECKING:  # pragma: no cover
    from ssl_em.adapters.heads import DenseHead as DenseHead
    from ssl_em.adapters.heads import LinearHead3D as LinearHead3D
    from ssl_em.adapters.heads import SegmentationModel as SegmentationModel
    from ssl_em.adapters.heads import UNETRDecoder3D as UNETRDecoder3D
    from ssl_em.adapters.heads import build_segmentation_model as build_segmentation_model
    from ssl_em.adapters.losses import BCEDiceLoss as BCEDiceLoss
    from ssl_em.adapters.losses import CLDiceLoss as CLDiceLoss
    from ssl_em.adapters.losses import bce_loss as bce_loss
    from ssl_em.adapters.losses import cldice_loss as cldice_loss
    from ssl_em.adapters.losses import dice_loss as dice_loss
    from ssl_em.adapters.losses import soft_skeleton as soft_skeleton
    from ssl_em.adapters.peft_adapters import ADAPTER_METHODS as ADAPTER_METHODS
    from ssl_em.adapters.peft_adapters import AdaptedModel as AdaptedModel
    from ssl_em.adapters.peft_adapters import add_adapter as add_adapter
    from ssl_em.adapters.peft_adapters import base_weights_sha256 as base_weights_sha256
    from ssl_em.adapters.peft_adapters import count_trainable as count_trainable
    from ssl_em.adapters.peft_adapters import merge_adapter as merge_adapter
    from ssl_em.adapters.peft_adapters import resolve_targets as resolve_targets
    from ssl_em.adapters.io import FinetunedModel as FinetunedModel
    from ssl_em.adapters.io import is_finetuned_folder as is_finetuned_folder
    from ssl_em.adapters.io import load_adapter as load_adapter
    from ssl_em.adapters.io import load_finetuned as load_finetuned
    from ssl_em.adapters.io import load_segmentation_model as load_segmentation_model
    from ssl_em.adapters.io import read_adapter_sidecar as read_adapter_sidecar
    from ssl_em.adapters.io import save_adapter as save_adapter
    from ssl_em.adapters.io import save_finetuned as save_finetuned
    from ssl_em.adapters.tasks import Task as Task
    from ssl_em.adapters.tasks import get_task as get_task
    from ssl_em.adapters.tasks import list_tasks as list_tasks


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ssl_em.adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ssl_em.adapters.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)

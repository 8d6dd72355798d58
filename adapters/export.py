"""Deployable fine-tuned models: one folder that ``ssl-em predict --model FOLDER`` runs as is.

Folder layout::

    adapter.safetensors   adapter + head weights (everything for method "full" on a pretrained base)
    adapter.json          method, adapter spec, base encoder reference + sha256, head, and metadata:
                          task (+ kwargs), normalisation and voxel size (z, y, x nm) of the training data
    encoder.safetensors   only for random-init runs (no ``pretrained``): the base encoder, so the
    encoder.json          folder is self-contained; the sidecar then has ``metadata.base_in_folder``

A pretrained base is referenced by its (absolute) path or shipped name, not copied: the folder of a
LoRA run is then a small fraction of the encoder. A random-init ``full`` run ("scratch") saves its
trained encoder here and the head as a ``frozen`` adapter on it (the trained encoder *is* the base).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.adapters.tasks import Task

__all__ = ["FinetunedModel", "export_finetuned", "is_finetuned_folder", "load_finetuned"]

ENCODER_FILE = "encoder.safetensors"


def _base_encoder(module: FineTuning) -> nn.Module:
    """A fresh, un-injected encoder holding ``module``'s current base weights (adapters dropped)."""
    from ssl_em.adapters.peft_adapters import _base_state
    from ssl_em.models import create_encoder

    adapted = module.model
    # modules inside the encoder that train in full (train_decoder) stay: the encoder must be whole;
    # their trained values also live in the adapter file, which is loaded over them
    heads = [h for h in adapted.spec["modules_to_save"] if not h.startswith("encoder.")]
    state = _base_state(adapted.base_model, heads, adapted.adapter_prefix)
    cfg = module.encoder_config
    encoder = create_encoder(cfg["architecture"], **dict(cfg.get("kwargs") or {}))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
    return encoder


def export_finetuned(module: FineTuning, out_dir: str | Path) -> Path:
    """Write ``module`` (a trained :class:`~ssl_em.adapters.finetune.FineTuning`) to ``out_dir``.

    Normalisation and voxel size come from ``module.data_description`` (the data module's
    ``describe()``, recorded at fit start). Returns ``out_dir``.
    """
    from ssl_em.adapters.peft_adapters import add_adapter, save_adapter
    from ssl_em.models import save_encoder

    hp, data = module.hparams, dict(module.data_description or {})
    adapted = module.model
    metadata: dict[str, Any] = {
        "task": hp.task, "task_kwargs": dict(hp.task_kwargs or {}), "head": hp.head,
        "normalization": data.get("normalization"), "voxel_size": data.get("voxel_size"),
        "patch_shape": data.get("patch_shape"), "trained_method": adapted.method,
        "steps": int(module.global_step), "data": data,
    }
    out = Path(out_dir)
    if hp.pretrained:
        base = Path(str(hp.pretrained))
        # an absolute path keeps the folder usable from any working directory
        ref = str(base.resolve()) if base.exists() else str(hp.pretrained)
        return save_adapter(adapted, out, ref, metadata)
    encoder = _base_encoder(module)
    save_encoder(encoder, out, {"method": "random_init" if adapted.method != "full" else "scratch",
                                "normalization": metadata["normalization"], "voxel_size": metadata["voxel_size"]})
    if adapted.method == "full":  # the trained encoder is the base now: save the head on top of it
        adapted = add_adapter(copy.deepcopy(adapted.base_model), "frozen",
                              modules_to_save=adapted.spec["modules_to_save"])
    return save_adapter(adapted, out, ENCODER_FILE, {**metadata, "base_in_folder": True})


def is_finetuned_folder(path: str | Path) -> bool:
    """True for a folder (or its ``adapter.json``) written by :func:`export_finetuned` / ``save_adapter``."""
    from ssl_em.adapters.peft_adapters import SIDECAR_NAME, WEIGHTS_NAME

    p = Path(path)
    folder = p.parent if p.name in (SIDECAR_NAME, WEIGHTS_NAME) else p
    return (folder / SIDECAR_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


class FinetunedModel:
    """A loaded fine-tuned folder: ``model`` (eval mode, logits), ``task``, ``normalization`` (a
    fitted ``Normalization`` or None), ``voxel_size`` (z, y, x nm or None) and the sidecar ``info``."""

    def __init__(self, model: nn.Module, task: Task, info: dict[str, Any]) -> None:
        from ssl_em.data.crops import Normalization

        self.model, self.task, self.info = model, task, info
        meta = info.get("metadata") or {}
        norm = meta.get("normalization") or (meta.get("data") or {}).get("normalization")
        self.normalization = Normalization.from_dict(norm) if norm else None
        vs = meta.get("voxel_size")
        self.voxel_size = tuple(float(v) for v in vs) if vs else None


def load_finetuned(path: str | Path, merge: bool = True) -> FinetunedModel:
    """Rebuild a fine-tuned folder: base encoder (in the folder, or the referenced pretrained one,
    checked by sha256) + head + adapter. ``merge`` folds LoRA-style adapters into the base weights
    for faster inference where peft can (same outputs up to float rounding)."""
    from ssl_em.adapters.peft_adapters import load_segmentation_model, merge_adapter, read_adapter_sidecar
    from ssl_em.adapters.tasks import get_task
    from ssl_em.errors import CheckpointError, ConfigError

    info, weights = read_adapter_sidecar(path)
    meta = info.get("metadata") or {}
    if "task" not in meta:
        raise CheckpointError(f"{weights.parent} records no task: it is an adapter, not a fine-tuned model folder")
    encoder = None
    if meta.get("base_in_folder"):
        from ssl_em.models import load_encoder

        encoder = load_encoder(weights.parent / ENCODER_FILE)
    adapted = load_segmentation_model(weights.parent, encoder)
    model: nn.Module = adapted
    if merge and adapted.method not in ("frozen", "full"):
        try:
            model = merge_adapter(adapted)
        except ConfigError:  # layers peft cannot merge: run the adapter unmerged
            model = adapted
    return FinetunedModel(model.eval(), get_task(meta["task"], **dict(meta.get("task_kwargs") or {})), info)

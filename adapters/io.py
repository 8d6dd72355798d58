"""Adapters and fine-tuned models on disk (safetensors + JSON sidecar), verified on load.

An adapter folder (``save_adapter``) holds the adapter + head weights and names its base encoder
with the sha256 of the base weights, so ``load_adapter`` refuses any other base. A fine-tuned model
folder (``save_finetuned``) is one that ``ssl-em predict --model FOLDER`` runs as is::

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
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ssl_em.adapters.heads import build_segmentation_model
from ssl_em.adapters.peft_adapters import (
    AdaptedModel, adapter_state, add_adapter, base_state, base_weights_sha256, count_trainable, merge_adapter,
)
from ssl_em.adapters.tasks import Task, get_task
from ssl_em.data.normalize import Normalization
from ssl_em.errors import CheckpointError, ConfigError
from ssl_em.models import create_encoder, load_encoder, save_encoder
from ssl_em.utils.io import atomic_path, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from ssl_em.adapters.finetune import FineTuning

__all__ = ["FinetunedModel", "is_finetuned_folder", "load_adapter", "load_finetuned", "load_segmentation_model",
           "read_adapter_sidecar", "save_adapter", "save_finetuned"]

FORMAT = "ssl-em-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter.safetensors"
SIDECAR_NAME = "adapter.json"
ENCODER_FILE = "encoder.safetensors"


# ---- adapters -----------------------------------------------------------------------------------
def _encoder_config(model: nn.Module) -> dict[str, Any] | None:
    encoder = getattr(model, "encoder", model)
    config = getattr(encoder, "encoder_config", None)
    return dict(config) if isinstance(config, dict) else None


def save_adapter(
    model: AdaptedModel,
    out_dir: str | Path,
    base_encoder_name_or_path: str | Path,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/adapter.safetensors`` (adapter + head weights only) and ``adapter.json``.

    The sidecar names the base encoder (``base_encoder_name_or_path``, its ``encoder_config``) and
    the sha256 of the base weights, so :func:`load_adapter` can refuse any other base.
    ``metadata`` (JSON-serialisable: task, voxel size, normalisation, ...) is stored as given.
    Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"save_adapter needs the model returned by add_adapter, got {type(model).__name__}")
    now = base_weights_sha256(model)
    if model.method != "full" and now != model.base_sha256:
        raise CheckpointError(
            f"base weights changed after add_adapter (sha256 {model.base_sha256[:12]} -> {now[:12]}): "
            "load pretrained weights before add_adapter, not after"
        )
    trainable, total = count_trainable(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in adapter_state(model).items()}
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": model.method,
        "adapter": model.spec,
        "base": {
            "name_or_path": str(base_encoder_name_or_path),
            "architecture": (_encoder_config(model.base_model) or {}).get("architecture"),
            "encoder_config": _encoder_config(model.base_model),
            "sha256": model.base_sha256,
        },
        "head": getattr(getattr(model.base_model, "head", None), "config", None),
        "parameters": {"trainable": trainable, "total": total, "saved": sum(v.numel() for v in state.values())},
        "metadata": metadata or {},
    }
    try:
        text = json.dumps(sidecar, indent=2)
    except TypeError as err:
        raise ConfigError(f"adapter metadata is not JSON-serialisable: {err}") from None
    out = Path(out_dir)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    atomic_write_text(out / SIDECAR_NAME, text)  # last: a sidecar means the weights are complete
    return out


def read_adapter_sidecar(path: str | Path) -> tuple[dict[str, Any], Path]:
    """``(sidecar dict, weights path)`` for an adapter folder or either of its two files."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    sidecar, weights = folder / SIDECAR_NAME, folder / WEIGHTS_NAME
    if not sidecar.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not an adapter folder: needs {SIDECAR_NAME} and {WEIGHTS_NAME}")
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{sidecar} is not valid JSON: {err}") from None
    if info.get("format") != FORMAT or info.get("format_version", 99) > FORMAT_VERSION:
        raise CheckpointError(f"{sidecar} is not an ssl-em adapter of format version <= {FORMAT_VERSION}")
    return info, weights


def load_adapter(base_model: nn.Module, path: str | Path) -> AdaptedModel:
    """Rebuild the saved adapter on ``base_model`` (with its pretrained weights already loaded).

    Raises CheckpointError when ``base_model``'s base weights are not the ones the adapter was
    trained on (the sidecar's sha256), naming both.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info, weights = read_adapter_sidecar(path)
    spec = dict(info["adapter"])
    base = info["base"]
    heads = [h for h in spec["modules_to_save"] if h in dict(base_model.named_modules())]
    given = base_weights_sha256(base_model, heads)
    if given != base["sha256"]:
        arch = (_encoder_config(base_model) or {}).get("architecture") or type(base_model).__name__
        raise CheckpointError(
            f"adapter {path} was trained on base {base['name_or_path']} (sha256 {base['sha256'][:12]}) "
            f"but the given model is {arch} with base sha256 {given[:12]}; load that base before load_adapter"
        )
    adapted = add_adapter(base_model, **spec)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} cannot be read: {err}") from None
    expected = set(adapter_state(adapted))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit this adapter: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    try:
        adapted.base_model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: e.g. a head with another number of outputs
        raise CheckpointError(f"{weights} does not fit this model: {str(err).splitlines()[-1].strip()}") from None
    return adapted


def load_segmentation_model(path: str | Path, encoder: nn.Module | None = None) -> AdaptedModel:
    """Everything from an adapter folder: base encoder + head (from the sidecar) + adapter weights.

    ``encoder``: the base encoder with its pretrained weights; default ``ssl_em.load_encoder`` of
    the sidecar's ``base.name_or_path`` (tried as given, then relative to the adapter folder).
    The base hash is checked as in :func:`load_adapter`.
    """
    info, weights = read_adapter_sidecar(path)
    if encoder is None:
        name = info["base"]["name_or_path"]
        beside = weights.parent / name
        encoder = load_encoder(beside if not Path(name).exists() and beside.exists() else name)
    head = dict(info.get("head") or {})
    kind = head.pop("type", None)
    if kind is None:
        raise CheckpointError(f"{weights.parent / SIDECAR_NAME} does not record its head; use load_adapter")
    return load_adapter(build_segmentation_model(encoder, kind, **head), path)


# ---- fine-tuned model folders -------------------------------------------------------------------


def _base_encoder(module: FineTuning) -> nn.Module:
    """A fresh, un-injected encoder holding ``module``'s current base weights (adapters dropped)."""
    adapted = module.model
    # modules inside the encoder that train in full (train_decoder) stay: the encoder must be whole;
    # their trained values also live in the adapter file, which is loaded over them
    heads = [h for h in adapted.spec["modules_to_save"] if not h.startswith("encoder.")]
    state = base_state(adapted.base_model, heads, adapted.adapter_prefix)
    cfg = module.encoder_config
    encoder = create_encoder(cfg["architecture"], **dict(cfg.get("kwargs") or {}))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
    return encoder


def save_finetuned(module: FineTuning, out_dir: str | Path) -> Path:
    """Write ``module`` (a trained :class:`~ssl_em.adapters.finetune.FineTuning`) to ``out_dir``.

    Normalisation and voxel size come from ``module.data_description`` (the data module's
    ``describe()``, recorded at fit start). Returns ``out_dir``.
    """
    hp, data = module.hparams, dict(module.data_description or {})
    adapted = module.model
    metadata: dict[str, Any] = {
        # settings the task chose on the user's labels (Task.calibrate) travel with the model
        "task": hp.task, "task_kwargs": {**dict(hp.task_kwargs or {}), **module.task.calibrated}, "head": hp.head,
        "normalization": data.get("normalization"), "voxel_size": data.get("voxel_size"),
        "crop_shape": data.get("crop_shape", data.get("patch_shape")),  # the old name: earlier checkpoints
        "trained_method": adapted.method,
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
    """True for a folder (or its ``adapter.json``) written by :func:`save_finetuned` / ``save_adapter``."""
    p = Path(path)
    folder = p.parent if p.name in (SIDECAR_NAME, WEIGHTS_NAME) else p
    return (folder / SIDECAR_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


class FinetunedModel:
    """A loaded fine-tuned folder: ``model`` (eval mode, logits), ``task``, ``normalization`` (a
    fitted ``Normalization`` or None), ``voxel_size`` (z, y, x nm or None) and the sidecar ``info``."""

    def __init__(self, model: nn.Module, task: Task, info: dict[str, Any]) -> None:
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
    info, weights = read_adapter_sidecar(path)
    meta = info.get("metadata") or {}
    if "task" not in meta:
        raise CheckpointError(f"{weights.parent} records no task: it is an adapter, not a fine-tuned model folder")
    encoder = None
    if meta.get("base_in_folder"):
        encoder = load_encoder(weights.parent / ENCODER_FILE)
    adapted = load_segmentation_model(weights.parent, encoder)
    model: nn.Module = adapted
    if merge and adapted.method not in ("frozen", "full"):
        try:
            model = merge_adapter(adapted)
        except ConfigError:  # layers peft cannot merge: run the adapter unmerged
            model = adapted
    return FinetunedModel(model.eval(), get_task(meta["task"], **dict(meta.get("task_kwargs") or {})), info)

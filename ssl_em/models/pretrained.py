"""Encoders that ship with ssl-em: weights inside the package, loaded offline by name.

Each lives in ``ssl_em/weights/<architecture>.<tag>/`` as ``encoder.safetensors`` + ``encoder.json``
(the export format of :mod:`ssl_em.models.weights_io`), its model card ``README.md`` and loss curve
``loss.png``. Three ways in, all reading the same files, none touching the network::

    ssl_em.load_encoder("unet_small.spark_vnc_isbi")
    ssl_em.create_encoder("unet_small.spark_vnc_isbi", pretrained=True)
    timm.create_model("unet_small", pretrained=True)    # after ``import ssl_em``; the default tag

The folders are also timm pretrained configs (``timm.list_pretrained("unet*")`` lists them), so
timm resolves ``name.tag`` itself and hands the entrypoint the config, which loads here.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssl_em.errors import CheckpointError, ConfigError

__all__ = ["WEIGHTS_ROOT", "check_voxel_size", "list_pretrained", "model_card", "pretrained_dir",
           "timm_default_cfgs", "VoxelSizeWarning"]

WEIGHTS_ROOT = Path(__file__).resolve().parent.parent / "weights"


class VoxelSizeWarning(UserWarning):
    """The data's voxel size differs from the one an encoder was pretrained at."""


def list_pretrained(pattern: str = "*") -> list[str]:
    """Names (``architecture.tag``) of the shipped encoders matching a shell-style pattern."""
    if not WEIGHTS_ROOT.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_ROOT.glob(pattern) if (p / "encoder.json").is_file() and "." in p.name)


def pretrained_dir(name: str) -> Path | None:
    """The folder of shipped encoder ``name`` (``arch.tag``, or a bare architecture for its default
    tag, the first in sorted order), or None when ssl-em ships no such weights."""
    if name in list_pretrained():
        return WEIGHTS_ROOT / name
    tagged = list_pretrained(f"{name}.*") if "." not in name else []
    return WEIGHTS_ROOT / tagged[0] if tagged else None


def model_card(name: str) -> str:
    """The model card (Markdown) of a shipped encoder."""
    folder = pretrained_dir(name)
    if folder is None:
        shipped = ", ".join(list_pretrained()) or "none"
        raise CheckpointError(f"ssl-em ships no pretrained encoder {name!r}; shipped: {shipped}")
    card = folder / "README.md"
    if not card.is_file():
        raise CheckpointError(f"{folder} has no model card README.md (broken installation)")
    return card.read_text()


@functools.cache  # registry.py and unet3d.py both register from it: read the sidecars once
def timm_default_cfgs() -> dict[str, Any]:
    """timm ``default_cfgs`` for every shipped encoder; assign it to a module's ``default_cfgs``
    before its entrypoints are registered (timm's ``register_model`` looks its names up there)."""
    from timm.models import generate_default_cfgs

    cfgs: dict[str, dict[str, Any]] = {}
    for name in list_pretrained():
        record = json.loads((WEIGHTS_ROOT / name / "encoder.json").read_text())
        meta = record.get("metadata", {})
        cfgs[name] = dict(file=str(WEIGHTS_ROOT / name / record.get("weights", "encoder.safetensors")),
                          num_classes=0, license=meta.get("license"), input_size=(1, *meta.get("crop_size", ())))
    return generate_default_cfgs(cfgs) if cfgs else {}


def resolve_pretrained_name(architecture: str, pretrained_cfg: Any) -> str:
    """``arch.tag`` to load for ``timm.create_model(..., pretrained=True)``: the tag timm resolved
    (it passes the config to the entrypoint) or the architecture's default shipped weights."""
    tag = pretrained_cfg.get("tag") if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "tag", None)
    folder = pretrained_dir(f"{architecture}.{tag}" if tag else architecture)
    if folder is None:
        shipped = ", ".join(list_pretrained()) or "none"
        raise ConfigError(f"{architecture} has no shipped weights (shipped: {shipped}); load your own with "
                          "ssl_em.load_encoder(path)")
    return folder.name


def check_voxel_size(data_voxel: Sequence[float] | None, encoder_voxel: Sequence[float] | None, *,
                     what: str = "data", reference: str = "encoder's pretraining",
                     tolerance: float = 0.25) -> tuple[float, float, float] | None:
    """Warn (:class:`VoxelSizeWarning`) when ``data_voxel`` differs from ``encoder_voxel`` (z, y, x nm)
    by more than ``tolerance`` (relative) on any axis; return the per-axis zoom factor that would
    resample the data to the encoder's voxel size (``scipy.ndimage.zoom`` / ``ssl-em convert``),
    or None when they match or either is unknown. Features learnt at one scale transfer worst at
    another: membranes 2x thicker than in pretraining look like a different structure."""
    if not data_voxel or not encoder_voxel:
        return None
    data_v, enc_v = [float(v) for v in data_voxel], [float(v) for v in encoder_voxel]
    if len(data_v) != 3 or len(enc_v) != 3 or min(data_v + enc_v) <= 0 or not all(map(math.isfinite, data_v + enc_v)):
        return None
    zoom = tuple(d / e for d, e in zip(data_v, enc_v))
    if all(abs(math.log(z)) <= math.log1p(tolerance) for z in zoom):
        return None
    fmt = ", ".join(f"{v:g}" for v in data_v), ", ".join(f"{v:g}" for v in enc_v)
    warnings.warn(
        f"{what} voxel size ({fmt[0]}) nm differs from the {reference} voxel size ({fmt[1]}) nm; "
        f"resample the volume by zoom (z, y, x) = ({', '.join(f'{z:.3g}' for z in zoom)}) for features at the "
        "scale they were learnt", VoxelSizeWarning, stacklevel=2)
    return zoom  # type: ignore[return-value]

"""Encoder weights on disk: ``encoder.safetensors`` (weights) + ``encoder.json`` (everything needed to rebuild).

The sidecar names the registered architecture and its kwargs, so ``load_encoder`` (in
:mod:`ssl_em.models.registry`, which rebuilds by name) needs no code from the training run; it also
carries what a user must match at inference (voxel size, intensity normalisation) and how the weights
were made (method, steps, data). Every read is verified (format version, sha256, pickles refused);
training checkpoints go through ``ssl-em export-encoder`` (:mod:`ssl_em.pretrain.export_encoder`) first.
This module knows the file format only, not the registry, so the registry can import it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_em.errors import CheckpointError
from ssl_em.utils.io import sha256_file

__all__ = ["FORMAT_VERSION", "SIDECAR", "WEIGHTS", "check_state", "load_encoder_weights", "read_sidecar",
           "read_verified", "save_encoder"]

FORMAT_VERSION = 1
WEIGHTS, SIDECAR = "encoder.safetensors", "encoder.json"
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar"}
_EXPORT_HINT = "ssl-em loads only safetensors; run 'ssl-em export-encoder CKPT OUT_DIR' first"


def save_encoder(model: nn.Module, out_dir: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/encoder.safetensors`` and ``out_dir/encoder.json``; return ``out_dir``.

    ``model`` is any encoder built by a registered name (it has ``encoder_config``). ``metadata``
    (JSON values) goes into the sidecar, e.g. ``voxel_size`` (z, y, x) nm, ``normalization``,
    ``method``, ``steps``, ``data``. Each file is written to a temporary name and renamed, weights
    first, so a sidecar on disk always describes complete weights (checked by its sha256).
    """
    from safetensors.torch import save_file

    from ssl_em._version import __version__
    from ssl_em.utils.io import atomic_path, atomic_write_text

    config = getattr(model, "encoder_config", None) or {}
    arch = config.get("architecture")
    if not isinstance(arch, str) or not arch:  # set by build_encoder, i.e. by every registered name
        raise CheckpointError(
            f"cannot export a {type(model).__name__} without a registered architecture (encoder_config "
            f"architecture={arch!r}); build it with ssl_em.create_encoder(name)")
    record = {
        "format_version": FORMAT_VERSION,
        "library": "ssl-em",
        "library_version": __version__,
        "architecture": arch,
        "kwargs": config.get("kwargs", {}),
        "patch_size": list(getattr(model, "patch_size", ())),
        "embed_dim": getattr(model, "embed_dim", None),
        "num_params": sum(p.numel() for p in model.parameters()),
        "weights": WEIGHTS,
        "weights_sha256": None,
        "metadata": dict(metadata or {}),
    }
    try:
        json.dumps(record)
    except TypeError as err:
        msg = f"encoder config or metadata is not JSON-serialisable ({err}); pass plain values"
        raise CheckpointError(msg) from None
    # clone: safetensors refuses tensors that share storage; contiguous CPU copies are always safe
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": arch})
        record["weights_sha256"] = sha256_file(tmp)
    atomic_write_text(out / SIDECAR, json.dumps(record, indent=2) + "\n")
    return out


def _looks_pickled(path: Path) -> bool:
    """torch.save writes a zip (``PK\\x03\\x04``) or a raw pickle (``0x80``, protocol); safetensors has
    an 8-byte header length then ``{``, which rules out a false alarm on an unlucky length byte."""
    with open(path, "rb") as f:
        head = f.read(9)
    return head[8:9] != b"{" and (head[:4] == b"PK\x03\x04" or head[:1] == b"\x80")


def _resolve(path_or_name: str | os.PathLike) -> tuple[Path, Path]:
    """(sidecar, weights) for a folder, a ``.safetensors``, a ``.json`` or a named encoder folder."""
    p = Path(path_or_name).expanduser()
    if not p.exists() and isinstance(path_or_name, str) and os.sep not in path_or_name:
        from ssl_em.models.pretrained import WEIGHTS_ROOT, list_pretrained

        if path_or_name in list_pretrained():  # full "arch.tag" only: a bare architecture means random init
            p = WEIGHTS_ROOT / path_or_name
    if not p.exists() and isinstance(path_or_name, str) and os.sep not in path_or_name and not p.suffix:
        home = Path(os.environ.get("SSL_EM_ENCODERS", Path.home() / ".cache" / "ssl-em" / "encoders"))
        if not (home / path_or_name).is_dir():
            raise CheckpointError(
                f"no encoder folder {path_or_name!r} (looked in . and {home}); pass a folder written by "
                f"save_encoder, or use ssl_em.create_encoder({path_or_name!r}) for random weights")
        p = home / path_or_name
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.suffix.lower() in _PICKLE_SUFFIXES or (p.is_file() and p.suffix != ".json" and _looks_pickled(p)):
        raise CheckpointError(f"{p} is a pickle checkpoint; {_EXPORT_HINT}")
    if p.is_dir():
        sidecar = p / SIDECAR
    elif p.suffix == ".json":
        sidecar = p
    else:
        sidecar = p.with_suffix(".json")
    if not sidecar.is_file():
        raise CheckpointError(f"missing sidecar {sidecar}: an encoder needs its JSON next to the weights")
    try:
        record = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"sidecar {sidecar} is not valid JSON ({err})") from None
    weights = p if p.is_file() and p.suffix != ".json" else sidecar.parent / str(record.get("weights", WEIGHTS))
    if not weights.is_file():
        raise CheckpointError(f"missing weights {weights} named by {sidecar}")
    return sidecar, weights


def read_sidecar(path_or_name: str | os.PathLike) -> dict[str, Any]:
    """The sidecar dict of an exported encoder (no weights read)."""
    sidecar, _ = _resolve(path_or_name)
    return json.loads(sidecar.read_text())


def read_verified(path_or_name: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(sidecar record, tensors, weights path) of an exported encoder, after every integrity check."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sidecar, weights = _resolve(path_or_name)
    record = json.loads(sidecar.read_text())
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{sidecar} has format_version {version!r}; this ssl-em reads <= {FORMAT_VERSION}")
    if _looks_pickled(weights):
        raise CheckpointError(f"{weights} is a pickle checkpoint; {_EXPORT_HINT}")
    expected_sha = record.get("weights_sha256")
    if expected_sha and sha256_file(weights) != expected_sha:
        raise CheckpointError(f"{weights} does not match the sha256 in {sidecar} (mixed or corrupted export)")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err})") from None
    return record, tensors, weights


def load_encoder_weights(model: nn.Module, path_or_name: str | os.PathLike) -> nn.Module:
    """Load an exported encoder's weights into ``model`` (built by the same registered architecture,
    e.g. by ``timm.create_model(name, pretrained=True)``); shapes are checked first."""
    record, tensors, weights = read_verified(path_or_name)
    arch = (getattr(model, "encoder_config", None) or {}).get("architecture")
    if record["architecture"] != arch:
        raise CheckpointError(f"{weights} holds a {record['architecture']}, not a {arch}")
    check_state(model.state_dict(), tensors, str(weights), True)
    model.load_state_dict(tensors)
    model.pretrained_metadata = record
    return model


def check_state(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], where: str,
                 strict: bool) -> None:
    """One-line errors for the first shape mismatch, and (strict) for missing / unexpected tensors."""
    for name, tensor in expected.items():
        if name in found and tuple(found[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(found[name].shape)}, "
                                  f"the model expects {tuple(tensor.shape)}")
    if strict:
        missing = [k for k in expected if k not in found]
        unexpected = [k for k in found if k not in expected]
        if missing or unexpected:
            raise CheckpointError(f"{where}: missing tensors {missing[:3]}, unexpected {unexpected[:3]} "
                                  f"({len(missing)} / {len(unexpected)} in all); pass strict=False to ignore")

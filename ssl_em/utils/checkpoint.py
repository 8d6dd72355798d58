"""Training checkpoints as safetensors: tensors in the body, everything else as JSON in the header.

Lightning's default checkpoint is a pickle. Here a checkpoint is one safetensors file (safe to open
from anyone, no code execution) holding every tensor of the nested checkpoint dict (model, optimizer
state, ...) and, in the header's metadata, the JSON structure around them (loop state, epoch, step,
hyper-parameters). ``SafetensorsCheckpointIO`` plugs it into Lightning, so resume works unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ssl_em.errors import CheckpointError
from ssl_em.utils.io import atomic_path

FORMAT = "ssl_em.checkpoint/1"
_STRUCTURE_KEY = "ssl_em_structure"


def _encode(obj: Any, tensors: dict, path: str) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        # clone: safetensors refuses tensors that share storage (e.g. tied or viewed optimizer state)
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"$tensor": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # non-string keys (optimizer state is keyed by int parameter ids) keep their type
        return {"$items": [[_encode(k, tensors, path), _encode(v, tensors, f"{path}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _encode(torch.from_numpy(np.ascontiguousarray(obj)), tensors, path)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise CheckpointError(f"checkpoint entry {path} has type {type(obj).__name__}, which is not saved as data")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if "$tensor" in obj:
            return tensors[obj["$tensor"]]
        if "$tuple" in obj:
            return tuple(_decode(v, tensors) for v in obj["$tuple"])
        if "$items" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["$items"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` (nested dicts/lists/tuples of tensors and JSON values) atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    structure = _encode(checkpoint, tensors, "checkpoint")
    metadata = {"format": FORMAT, _STRUCTURE_KEY: json.dumps(structure)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def is_safetensors(path: str | os.PathLike) -> bool:
    """True when ``path`` starts like a safetensors file (8-byte header length, then a JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a pickle or corrupt file is refused."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"{path}: not an ssl-em safetensors checkpoint ({type(err).__name__}: {err}); "
            "pickled .ckpt/.pt files are not loaded"
        ) from None
    if metadata.get("format") != FORMAT or _STRUCTURE_KEY not in metadata:
        raise CheckpointError(f"{path}: safetensors file without ssl-em checkpoint metadata (format {FORMAT})")
    return _decode(json.loads(metadata[_STRUCTURE_KEY]), tensors)


def _checkpoint_io_base() -> type:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

    return CheckpointIO


class SafetensorsCheckpointIO(_checkpoint_io_base()):  # type: ignore[misc]
    """Lightning CheckpointIO writing :func:`save_checkpoint` files (``.ckpt`` name, safetensors inside)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("SafetensorsCheckpointIO takes no storage_options")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)

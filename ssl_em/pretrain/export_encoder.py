"""``ssl-em export-encoder``: the encoder of a pretraining checkpoint -> safetensors + JSON sidecar.

Checkpoints are read with ``weights_only=True`` (ssl-em's own are safetensors); the encoder's tensors
are found by its own key set, rebuilt by its registered name and written by
:func:`ssl_em.models.weights_io.save_encoder`, with the run's loss curve as ``loss.png``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_em.errors import ArgumentParser, CheckpointError, ConfigError
from ssl_em.models.registry import create_encoder
from ssl_em.models.weights_io import SIDECAR, WEIGHTS, check_state, save_encoder
from ssl_em.pretrain.panels import save_curve

__all__ = ["export_from_checkpoint", "main", "write_loss_curve"]

# Hyper-parameters copied from a training checkpoint into the sidecar's metadata.
_HPARAM_KEYS = ("voxel_size", "normalization", "method", "data", "crop_size", "mask_ratio", "target")


def _encoder_from_hparams(hparams: Mapping[str, Any], ckpt: Path) -> nn.Module:
    config = hparams.get("encoder_config")
    if not isinstance(config, Mapping) and isinstance(hparams.get("encoder"), str):
        config = {"architecture": hparams["encoder"], "kwargs": hparams.get("encoder_kwargs") or {}}
    if not isinstance(config, Mapping) or "architecture" not in config:
        raise CheckpointError(f"{ckpt} hyper_parameters hold no 'encoder_config' (or 'encoder' name); "
                              "cannot tell which encoder to rebuild")
    try:
        return create_encoder(config["architecture"], **dict(config.get("kwargs") or {}))
    except ConfigError as err:
        raise CheckpointError(f"{ckpt}: {err}") from None


def _find_prefix(state: Mapping[str, Any], expected: Sequence[str], ckpt: Path, prefix: str | None) -> str:
    """The key prefix under which *all* of the encoder's tensors sit (e.g. ``"model.encoder."``).

    Found from the encoder's own key set rather than guessed from names; several complete
    candidates (student/teacher) must be disambiguated with ``prefix``.
    """
    if prefix is not None:
        candidates = [prefix]
    else:
        first = expected[0]
        candidates = sorted({k[: len(k) - len(first)] for k in state if k.endswith(first)}, key=len)
    complete = [c for c in candidates if all(c + k in state for k in expected)]
    if not complete:
        raise CheckpointError(f"{ckpt}: no prefix {'%r ' % prefix if prefix else ''}holds all encoder tensors "
                              f"(first expected key {expected[0]!r})")
    preferred = [c for c in complete if c.endswith("encoder.")] if len(complete) > 1 else complete
    if len(preferred) != 1:
        raise CheckpointError(f"{ckpt}: encoder tensors found under several prefixes {complete}; "
                              "choose one with --prefix")
    return preferred[0]


def _read_checkpoint(ckpt: Path) -> Any:
    """ssl-em checkpoints are safetensors (``ssl_em.utils.checkpoint``); other Lightning checkpoints are
    read with ``torch.load(weights_only=True)``, which refuses code-carrying pickles."""
    from ssl_em.utils.checkpoint import is_safetensors, load_checkpoint

    if is_safetensors(ckpt):
        return load_checkpoint(ckpt)
    try:
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for custom objects, RuntimeError for a broken zip
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ckpt} cannot be read with weights_only=True (it must hold only tensors and plain "
                              f"hyper-parameters): {msg}") from None


def export_from_checkpoint(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *, prefix: str | None = None,
                           metadata: Mapping[str, Any] | None = None) -> Path:
    """Extract the encoder from a Lightning checkpoint and :func:`save_encoder` it to ``out_dir``.

    The checkpoint is read with ``weights_only=True``; its ``hyper_parameters`` must name the encoder
    (``encoder_config`` = ``{"architecture", "kwargs"}``, or ``encoder`` + ``encoder_kwargs``).
    ``voxel_size``, ``normalization``, ``method``, ... and ``global_step`` go into the metadata.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    data = _read_checkpoint(ckpt)
    if not isinstance(data, Mapping) or not isinstance(data.get("state_dict"), Mapping):
        raise CheckpointError(f"{ckpt} is not a Lightning checkpoint (no 'state_dict')")
    state, hparams = data["state_dict"], dict(data.get("hyper_parameters") or {})
    record = dict(data.get("ssl_em") or {})  # written by ssl-em's LightningModules: no guessing needed
    if "encoder_config" in record:
        hparams.setdefault("encoder_config", record["encoder_config"])
    model = _encoder_from_hparams(hparams, ckpt)
    expected = list(model.state_dict())
    pre = _find_prefix(state, expected, ckpt, prefix if prefix is not None else record.get("encoder_prefix"))
    tensors = {k: state[pre + k] for k in expected}
    check_state(model.state_dict(), tensors, str(ckpt), strict=True)
    model.load_state_dict(tensors)
    meta = {k: hparams[k] for k in _HPARAM_KEYS if k in hparams}
    description = dict(record.get("data") or {})
    meta.update({k: description[k] for k in ("voxel_size", "normalization") if k in description})
    meta.update({k: record[k] for k in ("method", "method_kwargs") if k in record})
    if description:
        meta["data"] = description
    meta.update(steps=data.get("global_step"), epoch=data.get("epoch"), source_checkpoint=ckpt.name)
    meta.update(metadata or {})
    return save_encoder(model, out_dir, meta)


def main(argv: Sequence[str] | None = None) -> int:
    """``ssl-em export-encoder CKPT OUT_DIR [--prefix P]``."""
    parser = ArgumentParser(prog="ssl-em export-encoder",
                                     description="Export the encoder of a training checkpoint to safetensors + JSON.")
    parser.add_argument("ckpt", help="Lightning checkpoint (.ckpt), read with weights_only=True")
    parser.add_argument("out_dir", help="folder for encoder.safetensors and encoder.json")
    parser.add_argument("--prefix", help="state-dict prefix of the encoder (default: found automatically)")
    args = parser.parse_args(list(argv or []))
    _check_export_folder(Path(args.out_dir))
    out = export_from_checkpoint(args.ckpt, args.out_dir, prefix=args.prefix)
    record = json.loads((out / SIDECAR).read_text())
    print(f"wrote {out / WEIGHTS} and {out / SIDECAR}: {record['architecture']}, "
          f"{record['num_params']:,} params, step {record['metadata'].get('steps')}")
    curve = write_loss_curve(Path(args.ckpt), out / "loss.png", max_step=record["metadata"].get("steps"),
                             title=f"{record['architecture']} {record['metadata'].get('method', '')} pretraining")
    if curve is not None:
        print(f"wrote {curve} from the run's metrics.csv")
    return 0


def _check_export_folder(out: Path) -> None:
    """An export goes to a new or empty folder, or replaces an earlier ssl-em export there; a folder
    holding anything else is the user's and is left alone."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        ours = json.loads((out / SIDECAR).read_text()).get("library") == "ssl-em"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(f"{out} already holds files and no earlier ssl-em export: choose a new or empty folder")


def write_loss_curve(ckpt: Path, out_png: Path, *, max_step: int | None = None, title: str = "") -> Path | None:
    """Plot the run's logged losses (Lightning's ``metrics.csv``, next to ``checkpoints/``) up to the
    checkpoint's step; None when the run left no such log (e.g. a logger other than CSV)."""
    import csv

    metrics = ckpt.resolve().parent.parent / "metrics.csv"
    if not metrics.is_file():
        return None
    series: dict[str, tuple[list[float], list[float]]] = {}
    with open(metrics, newline="") as f:
        for row in csv.DictReader(f):
            for key in ("train/loss", "val/loss", "train/loss_step", "val/loss_epoch"):
                value, step = row.get(key), row.get("step")
                if value and step and (max_step is None or int(step) <= max_step):
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(float(step))
                    ys.append(float(value))
    if not series:
        return None
    key = next(iter(series))
    xs, ys = series[key]
    import numpy as np

    if len(ys) >= 20:  # per-step losses of masked modelling are noisy: the trend is in a moving mean
        k = max(5, len(ys) // 20)
        mean = np.convolve(ys, np.ones(k) / k, mode="valid").tolist()
        series[f"{key}, moving mean ({k} logs)"] = (xs[k - 1:], mean)
    return save_curve(series, out_png, xlabel="step", ylabel="loss", title=title, logy=True)

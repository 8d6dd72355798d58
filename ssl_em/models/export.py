"""Encoders on disk: ``encoder.safetensors`` (weights) + ``encoder.json`` (everything needed to rebuild).

The sidecar names the registered architecture and its kwargs, so :func:`load_encoder` needs no code
from the training run; it also carries what a user must match at inference (voxel size, intensity
normalisation) and how the weights were made (method, steps, data). Pickles are never loaded:
training checkpoints go through :func:`export_from_checkpoint` (``weights_only=True``) first.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_em.errors import CheckpointError, ConfigError
from ssl_em.utils.io import sha256_file

__all__ = ["FORMAT_VERSION", "export_from_checkpoint", "load_encoder", "load_encoder_weights", "main", "save_encoder"]

FORMAT_VERSION = 1
WEIGHTS, SIDECAR = "encoder.safetensors", "encoder.json"
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar"}
_EXPORT_HINT = "ssl-em loads only safetensors; run 'ssl-em export-encoder CKPT OUT_DIR' first"
# Hyper-parameters copied from a training checkpoint into the sidecar's metadata.
_HPARAM_KEYS = ("voxel_size", "normalization", "method", "data", "crop_size", "mask_ratio", "target")


def save_encoder(model: nn.Module, out_dir: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/encoder.safetensors`` and ``out_dir/encoder.json``; return ``out_dir``.

    ``model`` is any encoder built by a registered name (it has ``encoder_config``). ``metadata``
    (JSON values) goes into the sidecar, e.g. ``voxel_size`` (z, y, x) nm, ``normalization``,
    ``method``, ``steps``, ``data``. Each file is written to a temporary name and renamed, weights
    first, so a sidecar on disk always describes complete weights (checked by its sha256).
    """
    from safetensors.torch import save_file

    from ssl_em._version import __version__
    from ssl_em.models.registry import list_encoders
    from ssl_em.utils.io import atomic_path, atomic_write_text

    config = getattr(model, "encoder_config", None) or {}
    arch = config.get("architecture")
    if arch not in list_encoders():
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


def _read_verified(path_or_name: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(sidecar record, tensors, weights path) of an exported encoder, after every integrity check."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ssl_em.models.registry import list_encoders

    sidecar, weights = _resolve(path_or_name)
    record = json.loads(sidecar.read_text())
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{sidecar} has format_version {version!r}; this ssl-em reads <= {FORMAT_VERSION}")
    arch = record.get("architecture")
    if arch not in list_encoders():
        raise CheckpointError(f"{sidecar} names unknown architecture {arch!r}; known: {', '.join(list_encoders())}")
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


def load_encoder(path_or_name: str | os.PathLike, *, strict: bool = True,
                 map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an encoder from ``encoder.json`` and load ``encoder.safetensors``; returned in eval mode.

    ``path_or_name``: the folder, either file, the name of an encoder shipped with ssl-em
    (``ssl-em models --pretrained``, e.g. ``"unet3d_tiny.spark_vnc"``), or a bare name looked up under
    ``$SSL_EM_ENCODERS`` (default ``~/.cache/ssl-em/encoders/NAME``). The sidecar dict is attached as
    ``model.pretrained_metadata`` (``["metadata"]["voxel_size"]`` etc.).
    """
    from ssl_em.models.registry import create_encoder

    record, tensors, weights = _read_verified(path_or_name)
    arch = record["architecture"]
    try:
        model = create_encoder(arch, **record.get("kwargs", {}))
    except ConfigError as err:
        raise CheckpointError(f"{weights.parent}: cannot rebuild {arch}: {err}") from None
    _check_state(model.state_dict(), tensors, str(weights), strict)
    model.load_state_dict(tensors, strict=strict)
    model.pretrained_metadata = record
    return model.to(map_location).eval()


def load_encoder_weights(model: nn.Module, path_or_name: str | os.PathLike) -> nn.Module:
    """Load an exported encoder's weights into ``model`` (built by the same registered architecture,
    e.g. by ``timm.create_model(name, pretrained=True)``); shapes are checked first."""
    record, tensors, weights = _read_verified(path_or_name)
    arch = (getattr(model, "encoder_config", None) or {}).get("architecture")
    if record["architecture"] != arch:
        raise CheckpointError(f"{weights} holds a {record['architecture']}, not a {arch}")
    _check_state(model.state_dict(), tensors, str(weights), True)
    model.load_state_dict(tensors)
    model.pretrained_metadata = record
    return model


def _check_state(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], where: str,
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


def _encoder_from_hparams(hparams: Mapping[str, Any], ckpt: Path) -> nn.Module:
    from ssl_em.models.registry import create_encoder

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
    _check_state(model.state_dict(), tensors, str(ckpt), strict=True)
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
    parser = argparse.ArgumentParser(prog="ssl-em export-encoder",
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
        from ssl_em.errors import ConfigError

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
    from ssl_em.pretrain.panels import save_curve

    return save_curve(series, out_png, xlabel="step", ylabel="loss", title=title, logy=True)

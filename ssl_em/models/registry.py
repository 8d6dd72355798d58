"""Encoders by name: registered in timm's registry and tracked as ssl-em encoders.

``create_encoder("vit3d_small_patch2x16") == timm.create_model("vit3d_small_patch2x16")`` once
:mod:`ssl_em.models` is imported. A variant is a few lines: defaults merged under the user's
keyword arguments; the merged dict is recorded as ``model.encoder_config`` so an exported encoder
can be rebuilt from its JSON sidecar alone. Names encode the patch (z x y x x voxels; one number =
isotropic). Each family registers its variants in its own module (``vit3d.py``, ``unet3d.py``).
"""

from __future__ import annotations

import difflib
import os
import fnmatch
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ssl_em.errors import ArgumentParser, CheckpointError, ConfigError
from ssl_em.models.weights_io import SIDECAR, check_state, load_encoder_weights, read_verified

__all__ = ["build_encoder", "create_encoder", "list_encoders", "load_encoder", "main", "register_encoder"]

_ENCODERS: list[str] = []  # names registered through register_encoder, in registration order
# Arguments timm.create_model passes to every entrypoint (the config names the shipped weights' tag).
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_encoder(fn: F) -> F:
    """Decorator: register ``fn`` in timm's registry under ``fn.__name__`` and list it as an ssl-em encoder."""
    from timm.models import register_model

    register_model(fn)
    if fn.__name__ not in _ENCODERS:
        _ENCODERS.append(fn.__name__)
    return fn


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def build_encoder(cls: Callable[..., nn.Module], name: str, defaults: dict[str, Any], pretrained: bool = False,
                  **kwargs: Any) -> nn.Module:
    """Build ``cls(**{**defaults, **kwargs})`` and record ``encoder_config`` for export.

    Unknown arguments are a ConfigError naming them, not a TypeError from deep inside.
    """
    pretrained_cfg = kwargs.get("pretrained_cfg")
    for key in _TIMM_ARGS:
        kwargs.pop(key, None)
    shipped = None
    if pretrained:  # resolved before building, so a missing tag fails fast
        from ssl_em.models.pretrained import resolve_pretrained_name

        shipped = resolve_pretrained_name(name, pretrained_cfg)
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(f"{name} does not take argument(s) {', '.join(unknown)}; it takes {', '.join(params)}")
    merged = {**defaults, **kwargs}
    model = cls(**merged)
    model.encoder_config = {"architecture": name, "kwargs": {k: _to_json(v) for k, v in merged.items()}}
    if shipped is not None:
        load_encoder_weights(model, shipped)
    return model


def list_encoders(pattern: str = "*") -> list[str]:
    """Sorted names of ssl-em encoders (not all of timm's models) matching a shell-style pattern."""
    return sorted(n for n in _ENCODERS if fnmatch.fnmatchcase(n, pattern))


def create_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build a registered encoder; ``overrides`` replace its defaults (e.g. ``patch_size=(2, 8, 8)``).

    ``pretrained=True`` loads shipped weights: ``name`` may carry their tag (``"unet_small.spark_vnc_isbi"``).
    """
    if name.split(".", 1)[0] not in _ENCODERS:
        close = difflib.get_close_matches(name, _ENCODERS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see 'ssl-em models'"
        raise ConfigError(f"unknown encoder {name!r}{hint}")
    import timm

    return timm.create_model(name, **overrides)


def load_encoder(path_or_name: str | os.PathLike, *, strict: bool = True,
                 map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an encoder from ``encoder.json`` and load ``encoder.safetensors``; returned in eval mode.

    ``path_or_name``: the folder, either file, the name of an encoder shipped with ssl-em
    (``ssl-em models --pretrained``, e.g. ``"unet_small.spark_vnc_isbi"``), or a bare name looked up under
    ``$SSL_EM_ENCODERS`` (default ``~/.cache/ssl-em/encoders/NAME``). The sidecar dict is attached as
    ``model.pretrained_metadata`` (``["metadata"]["voxel_size"]`` etc.).
    """
    record, tensors, weights = read_verified(path_or_name)
    arch = record.get("architecture")
    if arch not in _ENCODERS:
        raise CheckpointError(f"{weights.parent / SIDECAR} names unknown architecture {arch!r}; "
                              f"known: {', '.join(list_encoders())}")
    try:
        model = create_encoder(arch, **record.get("kwargs", {}))
    except ConfigError as err:
        raise CheckpointError(f"{weights.parent}: cannot rebuild {arch}: {err}") from None
    check_state(model.state_dict(), tensors, str(weights), strict)
    model.load_state_dict(tensors, strict=strict)
    model.pretrained_metadata = record
    return model.to(map_location).eval()


def _summary(name: str) -> dict[str, Any]:
    from timm.models import model_entrypoint

    with torch.device("meta"):  # shapes only: no memory, no init cost even for ViT-B
        model = create_encoder(name)
    kw = model.encoder_config["kwargs"]
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "patch": "x".join(map(str, model.patch_size)),
        "embed_dim": model.embed_dim,
        "depth": kw.get("depth", "-"),
        "kwargs": kw,
        "doc": (inspect.getdoc(model_entrypoint(name)) or "").splitlines()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``ssl-em models [PATTERN] [--info NAME]``: registered encoders and their shipped weights, or
    one encoder's configuration (and model card, for shipped weights ``arch.tag``)."""
    from ssl_em.models.pretrained import list_pretrained, model_card, pretrained_dir

    parser = ArgumentParser(prog="ssl-em models", description="List registered encoders and shipped weights.")
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style name filter, e.g. 'vit3d_small*'")
    parser.add_argument("--info", metavar="NAME", help="one encoder's configuration; for shipped weights "
                        "(e.g. unet_small.spark_vnc_isbi) also its model card")
    parser.add_argument("--pretrained", action="store_true", help="list only encoders shipped with weights")
    args = parser.parse_args(list(argv or []))
    import json

    if args.info:
        if "." in args.info:  # shipped weights are "arch.tag"
            print(model_card(args.info).rstrip())
            print(f"\nfiles: {pretrained_dir(args.info)}")
            return 0
        if args.info not in _ENCODERS:
            create_encoder(args.info)  # raises the ConfigError with suggestions
        s = _summary(args.info)
        print(f"{s['name']}: {s['doc']}\nparams: {s['params']:,}\npatch (z, y, x): {s['patch']}")
        print("kwargs:", json.dumps(s["kwargs"]))
        shipped = list_pretrained(f"{args.info}.*")
        print("shipped weights:", ", ".join(shipped) if shipped else "none (random init)")
        return 0
    shipped = list_pretrained()
    names = list_encoders(args.pattern)
    if args.pretrained:
        names = [n for n in names if any(p.startswith(n + ".") for p in shipped)]
    rows = [_summary(n) for n in names]
    if not rows:
        print(f"no encoder matches {args.pattern!r}")
        return 1
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'params':>8}  {'patch':>8}  {'embed':>5}  {'depth':>5}  shipped weights")
    for r in rows:
        tags = ", ".join(p for p in shipped if p.startswith(r["name"] + ".")) or "-"
        print(f"{r['name']:<{width}}  {r['params'] / 1e6:>7.2f}M  {r['patch']:>8}  {r['embed_dim']:>5}  "
              f"{r['depth']:>5}  {tags}")
    return 0

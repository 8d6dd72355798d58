"""Parameter-efficient fine-tuning through peft: LoRA, DoRA, LoHa, LoKr, IA3, plus frozen/full baselines.

Order matters: build the model, load the pretrained base weights, THEN ``add_adapter``. Injection
renames the targeted layers' weights (``qkv.weight`` -> ``qkv.base_layer.weight``), so a
``load_state_dict`` afterwards silently misses them (non-strict) or fails (strict). ``add_adapter``
records a sha256 of the base weights; ``save_adapter`` refuses to save when they changed since
(except ``method="full"``), and ``load_adapter`` refuses a base whose hash differs from the one
the adapter was trained on.

Targets are chosen by module name, never ``"all-linear"`` (that would wrap the new head too).
A plain dotted name matches a module whose name equals it or ends with ``"." + name``
(``"attn.qkv"``); any other string is a regular expression matched against the full name.
``targets=None`` picks the ViT block layers (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``;
``"proj"`` alone would also catch ``patch_embed.proj``) or, for conv encoders (U-Net), every
``Conv3d`` inside ``model.encoder``.

``modules_to_save`` (the new head) are handled here rather than by peft's ``ModulesToSaveWrapper``:
peft matches those names by suffix (``"head"`` would also catch a ViT's own ``encoder.head``) and
keeps a frozen copy of each. Here they are exact module names, trained in place and saved whole.

Every method returns an :class:`AdaptedModel` so training code is uniform: ``model(x)``,
``count_trainable(model)``, ``merge_adapter``; saving and loading are in :mod:`ssl_em.adapters.io`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ssl_em.errors import ConfigError

__all__ = [
    "AdaptedModel", "ADAPTER_METHODS", "adapter_state", "add_adapter", "base_state", "base_weights_sha256", "count_trainable",
    "merge_adapter", "resolve_targets",
]

VIT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# layer types each peft method can wrap (peft 0.21: LoHa/LoKr have no Conv3d layer)
_SUPPORTED: dict[str, tuple[type[nn.Module], ...]] = {
    "lora": (nn.Linear, nn.Conv3d),
    "dora": (nn.Linear, nn.Conv3d),
    "loha": (nn.Linear,),
    "lokr": (nn.Linear,),
    "ia3": (nn.Linear, nn.Conv3d),
}
ADAPTER_METHODS = (*_SUPPORTED, "frozen", "full")


class AdaptedModel(nn.Module):
    """The model after :func:`add_adapter`: ``forward`` is the wrapped model's.

    Attributes:
        model: a ``peft.PeftModel`` (peft methods) or the original module (``frozen`` / ``full``).
        method: one of :data:`ADAPTER_METHODS`.
        spec: the ``add_adapter`` arguments (targets resolved to full names), JSON-serialisable,
            enough to rebuild the same adapter on the same base.
        base_sha256: hash of the base weights at injection (heads excluded).
    """

    def __init__(self, model: nn.Module, method: str, spec: dict[str, Any], base_sha256: str) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.spec = spec
        self.base_sha256 = base_sha256

    @property
    def base_model(self) -> nn.Module:
        """The user's module (with adapter layers injected in place for peft methods)."""
        get = getattr(self.model, "get_base_model", None)
        return get() if get is not None else self.model

    @property
    def adapter_prefix(self) -> str | None:
        """Name prefix of the peft adapter parameters (``"lora_"``, ``"hada_"``, ...), None otherwise."""
        tuner = getattr(self.model, "base_model", None)
        return getattr(tuner, "prefix", None) if self.method in _SUPPORTED else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


# ---- names ------------------------------------------------------------------------------------
def _matches(pattern: str, name: str) -> bool:
    if re.fullmatch(r"[\w.]+", pattern):
        return name == pattern or name.endswith("." + pattern)
    return re.fullmatch(pattern, name) is not None


def _peft_cannot_merge(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv3d) and tuple(m.kernel_size[:2]) == (1, 1)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _resolve_modules_to_save(model: nn.Module, names: Sequence[str]) -> list[str]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"modules_to_save {missing} not found in {type(model).__name__} (its children: {top})")
    return list(names)


def resolve_targets(
    model: nn.Module, targets: Sequence[str] | str | None, method: str = "lora", exclude: Sequence[str] = ()
) -> list[str]:
    """Full names of the modules ``targets`` selects (outside ``exclude``), checked against ``method``.

    Raises ConfigError when nothing matches or a match is a layer type the method cannot wrap.
    """
    if isinstance(targets, str):
        targets = (targets,)
    named = [(n, m) for n, m in model.named_modules() if n and not _under(n, exclude)]
    if targets is None:
        if any(n.endswith(".attn.qkv") for n, _ in named):
            targets = VIT_TARGETS
        else:  # conv encoders: every Conv3d of the encoder (the head is excluded above) but 1x1x1
            # shortcuts, which peft 0.21 cannot merge (its 1x1 fast path squeezes only 2-D kernels)
            scope = "encoder." if hasattr(model, "encoder") else ""
            found = [n for n, m in named if n.startswith(scope) and isinstance(m, nn.Conv3d)
                     and not _peft_cannot_merge(m)]
            if not found:
                raise ConfigError(f"no default targets in {type(model).__name__}: pass targets=[module names]")
            targets = found
    # parameterless matches (an Identity "shortcut", Dropout) have nothing to adapt: skipped
    chosen = [(n, m) for n, m in named if any(_matches(t, n) for t in targets) and any(True for _ in m.parameters())]
    if not chosen:
        example = ", ".join(n for n, m in named if isinstance(m, (nn.Linear, nn.Conv3d)))[:300]
        raise ConfigError(f"targets {list(targets)} match no module of {type(model).__name__}; layers: {example}")
    supported = _SUPPORTED.get(method, (nn.Linear, nn.Conv3d))
    bad = [f"{n} ({type(m).__name__})" for n, m in chosen if not isinstance(m, supported)]
    if bad:
        kinds = "/".join(t.__name__ for t in supported)
        raise ConfigError(f"method {method!r} wraps only {kinds}; targets also match {', '.join(bad[:5])}")
    return [n for n, _ in chosen]


# ---- base weights -----------------------------------------------------------------------------
def base_state(model: nn.Module, exclude: Sequence[str], adapter_prefix: str | None) -> dict[str, torch.Tensor]:
    """Base weights under their pre-injection names: adapter tensors and ``exclude`` (heads) dropped."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if adapter_prefix and any(p.startswith(adapter_prefix) for p in parts):
            continue
        name = ".".join(p for p in parts if p != "base_layer")
        if not _under(name, exclude):
            out[name] = value
    return out


def _sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_weights_sha256(model: nn.Module, exclude: Sequence[str] = ("head",)) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``model``'s weights outside ``exclude``.

    For an :class:`AdaptedModel` the base is read back from the injected layers under the original
    names, so the value equals the hash taken before injection while the base is untouched.
    """
    if isinstance(model, AdaptedModel):
        return _sha256(base_state(model.base_model, model.spec["modules_to_save"], model.adapter_prefix))
    return _sha256(base_state(model, [n for n in exclude if n in dict(model.named_modules())], None))


# ---- inject -----------------------------------------------------------------------------------
def _peft_config(method: str, targets: list[str], r: int, alpha: float, dropout: float, kw: dict[str, Any]):
    import peft

    if method in ("lora", "dora"):
        kw = {"use_dora": method == "dora", **kw}
        return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, **kw)
    if method == "loha":
        return peft.LoHaConfig(r=r, alpha=alpha, rank_dropout=dropout, target_modules=targets, **kw)
    if method == "lokr":
        return peft.LoKrConfig(r=r, alpha=alpha, rank_dropout=dropout, target_modules=targets, **kw)
    # IA3 scales the *input* of feed-forward layers (the paper's l_ff on the MLP's second layer)
    ff = kw.pop("feedforward_modules", None)
    if ff is None:
        ff = [t for t in targets if t.endswith("fc2")]
    return peft.IA3Config(target_modules=targets, feedforward_modules=list(ff), **kw)


def add_adapter(
    model: nn.Module,
    method: str = "lora",
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    targets: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] = ("head",),
    train_decoder: bool = False,
    **method_kwargs: Any,
) -> AdaptedModel:
    """Wrap ``model`` for fine-tuning; load its base weights first (see the module docstring).

    Args:
        method: ``lora``, ``dora`` (LoRA with ``use_dora``), ``loha``, ``lokr``, ``ia3``; or the baselines
            ``frozen`` (only ``modules_to_save`` train) and ``full`` (everything trains).
        r / alpha / dropout: rank, scaling and dropout (LoHa/LoKr: rank dropout; ignored by IA3).
        targets: module names / regexes to adapt; None = the encoder's default (module docstring).
        modules_to_save: exact module names trained in full and saved with the adapter (new heads).
        train_decoder: U-Nets: adapters on the encoder path only, while the decoder path (the
            encoder's ``decoder_modules``) and the encoder path's normalisation layers train in full
            and are saved with the adapter, as a ViT's UNETR decoder is: a few labels cannot retrain a
            frozen decoder's view of the task through low-rank updates alone. The study's and the
            recipes' U-Net setting (measured against LoRA everywhere with ``benchmarks/label_efficiency.py
            --adapter-kwargs``; figures in README).
        method_kwargs: passed to the peft config (e.g. ``use_rslora=True``, ``feedforward_modules``).

    The model is modified in place (peft injects layers); use the returned wrapper from then on.
    """
    if isinstance(model, AdaptedModel):
        raise ConfigError("model already has an adapter; call merge_adapter first or start from the base model")
    if method not in ADAPTER_METHODS:
        raise ConfigError(f"unknown adapter method {method!r}; choose one of {', '.join(ADAPTER_METHODS)}")
    if train_decoder:
        modules_to_save = (*modules_to_save, *_decoder_path(model))
    heads = _resolve_modules_to_save(model, modules_to_save)
    base_sha = _sha256(base_state(model, heads, None))
    resolved = resolve_targets(model, targets, method, exclude=heads) if method in _SUPPORTED else []
    spec = dict(method=method, r=r, alpha=alpha, dropout=dropout, targets=resolved, modules_to_save=heads,
                **method_kwargs)
    if method in _SUPPORTED:
        import peft

        wrapped: nn.Module = peft.get_peft_model(model, _peft_config(method, resolved, r, alpha, dropout,
                                                                     dict(method_kwargs)))
    else:
        wrapped = model
        for p in model.parameters():
            p.requires_grad_(method == "full")
    for name in heads:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return AdaptedModel(wrapped, method, spec, base_sha)


def _decoder_path(model: nn.Module) -> list[str]:
    """Module names (in ``model``) of the encoder's decoder path and of the encoder path's norms."""
    encoder = getattr(model, "encoder", None)
    decoder = getattr(encoder, "decoder_modules", None)
    if not decoder:
        raise ConfigError(f"train_decoder needs an encoder with a decoder path (a U-Net); "
                          f"{type(encoder).__name__} has none")
    norms = [n for n, m in encoder.named_modules()
             if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm3d, nn.modules.batchnorm._BatchNorm))
             and not _under(n, decoder)]
    return [f"encoder.{n}" for n in (*decoder, *norms)]


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- adapter tensors and merge (files: ssl_em.adapters.io) ----------------------------------------------------------------------
def adapter_state(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: adapter tensors + whole ``modules_to_save`` (all tensors for ``full``)."""
    prefix, heads = model.adapter_prefix, model.spec["modules_to_save"]
    out = {}
    for key, value in model.base_model.state_dict().items():
        keep = (model.method == "full" or _under(key, heads)
                or (prefix is not None and any(p.startswith(prefix) for p in key.split("."))))
        if keep:
            out[key] = value
    return out


def merge_adapter(model: AdaptedModel) -> nn.Module:
    """Fold the adapter into the base weights (peft ``merge_and_unload``): a plain module, same outputs."""
    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"merge_adapter needs the model returned by add_adapter, got {type(model).__name__}")
    if model.method in _SUPPORTED:
        if model.method in ("lora", "dora"):
            bad = [n for n, m in model.base_model.named_modules()
                   if hasattr(m, "base_layer") and _peft_cannot_merge(m.get_base_layer())]
            if bad:
                raise ConfigError(
                    f"peft cannot merge LoRA on (1, 1, k) Conv3d layers {bad[:3]}; keep the adapter unmerged"
                )
        return model.model.merge_and_unload()
    return model.model

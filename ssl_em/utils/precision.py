"""Pick the device, and the training/inference precision by measurement, never by CPU flags.

bf16 autocast on a CPU without native bf16 was measured 21x slower than fp32 per MAE step, and on a
CPU with native bf16 (AVX512-BF16) a fine-tuning step ran slower in bf16 than in fp32 and two runs
diverged. So ``"auto"`` on a CPU is fp32 unless :func:`measure_precision` timed this model's step
faster in bf16 (and finite); on a GPU with bf16 support it is bf16.
"""

from __future__ import annotations

import functools
from typing import Literal

Precision = Literal["auto", "32", "bf16"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: be conservative
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; ``"cpu"``, ``"cuda"``, ``"cuda:N"``
    (and ``"mps"`` on Apple silicon) as given, after checking that such a GPU exists (a one-line ConfigError otherwise)."""
    import torch

    from ssl_em.errors import ConfigError

    name = str(device).lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu" or (name == "mps" and torch.backends.mps.is_available()):
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible (use --device cpu or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return name


def native_bf16(device_type: str) -> bool:
    """bf16 that ``"auto"`` takes without a measurement: a CUDA GPU that supports it (never a CPU)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def resolve_precision(precision: str, device_type: str) -> str:
    """Return ``"32"`` or ``"bf16"`` for ``precision`` in {"auto", "32", "bf16", "bf16-mixed", ...};
    ``"auto"`` here is the unmeasured choice (:func:`native_bf16`); training measures instead."""
    p = str(precision).lower()
    if p == "auto":
        return "bf16" if native_bf16(device_type) else "32"
    if p.startswith("bf16"):
        return "bf16"
    if p in {"32", "32-true", "fp32", "float32"}:
        return "32"
    from ssl_em.errors import ConfigError

    raise ConfigError(f"precision {precision!r} is not one of auto, 32, bf16")


def lightning_precision(precision: str, device_type: str) -> str:
    """Lightning's precision string for ``precision`` (``"bf16-mixed"`` or ``"32-true"``)."""
    return "bf16-mixed" if resolve_precision(precision, device_type) == "bf16" else "32-true"


def autocast(precision: str, device_type: str):
    """A context manager: bf16 autocast when ``precision`` resolves to bf16, else a no-op."""
    import contextlib

    import torch

    if resolve_precision(precision, device_type) == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- precision by measurement ----------------------------------------------------------------------
def _machine(device_type: str) -> str:
    import platform

    import torch

    if device_type == "cuda":
        return f"cuda:{torch.cuda.get_device_name()}"
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu:{model}:{torch.get_num_threads()} threads"


def _cache_path():
    import os
    from pathlib import Path

    root = os.environ.get("SSL_EM_CACHE") or Path.home() / ".cache" / "ssl_em"
    return Path(root) / "precision.json"


def measure_datamodule_precision(module, datamodule, device_type: str) -> dict:
    """:func:`measure_module_precision` on the first training batch of ``datamodule``, drawn inside
    ``fork_rng`` (a DataLoader takes its base seed from the global RNG, which training must not see moved)."""
    import torch

    with torch.random.fork_rng():
        batch = next(iter(datamodule.train_dataloader()))
    return measure_module_precision(module, batch, device_type)


def measure_module_precision(module, batch: dict, device_type: str, use_cache: bool = True) -> dict:
    """:func:`measure_precision` of a LightningModule with ``probe_loss(batch)`` (forward, loss and
    backward on ``batch``); the module's weights, buffers and the global RNG are left as they were,
    so a measured run trains exactly like an unmeasured one."""
    import copy

    import torch

    state = copy.deepcopy(module.state_dict())
    batch = {k: v.to(device_type) if hasattr(v, "to") else v for k, v in batch.items()}
    module.to(device_type).train()

    def step(precision: str) -> float:
        module.zero_grad(set_to_none=True)
        with autocast(precision, device_type):
            loss = module.probe_loss(batch)
        loss.backward()
        return float(loss.detach())

    n = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    key = f"{type(module).__name__} {n} params ({trainable} trainable), input {tuple(batch[next(iter(batch))].shape)}"
    devices = [torch.cuda.current_device()] if device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            record = measure_precision(step, key, device_type, use_cache=use_cache)
        finally:
            module.zero_grad(set_to_none=True)
            module.load_state_dict(state)
    return record


def measure_precision(step, key: str, device_type: str, repeats: int = 3, margin: float = 0.9,
                      use_cache: bool = True) -> dict:
    """Time ``step(precision)`` (one training step of this model on this device; returns the loss)
    in ``"32"`` and ``"bf16"`` and choose bf16 only when it is finite and at least ``1 / margin``
    times faster. ``key`` names the model and crop; choices are cached per machine, torch version and
    key in ``$SSL_EM_CACHE/precision.json`` (default ``~/.cache/ssl_em``). Returns a record:
    ``{"precision", "ms_per_step": {...}, "finite": {...}, "machine", "cached"}``."""
    import json
    import math
    import time

    import torch

    from ssl_em.utils.io import atomic_write_text

    machine = _machine(device_type)
    cache_key = f"{machine}|torch {torch.__version__}|{key}"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text()) if use_cache and path.exists() else {}
    except (OSError, ValueError):
        cache = {}
    if cache_key in cache:
        return {**cache[cache_key], "cached": True}
    ms, finite = {}, {}
    for precision in ("32", "bf16"):
        try:
            t = time.perf_counter()
            loss = step(precision)  # warm-up: allocations, kernel selection
            warm_up = time.perf_counter() - t
            if precision == "bf16" and ms.get("32") and warm_up > 5 * ms["32"] / 1000:
                # far slower even allowing for the warm-up (bf16 emulated on this CPU): no need to time it
                finite[precision], ms[precision] = math.isfinite(float(loss)), round(1000 * warm_up, 2)
                continue
            timings = []
            for _ in range(repeats):
                if device_type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss = step(precision)
                if device_type == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - t)
            finite[precision] = math.isfinite(float(loss))
            ms[precision] = round(1000 * min(timings), 2)
        except RuntimeError:  # e.g. an op without a bf16 kernel on this device
            finite[precision], ms[precision] = False, None
    bf16_wins = finite.get("bf16") and ms.get("bf16") is not None and ms["bf16"] < margin * (ms["32"] or math.inf)
    record = {"precision": "bf16" if bf16_wins else "32", "ms_per_step": ms, "finite": finite, "machine": machine,
              "key": key}
    if use_cache:
        cache[cache_key] = record
        try:
            atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
        except OSError:  # a read-only home: measure again next time
            pass
    return {**record, "cached": False}

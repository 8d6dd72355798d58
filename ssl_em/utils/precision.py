"""Pick the device, and the training/inference precision by measurement, never by CPU flags.

bf16 autocast on a CPU without native bf16 was measured 21x slower than fp32 per MAE step, and on a
CPU with native bf16 (AVX512-BF16) a fine-tuning step ran slower in bf16 than in fp32 and two runs
diverged. So ``"auto"`` on a CPU is fp32 unless :func:`measure_module_precision` timed this model's
step faster in bf16 (and finite); on a GPU with bf16 support it is bf16.

The bf16 step is only ever tried in a child process: on Intel CPUs with AMX (Sapphire Rapids and
later) oneDNN's bf16 backward of some Conv3d shapes crashes the process (SIGSEGV) or never returns
(torch 2.14.1), so trying it where training runs would kill the run it is meant to speed up.
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
PROBE_TAG = "ssl-em-precision-probe:"  # prefixes the child's protocol lines on stdout
KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA")  # they change which kernels run


def _machine(device_type: str) -> str:
    import os
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
    kernels = "".join(f":{k}={os.environ[k]}" for k in KERNEL_ENV if os.environ.get(k))
    return f"cpu:{model}:{torch.get_num_threads()} threads{kernels}"


def _cache_path():
    import os
    from pathlib import Path

    root = os.environ.get("SSL_EM_CACHE") or Path.home() / ".cache" / "ssl_em"
    return Path(root) / "precision.json"


def _read_cache() -> dict:
    import json

    path = _cache_path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def _remember(cache_key: str, record: dict) -> None:
    import json

    from ssl_em.utils.io import atomic_write_text

    cache = _read_cache()
    cache[cache_key] = record
    try:
        atomic_write_text(_cache_path(), json.dumps(cache, indent=1) + "\n")
    except OSError:  # a read-only home: measure again next time
        pass


def measure_datamodule_precision(module, datamodule, device_type: str, **kwargs) -> dict:
    """:func:`measure_module_precision` on the first training batch of ``datamodule``, drawn inside
    ``fork_rng`` (a DataLoader takes its base seed from the global RNG, which training must not see moved)."""
    import torch

    with torch.random.fork_rng():
        batch = next(iter(datamodule.train_dataloader()))
    return measure_module_precision(module, batch, device_type, **kwargs)


def measure_module_precision(module, batch: dict, device_type: str, use_cache: bool = True,
                             timeout_s: float | None = None, margin: float = 0.9, repeats: int = 3) -> dict:
    """Choose ``"32"`` or ``"bf16"`` for training a LightningModule with ``training_loss(batch)`` (forward,
    loss and backward on ``batch``) on ``device_type``: fp32 is timed here, bf16 in a child process
    (:func:`probe_in_child`, so a crash or a hang of a bf16 kernel costs nothing), and bf16 is chosen only
    when it is finite and at least ``1 / margin`` times faster. The module's weights, buffers and the
    global RNG are left as they were, so a measured run trains exactly like an unmeasured one.

    Choices are cached per machine (CPU model, threads, kernel-selecting environment), torch version,
    model and crop in ``$SSL_EM_CACHE/precision.json`` (default ``~/.cache/ssl_em``), crashes included,
    so a crashing kernel is tried once per machine. Returns ``{"precision", "reason", "ms_per_step",
    "finite", "machine", "key", "cached"}``."""
    import copy
    import math
    import pickle

    import torch

    n = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    key = f"{type(module).__name__} {n} params ({trainable} trainable), input {tuple(batch[next(iter(batch))].shape)}"
    machine = _machine(device_type)
    cache_key = f"{machine}|torch {torch.__version__}|{key}"
    if use_cache and cache_key in (cache := _read_cache()):
        return {**cache[cache_key], "cached": True}

    state = copy.deepcopy(module.state_dict())
    try:  # before any step here: the child starts from the same weights
        probe, unpicklable = pickle_probe(module, batch), None
    except (RuntimeError, TypeError, AttributeError, pickle.PicklingError) as err:  # e.g. weight-norm parametrizations
        probe, unpicklable = None, str(err).splitlines()[0][:120]
    device_batch = {k: v.to(device_type) if hasattr(v, "to") else v for k, v in batch.items()}
    module.to(device_type).train()
    devices = [torch.cuda.current_device()] if device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            fp32_ms, fp32_finite = time_step(_module_step(module, device_batch, device_type), "32", device_type,
                                             repeats)
        finally:
            module.zero_grad(set_to_none=True)
            module.load_state_dict(state)
    give_up_ms = 5 * fp32_ms  # bf16 slower than this in its warm-up is emulated: not timed further
    if probe is None:  # never tried where training runs: fp32
        bf16 = {"failure": f"not tried: the model cannot be sent to a probe process ({unpicklable})"}
    else:
        bf16 = probe_in_child(probe, device_type, repeats, give_up_ms, timeout_s)
    ms = {"32": fp32_ms, "bf16": bf16.get("ms")}
    finite = {"32": fp32_finite, "bf16": bool(bf16.get("finite"))}
    if bf16.get("failure"):
        precision, reason = "32", f"bf16 {bf16['failure']}"
    elif not finite["bf16"]:
        precision, reason = "32", "bf16 loss not finite"
    elif ms["bf16"] is not None and ms["bf16"] < margin * (fp32_ms if fp32_finite else math.inf):
        precision, reason = "bf16", f"bf16 {fp32_ms / ms['bf16']:.2f}x faster"
    else:
        precision, reason = "32", f"bf16 not faster ({ms['bf16']} vs {fp32_ms} ms per step)"
    record = {"precision": precision, "reason": reason, "ms_per_step": ms, "finite": finite, "machine": machine,
              "key": key}
    if use_cache:
        _remember(cache_key, record)
    return {**record, "cached": False}


def describe_record(record: dict) -> str:
    """One line for the log: ``precision auto -> 32 (fp32 41.2 ms, bf16 hung ...; cached)``."""
    ms = record["ms_per_step"]
    return (f"precision auto -> {record['precision']} (fp32 {ms.get('32')} ms, bf16 {ms.get('bf16')} ms per step: "
            f"{record.get('reason', 'measured')}{'; cached' if record.get('cached') else ''})")


def _module_step(module, batch: dict, device_type: str):
    """One training step of ``module`` on ``batch`` at a given precision; returns the loss."""

    def step(precision: str) -> float:
        module.zero_grad(set_to_none=True)
        with autocast(precision, device_type):
            loss = module.training_loss(batch)
        loss.backward()
        return float(loss.detach())

    return step


def time_step(step, precision: str, device_type: str, repeats: int = 3,
              give_up_ms: float | None = None) -> tuple[float, bool]:
    """``(ms, finite)`` of ``step(precision)``: the best of ``repeats`` timed calls after a warm-up call
    (allocations, kernel selection); a warm-up slower than ``give_up_ms`` is returned as is."""
    import math
    import time

    import torch

    def timed() -> tuple[float, float]:
        if device_type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(precision)
        if device_type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t), loss

    warm_up, loss = timed()
    if give_up_ms is not None and warm_up > give_up_ms:
        return round(warm_up, 2), math.isfinite(float(loss))
    timings = [timed() for _ in range(repeats)]
    return round(min(t for t, _ in timings), 2), math.isfinite(float(timings[-1][1]))


def pickle_probe(module, batch: dict) -> bytes:
    """The module and batch for :func:`probe_in_child`, pickled (the child is a fresh interpreter; it gets
    this process's ``sys.path`` so that it finds the module's class where this process found it)."""
    import pickle
    import sys

    import torch

    batch = {k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in batch.items()}
    header = {"sys_path": list(sys.path), "threads": torch.get_num_threads()}
    return pickle.dumps(header) + pickle.dumps((module, batch))


def probe_in_child(probe: bytes, device_type: str, repeats: int = 3, give_up_ms: float | None = None,
                   timeout_s: float | None = None, precision: str = "bf16") -> dict:
    """Time one training step at ``precision`` in a child process (:func:`_probe_child`) that may crash or
    hang without harm. ``timeout_s`` bounds the steps once the child has loaded the model (default: 60 s
    plus 20 times ``give_up_ms`` per step); loading is allowed 10 minutes. Returns ``{"ms", "finite"}``, or
    ``{"failure": why}`` when the child died, hung or raised."""
    import json
    import queue
    import signal
    import subprocess
    import sys
    import tempfile
    import threading

    if timeout_s is None:
        timeout_s = 60 + 20 * (give_up_ms or 1000) / 1000 * (repeats + 1)
    command = "from ssl_em.utils.precision import _probe_child; _probe_child()"
    args = json.dumps({"device_type": device_type, "precision": precision, "repeats": repeats,
                       "give_up_ms": give_up_ms})
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen([sys.executable, "-c", command, args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr)
        lines: queue.Queue = queue.Queue()

        def read() -> None:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith(PROBE_TAG):
                    lines.put(line[len(PROBE_TAG):])
            lines.put(None)  # end of output: the child exited

        threading.Thread(target=read, daemon=True).start()
        try:
            proc.stdin.write(probe)
            proc.stdin.close()
        except BrokenPipeError:  # died while loading; its exit code says why
            pass
        result, failure = None, None
        for stage, wait in (("loading the model", 600.0), ("its step", timeout_s)):
            try:
                message = lines.get(timeout=wait)
            except queue.Empty:
                failure = f"probe hung: no answer from {stage} within {wait:.0f} s (killed)"
                break
            if message is None:
                break
            if message != "ready":
                result = json.loads(message)
                break
        if failure is not None:
            proc.kill()
        try:
            code = proc.wait(timeout=60)  # an answer given, exiting: a hang at teardown is not ours to wait for
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if failure is None and result is None:
            if code < 0:
                name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
                failure = f"probe crashed with {name}"
            else:
                stderr.seek(0)
                tail = [x for x in stderr.read().decode(errors="replace").splitlines() if x.strip()]
                failure = f"probe failed (exit {code}): {tail[-1].strip() if tail else 'no message'}"
    if failure is not None:
        return {"failure": failure}
    if "error" in result:
        return {"failure": f"step raised {result['error']}"}
    return result


def _probe_child() -> None:
    """Body of the child process of :func:`probe_in_child`: reads the pickled module and batch on stdin,
    says ``ready``, times the step and prints ``{"ms", "finite"}`` (or ``{"error"}``) as JSON."""
    import json
    import pickle
    import sys

    options = json.loads(sys.argv[-1])
    stdin = sys.stdin.buffer
    header = pickle.load(stdin)
    sys.path[:] = header["sys_path"]
    import torch

    torch.set_num_threads(header["threads"])
    module, batch = pickle.load(stdin)  # our own parent's bytes, through a pipe
    device_type = options["device_type"]
    module.to(device_type).train()
    batch = {k: v.to(device_type) if hasattr(v, "to") else v for k, v in batch.items()}
    print(PROBE_TAG + "ready", flush=True)
    try:
        ms, finite = time_step(_module_step(module, batch, device_type), options["precision"], device_type,
                               options["repeats"], options["give_up_ms"])
        answer = {"ms": ms, "finite": finite}
    except RuntimeError as err:  # e.g. an op without a bf16 kernel on this device
        answer = {"error": str(err).splitlines()[0][:200] if str(err) else type(err).__name__}
    print(PROBE_TAG + json.dumps(answer), flush=True)

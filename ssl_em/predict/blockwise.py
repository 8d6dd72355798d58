"""Blockwise dense prediction of volumes larger than memory: :func:`predict_volume`.

The geometry (blocks, halos, windows, blending) is :mod:`ssl_em.predict.blocks`; where results go
(create, resume, refuse) is :mod:`ssl_em.predict.store`; a dask cluster runs the same block jobs
through :mod:`ssl_em.predict.dask_backend`. Every block is a chunk of the output written once, so a
resumed or distributed run gives the same bytes as one pass.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from ssl_em.data.volume import as_volume, spec_path
from ssl_em.errors import ConfigError, VolumeError
from ssl_em.predict.blocks import BlockJob, BlockPlan, describe, resolve_normalization, source_voxel_size
from ssl_em.predict.dask_backend import run_dask
from ssl_em.predict.store import BlockId, prepare_output
from ssl_em.utils.precision import resolve_device
from ssl_em.utils.shapes import to_triple

__all__ = ["inference_memory_format", "model_fingerprint", "predict_volume"]


def model_fingerprint(model: Any) -> str:
    """Hash of the model's class, repr and every state tensor (name, dtype, shape, bytes)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def inference_memory_format(model: Any, device: str) -> Any:
    """3-D conv nets on a CPU run inference in channels_last_3d: oneDNN's kernels for the few channels of
    EM U-Nets are far faster in it (forward 20-35 % less time for unet3d_tiny, unet2d_small and the plain
    U-Net on a 2-core AVX2 EPYC; benchmarks/predict_throughput.py). A fixed rule, not a timing, so every
    run and every resumed block computes in the same order and writes the same bytes."""
    import torch

    if device != "cpu" or not isinstance(model, torch.nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return model
    if not any(isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) for m in model.modules()):
        return model
    return model.to(memory_format=torch.channels_last_3d)


def _infer_out_channels(model: Any, job: BlockJob, c_in: int) -> int:
    n = getattr(model, "out_channels", None)
    if isinstance(n, int):
        return n
    probe = np.zeros((c_in, *job.plan.window), np.float32)
    return int(job.run_model(model, [probe])[0].shape[0])


def tta_axes(window: Sequence[int]) -> tuple[int, ...]:
    """The axes test-time mirroring flips for a (z, y, x) window: y and x, and z when the window has depth
    (mirroring a single section in z changes nothing)."""
    return ((0,) if int(window[0]) > 1 else ()) + (1, 2)


def predict_in_memory(model: Any, raw: np.ndarray, window_shape: Sequence[int], *, precision: str = "32",
                      device: str = "cpu", flips: Sequence[int] = ()) -> np.ndarray:
    """Sigmoid probabilities (K, z, y, x) of an in-memory, normalised ``raw`` through ``predict_volume``, in
    windows of the training crop (clipped to ``raw``) overlapping by a quarter: how fine-tuning, the study
    and calibration see a labelled region exactly as ``ssl-em predict`` would."""
    import tempfile

    window = tuple(min(int(p), int(n)) for p, n in zip(window_shape, raw.shape))
    block = tuple(min(int(n), 2 * p) for n, p in zip(raw.shape, window))
    with tempfile.TemporaryDirectory(prefix="ssl_em_probabilities_") as tmp:
        out = predict_volume(model.eval(), raw.astype(np.float32, copy=False), Path(tmp) / "probabilities.zarr",
                             block, tuple(p // 4 for p in window), window_shape=window, activation="sigmoid",
                             precision=precision, device=device, batch_size=4, progress=False, flips=flips)
        return np.asarray(out[:])


def predict_volume(
    model: Any,
    src: Any,
    dst: str | os.PathLike,
    block_shape: int | Sequence[int] = (32, 128, 128),
    overlap: int | Sequence[int] = (8, 32, 32),
    *,
    window_shape: int | Sequence[int] | None = None,
    blend: Literal["gaussian", "constant"] = "gaussian",
    batch_size: int = 1,
    precision: str = "auto",
    device: str = "auto",
    mask: Any = None,
    out_channels: int | None = None,
    out_dtype: Literal["float32", "uint8"] = "float32",
    activation: Literal["sigmoid", "softmax"] | None = None,
    normalization: Callable[[np.ndarray], np.ndarray] | dict | None = None,
    backend: Literal["local", "dask"] = "local",
    scheduler: Any = None,
    resume: bool = True,
    overwrite: bool = False,
    fill_missing: bool = False,
    flips: Sequence[int] = (),
    progress: bool = True,
    on_block: Callable[[int, int], Any] | None = None,
) -> Any:
    """Predict ``model`` densely over ``src`` block by block into a chunk-aligned zarr array.

    Args:
        model: ``nn.Module`` (or TorchScript) mapping (B, C_in, D, H, W) float32 to (B, C_out, D, H, W).
        src: volume spec (``open_volume``), or an array-like (numpy, zarr, ``Volume``) of shape
            (z, y, x) or (c, z, y, x). Read lazily, one region per block.
        dst: output folder; ``*.ome.zarr`` writes an OME-Zarr 0.5 image group (array ``0``, voxel
            size copied from the source), anything else a plain zarr v3 array.
        block_shape: output core per task (z, y, x) voxels = the output's chunk shape.
        overlap: context between neighbouring regions (z, y, x); each block reads block + overlap.
            Make overlap/2 at least the model's receptive-field radius for seamless output.
        window_shape: model input size; default block + overlap (one forward per block). Smaller
            windows tile the region with stride window - overlap and are blended (``blend``).
        batch_size: windows per forward (across blocks when each block is one window).
        mask: (z, y, x) spec/array, same shape or coarser by an integer factor; blocks whose core
            holds no nonzero mask voxel are not predicted and stay 0.
        out_channels: C_out when known (else read from ``model.out_channels`` or a probe forward).
        out_dtype: ``"float32"`` or ``"uint8"`` (probabilities in [0, 1] scaled to 0..255).
        activation: applied per window before blending: ``"sigmoid"``, ``"softmax"`` or None.
        normalization: raw block -> float32 callable, a dict for ``Normalization.from_dict``,
            or None (integers divided by their dtype's maximum).
        backend: ``"local"`` (this process, I/O overlapped with compute) or ``"dask"``
            (``scheduler``: None -> LocalCluster(2 processes), an address or a ``Client``).
        resume: skip blocks a previous run with identical settings finished (False: start over).
        overwrite: replace an existing ``dst`` made with other settings (else ConfigError). An output that
            is, holds or sits inside the input or mask, or a folder ssl-em did not write, is never replaced.
        fill_missing: read zarr chunks absent from a ``src``/``mask`` spec as the fill value (else VolumeError).
        flips: test-time augmentation: spatial axes (0 z, 1 y, 2 x) to mirror; each window's activated
            output is the mean over all 2^k mirrorings (k = len(flips)), at 2^k times the compute.
        on_block: called as ``on_block(done, total)`` after blocks are written (from a writer thread); an
            exception raised in it stops the prediction there (a GUI's cancel): the blocks written so far
            stay, and the same call resumes from them.

    Returns:
        The output zarr array, shape (C_out, z, y, x), chunks (C_out, *block_shape).
    """
    if out_dtype not in ("float32", "uint8"):
        raise ConfigError(f"out_dtype={out_dtype!r} is not one of 'float32', 'uint8'")
    if blend not in ("gaussian", "constant"):
        raise ConfigError(f"blend={blend!r} is not one of 'gaussian', 'constant'")
    if backend not in ("local", "dask"):
        raise ConfigError(f"backend={backend!r} is not one of 'local', 'dask'")
    if scheduler is not None and backend != "dask":
        raise ConfigError(f"scheduler={scheduler!r} is only used with backend='dask'")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if activation not in (None, "sigmoid", "softmax"):
        raise ConfigError(f"activation={activation!r} is not one of None, 'sigmoid', 'softmax'")
    flips = tuple(sorted({int(a) for a in flips}))
    if any(a not in (0, 1, 2) for a in flips):
        raise ConfigError(f"flips={list(flips)} must be spatial axes 0 (z), 1 (y), 2 (x)")
    source = as_volume(src, fill_missing=fill_missing)
    if len(source.shape) not in (3, 4):
        raise VolumeError(f"input {describe(src)} has shape {tuple(source.shape)}; expected (z, y, x) or (c, z, y, x)")
    shape = tuple(int(s) for s in source.shape[-3:])
    block, ov = to_triple(block_shape, "block_shape"), to_triple(overlap, "overlap")
    region = tuple(b + o for b, o in zip(block, ov))
    window = region if window_shape is None else to_triple(window_shape, "window_shape")
    if any(w > r for w, r in zip(window, region)):
        raise ConfigError(f"window_shape {window} is larger than block + overlap {region}")
    # an axis that fits in one region is one block: both its ends are the volume's border, so
    # no halo is needed there and a second, mostly redundant window is saved
    block = tuple(s if s <= r else b for s, r, b in zip(shape, region, block))
    plan = BlockPlan(shape, block, ov, window)  # type: ignore[arg-type]
    mask_arr = as_volume(mask, fill_missing=fill_missing, what="mask") if mask is not None else None
    if mask_arr is not None and any(s % m for s, m in zip(shape, mask_arr.shape[-3:])):
        raise VolumeError(f"mask shape {tuple(mask_arr.shape)} does not divide the input's {shape}")

    job = BlockJob(plan, source, "", resolve_normalization(normalization, source), blend, activation, out_dtype,
                   mask_arr, precision, device, batch_size, flips)
    if hasattr(model, "eval"):
        model.eval()
    c_in = int(source.shape[0]) if len(source.shape) == 4 else 1
    dev = resolve_device(device)
    model = model.to(dev) if hasattr(model, "to") else model
    model = inference_memory_format(model, dev)
    if out_channels is None:
        out_channels = _infer_out_channels(model, job, c_in)
    params = {
        "model": model_fingerprint(model), "src": describe(src), "shape": list(shape), "block": list(block),
        "overlap": list(ov), "window": list(window), "blend": blend, "activation": activation,
        "out_dtype": out_dtype, "out_channels": out_channels, "mask": describe(mask),
        "normalization": describe(normalization), "precision": precision,
        **({"flips": list(flips)} if flips else {}),  # outputs of earlier runs without flips stay resumable
    }
    arr_dir, done = prepare_output(Path(dst), (out_channels, *shape), (out_channels, *block), out_dtype, params,
                                    source_voxel_size(source), resume, overwrite,
                                    [p for p in (spec_path(src), spec_path(mask)) if p is not None])
    job.out_path = str(arr_dir)
    todo = [idx for idx in plan.blocks() if idx not in done]
    # one window per block: batch whole blocks together; else batching happens inside a block
    per_step = batch_size if len(plan.window_starts(plan.region)) == 1 else 1
    groups = [todo[i : i + per_step] for i in range(0, len(todo), per_step)]

    n_blocks = math.prod(plan.grid)
    with tqdm(total=n_blocks, initial=n_blocks - len(todo), disable=not progress, unit="block",
              desc=f"predict {Path(dst).name}") as bar:

        finished, lock = [n_blocks - len(todo)], threading.Lock()  # a disabled tqdm does not count

        def done(n: int) -> None:
            bar.update(n)
            with lock:
                finished[0] += n
                count = finished[0]
            if on_block is not None:
                on_block(count, n_blocks)

        if backend == "local":
            _run_local(job, model, groups, done)
        else:
            run_dask(job, model, groups, scheduler, done)
    return job.out


def _run_local(job: BlockJob, model: Any, groups: Iterable[list[BlockId]], on_done: Callable[[int], Any]) -> None:
    """Predict groups in this process; a small thread pool reads ahead and writes behind.

    Reading/decoding and compressing/writing chunks release the GIL (numcodecs, file I/O), so
    they overlap with the forward pass; at most two groups are in flight on each side, which
    keeps memory flat.
    """
    groups = list(groups)
    with ThreadPoolExecutor(max_workers=2) as pool:
        reads = [pool.submit(lambda g=g: [job.load(i) for i in g]) for g in groups[:2]]
        writes: list[Any] = []
        for k, ids in enumerate(groups):
            xs = reads.pop(0).result()
            if k + 2 < len(groups):
                reads.append(pool.submit(lambda g=groups[k + 2]: [job.load(i) for i in g]))
            live = [x for x in xs if x is not None]
            preds = iter(job.run_model(model, live) if live else [])
            outs = [next(preds) if x is not None else None for x in xs]
            while len(writes) >= 2:
                writes.pop(0).result()
            writes.append(pool.submit(_store_group, job, ids, outs, on_done))
        for w in writes:
            w.result()


def _store_group(job: BlockJob, ids: list[BlockId], outs: list[np.ndarray | None],
                 on_done: Callable[[int], Any]) -> None:
    for idx, y in zip(ids, outs):
        job.store(idx, y)
    on_done(len(ids))

"""Blockwise dense prediction of volumes larger than memory: resumable, chunk-aligned, exact tiling.

Geometry (all per axis, voxels, order z, y, x)::

    block   = the output core of one task = one zarr chunk of the result (written exactly once)
    overlap = context shared by neighbouring input regions; a block is predicted from the
              region  block + overlap  (halo overlap//2 before, the rest after), read lazily
    window  = what the model sees at once (default: the whole region, one forward per block);
              a smaller window tiles the region with stride window - overlap and the tiles are
              blended with ``blend`` weights, normalised by their sum

Only the core of each region is kept, so with a halo at least the model's receptive-field radius
the result equals one forward over the whole volume, and no chunk depends on its neighbours:
tasks are independent, memory is one region per task however large the volume, and a resumed or
distributed run gives the same bytes. Regions at the volume's edge are shifted inside it (the
model then sees the true border, as a whole-volume forward does); reflection padding is used only
where the volume is smaller than the window.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ssl_em.data.volume import spec_path
from ssl_em.errors import ConfigError, VolumeError
from ssl_em.utils.io import check_output, writer_attrs
from ssl_em.utils.precision import resolve_device

Triple = tuple[int, int, int]
BlockId = tuple[int, int, int]
DONE_DIR = ".ssl_em_done"  # one empty marker file per finished block, inside the output array's folder
ATTR_KEY = "ssl_em_predict"


def _triple(value: int | Sequence[int], name: str) -> Triple:
    t = (int(value),) * 3 if np.isscalar(value) else tuple(int(v) for v in value)  # type: ignore[arg-type]
    if len(t) != 3:
        raise ConfigError(f"{name}={value!r} must be one int or three (z, y, x)")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class BlockPlan:
    """The block grid over a volume of spatial ``shape`` (z, y, x); picklable, pure geometry."""

    shape: Triple
    block: Triple
    overlap: Triple
    window: Triple

    def __post_init__(self) -> None:
        if min(self.block) < 1 or min(self.overlap) < 0:
            raise ConfigError(f"block {self.block} must be >= 1 and overlap {self.overlap} >= 0 per axis")
        if any(w <= o for w, o, r in zip(self.window, self.overlap, self.region) if w < r):
            raise ConfigError(f"window {self.window} must exceed overlap {self.overlap} to tile a region")

    @property
    def region(self) -> Triple:
        """Input read per block: block + overlap."""
        return tuple(b + o for b, o in zip(self.block, self.overlap))  # type: ignore[return-value]

    @property
    def grid(self) -> Triple:
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block))  # type: ignore[return-value]

    def blocks(self) -> Iterator[BlockId]:
        return itertools.product(*(range(g) for g in self.grid))  # type: ignore[return-value]

    def core(self, idx: BlockId) -> tuple[slice, slice, slice]:
        """The output box of block ``idx`` (the last block along an axis may be shorter)."""
        return tuple(  # type: ignore[return-value]
            slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(idx, self.block, self.shape)
        )

    def region_box(self, idx: BlockId) -> tuple[slice, slice, slice]:
        """The input box read for block ``idx``: core + halo, shifted to lie inside the volume."""
        out = []
        for i, b, o, s in zip(idx, self.block, self.overlap, self.shape):
            size = min(b + o, s)
            start = min(max(i * b - o // 2, 0), s - size)
            out.append(slice(start, start + size))
        return tuple(out)  # type: ignore[return-value]

    def window_starts(self, padded: Sequence[int]) -> list[Triple]:
        """Starts of the model windows tiling a (padded) region; the last one is flush with its end."""
        axes = []
        for n, w, o in zip(padded, self.window, self.overlap):
            step = max(w - o, 1)
            starts = list(range(0, max(n - w, 0) + 1, step))
            if starts[-1] + w < n:
                starts.append(n - w)
            axes.append(starts)
        return list(itertools.product(*axes))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8)
def _blend_weights(window: Triple, mode: str) -> np.ndarray:
    """(D, H, W) float32 importance map: separable Gaussian (sigma = window/8, as MONAI) or ones."""
    if mode == "constant":
        return np.ones(window, np.float32)
    axes = []
    for n in window:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        g = np.exp(-0.5 * (x / max(0.125 * n, 1e-6)) ** 2)
        axes.append(g / g.max())
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = np.maximum(w, 1e-3).astype(np.float32)  # never zero: every voxel keeps a weight
    w.flags.writeable = False  # cached and shared between calls
    return w


def default_normalization(raw: np.ndarray) -> np.ndarray:
    """Integers to [0, 1] by their dtype's maximum (uint8 -> /255); floats unchanged."""
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / np.float32(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32, copy=False)


def _resolve_normalization(normalization: Any, source: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A raw -> float32 callable. Unfitted ``Normalization`` records are fitted on the whole source
    once (never per block: per-block statistics would make blocks disagree at their seams)."""
    if normalization is None:
        return default_normalization
    if isinstance(normalization, dict):
        from ssl_em.data.crops import Normalization

        normalization = Normalization.from_dict(normalization)
    if not callable(normalization):
        raise ConfigError(f"normalization={normalization!r} must be None, a dict or a callable")
    if hasattr(normalization, "fit") and getattr(normalization, "fitted", True) is False:
        normalization = normalization.fit(source)
    return normalization


def open_source(spec: Any, what: str = "input", fill_missing: bool = False) -> Any:
    """An array-like with ``shape``, ``dtype`` and box slicing; strings go through ``open_volume``."""
    if isinstance(spec, (str, os.PathLike)):
        from ssl_em.data.volume import open_volume  # type: ignore[import-not-found]

        return open_volume(spec, fill_missing=fill_missing)
    if all(hasattr(spec, a) for a in ("shape", "dtype", "__getitem__")):
        return spec
    raise VolumeError(f"{what} {spec!r} is neither a volume spec nor an array with shape/dtype/slicing")


@dataclass
class BlockJob:
    """Everything one worker needs to predict blocks except the model; picklable when the source is."""

    plan: BlockPlan
    src: Any  # (z, y, x) or (c, z, y, x) array-like
    out_path: str  # folder of the output zarr array
    normalization: Callable[[np.ndarray], np.ndarray]
    blend: str = "gaussian"
    activation: str | None = None
    out_dtype: str = "float32"
    mask: Any = None
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 1
    _out: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_out": None}  # reopen the zarr array in the worker

    @property
    def out(self) -> Any:
        if self._out is None:
            import zarr

            self._out = zarr.open_array(self.out_path, mode="r+")
        return self._out

    # --- stage 1: read (I/O, no model) -------------------------------------------------------
    def load(self, idx: BlockId) -> np.ndarray | None:
        """Normalised input region (C, *padded) float32 for block ``idx``; None if the mask is empty."""
        if self.mask is not None and not self._mask_any(idx):
            return None
        box = self.plan.region_box(idx)
        raw = np.asarray(self.src[box] if len(self.src.shape) == 3 else self.src[(slice(None), *box)])
        x = np.asarray(self.normalization(raw), dtype=np.float32)
        x = x[None] if x.ndim == 3 else x
        pad = [(0, 0)] + [(0, max(w - n, 0)) for w, n in zip(self.plan.window, x.shape[1:])]
        if any(p[1] for p in pad):  # only a volume smaller than the window gets padded
            x = np.pad(x, pad, mode="reflect" if min(x.shape[1:]) > 1 else "edge")
        return x

    def _mask_any(self, idx: BlockId) -> bool:
        core = self.plan.core(idx)
        # the mask may be coarser than the source by an integer factor per axis
        box = tuple(
            slice(c.start * m // s, max(-(-c.stop * m // s), c.start * m // s + 1))
            for c, m, s in zip(core, self.mask.shape[-3:], self.plan.shape)
        )
        return bool(np.any(np.asarray(self.mask[box])))

    # --- stage 2: predict (model) ------------------------------------------------------------
    def predict(self, model: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Model output (C_out, *padded) float32 for each input region, windows blended."""
        import torch

        from ssl_em.utils.precision import autocast

        device = torch.device(resolve_device(self.device))
        tiles = [(i, s) for i, x in enumerate(inputs) for s in self.plan.window_starts(x.shape[1:])]
        acc: list[np.ndarray | None] = [None] * len(inputs)
        single = all(len(self.plan.window_starts(x.shape[1:])) == 1 for x in inputs)
        wsum = [] if single else [np.zeros(x.shape[1:], np.float32) for x in inputs]
        weight = None if single else _blend_weights(self.plan.window, self.blend)
        win = self.plan.window
        for b0 in range(0, len(tiles), self.batch_size):
            batch = tiles[b0 : b0 + self.batch_size]
            boxes = [tuple(slice(s, s + w) for s, w in zip(st, win)) for _, st in batch]
            xb = torch.from_numpy(np.stack([inputs[i][(slice(None), *bx)] for (i, _), bx in zip(batch, boxes)]))
            with torch.inference_mode(), autocast(self.precision, device.type):
                yb = model(xb.to(device))
                yb = activate(yb, self.activation)
            yb = yb.float().cpu().numpy()
            if yb.ndim != 5 or yb.shape[2:] != xb.shape[2:]:
                raise ConfigError(
                    f"model output {tuple(yb.shape)} must be (B, C, *window) for input {tuple(xb.shape)}: "
                    "blockwise prediction needs a dense model that keeps the spatial shape"
                )
            for (i, _), bx, y in zip(batch, boxes, yb):
                if single:
                    acc[i] = y
                    continue
                if acc[i] is None:
                    acc[i] = np.zeros((y.shape[0], *inputs[i].shape[1:]), np.float32)
                acc[i][(slice(None), *bx)] += y * weight  # type: ignore[index]
                wsum[i][bx] += weight
        if not single:
            acc = [a / w for a, w in zip(acc, wsum)]  # type: ignore[operator]
        return acc  # type: ignore[return-value]

    # --- stage 3: write (I/O) ----------------------------------------------------------------
    def store(self, idx: BlockId, pred: np.ndarray | None) -> None:
        """Crop the core, write the block's chunk, then mark it done (the marker comes last)."""
        if pred is not None:  # a skipped block stays at the fill value 0 without being stored
            core = self.plan.core(idx)
            region = self.plan.region_box(idx)
            local = tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(core, region))
            self.out[(slice(None), *core)] = to_dtype(pred[(slice(None), *local)], self.out_dtype)
        marker = Path(self.out_path) / DONE_DIR / ".".join(map(str, idx))
        marker.touch()  # creating an empty file is atomic; a killed write leaves no marker

    def run(self, model: Any, ids: Sequence[BlockId]) -> list[BlockId]:
        """Read, predict and write ``ids`` in one go (one dask task or one local step)."""
        inputs = [(idx, self.load(idx)) for idx in ids]
        todo = [(idx, x) for idx, x in inputs if x is not None]
        preds = dict(zip((i for i, _ in todo), self.predict(model, [x for _, x in todo]))) if todo else {}
        for idx in ids:
            self.store(idx, preds.get(idx))
        return list(ids)


def activate(y: Any, activation: str | None) -> Any:
    if activation is None:
        return y
    if activation == "sigmoid":
        return y.sigmoid()
    if activation == "softmax":
        return y.softmax(dim=1)
    raise ConfigError(f"activation={activation!r} is not one of None, 'sigmoid', 'softmax'")


def to_dtype(pred: np.ndarray, out_dtype: str) -> np.ndarray:
    """float32 as is; uint8 maps probabilities [0, 1] to 0..255 (rounded, clipped)."""
    if out_dtype == "uint8":
        return np.clip(np.rint(pred * 255.0), 0, 255).astype(np.uint8)
    return pred.astype(out_dtype, copy=False)


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


def _describe(obj: Any) -> Any:
    """A JSON-able description of a source/mask/normalisation for the parameter hash."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, (os.PathLike,)):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): _describe(v) for k, v in obj.items()}
    spec = getattr(obj, "spec", None)
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        desc = {"array": type(obj).__name__, "shape": list(obj.shape), "dtype": str(obj.dtype)}
        if type(obj) is np.ndarray:  # in memory: hashing it is cheap next to predicting it
            data = memoryview(np.ascontiguousarray(obj)).cast("B")
            desc["blake2b"] = hashlib.blake2b(data, digest_size=16).hexdigest()
        return desc
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def _voxel_size(src: Any) -> tuple[float, float, float] | None:
    vs = getattr(src, "voxel_size", None)
    if vs is None or not getattr(src, "voxel_size_known", True):
        return None
    return tuple(float(v) for v in vs)  # type: ignore[return-value]


def _create_output(dst: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str,
                   attrs: dict, voxel_size: tuple[float, float, float] | None) -> Path:
    """Create the empty output array (zarr v3 or an OME-Zarr 0.5 image group); return its folder."""
    import zarr

    kw = dict(shape=shape, chunks=chunks, dtype=dtype, fill_value=0, dimension_names=["c", "z", "y", "x"],
              attributes=attrs)
    if not dst.name.endswith(".ome.zarr"):
        zarr.create_array(str(dst), **kw)
        return dst
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", **({"unit": "nanometer"} if voxel_size else {})} for a in "zyx"
    ]
    scale = [1.0, *(voxel_size or (1.0, 1.0, 1.0))]
    root = zarr.open_group(str(dst), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": dst.name.removesuffix(".ome.zarr"), "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }]}
    root.create_array("0", **kw)
    return dst / "0"


def _prepare_output(dst: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, params: dict,
                    voxel_size: Any, resume: bool, overwrite: bool, inputs: list[Path]) -> tuple[Path, set[BlockId]]:
    """Create or reopen the output; return its array folder and the blocks already done. An output that
    is, holds or sits in an input, or that ssl-em did not write, is refused whatever the flags."""
    import zarr

    check_output(dst, inputs, overwrite=True, writer="ssl_em.predict")  # resumed, or replaced with overwrite

    digest = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=16).hexdigest()
    arr_dir = dst / "0" if dst.name.endswith(".ome.zarr") else dst
    if dst.exists() and not overwrite:
        try:
            stored = zarr.open_array(str(arr_dir), mode="r").attrs.get(ATTR_KEY, {})
        except Exception:  # not a zarr array at all
            stored = {}
        if stored.get("hash") != digest:
            changed = sorted(k for k in params if stored.get("params", {}).get(k) != params[k])
            what = f"settings differ ({', '.join(changed)})" if stored else "it is not an ssl-em prediction"
            raise ConfigError(f"output {dst} exists and {what}; pass overwrite=True (--overwrite) to replace it")
    if dst.exists() and (overwrite or not resume):  # start over: no stale chunks survive
        shutil.rmtree(dst)
    if not dst.exists():
        attrs = {ATTR_KEY: {"hash": digest, "params": params}, **writer_attrs("ssl_em.predict", sparse=True)}
        arr_dir = _create_output(dst, shape, chunks, dtype, attrs, voxel_size)
    done_dir = arr_dir / DONE_DIR
    done_dir.mkdir(exist_ok=True)
    done = {tuple(int(v) for v in p.name.split(".")) for p in done_dir.iterdir() if p.name.count(".") == 2}
    return arr_dir, done  # type: ignore[return-value]


def _infer_out_channels(model: Any, job: BlockJob, c_in: int) -> int:
    n = getattr(model, "out_channels", None)
    if isinstance(n, int):
        return n
    probe = np.zeros((c_in, *job.plan.window), np.float32)
    return int(job.predict(model, [probe])[0].shape[0])


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
    progress: bool = True,
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
    source = open_source(src, fill_missing=fill_missing)
    if len(source.shape) not in (3, 4):
        raise VolumeError(f"input {_describe(src)} has shape {tuple(source.shape)}; expected (z, y, x) or (c, z, y, x)")
    shape = tuple(int(s) for s in source.shape[-3:])
    block, ov = _triple(block_shape, "block_shape"), _triple(overlap, "overlap")
    region = tuple(b + o for b, o in zip(block, ov))
    window = region if window_shape is None else _triple(window_shape, "window_shape")
    if any(w > r for w, r in zip(window, region)):
        raise ConfigError(f"window_shape {window} is larger than block + overlap {region}")
    # an axis that fits in one region is one block: both its ends are the volume's border, so
    # no halo is needed there and a second, mostly redundant window is saved
    block = tuple(s if s <= r else b for s, r, b in zip(shape, region, block))
    plan = BlockPlan(shape, block, ov, window)  # type: ignore[arg-type]
    mask_arr = open_source(mask, "mask", fill_missing) if mask is not None else None
    if mask_arr is not None and any(s % m for s, m in zip(shape, mask_arr.shape[-3:])):
        raise VolumeError(f"mask shape {tuple(mask_arr.shape)} does not divide the input's {shape}")

    job = BlockJob(plan, source, "", _resolve_normalization(normalization, source), blend, activation, out_dtype,
                   mask_arr, precision, device, batch_size)
    if hasattr(model, "eval"):
        model.eval()
    c_in = int(source.shape[0]) if len(source.shape) == 4 else 1
    dev = resolve_device(device)
    model = model.to(dev) if hasattr(model, "to") else model
    if out_channels is None:
        out_channels = _infer_out_channels(model, job, c_in)
    params = {
        "model": model_fingerprint(model), "src": _describe(src), "shape": list(shape), "block": list(block),
        "overlap": list(ov), "window": list(window), "blend": blend, "activation": activation,
        "out_dtype": out_dtype, "out_channels": out_channels, "mask": _describe(mask),
        "normalization": _describe(normalization), "precision": precision,
    }
    arr_dir, done = _prepare_output(Path(dst), (out_channels, *shape), (out_channels, *block), out_dtype, params,
                                    _voxel_size(source), resume, overwrite,
                                    [p for p in (spec_path(src), spec_path(mask)) if p is not None])
    job.out_path = str(arr_dir)
    todo = [idx for idx in plan.blocks() if idx not in done]
    # one window per block: batch whole blocks together; else batching happens inside a block
    per_step = batch_size if len(plan.window_starts(plan.region)) == 1 else 1
    groups = [todo[i : i + per_step] for i in range(0, len(todo), per_step)]

    from tqdm.auto import tqdm

    n_blocks = math.prod(plan.grid)
    with tqdm(total=n_blocks, initial=n_blocks - len(todo), disable=not progress, unit="block",
              desc=f"predict {Path(dst).name}") as bar:
        if backend == "local":
            _run_local(job, model, groups, bar.update)
        else:
            from ssl_em.predict.dask_backend import run_dask

            run_dask(job, model, groups, scheduler, bar.update)
    return job.out


def _run_local(job: BlockJob, model: Any, groups: Iterable[list[BlockId]], on_done: Callable[[int], Any]) -> None:
    """Predict groups in this process; a small thread pool reads ahead and writes behind.

    Reading/decoding and compressing/writing chunks release the GIL (numcodecs, file I/O), so
    they overlap with the forward pass; at most two groups are in flight on each side, which
    keeps memory flat.
    """
    from concurrent.futures import ThreadPoolExecutor

    groups = list(groups)
    with ThreadPoolExecutor(max_workers=2) as pool:
        reads = [pool.submit(lambda g=g: [job.load(i) for i in g]) for g in groups[:2]]
        writes: list[Any] = []
        for k, ids in enumerate(groups):
            xs = reads.pop(0).result()
            if k + 2 < len(groups):
                reads.append(pool.submit(lambda g=groups[k + 2]: [job.load(i) for i in g]))
            live = [x for x in xs if x is not None]
            preds = iter(job.predict(model, live) if live else [])
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

"""``ssl-em predict``: blockwise prediction of a volume spec into zarr / OME-Zarr, with a preview PNG.

``--model`` takes a fine-tuned folder (written when ``ssl-em fit`` of a fine-tuning recipe ends:
``<log_dir>/model``), a TorchScript file, a ``torch.export`` archive or ``module:factory``. A
fine-tuned folder brings its own normalisation (the training data's) and sigmoid output, and
``--instances`` runs its task's post-processing (watershed, components, agglomeration) block by
block with global ids (:func:`ssl_em.predict.stitch.blockwise_instances`), so it scales like prediction.
"""

from __future__ import annotations

import argparse
import importlib
import os
import warnings
from pathlib import Path
from typing import Any

from ssl_em.errors import ArgumentParser, CheckpointError, ConfigError


def load_model(spec: str) -> Any:
    """An ``nn.Module`` from ``spec``: a fine-tuned folder (``adapter.json`` + ``adapter.safetensors``,
    see :mod:`ssl_em.adapters.io`; returns logits), a TorchScript file, a ``torch.export``
    archive (``*.pt2``), or ``package.module:function`` (a factory returning a module).
    """
    finetuned = _load_finetuned(spec)
    if finetuned is not None:
        return finetuned.model
    import torch

    if os.path.exists(spec) and spec.endswith(".pt2"):
        try:
            return torch.export.load(spec).module()
        except Exception as err:
            raise CheckpointError(f"model {spec} is not a torch.export archive ({type(err).__name__})") from None
    if os.path.exists(spec):
        try:
            with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it still loads
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(spec, map_location="cpu")
        except Exception as err:  # not TorchScript (pickled modules are not loaded: unsafe)
            raise CheckpointError(f"model {spec} is not a TorchScript file ({type(err).__name__})") from None
    if ":" in spec and not spec.endswith((".pt", ".pth", ".ts")):
        mod_name, _, fn_name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"model factory {spec!r} cannot be imported: {err}") from None
        return factory()
    raise ConfigError(f"model {spec!r} is neither an existing TorchScript file nor 'module:function'")


def _load_finetuned(spec: str) -> Any:
    """The :class:`~ssl_em.adapters.io.FinetunedModel` of a fine-tuned folder, else None."""
    from ssl_em.adapters.io import is_finetuned_folder, load_finetuned

    return load_finetuned(spec) if is_finetuned_folder(spec) else None


def parse_roi(text: str, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """``"z0:z1,y0:y1,x0:x1"`` (empty ends allowed, e.g. ``"10:20,:,:"``) -> three slices inside ``shape``."""
    parts = text.split(",")
    if len(parts) != 3:
        raise ConfigError(f"--roi {text!r} needs three ranges z0:z1,y0:y1,x0:x1")
    box = []
    for part, n in zip(parts, shape[-3:]):
        a, sep, b = part.partition(":")
        try:
            start, stop = int(a) if a.strip() else 0, int(b) if b.strip() else n
        except ValueError:
            raise ConfigError(f"--roi {text!r}: {part!r} is not start:stop integers") from None
        if not sep or not 0 <= start < stop <= n:
            raise ConfigError(f"--roi {text!r}: range {part!r} is empty or outside the volume shape {tuple(shape)}")
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]


def _stem(output: str) -> str:
    return str(output).rstrip("/").removesuffix(".zarr").removesuffix(".ome")


def write_overlay(src: Any, out: Any, png: Path, normalization: Any = None, labels: Any = None,
                  threshold: float = 0.5) -> None:
    """Middle z-section: raw | raw with the predicted mask (or ``labels``, one colour per id) | channel 0."""
    from ssl_em.utils.plotting import pyplot, save_figure

    plt = pyplot()
    import numpy as np
    from skimage.color import label2rgb

    from ssl_em.data.normalize import default_normalization

    z = out.shape[1] // 2
    raw = np.asarray(src[z : z + 1] if len(src.shape) == 3 else src[0, z : z + 1])
    img = np.asarray((normalization or default_normalization)(raw), np.float32)[0]
    lo, hi = np.percentile(img, (0.5, 99.5))
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    prob = np.asarray(out[0, z], np.float32)
    prob = prob / 255.0 if np.dtype(out.dtype) == np.uint8 else prob
    seg = np.asarray(labels[z]) if labels is not None else (prob > threshold).astype(np.int32)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3), squeeze=False)
    axes[0, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title(f"input z={z}")
    axes[0, 1].imshow(label2rgb(seg, image=img, alpha=0.35, bg_label=0))
    kind = f"{len(np.unique(seg)) - (seg == 0).any()} instances" if labels is not None else f"mask (p > {threshold})"
    axes[0, 1].set_title(kind)
    im = axes[0, 2].imshow(prob, cmap="magma", vmin=0, vmax=1)
    axes[0, 2].set_title("probability, channel 0")
    fig.colorbar(im, ax=axes[0, 2], fraction=0.046)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, png, dpi=80)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers (z,y,x)") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r} needs one or three integers (z,y,x)")
    return values * 3 if len(values) == 1 else values


def write_preview(src: Any, out: Any, png: Path) -> None:
    """Middle z-slice of the input and of each output channel (up to 4), side by side."""
    from ssl_em.utils.plotting import pyplot, save_figure

    plt = pyplot()
    import numpy as np


    z = out.shape[1] // 2
    raw = np.asarray(src[z] if len(src.shape) == 3 else src[0, z])
    chans = min(out.shape[0], 4)
    fig, axes = plt.subplots(1, 1 + chans, figsize=(4 * (1 + chans), 4), squeeze=False)
    axes[0, 0].imshow(raw, cmap="gray")
    axes[0, 0].set_title(f"input z={z}")
    for c in range(chans):
        im = axes[0, c + 1].imshow(np.asarray(out[c, z]), cmap="magma")
        axes[0, c + 1].set_title(f"output channel {c}")
        fig.colorbar(im, ax=axes[0, c + 1], fraction=0.046)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, png, dpi=80)


def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="ssl-em predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="fine-tuned folder (adapter.json), TorchScript file, *.pt2 or 'package.module:factory'")
    p.add_argument("--input", required=True, help="volume spec (a.zarr, a.ome.zarr@0, f.h5:/ds, f.npy, ...)")
    p.add_argument("--output", required=True, help="DST.zarr (zarr v3 array) or DST.ome.zarr (OME-Zarr image)")
    p.add_argument("--roi", default=None, help="predict only this box z0:z1,y0:y1,x0:x1 (empty ends allowed)")
    p.add_argument("--block", type=_ints, default=(32, 256, 256), help="output block = chunk, z,y,x")
    p.add_argument("--overlap", type=_ints, default=(8, 32, 32), help="context between blocks, z,y,x")
    p.add_argument("--window", type=_ints, default=None, help="model input z,y,x (default block + overlap)")
    p.add_argument("--blend", choices=["gaussian", "constant"], default="gaussian")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--tta", action="store_true",
                   help="test-time mirroring: average the outputs over flips of y and x (and z when the window "
                   "has depth), 4-8x the compute")
    p.add_argument("--activation", choices=["auto", "none", "sigmoid", "softmax"], default="auto",
                   help="auto: sigmoid for a fine-tuned folder, none otherwise")
    p.add_argument("--out-dtype", choices=["float32", "uint8"], default="float32")
    p.add_argument("--mask", default=None, help="volume spec; blocks without mask voxels are skipped")
    p.add_argument("--instances", action="store_true",
                   help="fine-tuned folder only: also write DST_instances.zarr, the task's post-processing run "
                        "block by block with global ids (memory: one block + halo; same --backend)")
    p.add_argument("--instances-halo", type=_ints, default=(8, 32, 32),
                   help="context z,y,x on each side of an instance block: at least the objects' size for "
                        "seams to match the whole-volume result")
    p.add_argument("--min-volume-nm3", type=float, default=None,
                   help="drop instances smaller than this (default: the task's own setting)")
    p.add_argument("--precision", default="auto", help="auto, 32 or bf16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=["local", "dask"], default="local")
    p.add_argument("--scheduler", default=None, help="dask scheduler address (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with other settings")
    p.add_argument("--no-resume", action="store_true", help="recompute blocks a previous run finished")
    p.add_argument("--fill-missing", action="store_true",
                   help="read chunks absent from a zarr input or mask as the fill value (default: an error)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--png", action="store_true",
                   help="write DST.png: middle section of input and output (fine-tuned: mask / instance overlay)")
    args = p.parse_args(argv)

    from ssl_em.data.volume import Region, as_volume, spec_path
    from ssl_em.predict.blockwise import predict_volume, tta_axes
    from ssl_em.utils.io import check_output

    inputs = [p for p in (spec_path(args.input), spec_path(args.mask) if args.mask else None) if p is not None]
    check_output(args.output, inputs, overwrite=True, writer="ssl_em.predict")  # before any work
    finetuned = _load_finetuned(args.model)
    if args.instances and finetuned is None:
        raise ConfigError(f"--instances needs a fine-tuned model folder (with its task); {args.model} is not one")
    model = finetuned.model if finetuned is not None else load_model(args.model)
    activation = args.activation
    if activation == "auto":
        activation = "sigmoid" if finetuned is not None else "none"
    src = as_volume(args.input, fill_missing=args.fill_missing)
    if args.roi:
        src = Region(src, parse_roi(args.roi, tuple(src.shape)))
    normalization = finetuned.normalization if finetuned is not None else None
    if finetuned is not None and getattr(src, "voxel_size_known", False):
        from ssl_em.models.pretrained import check_voxel_size

        check_voxel_size(src.voxel_size, finetuned.voxel_size, what=f"input {args.input}", reference="model's training")
    mask = args.mask
    if mask is not None and args.roi:
        mask_vol = as_volume(mask, fill_missing=args.fill_missing, what="mask")
        if tuple(mask_vol.shape) != tuple(src.vol.shape[-3:]):
            raise ConfigError(f"--mask with --roi needs the mask at the input's shape {tuple(src.vol.shape[-3:])}")
        mask = Region(mask_vol, src.box)
    out = predict_volume(
        model, src, args.output, args.block, args.overlap, window_shape=args.window,
        blend=args.blend, batch_size=args.batch_size, precision=args.precision, device=args.device,
        mask=mask, out_dtype=args.out_dtype, normalization=normalization,
        activation=None if activation == "none" else activation, backend=args.backend,
        scheduler=args.scheduler, resume=not args.no_resume, overwrite=args.overwrite, fill_missing=args.fill_missing,
        progress=not args.no_progress, flips=tta_axes(args.window or tuple(b + o for b, o in zip(args.block, args.overlap)))
        if args.tta else (),
    )
    print(f"wrote {args.output}: shape {tuple(out.shape)} (c, z, y, x), chunks {tuple(out.chunks)}, {out.dtype}")
    labels = None
    if args.instances:
        from ssl_em.predict.stitch import blockwise_instances

        spec = finetuned.task.blockwise_instances_args()
        if spec is None:
            raise ConfigError(f"task {finetuned.task.name!r} has no instances (its output is a mask): drop --instances")
        if args.min_volume_nm3 is not None:
            spec["min_volume_nm3"] = args.min_volume_nm3
        # physical sizes (min volume, mito boundaries) refer to the voxel size the model was trained at
        voxel = finetuned.voxel_size or getattr(src, "voxel_size", None) or (1.0, 1.0, 1.0)
        path = Path(_stem(args.output) + "_instances.zarr")
        labels = blockwise_instances(
            args.output, path, block_shape=tuple(out.chunks[1:]), halo=args.instances_halo, voxel_size=voxel,
            backend=args.backend, scheduler=args.scheduler, overwrite=True, progress=not args.no_progress, **spec)
        print(f"wrote {path}: {labels.attrs['num_instances']} {finetuned.task.name} instance(s), shape {tuple(labels.shape)}, "
              f"chunks {tuple(labels.chunks)}")
    if args.png:
        png = Path(_stem(args.output) + ".png")
        if finetuned is not None:
            write_overlay(src, out, png, normalization, labels, getattr(finetuned.task, "threshold", 0.5))
        else:
            write_preview(src, out, png)
        print(f"preview {png}")
    return 0

"""Writing a phantom: a zarr v3 group or npz with its voxel size, and a preview PNG."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ssl_em.data.phantom.tissue import Phantom

_ARRAYS = ("raw", "neurons", "membrane", "mito", "synapse", "vesicles")


def save_phantom(ph: Phantom, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``ph`` atomically as a zarr v3 group (``*.npz``: compressed npz) plus ``<stem>_preview.png``.

    Every array carries ``resolution`` (z, y, x nm); the npz holds ``resolution_nm`` and ``partners``.
    Returns the preview path. An existing ``out`` is replaced only with ``overwrite`` and only when
    ssl-em wrote it (a zarr phantom; an npz cannot say so and is never replaced).
    """
    from ssl_em.utils.io import atomic_path, check_output, writer_attrs

    out = Path(out)
    check_output(out, [], overwrite=overwrite, writer="ssl_em.data.phantom")
    res = [float(v) for v in ph.voxel_size]
    if out.suffix.lower() == ".npz":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:  # a file object: savez must not append .npz
            np.savez_compressed(f, **{k: getattr(ph, k) for k in _ARRAYS}, partners=ph.partners,
                                resolution_nm=np.asarray(res))
    else:
        import zarr

        with atomic_path(out, is_dir=True) as tmp:
            root = zarr.open_group(tmp, mode="w", zarr_format=3)
            root.attrs.update(writer_attrs("ssl_em.data.phantom"))
            root.attrs.update({"resolution": res, "unit": "nm", "axes": "zyx", "seed": ph.seed,
                               "generator": "ssl_em.data.phantom", "partners": ph.partners.tolist(),
                               "config": dataclasses.asdict(ph.config)})
            chunks = tuple(min(n, c) for n, c in zip(ph.shape, (16, 128, 128)))
            for name in _ARRAYS:
                root.create_array(name, data=getattr(ph, name), chunks=chunks,
                                  config={"write_empty_chunks": True},  # complete: an absent chunk is an error
                                  attributes={"resolution": res, "unit": "nm", "axes": "zyx"})
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return save_preview(ph, out.with_name(f"{stem}_preview.png"))


def _overlay(raw: np.ndarray, membrane: np.ndarray, mito: np.ndarray, syn: np.ndarray) -> np.ndarray:
    rgb = np.repeat(raw[..., None] / 255.0, 3, -1)
    for mask, colour, alpha in ((membrane > 0, (0.15, 0.25, 1.0), 0.35), (mito > 0, (1.0, 0.1, 0.1), 0.4),
                                (syn > 0, (0.1, 1.0, 0.1), 0.7)):
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour)
    return rgb


def save_preview(ph: Phantom, path: str | Path) -> Path:
    """PNG: middle section raw, the same with labels tinted, and an xz cut at true aspect (anisotropy)."""
    from ssl_em.utils.plotting import pyplot, save_figure

    plt = pyplot()


    path = Path(path)
    Z, Y, X = ph.shape
    z, y = Z // 2, Y // 2
    vz, vy, vx = ph.voxel_size
    cut = (ph.raw[z], ph.membrane[z], ph.mito[z], ph.synapse[z])
    xz = (ph.raw[:, y], ph.membrane[:, y], ph.mito[:, y], ph.synapse[:, y])
    # equal panel heights at true physical aspect: the xz cut shows how coarse z is
    ratios = [X * vx / (Y * vy)] * 2 + [X * vx / (Z * vz)]
    fig, axes = plt.subplots(1, 3, figsize=(4.8 * sum(ratios) + 0.6, 5.6), dpi=110,
                             gridspec_kw={"width_ratios": ratios, "wspace": 0.04})
    axes[0].imshow(cut[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes[0].set_title(f"raw, section z={z}", fontsize=9)
    axes[1].imshow(_overlay(*cut), interpolation="nearest")
    axes[1].set_title("membrane (blue), mitochondria (red), clefts (green)", fontsize=9)
    axes[2].imshow(_overlay(*xz), aspect=vz / vx, interpolation="nearest")
    axes[2].set_title(f"xz cut, y={y}", fontsize=9)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"ssl-em phantom {Z}x{Y}x{X} voxels, {vz:g}x{vy:g}x{vx:g} nm, seed {ph.seed}")
    save_figure(fig, path, bbox_inches="tight")
    return path

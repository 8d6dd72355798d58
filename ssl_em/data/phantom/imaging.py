"""The phantom's imaging: cytoplasm texture, section blur, per-section gain and illumination, shot
noise and missing sections, rendered in z-slabs from per-section seeds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ssl_em.data.phantom.tissue import PhantomConfig, _slice_rng, _SmoothNoise

_SLAB = 16  # sections rendered at once; fixed so results never depend on memory settings


def _render(cells: np.ndarray, membrane: np.ndarray, mito: np.ndarray, mito_axes: np.ndarray, syn: np.ndarray,
            psd: np.ndarray, ves: tuple[np.ndarray, np.ndarray, np.ndarray], vs: tuple[float, float, float],
            cfg: PhantomConfig, rng: np.random.Generator, seed: int, bar: Any) -> np.ndarray:
    """Paint the tissue in float32, blur (mostly along z), modulate per section, add shot noise -> uint8."""
    shape = cells.shape
    Z, Y, X = shape
    vz, vy, vx = vs
    bright = (cfg.cytoplasm * (1 + cfg.cell_contrast * rng.standard_normal(int(cells.max()) + 1))).astype(np.float32)
    bright[rng.random(bright.size) < cfg.dark_cell_fraction] *= cfg.dark_cell
    low = _SmoothNoise(rng, shape, (120 / vz, 90 / vy, 90 / vx))
    wob = _SmoothNoise(rng, shape, (80 / vz, 40 / vy, 40 / vx))  # bends the cristae
    # cristae: stripes across each mitochondrion's long axis, seen obliquely in-plane
    inplane = rng.normal(size=(len(mito_axes), 3)) * [0, 1, 1]
    cdir = mito_axes * [0.3, 1, 1] + 0.6 * inplane
    cdir /= np.linalg.norm(cdir, axis=1, keepdims=True) + 1e-9
    cdir = (cdir * vs / cfg.cristae_period_nm * 2 * np.pi).astype(np.float32)  # radians per voxel step
    gain = 1 + cfg.section_gain_std * rng.standard_normal(Z)
    offset = cfg.section_offset_std * rng.standard_normal(Z)
    ramp = cfg.illumination_std * rng.standard_normal((Z, 2))
    sigma = (cfg.section_blur_nm / vz, cfg.psf_nm / vy, cfg.psf_nm / vx)
    halo = int(math.ceil(3 * sigma[0])) + 1
    ves_order = np.argsort(ves[0], kind="stable")
    ves_idx, ves_d = ves[0][ves_order], ves[2][ves_order].astype(np.float32)
    psd = np.sort(psd)
    plane = Y * X
    gy = np.linspace(-0.5, 0.5, Y, dtype=np.float32)[:, None]
    gx = np.linspace(-0.5, 0.5, X, dtype=np.float32)[None, :]
    grain = (cfg.granule_nm / vy, cfg.granule_nm / vx)
    grain_norm = 2 * math.sqrt(math.pi * grain[0] * grain[1])  # 1 / std of white noise blurred by grain
    raw = np.empty(shape, np.uint8)
    for z0 in range(0, Z, _SLAB):
        z1 = min(Z, z0 + _SLAB)
        a0, a1 = max(0, z0 - halo), min(Z, z1 + halo)
        sl = slice(a0, a1)
        fine = np.stack([_slice_rng(seed, 0, z).standard_normal((Y, X), np.float32) for z in range(a0, a1)])
        fine = ndi.gaussian_filter(fine, (0, *grain)) * grain_norm  # unit std, ~granule-sized blobs
        tex = low(a0, a1)
        img = bright[cells[sl]] * (1 + cfg.texture * (0.7 * tex + 0.7 * fine))
        img *= 1 - cfg.granules * np.clip(fine - 1.0, 0, 1)  # dark granules (microtubules, ribosomes, vesicles)
        m = mito[sl]
        mm = m > 0
        if mm.any():
            zz, yy, xx = np.nonzero(mm)
            ids = m[mm]
            phase = ((zz + a0) * cdir[ids, 0] + yy * cdir[ids, 1] + xx * cdir[ids, 2] + 2.0 * wob(a0, a1)[mm])
            img[mm] = cfg.mito * (1 + 0.5 * cfg.texture * fine[mm]) + cfg.cristae * np.sin(phase)
            k = 2 * max(1, round(12 / min(vy, vx))) + 1  # ~12 nm double membrane
            rim = mm & (ndi.minimum_filter(mm.view(np.uint8), size=(1, k, k)) == 0)
            img[rim] = cfg.mito_rim
        mem = membrane[sl]
        img[mem] = cfg.membrane * (1 + 0.15 * tex[mem])
        img[syn[sl] > 0] = cfg.cleft
        lo_i, hi_i = a0 * plane, a1 * plane
        p = psd[np.searchsorted(psd, lo_i):np.searchsorted(psd, hi_i)] - lo_i
        img.reshape(-1)[p] = np.minimum(img.reshape(-1)[p], 0.22)
        s, e = np.searchsorted(ves_idx, lo_i), np.searchsorted(ves_idx, hi_i)
        v, dn = ves_idx[s:e] - lo_i, ves_d[s:e]
        # vesicle profile: light lumen, dark rim (blends smoothly at the edge)
        prof = np.where(dn < 0.55, cfg.cytoplasm * 1.05, 0.28 + 0.3 * np.clip((dn - 0.85) / 0.15, 0, 1))
        img.reshape(-1)[v] = prof
        img = ndi.gaussian_filter(img, sigma, mode="nearest")[z0 - a0:z1 - a0]
        for j, z in enumerate(range(z0, z1)):
            sec = img[j] * gain[z] + offset[z] + ramp[z, 0] * gy + ramp[z, 1] * gx
            noise = _slice_rng(seed, 1, z).standard_normal((Y, X), np.float32)
            sec += np.sqrt(np.clip(sec, 1e-3, None) / cfg.dose) * noise
            raw[z] = np.clip(sec * 255 + 0.5, 0, 255).astype(np.uint8)
        bar.update(z1 - z0)
    return raw

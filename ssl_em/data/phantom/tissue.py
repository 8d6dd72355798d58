"""The phantom's tissue: neurites (drifting tubes, a weighted Voronoi partition), membranes between
them, mitochondria and synaptic clefts with their vesicles; every label exact."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ssl_em.errors import ConfigError

_TASKS = {"mito": "mito", "mitochondria": "mito", "synapse": "synapse", "synapses": "synapse",
          "cleft": "synapse", "clefts": "synapse", "neuron": "neurons", "neurons": "neurons",
          "membrane": "membrane", "membranes": "membrane", "vesicles": "vesicles"}


@dataclass(frozen=True)
class PhantomConfig:
    """Tissue and imaging parameters. Lengths in nm; intensities are fractions of full scale (0-1).

    Ranges ``(lo, hi)`` are sampled per object (diameters log-uniform, the rest uniform).
    """

    # neurites
    neurite_diameter_nm: tuple[float, float] = (80.0, 650.0)  # seed ellipses; cells grow ~1.25x to fill space
    neurite_packing: float = 0.65  # area fraction the seed ellipses cover before growing
    drift_slope: float = 0.2  # rms lateral drift of neurites per unit depth (nm / nm)
    flow_scale_nm: float = 1500.0  # correlation length of the drift field
    wiggle_nm: float = 50.0  # amplitude of the smooth membrane undulation (plus 2x at 3x the scale)
    wiggle_scale_nm: float = 200.0  # its correlation length
    membrane_thickness_nm: float = 20.0  # at least one voxel
    # mitochondria
    mito_fraction: float = 0.05  # target fraction of voxels
    mito_diameter_nm: tuple[float, float] = (180.0, 420.0)
    mito_length_nm: tuple[float, float] = (250.0, 1200.0)  # end to end, before clipping to the cell
    mito_axial_fraction: float = 0.35  # share running along the neurite (round profiles); rest oblique/in-plane
    cristae_period_nm: float = 45.0
    # synapses
    synapse_fraction: float = 0.005  # target fraction of voxels labelled cleft
    cleft_diameter_nm: tuple[float, float] = (150.0, 350.0)
    vesicle_diameter_nm: float = 40.0
    vesicles_per_synapse: tuple[int, int] = (15, 40)
    vesicle_cloud_nm: float = 250.0  # radius of the presynaptic vesicle cloud around the cleft centre
    # intensities (before noise)
    cytoplasm: float = 0.66
    cell_contrast: float = 0.07  # std of per-cell brightness (relative)
    # dark (glia-like) profiles as dark as mitochondria: intensity alone cannot tell them apart, as in
    # real neuropil, so a few painted patches are scarce (all labels: ~0.9 IoU; 4 patches: far less)
    dark_cell_fraction: float = 0.3
    dark_cell: float = 0.6  # their brightness relative to other cells
    texture: float = 0.16  # std of cytoplasm texture (relative), half low- and half high-frequency
    granules: float = 0.6  # darkening of the densest cytoplasmic granules
    granule_nm: float = 10.0  # their size (gaussian sigma)
    membrane: float = 0.16
    mito: float = 0.40
    mito_rim: float = 0.24
    cristae: float = 0.10  # stripe amplitude inside mitochondria
    cleft: float = 0.12
    # imaging
    section_blur_nm: float = 16.0  # gaussian sigma along z (section thickness)
    psf_nm: float = 6.0  # gaussian sigma in-plane
    dose: float = 300.0  # electrons per voxel at full white; lower is noisier (Poisson-like)
    section_gain_std: float = 0.06
    section_offset_std: float = 0.03
    illumination_std: float = 0.03  # std of the in-plane brightness ramp per section

    def __post_init__(self) -> None:
        for name in ("neurite_diameter_nm", "mito_diameter_nm", "mito_length_nm", "cleft_diameter_nm",
                     "vesicles_per_synapse"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"PhantomConfig.{name}={getattr(self, name)!r}: need 0 < lo <= hi")
        for name in ("neurite_packing", "mito_fraction", "synapse_fraction", "mito_axial_fraction",
                     "dark_cell_fraction", "dark_cell"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"PhantomConfig.{name}={getattr(self, name)!r}: must lie in [0, 1]")
        if self.neurite_packing <= 0 or self.dose <= 0 or self.membrane_thickness_nm <= 0:
            raise ConfigError("PhantomConfig: neurite_packing, dose and membrane_thickness_nm must be > 0")


@dataclass
class Phantom:
    """A phantom volume; every array is (z, y, x) with the same shape.

    ``raw`` uint8 image; ``neurons`` uint32 cell ids (1..n, 0 on membranes); ``membrane`` uint8 0/1;
    ``mito`` uint32 mitochondrion ids; ``synapse`` uint32 cleft ids (a subset of membrane voxels);
    ``vesicles`` uint32 cleft id of the synapse whose presynaptic vesicle a voxel belongs to;
    ``partners`` (n_clefts, 2) uint32 (pre, post) neuron ids, row k-1 for cleft k;
    ``voxel_size`` (z, y, x) nm.
    """

    raw: np.ndarray
    neurons: np.ndarray
    membrane: np.ndarray
    mito: np.ndarray
    synapse: np.ndarray
    vesicles: np.ndarray
    partners: np.ndarray
    voxel_size: tuple[float, float, float]
    seed: int
    config: PhantomConfig

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.raw.shape  # type: ignore[return-value]

    def labels(self, task: str) -> np.ndarray:
        """Label array for ``"mito" | "synapse" | "neuron" | "membrane"`` (instance ids, or 0/1 for membrane)."""
        key = _TASKS.get(task.lower())
        if key is None:
            raise ConfigError(f"phantom task {task!r} is unknown; choose mito, synapse, neuron or membrane")
        return getattr(self, key)


# -- smooth random fields ----------------------------------------------------------------------------
def _lerp_axis(a: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``a`` at fractional indices ``pos`` along ``axis``."""
    i0 = np.floor(pos).astype(np.intp)
    w = (pos - i0).astype(np.float32).reshape([-1 if k == axis else 1 for k in range(a.ndim)])
    return np.take(a, i0, axis=axis) * (1 - w) + np.take(a, i0 + 1, axis=axis) * w


class _SmoothNoise:
    """Random field of roughly unit std and correlation length ``corr`` voxels per axis, read by z-range.

    White noise on a coarse grid, blurred, then linearly upsampled; y and x are upsampled once
    and cached, z per request, so slabs cost only their own size.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], corr: tuple[float, ...]):
        corr = tuple(max(float(c), 1.0) for c in corr)
        coarse = ndi.gaussian_filter(rng.standard_normal([int(n / c) + 4 for n, c in zip(shape, corr)],
                                                         dtype=np.float32), 0.7)
        coarse /= coarse.std() + 1e-6
        phase = rng.random(3)
        self._pos = [1 + phase[k] + np.arange(shape[k]) / corr[k] for k in range(3)]
        self._yx = _lerp_axis(_lerp_axis(coarse, self._pos[2], 2), self._pos[1], 1)

    def __call__(self, z0: int, z1: int) -> np.ndarray:
        return _lerp_axis(self._yx, self._pos[0][z0:z1], 0)


def _slice_rng(seed: int, stream: int, z: int) -> np.random.Generator:
    """Per-section generator: a section's noise is the same whatever slab it is rendered in."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(100 + stream, z)))


# -- neurites ----------------------------------------------------------------------------------------
@dataclass
class _Tracks:
    pos: np.ndarray  # (Z, N, 2) ellipse centres per section, nm, relative to the field of view origin
    radius: np.ndarray  # (Z, N) nm
    elong: np.ndarray  # (N,) semi-axes are radius * elong and radius / elong
    angle: np.ndarray  # (N,) radians


def _tracks(shape: tuple[int, int, int], vs: tuple[float, float, float], cfg: PhantomConfig,
            rng: np.random.Generator) -> _Tracks:
    """Pack seed ellipses in the plane (large first) and advect them through z by a curl-noise drift."""
    Z, Y, X = shape
    vz, vy, vx = vs
    d0, d1 = cfg.neurite_diameter_nm
    margin = 1.5 * cfg.drift_slope * Z * vz + d1  # neurites drift into view from here
    H, W = Y * vy + 2 * margin, X * vx + 2 * margin
    mean_d2 = (d1**2 - d0**2) / (2 * math.log(d1 / d0)) if d1 > d0 else d0**2
    n = int(cfg.neurite_packing * H * W / (math.pi / 4 * mean_d2)) + 1
    radii = np.sort(np.exp(rng.uniform(math.log(d0), math.log(d1), n)))[::-1] / 2
    acc = np.zeros((n, 3))  # y, x, r of accepted seeds (random sequential adsorption)
    k = 0
    for r in radii:
        cand = rng.uniform((0, 0), (H, W), size=(24, 2))
        if k:
            gap = np.hypot(cand[:, None, 0] - acc[None, :k, 0], cand[:, None, 1] - acc[None, :k, 1]) - acc[:k, 2]
            ok = np.flatnonzero(gap.min(1) > 1.05 * r)
            if not ok.size:
                continue
            cand = cand[ok]
        acc[k] = (*cand[0], r)
        k += 1
    seeds = acc[:k]

    # Divergence-free drift v = curl(psi): area-preserving, so cells neither pile up nor tear apart.
    L = cfg.flow_scale_nm
    psi = ndi.gaussian_filter(rng.standard_normal((int(Z * vz / L) + 4, int(H / L) + 4, int(W / L) + 4)), 1.0)
    flow = np.stack([np.gradient(psi, axis=2), -np.gradient(psi, axis=1)])
    flow /= np.sqrt((flow**2).sum(0).mean()) + 1e-12
    theta = rng.uniform(0, 2 * np.pi)
    tilt = rng.uniform(0.3, 1.0) * cfg.drift_slope * np.array([np.sin(theta), np.cos(theta)])
    pos = np.empty((Z, k, 2))
    p = seeds[:, :2].copy()
    for z in range(Z):  # loop over sections, vectorised over seeds
        pos[z] = p
        coords = np.stack([np.full(k, z * vz / L + 1), p[:, 0] / L + 1, p[:, 1] / L + 1])
        v = np.stack([ndi.map_coordinates(f, coords, order=1, mode="nearest") for f in flow], 1)
        p = p + (tilt + 0.7 * cfg.drift_slope * v) * vz
    # varicosities: radius swells and thins slowly along the neurite
    depth = np.arange(Z)[:, None] * vz
    amp, lam, phi = rng.uniform(0, 0.25, k), rng.uniform(1000, 4000, k), rng.uniform(0, 2 * np.pi, k)
    radius = seeds[:, 2] * (1 + amp * np.sin(2 * np.pi * depth / lam + phi))
    elong = np.sqrt(np.clip(1 + np.abs(rng.normal(0, 0.25, k)), 1, 1.8))
    return _Tracks(pos - margin, radius, elong, rng.uniform(0, np.pi, k))


def _cells(shape: tuple[int, int, int], vs: tuple[float, float, float], cfg: PhantomConfig,
           rng: np.random.Generator, tr: _Tracks, bar: Any) -> np.ndarray:
    """Per section: multiplicatively weighted Voronoi of the seed ellipses, then a smooth warp.

    Each pixel goes to the seed with the smallest elliptical distance divided by the seed's radius,
    so boundaries between unequal cells are arcs curving around the smaller one (round small
    profiles), as membranes under tension do. (Z, Y, X) uint32 ids >= 1 (track index + 1).
    """
    Z, Y, X = shape
    _, vy, vx = vs
    amp = cfg.wiggle_nm / min(vy, vx)
    pad = int(9 * amp) + 4  # room for the warp
    Hp, Wp = Y + 2 * pad, X + 2 * pad
    ca, sa = np.cos(tr.angle), np.sin(tr.angle)
    corr = np.array([cfg.wiggle_scale_nm / v for v in vs])
    warps = [_SmoothNoise(rng, shape, c) for c in (corr, corr, 3 * corr, 3 * corr)]  # y, x fine; y, x coarse
    yy, xx = np.mgrid[0:Y, 0:X]
    ys, xs = (np.arange(Hp) - pad + 0.5) * vy, (np.arange(Wp) - pad + 0.5) * vx  # pixel centres, nm
    best = np.empty((Hp, Wp), np.float32)
    lab = np.empty((Hp, Wp), np.uint32)
    cells = np.empty(shape, np.uint32)
    for z in range(Z):  # loop over sections, and over the seeds near the frame: each step is vectorised
        best[:] = np.inf
        lab[:] = 0
        reach = 2.0 * tr.radius[z] * tr.elong  # beyond this a seed never wins against its packed neighbours
        cy, cx = tr.pos[z, :, 0], tr.pos[z, :, 1]
        near = np.flatnonzero((cy + reach > ys[0]) & (cy - reach < ys[-1])
                              & (cx + reach > xs[0]) & (cx - reach < xs[-1]))
        for i in near:
            y0, y1 = np.searchsorted(ys, [cy[i] - reach[i], cy[i] + reach[i]])
            x0, x1 = np.searchsorted(xs, [cx[i] - reach[i], cx[i] + reach[i]])
            dy, dx = (ys[y0:y1] - cy[i])[:, None], (xs[x0:x1] - cx[i])[None, :]
            a, b = tr.radius[z, i] * tr.elong[i], tr.radius[z, i] / tr.elong[i]
            q = ((dy * ca[i] + dx * sa[i]) / a) ** 2 + ((dx * ca[i] - dy * sa[i]) / b) ** 2
            win = q < best[y0:y1, x0:x1]
            best[y0:y1, x0:x1][win] = q[win]
            lab[y0:y1, x0:x1][win] = i + 1
        if not lab.all():  # a gap no seed reaches: give it to the nearest labelled pixel
            idx = ndi.distance_transform_edt(lab == 0, return_distances=False, return_indices=True)
            lab = lab[idx[0], idx[1]]
        wy = amp * (warps[0](z, z + 1)[0] + 2 * warps[2](z, z + 1)[0])
        wx = amp * (warps[1](z, z + 1)[0] + 2 * warps[3](z, z + 1)[0])
        sy = np.clip(np.rint(yy + pad + wy), 0, Hp - 1).astype(np.intp)
        sx = np.clip(np.rint(xx + pad + wx), 0, Wp - 1).astype(np.intp)
        cells[z] = lab[sy, sx]
        bar.update(1)
    return cells


def _membrane_width(vs: tuple[float, float, float], cfg: PhantomConfig) -> int:
    return max(1, round(cfg.membrane_thickness_nm / min(vs[1], vs[2])))


def _membranes(cells: np.ndarray, vs: tuple[float, float, float], cfg: PhantomConfig) -> np.ndarray:
    """In-plane band where two cells meet (bool); a window of k pixels marks a band k - 1 wide."""
    size = (1, _membrane_width(vs, cfg) + 1, _membrane_width(vs, cfg) + 1)
    return ndi.minimum_filter(cells, size=size) != ndi.maximum_filter(cells, size=size)


def _split_fragments(neurons: np.ndarray, membrane: np.ndarray, min_voxels: int) -> np.ndarray:
    """Make every id one 3-D connected piece (6-connectivity); return the relabelled neurons.

    Pieces under ``min_voxels`` (thin wedges cut off by membranes) become membrane; larger extra
    pieces of an id (a neurite leaving and re-entering the crop) get ids of their own.
    """
    import cc3d

    cc = cc3d.connected_components(neurons, connectivity=6)
    size = np.bincount(cc.ravel())
    owner = np.zeros(size.size, np.int64)
    owner[cc.ravel()] = neurons.ravel()
    order = np.lexsort((-size, owner))  # by id, largest piece first
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    new = np.zeros(size.size, np.uint32)
    new[order[first]] = owner[order[first]]
    extra = order[~first]
    new[extra] = owner.max() + 1 + np.arange(extra.size)
    new[(size < min_voxels) | (owner == 0)] = 0
    out = new[cc]
    membrane |= (out == 0) & (neurons > 0)
    return out


def _sides(neurons: np.ndarray, vs: tuple[float, float, float], cfg: PhantomConfig) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest neuron id seen in-plane around each voxel, across a membrane's width."""
    k = _membrane_width(vs, cfg) + 3
    lo = ndi.minimum_filter(np.where(neurons > 0, neurons, np.iinfo(np.uint32).max), size=(1, k, k))
    return lo, ndi.maximum_filter(neurons, size=(1, k, k))


# -- mitochondria ------------------------------------------------------------------------------------
def _box(center: np.ndarray, half: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    lo = np.maximum(np.floor(center - half).astype(int), 0)
    hi = np.minimum(np.ceil(center + half).astype(int) + 1, shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), lo


def _component_at(mask: np.ndarray, point: np.ndarray) -> np.ndarray:
    """The connected part of ``mask`` containing ``point`` (empty if the point is outside)."""
    if not mask[tuple(point)]:
        return np.zeros_like(mask)
    lab, _ = ndi.label(mask)
    return lab == lab[tuple(point)]


def _mitochondria(cells: np.ndarray, interior: np.ndarray, vs: tuple[float, float, float], cfg: PhantomConfig,
                  rng: np.random.Generator, tr: _Tracks) -> tuple[np.ndarray, np.ndarray]:
    """Capsules clipped to their host's cytoplasm until ``mito_fraction`` is reached. -> (ids, axes (n+1, 3))."""
    shape = cells.shape
    Z, Y, X = shape
    vsa = np.asarray(vs)
    mito = np.zeros(shape, np.uint32)
    axes = [np.zeros(3)]
    target, total = cfg.mito_fraction * cells.size, 0
    m0, m1 = cfg.mito_diameter_nm
    for _ in range(int(60 * target / max(np.pi / 4 * m0**2 * m0 / np.prod(vsa), 1)) + 50):
        if total >= 0.9 * target:
            break
        z = int(rng.integers(Z))
        diam = math.exp(rng.uniform(math.log(m0), math.log(m1)))
        r_host = tr.radius[z]
        hosts = np.flatnonzero(r_host / tr.elong > 0.6 * diam)  # minor semi-axis: neurites wide enough for it
        if not hosts.size:
            continue
        h = rng.choice(hosts, p=r_host[hosts] ** 2 / (r_host[hosts] ** 2).sum())
        off = rng.normal(0, 0.25, 2) * max(r_host[h] / tr.elong[h] - diam / 2, 0)
        c = np.array([z, *((tr.pos[z, h] + off) / vsa[1:] - 0.5)])
        ci = np.rint(c).astype(int)
        if np.any(ci < 0) or np.any(ci >= shape) or cells[tuple(ci)] != h + 1 or not interior[tuple(ci)]:
            continue
        if rng.random() < cfg.mito_axial_fraction:  # along the neurite's local direction, slightly jittered
            zn = min(z + 1, Z - 1)
            drift = (tr.pos[zn, h] - tr.pos[max(zn - 1, 0), h]) / vsa[0]
            u = np.array([1.0, *drift]) + rng.normal(0, 0.15, 3)
        else:  # oblique to in-plane: polar angle 50-90 degrees from z
            pol, az = np.deg2rad(rng.uniform(50, 90)), rng.uniform(0, 2 * np.pi)
            u = np.array([np.cos(pol), np.sin(pol) * np.sin(az), np.sin(pol) * np.cos(az)])
        u /= np.linalg.norm(u)
        half_len = max(math.exp(rng.uniform(*np.log(cfg.mito_length_nm))) - diam, 0) / 2
        rad = diam / 2
        sl, lo = _box(c, (half_len * np.abs(u) + rad) / vsa + 1, shape)
        g = [(np.arange(s.start, s.stop) - c[k]) * vsa[k] for k, s in enumerate(sl)]
        gz, gy, gx = g[0][:, None, None], g[1][None, :, None], g[2][None, None, :]
        t = np.clip(gz * u[0] + gy * u[1] + gx * u[2], -half_len, half_len)
        d2 = (gz - t * u[0]) ** 2 + (gy - t * u[1]) ** 2 + (gx - t * u[2]) ** 2
        mask = (d2 <= rad**2) & (cells[sl] == h + 1) & interior[sl] & (mito[sl] == 0)
        mask = _component_at(mask, ci - lo)
        size = int(mask.sum())
        if size < 0.1 * np.pi * rad**2 * vs[0] / np.prod(vsa) or total + size > 1.3 * target:
            continue
        axes.append(u)
        mito[sl][mask] = len(axes) - 1
        total += size
    return mito, np.array(axes)


# -- synapses ----------------------------------------------------------------------------------------
def _synapses(cells: np.ndarray, membrane: np.ndarray, lo: np.ndarray, hi: np.ndarray, interior: np.ndarray,
              mito: np.ndarray, vs: tuple[float, float, float], cfg: PhantomConfig, rng: np.random.Generator):
    """Membrane patches between two cells with vesicles on the presynaptic side.

    Returns cleft ids, postsynaptic-density flat indices, vesicle (flat index, cleft id, normalised
    distance from the vesicle centre) and (pre, post) cell ids per cleft.
    """
    shape = cells.shape
    vsa = np.asarray(vs)
    syn = np.zeros(shape, np.uint32)
    cand = np.flatnonzero(membrane & (lo < hi) & (hi > 0))
    if not cand.size:
        return syn, np.zeros(0, np.intp), (np.zeros(0, np.intp), np.zeros(0, np.uint32), np.zeros(0)), np.zeros((0, 2))
    psd, ves_idx, ves_id, ves_d, partners = [], [], [], [], []
    target, total = cfg.synapse_fraction * cells.size, 0
    rv = cfg.vesicle_diameter_nm / 2
    st = np.stack(np.meshgrid(*[np.arange(-(int(rv / v) + 1), int(rv / v) + 2) for v in vs], indexing="ij"),
                  -1).reshape(-1, 3)  # vesicle stencil offsets
    for _ in range(int(40 * target / 100) + 50):
        if total >= 0.9 * target:
            break
        ci = np.array(np.unravel_index(cand[rng.integers(cand.size)], shape))
        a, b = int(lo[tuple(ci)]), int(hi[tuple(ci)])
        pre, post = (a, b) if rng.random() < 0.5 else (b, a)
        rad = math.exp(rng.uniform(*np.log(cfg.cleft_diameter_nm))) / 2
        sl, o = _box(ci, rad / vsa + 3, shape)
        g = [(np.arange(s.start, s.stop) - ci[k]) * vsa[k] for k, s in enumerate(sl)]
        d2 = g[0][:, None, None] ** 2 + g[1][None, :, None] ** 2 + g[2][None, None, :] ** 2
        cleft = membrane[sl] & (lo[sl] == a) & (hi[sl] == b) & (d2 <= rad**2) & (syn[sl] == 0)
        cleft = _component_at(cleft, ci - o)
        size = int(cleft.sum())
        if size < 8 or total + size > 1.3 * target:
            continue
        # postsynaptic density: a thin dark layer of the post cell along the cleft
        near = ndi.maximum_filter(cleft.view(np.uint8), size=(1, 5, 5)) > 0
        dens = near & (cells[sl] == post) & ~membrane[sl]
        # vesicles: random centres in the presynaptic cytoplasm near the cleft, away from mitochondria
        n_ves = int(rng.integers(cfg.vesicles_per_synapse[0], cfg.vesicles_per_synapse[1] + 1))
        dirs = rng.normal(size=(8 * n_ves, 3))
        cen = ci + dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * (
            rng.uniform(rv * 1.5, cfg.vesicle_cloud_nm, (8 * n_ves, 1))) / vsa
        cl = np.rint(cen).astype(int)
        inside = np.all((cl >= 0) & (cl < shape), axis=1)
        cen, at = cen[inside], tuple(cl[inside].T)
        cen = cen[(cells[at] == pre) & interior[at] & (mito[at] == 0)][:n_ves]
        if len(cen) < 3:
            continue
        vox = np.rint(cen).astype(int)[:, None, :] + st[None]  # (V, K, 3)
        dn = np.linalg.norm((vox - cen[:, None, :]) * vsa, axis=-1) / rv
        vox, dn = vox.reshape(-1, 3), dn.ravel()
        ok = (dn <= 1) & np.all((vox >= 0) & (vox < shape), axis=1)
        vox, dn = vox[ok], dn[ok]
        at = tuple(vox.T)
        ok = (cells[at] == pre) & interior[at] & (mito[at] == 0)
        partners.append((pre, post))
        k = len(partners)
        syn[sl][cleft] = k
        total += size
        flat = np.ravel_multi_index(vox[ok].T, shape)
        ves_idx.append(flat)
        ves_id.append(np.full(flat.size, k, np.uint32))
        ves_d.append(dn[ok])
        psd.append(np.ravel_multi_index((np.argwhere(dens) + o).T, shape))

    def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dt)

    return (syn, cat(psd, np.intp), (cat(ves_idx, np.intp), cat(ves_id, np.uint32), cat(ves_d, np.float64)),
            np.array(partners, np.uint32).reshape(-1, 2))

"""3-D augmentations for EM crops that keep labels aligned with the raw.

A sample is a ``dict[str, np.ndarray]`` of spatial arrays whose last three axes are (z, y, x):
``"raw"`` (float32, already normalised to about 0..1, optionally with leading channels), and any
others (``"label"``, ``"mask"``, ...) that must move with it. Every transform is a small callable
``t(sample, rng) -> sample`` applied with probability ``p``:

* geometric ops (flip, rot90, elastic, misaligned section) act on every array; interpolation is
  linear for raw keys and nearest for everything else, so label ids are never blended;
* intensity ops (contrast, brightness, gamma, noise, blur, missing section, contrast jump) act on
  raw keys only.

An optional ``"overlap"`` entry, an int array (3, 2) of [start, stop) per axis, is a box in the
sample's own coordinates (``TwoViewDataset`` uses it); flips and rotations carry it along. Elastic
and misalignment move voxels by a few pixels only, so the box stays approximately right.

Transforms may return views of their inputs (flips); callers that need contiguous memory copy once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Sample = dict[str, np.ndarray]
RAW_KEYS = ("raw",)
BOX_KEY = "overlap"


def _spatial(sample: Sample) -> list[str]:
    """Keys of arrays that follow geometric ops (everything but the overlap box)."""
    return [k for k, v in sample.items() if k != BOX_KEY and isinstance(v, np.ndarray) and v.ndim >= 3]


def _as_float(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float32 else x.astype(np.float32)


@dataclass
class Transform:
    """Base: applies :meth:`apply` with probability ``p``; ``raw_keys`` get intensity ops."""

    p: float = 1.0
    raw_keys: tuple[str, ...] = RAW_KEYS

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.p >= 1.0 or rng.random() < self.p:
            return self.apply(dict(sample), rng)
        return sample

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------- geometric


@dataclass
class RandomFlip(Transform):
    """Flip each of ``axes`` (0 = z, 1 = y, 2 = x) independently with probability 1/2."""

    axes: tuple[int, ...] = (0, 1, 2)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        flips = [a for a in self.axes if rng.random() < 0.5]
        if not flips:
            return sample
        for k in _spatial(sample):
            sample[k] = np.flip(sample[k], axis=tuple(a - 3 for a in flips))
        if BOX_KEY in sample:
            box, n = sample[BOX_KEY].copy(), sample["raw"].shape[-3:]
            for a in flips:  # [s, e) -> [n - e, n - s)
                box[a] = n[a] - box[a, ::-1]
            sample[BOX_KEY] = box
        return sample


@dataclass
class RandomRot90(Transform):
    """Rotate by k * 90 degrees in the given planes (default y-x only: z is anisotropic in ssTEM).

    A quarter turn swaps the plane's two axes, so it is used only where ``swap_ok`` (their voxel
    sizes match; pass False for e.g. 4 x 5 nm pixels) and the patch is square in that plane;
    otherwise only k in {0, 2} (a half turn, equal to a double flip) is drawn.
    """

    planes: tuple[tuple[int, int], ...] = ((1, 2),)
    swap_ok: bool = True

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        shape = sample["raw"].shape[-3:]
        for a, b in self.planes:
            quarter_ok = self.swap_ok and shape[a] == shape[b]
            k = int(rng.integers(4)) if quarter_ok else 2 * int(rng.integers(2))
            if k == 0:
                continue
            for key in _spatial(sample):
                sample[key] = np.rot90(sample[key], k, axes=(a - 3, b - 3))
            if BOX_KEY in sample:
                sample[BOX_KEY] = _rot90_box(sample[BOX_KEY], k, a, b, shape)
        return sample


def _rot90_box(box: np.ndarray, k: int, a: int, b: int, shape: Sequence[int]) -> np.ndarray:
    """Box (3, 2) after ``np.rot90(x, k, axes=(a, b))`` of an array of ``shape``."""
    box, shape = box.copy(), list(shape)
    for _ in range(k % 4):  # one turn: new[a] = old[b] reversed, new[b] = old[a]
        box[[a, b]] = np.stack([shape[b] - box[b, ::-1], box[a]])
        shape[a], shape[b] = shape[b], shape[a]
    return box


@dataclass
class ElasticDeform(Transform):
    """Smooth random in-plane displacement, the same for every section (keeps 3-D continuity).

    ``alpha``: displacement scale in pixels; ``spacing``: distance in pixels between the random
    control points, which are upsampled with cubic splines (larger = smoother). Resampling is
    ``scipy.ndimage.map_coordinates(order=1 raw / order=0 others, mode="mirror")`` per section,
    done as four precomputed gathers over all sections at once (several times faster).
    """

    alpha: float = 4.0
    spacing: int = 32

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        from scipy import ndimage

        h, w = sample["raw"].shape[-2:]
        # displacement: random control points every `spacing` px, cubic-spline upsampled (smooth)
        grid = (max(2, -(-h // self.spacing) + 1), max(2, -(-w // self.spacing) + 1))
        coarse = rng.normal(0.0, self.alpha, size=(2, *grid)).astype(np.float32)
        disp = np.stack([ndimage.zoom(c, (h / grid[0], w / grid[1]), order=3)[:h, :w] for c in coarse])
        cy = np.arange(h, dtype=np.float32)[:, None] + disp[0]  # (H, W): where each output pixel reads
        cx = np.arange(w, dtype=np.float32)[None, :] + disp[1]
        y0, x0 = np.floor(cy), np.floor(cx)
        wy, wx = cy - y0, cx - x0
        y0, x0 = y0.astype(np.intp), x0.astype(np.intp)
        # gathers with precomputed (H, W) indices move every section at once (no per-slice loop)
        near = (_mirror(np.floor(cy + 0.5).astype(np.intp), h), _mirror(np.floor(cx + 0.5).astype(np.intp), w))
        taps = [(_mirror(y0 + dy, h), _mirror(x0 + dx, w), (wy if dy else 1 - wy) * (wx if dx else 1 - wx))
                for dy in (0, 1) for dx in (0, 1)]
        for key in _spatial(sample):
            arr = sample[key]
            if key in self.raw_keys:  # bilinear
                arr = _as_float(arr)
                sample[key] = sum(arr[..., iy, ix] * wt for iy, ix, wt in taps)
            else:  # nearest: ids are never blended
                sample[key] = arr[..., near[0], near[1]]
        return sample


def _mirror(i: np.ndarray, n: int) -> np.ndarray:
    """Reflect indices into 0..n-1 without repeating the edge (scipy's 'mirror' mode)."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)


@dataclass
class MisalignedSection(Transform):
    """ssTEM misalignment: sections from a random z on (or one section, a 'slip') shift in-plane.

    Labels and masks shift with the raw (the tissue moved, not the annotation); pixels that enter
    from outside the crop replicate the edge and are set to 0 in ``"mask"`` (not supervised).
    """

    max_shift: int = 8
    p_slip: float = 0.5

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        d = sample["raw"].shape[-3]
        if d < 2 or self.max_shift < 1:
            return sample
        z0 = int(rng.integers(1, d))
        zs = slice(z0, z0 + 1) if rng.random() < self.p_slip else slice(z0, d)
        dy, dx = 0, 0
        while dy == 0 and dx == 0:
            dy, dx = (int(v) for v in rng.integers(-self.max_shift, self.max_shift + 1, size=2))
        for key in _spatial(sample):
            arr = np.array(sample[key])  # writable copy
            arr[..., zs, :, :] = _shift_edge(arr[..., zs, :, :], dy, dx)
            if key == "mask":
                h, w = arr.shape[-2:]
                moved = arr[..., zs, :, :]  # a view: zero the strips that came from outside
                moved[..., : max(dy, 0), :] = 0
                moved[..., h + min(dy, 0) :, :] = 0
                moved[..., :, : max(dx, 0)] = 0
                moved[..., :, w + min(dx, 0) :] = 0
            sample[key] = arr
        return sample


def _shift_edge(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift the last two axes by (dy, dx) pixels, filling with the nearest edge value."""
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(abs(dy), abs(dy)), (abs(dx), abs(dx))]
    padded = np.pad(x, pad, mode="edge")
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return padded[..., y0 : y0 + h, x0 : x0 + w]


# --------------------------------------------------------------------------- intensity (raw only)


@dataclass
class RandomContrast(Transform):
    """Scale raw around its mean by a factor in ``factor``."""

    factor: tuple[float, float] = (0.75, 1.25)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        c = np.float32(rng.uniform(*self.factor))
        for k in self.raw_keys:
            x = _as_float(sample[k])
            m = x.mean(dtype=np.float32)
            sample[k] = (x - m) * c + m
        return sample


@dataclass
class RandomBrightness(Transform):
    """Add an offset in ``delta`` (raw units, i.e. fractions of the 0..1 range)."""

    delta: tuple[float, float] = (-0.1, 0.1)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        b = np.float32(rng.uniform(*self.delta))
        for k in self.raw_keys:
            sample[k] = _as_float(sample[k]) + b
        return sample


@dataclass
class RandomGamma(Transform):
    """``x ** gamma`` on raw clipped to 0..1 (gamma drawn log-uniformly in ``gamma``)."""

    gamma: tuple[float, float] = (0.75, 1.33)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        g = np.float32(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))
        for k in self.raw_keys:
            sample[k] = np.power(np.clip(_as_float(sample[k]), 0.0, 1.0), g)
        return sample


@dataclass
class GaussianNoise(Transform):
    """Additive gaussian noise with a standard deviation drawn from ``sigma``."""

    sigma: tuple[float, float] = (0.0, 0.05)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        s = np.float32(rng.uniform(*self.sigma))
        for k in self.raw_keys:
            x = _as_float(sample[k])
            sample[k] = x + s * rng.standard_normal(x.shape, dtype=np.float32)
        return sample


@dataclass
class GaussianBlur(Transform):
    """In-plane gaussian blur (sigma in pixels drawn from ``sigma``); z is never blurred (sections)."""

    sigma: tuple[float, float] = (0.0, 1.0)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        from scipy import ndimage

        s = float(rng.uniform(*self.sigma))
        for k in self.raw_keys:
            x = _as_float(sample[k])
            sample[k] = ndimage.gaussian_filter(x, [0.0] * (x.ndim - 2) + [s, s])
        return sample


@dataclass
class MissingSection(Transform):
    """Blank up to ``max_sections`` z-sections of the raw (lost or damaged sections); labels stay.

    ``fill``: "mean" (the crop's mean, as a flat grey section) or "zero".
    """

    max_sections: int = 1
    fill: str = "mean"

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for k in self.raw_keys:
            x = np.array(_as_float(sample[k]))
            d = x.shape[-3]
            n = int(rng.integers(1, min(self.max_sections, d) + 1))
            zs = rng.choice(d, size=n, replace=False)
            x[..., zs, :, :] = x.mean() if self.fill == "mean" else 0.0
            sample[k] = x
        return sample


@dataclass
class ContrastJump(Transform):
    """Per-section gain and offset (section thickness and staining vary): each z-section changes
    with probability ``p_section`` by gain in ``gain`` and offset in ``offset``."""

    p_section: float = 0.3
    gain: tuple[float, float] = (0.8, 1.2)
    offset: tuple[float, float] = (-0.1, 0.1)

    def apply(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for k in self.raw_keys:
            x = _as_float(sample[k])
            d = x.shape[-3]
            hit = rng.random(d) < self.p_section
            g = np.where(hit, rng.uniform(*self.gain, size=d), 1.0).astype(np.float32)[:, None, None]
            o = np.where(hit, rng.uniform(*self.offset, size=d), 0.0).astype(np.float32)[:, None, None]
            sample[k] = x * g + o
        return sample


# --------------------------------------------------------------------------- composition


@dataclass
class Compose:
    """Apply ``transforms`` in order; each decides on its own probability."""

    transforms: list = field(default_factory=list)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __len__(self) -> int:
        return len(self.transforms)


def geometric_only(augment: Compose) -> Compose:
    """The geometric part of a pipeline (e.g. to check alignment or for label-only previews)."""
    geo = (RandomFlip, RandomRot90, ElasticDeform, MisalignedSection)
    return Compose([t for t in augment.transforms if isinstance(t, geo)])


def default_em_augment(
    anisotropic: bool = True, strength: float = 1.0, square_pixels: bool = True, artefacts: bool = True
) -> Compose:
    """The standard EM pipeline: flips, rotations, elastic, intensity and section artefacts.

    ``anisotropic``: z is thicker than y/x (ssTEM), so rotations stay in the y-x plane; with
    False (FIB-SEM, isotropic) quarter turns are drawn in all three planes where the patch is
    square. ``strength`` scales probabilities and magnitudes (0 = identity, 1 = default, up to ~2).
    ``square_pixels``: y and x voxel sizes match, so quarter turns that swap y/x are allowed.
    ``artefacts``: include missing/misaligned sections and contrast jumps (ssTEM artefacts).
    """
    s = float(strength)
    if s <= 0:
        return Compose([])
    p = lambda v: min(1.0, v * s)  # noqa: E731
    amp = lambda lo, hi, c=1.0: (c - (c - lo) * s, c + (hi - c) * s)  # noqa: E731
    planes = ((1, 2),) if anisotropic else ((1, 2), (0, 2), (0, 1))
    ts: list = [
        RandomFlip(),
        RandomRot90(planes=planes, swap_ok=square_pixels),
        ElasticDeform(p=p(0.3), alpha=4.0 * s),
        RandomContrast(p=p(0.5), factor=amp(0.75, 1.25)),
        RandomBrightness(p=p(0.5), delta=(-0.1 * s, 0.1 * s)),
        RandomGamma(p=p(0.3), gamma=(0.75 ** s, 1.33 ** s)),
        GaussianBlur(p=p(0.2), sigma=(0.0, 1.0 * s)),
        GaussianNoise(p=p(0.3), sigma=(0.0, 0.05 * s)),
    ]
    if artefacts:
        ts += [
            MisalignedSection(p=p(0.1), max_shift=max(1, round(8 * s))),
            MissingSection(p=p(0.1), max_sections=1),
            ContrastJump(p=p(0.2), gain=amp(0.8, 1.2), offset=(-0.1 * s, 0.1 * s)),
        ]
    return Compose(ts)

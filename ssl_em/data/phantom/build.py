"""``make_phantom``: tissue then imaging, from one seed split into independent streams."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ssl_em.data.phantom.imaging import _render
from ssl_em.data.phantom.tissue import (
    Phantom,
    PhantomConfig,
    _cells,
    _membranes,
    _mitochondria,
    _sides,
    _split_fragments,
    _synapses,
    _tracks,
)
from ssl_em.errors import ConfigError
from ssl_em.utils.shapes import to_triple


def make_phantom(shape: tuple[int, int, int] = (64, 256, 256), voxel_size: tuple[float, float, float] = (40, 8, 8),
                 seed: int = 0, *, missing_section_rate: float = 0.0, config: PhantomConfig | None = None,
                 progress: bool = False) -> Phantom:
    """Generate a neuropil phantom of ``shape`` (z, y, x) voxels of ``voxel_size`` (z, y, x nm).

    The same arguments always give the same phantom; different seeds give different tissue.
    ``missing_section_rate`` is the probability that a section's raw is blank or pure noise
    (labels are untouched, as in real data where the tissue exists but the image is lost).
    Memory is about 50 bytes per voxel while generating (128 x 256 x 256: ~0.4 GB).
    """
    from tqdm.auto import tqdm

    shape = to_triple(shape, "phantom shape", int, positive=True)
    vs = to_triple(voxel_size, "phantom voxel size", float, positive=True)
    if not 0 <= missing_section_rate <= 1:
        raise ConfigError(f"missing_section_rate={missing_section_rate!r}: must lie in [0, 1]")
    if int(seed) < 0:
        raise ConfigError(f"phantom seed {seed!r}: must be a non-negative integer")
    cfg = config or PhantomConfig()
    # Independent streams: changing e.g. the missing-section rate never changes the tissue.
    r_tissue, r_mito, r_syn, r_img, r_missing = (np.random.default_rng(s)
                                                 for s in np.random.SeedSequence(int(seed)).spawn(5))
    bar = tqdm(total=2 * shape[0], desc="phantom", unit="section", disable=not progress, leave=False)
    tr = _tracks(shape, vs, cfg, r_tissue)
    cells = _cells(shape, vs, cfg, r_tissue, tr, bar)
    membrane = _membranes(cells, vs, cfg)
    neurons = _split_fragments(np.where(membrane, 0, cells).astype(np.uint32), membrane,
                               min(max(4, int(3e5 / np.prod(vs))), cells.size // 50))  # < 0.0003 um^3
    del cells
    interior = (ndi.maximum_filter(membrane.view(np.uint8), size=(1, 3, 3)) == 0) & (neurons > 0)
    mito, mito_axes = _mitochondria(neurons, interior, vs, cfg, r_mito, tr)
    syn, psd, ves, partners = _synapses(neurons, membrane, *_sides(neurons, vs, cfg), interior, mito, vs, cfg,
                                        r_syn)
    raw = _render(neurons, membrane, mito, mito_axes, syn, psd, ves, vs, cfg, r_img, int(seed), bar)
    bar.close()
    missing = r_missing.random(shape[0]) < missing_section_rate
    for z in np.flatnonzero(missing):
        blank = r_missing.random() < 0.5
        raw[z] = 0 if blank else r_missing.integers(0, 256, shape[1:], dtype=np.uint8)
    # dense neuron ids 1..n
    present = np.bincount(neurons.ravel()) > 0
    present[0] = False
    lut = np.cumsum(present).astype(np.uint32) * present
    vesicles = np.zeros(shape, np.uint32)
    vesicles.reshape(-1)[ves[0]] = ves[1]
    return Phantom(raw=raw, neurons=lut[neurons], membrane=membrane.astype(np.uint8), mito=mito, synapse=syn,
                   vesicles=vesicles, partners=lut[partners] if partners.size else partners.astype(np.uint32),
                   voxel_size=vs, seed=int(seed), config=cfg)

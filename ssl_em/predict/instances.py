"""Instances from network outputs: seeded watershed, mitochondria instances from foreground +
boundary (or distance), and neuron agglomeration from affinities (label helpers such as connected
components are in :mod:`ssl_em.utils.labels`).

All functions take and return numpy arrays in (z, y, x) and work on one block; label 0 is
background. Sizes and distances are physical (``voxel_size`` (z, y, x) in nm) so the same settings
hold across resolutions.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ssl_em.errors import ConfigError, LabelError
from ssl_em.utils.labels import connected_components, relabel_sequential, remove_small_objects

Offsets = Sequence[Sequence[int]]


def _box_slices(shape: Sequence[int], offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices (src, dst) pairing every voxel v with v + offset inside ``shape``."""
    src = tuple(slice(max(0, -o), n - max(0, o)) for n, o in zip(shape, offset))
    dst = tuple(slice(max(0, o), n - max(0, -o)) for n, o in zip(shape, offset))
    return src, dst


def _add_missing_seeds(seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give every mask component without a seed a seed of its own (else watershed leaves it 0)."""
    comps = connected_components(mask, 26 if mask.ndim == 3 else 8)
    seeded = np.unique(comps[seeds != 0])
    lonely = np.setdiff1d(np.unique(comps), np.concatenate([[0], seeded]))
    if lonely.size:
        pick = np.isin(comps, lonely)
        _, idx = np.unique(comps[pick], return_inverse=True)
        seeds = seeds.copy()
        seeds[pick] = int(seeds.max()) + 1 + idx
    return seeds


def seeded_watershed(
    boundary_or_distance: np.ndarray,
    mask: np.ndarray | None = None,
    seeds: np.ndarray | None = None,
    *,
    kind: Literal["boundary", "distance"] = "boundary",
    seed_threshold: float | None = None,
    min_distance: int | Sequence[int] = 2,
) -> np.ndarray:
    """Seeded watershed (scikit-image) inside ``mask``; every mask component gets >= 1 instance.

    ``kind="boundary"``: the map is high between objects (boundary probability); it is flooded
    from the connected components of ``map < seed_threshold`` (default 0.3).
    ``kind="distance"``: the map is high inside objects (distance transform or centre
    probability); seeds are its local maxima ``>= seed_threshold`` (default 0) at least
    ``min_distance`` voxels apart per axis (z, y, x), adjacent maxima joined, and ``-map`` is flooded.
    ``seeds`` (label array) overrides both. Returns uint32 labels 1..n, 0 outside ``mask``.
    """
    from skimage.segmentation import watershed

    elevation = np.asarray(boundary_or_distance, np.float32)
    mask = np.ones(elevation.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != elevation.shape:
        raise LabelError(f"mask shape {mask.shape} differs from map shape {elevation.shape}")
    if kind not in ("boundary", "distance"):
        raise ConfigError(f"kind must be 'boundary' or 'distance', got {kind!r}")
    if seeds is None:
        if kind == "boundary":
            seeds = connected_components(mask & (elevation < (0.3 if seed_threshold is None else seed_threshold)))
        else:
            from skimage.feature import peak_local_max

            md = np.broadcast_to(np.asarray(min_distance, int), (elevation.ndim,))
            footprint = np.ones(tuple(2 * md + 1), bool)
            peaks = peak_local_max(elevation, footprint=footprint, labels=mask.astype(np.uint8),
                                   threshold_abs=0.0 if seed_threshold is None else seed_threshold,
                                   exclude_border=False)
            peak_mask = np.zeros(elevation.shape, bool)
            peak_mask[tuple(peaks.T)] = True
            seeds = connected_components(peak_mask)  # plateau maxima are one seed, not many
    seeds = _add_missing_seeds(np.where(mask, seeds, 0), mask)
    flood = elevation if kind == "boundary" else -elevation
    return relabel_sequential(watershed(flood, markers=seeds, mask=mask))


def mito_instances(
    prob_foreground: np.ndarray,
    prob_boundary: np.ndarray | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    threshold: float = 0.5,
    seed_threshold: float = 0.3,
    min_distance_nm: float = 100.0,
    min_volume_nm3: float = 0.0,
) -> np.ndarray:
    """Mitochondria instances (uint32, 0 = background) from foreground (+ boundary) probabilities.

    With ``prob_boundary`` (pytorch_connectomics' "BC" output) seeds are foreground cores with
    boundary ``< seed_threshold`` and the boundary map is flooded. Without it the physical distance
    transform of the foreground is flooded from its maxima at least ``min_distance_nm`` apart.
    Objects under ``min_volume_nm3`` are removed; ids are sequential.
    """
    from scipy import ndimage

    fg = np.asarray(prob_foreground) > threshold
    if prob_boundary is not None:
        labels = seeded_watershed(prob_boundary, fg, kind="boundary", seed_threshold=seed_threshold)
    else:
        dist = ndimage.distance_transform_edt(fg, sampling=voxel_size)
        md = [max(1, round(min_distance_nm / v)) for v in voxel_size]
        labels = seeded_watershed(dist, fg, kind="distance", min_distance=md)
    if min_volume_nm3 > 0:
        labels = remove_small_objects(labels, min_volume_nm3, voxel_size)
    return relabel_sequential(labels)


def _check_affinities(affinities: np.ndarray, offsets: Offsets) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    affinities = np.asarray(affinities, np.float32)
    offs = [tuple(int(v) for v in o) for o in offsets]
    if affinities.ndim < 2 or len(offs) != affinities.shape[0] or any(len(o) != affinities.ndim - 1 for o in offs):
        raise ConfigError(f"affinities {affinities.shape} need one {affinities.ndim - 1}-D offset per channel, "
                          f"got {len(offs)} offsets")
    return affinities, offs


def affinity_boundary(affinities: np.ndarray, offsets: Offsets) -> np.ndarray:
    """Per-voxel boundary map ``1 - min`` of the nearest-neighbour affinities touching each voxel.

    The minimum (not the mean) marks both voxels beside a cut edge, so seeds of neighbouring
    objects are separated by a two-voxel band even when only one of six edges is cut.
    """
    affinities, offs = _check_affinities(affinities, offsets)
    lowest = np.ones(affinities.shape[1:], np.float32)
    found = False
    for a, o in zip(affinities, offs):
        if sum(abs(v) for v in o) != 1:
            continue
        found = True
        src, dst = _box_slices(lowest.shape, o)
        for s in (src, dst):  # an edge informs both of its voxels
            np.minimum(lowest[s], a[src], out=lowest[s])
    if not found:
        raise ConfigError(f"offsets {offs} hold no nearest-neighbour offset (one axis +-1)")
    return 1.0 - lowest


def boundary_affinities(boundary: np.ndarray, offsets: Offsets) -> np.ndarray:
    """Affinities ``(C, z, y, x)`` from a boundary probability map: ``1 - max b`` over the voxels on the
    line from ``v`` to ``v + o`` per offset ``o`` (a long-range pair is cut by a boundary between its ends,
    not only at them), so a pixel classifier's boundaries (ilastik's route to neurons) go through the
    same agglomeration as a network's affinities. Steps that leave the volume are skipped."""
    boundary = np.asarray(boundary, np.float32)
    offs = [tuple(int(v) for v in o) for o in offsets]
    out = np.empty((len(offs), *boundary.shape), np.float32)
    for c, o in enumerate(offs):
        out[c] = boundary
        n = max(abs(v) for v in o)
        for k in range(1, n + 1):  # the straight line's voxels, rounded
            src, dst = _box_slices(boundary.shape, tuple(round(v * k / n) for v in o))
            np.maximum(out[c][src], boundary[dst], out=out[c][src])
    return 1.0 - out


def region_graph(fragments: np.ndarray, affinities: np.ndarray, offsets: Offsets):
    """Edges between fragments with their summed affinity, edge count and adjacency.

    Returns ``(u (e,), v (e,), sum (e,), count (e,), adjacent (e,) bool)`` with ``u < v``; a pair
    is adjacent when a nearest-neighbour offset joins it. Label 0 is never part of an edge.
    """
    affinities, offs = _check_affinities(affinities, offsets)
    keys, vals, nn = [], [], []
    n = int(fragments.max()) + 1
    for a, o in zip(affinities, offs):
        src, dst = _box_slices(fragments.shape, o)
        fu, fv, av = fragments[src].ravel(), fragments[dst].ravel(), a[src].ravel()
        keep = (fu != fv) & (fu != 0) & (fv != 0)
        lo, hi = np.minimum(fu[keep], fv[keep]), np.maximum(fu[keep], fv[keep])
        keys.append(lo.astype(np.int64) * n + hi)
        vals.append(av[keep])
        nn.append(np.full(lo.size, sum(abs(v) for v in o) == 1))
    key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    total = np.bincount(inverse, weights=np.concatenate(vals), minlength=key.size)
    count = np.bincount(inverse, minlength=key.size)
    adjacent = np.bincount(inverse, weights=np.concatenate(nn), minlength=key.size) > 0
    return key // n, key % n, total, count, adjacent


def distance_fragments(boundary: np.ndarray, mask: np.ndarray | None = None,
                       voxel_size: Sequence[float] | None = None, *, inside: float = 0.5, sigma: float = 1.0,
                       min_distance: float = 4.0) -> np.ndarray:
    """Over-segmentation for agglomeration: watershed of ``boundary`` from the maxima of the distance to
    it (the "distance-transform watershed" of waterz / MALA pipelines).

    Seeds are the local maxima of the distance transform of ``boundary < inside``, smoothed by
    ``sigma``, at least ``min_distance`` apart (a connected piece of that interior without one is a seed
    whole); distances, ``sigma`` and ``min_distance`` are in units
    of the finest axis of ``voxel_size`` (so a 5x coarser z gets 5x fewer voxels of each). Each seed
    sits deep inside an object, so a faint gap in the boundary cannot join two objects' seeds, as the
    components of a thresholded boundary map do (the two designs and these settings on gala's test
    volume: ``benchmarks/neuron_postprocess.py``, records in benchmarks/results/neuron_postprocess).
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max

    boundary = np.asarray(boundary, np.float32)
    mask = np.ones(boundary.shape, bool) if mask is None else np.asarray(mask, bool)
    vs = np.asarray(voxel_size if voxel_size is not None else (1.0,) * boundary.ndim, float)
    scale = vs / vs.min()  # each axis' voxel in units of the finest
    interior = (boundary < inside) & mask
    dist = ndimage.distance_transform_edt(interior, sampling=scale).astype(np.float32)
    if sigma > 0:
        dist = ndimage.gaussian_filter(dist, sigma / scale)
    reach = np.maximum(1, np.round(min_distance / scale)).astype(int)
    peaks = peak_local_max(dist, footprint=np.ones(tuple(2 * reach + 1), bool), labels=mask.astype(np.uint8),
                           threshold_abs=0.5, exclude_border=False)
    seeds = np.zeros(boundary.shape, bool)
    seeds[tuple(peaks.T)] = True
    # plateau maxima are one seed; a piece of interior too small for a maximum of its own is seeded whole
    seeds = _add_missing_seeds(connected_components(seeds), interior)
    return seeded_watershed(boundary, mask, seeds=seeds)


def affinity_agglomeration(
    affinities: np.ndarray,
    offsets: Offsets,
    threshold: float = 0.5,
    *,
    voxel_size: Sequence[float] | None = None,
    mask: np.ndarray | None = None,
    fragments: np.ndarray | None = None,
) -> np.ndarray:
    """Neuron instances from affinities ``(C, z, y, x)``: watershed fragments + mean-affinity agglomeration.

    Channel ``c`` is the probability that voxel ``v`` and ``v + offsets[c]`` belong to one object
    (any sign convention; nearest-neighbour and long-range offsets). ``threshold`` is the affinity
    below which two voxels are apart, for both steps: fragments (unless given) come from
    :func:`distance_fragments` with interiors where every nearest-neighbour affinity is above it
    (:func:`affinity_boundary` below ``1 - threshold``; ``voxel_size``: the grid's, for the distances);
    then adjacent fragments are merged greedily in order of their mean affinity over all channels
    (long-range edges included; means are recomputed after each merge, as in waterz / MALA) until the
    best mean falls below ``threshold``. One number for both: a network whose affinities across membranes
    sit at 0.6 (under-confident) has no interior/boundary split at 0.5 and would give one fragment
    whatever the agglomeration's threshold. Returns uint32 labels 1..n, 0 outside ``mask``.
    """
    affinities, offs = _check_affinities(affinities, offsets)
    if fragments is None:
        fragments = distance_fragments(affinity_boundary(affinities, offs), mask, voxel_size, inside=1.0 - threshold)
    fragments = relabel_sequential(fragments)
    u, v, total, count, adjacent = region_graph(fragments, affinities, offs)
    # adjacency: node -> {neighbour: [affinity sum, edge count, adjacent]}
    graph: dict[int, dict[int, list]] = {}
    for a, b, s, c, adj in zip(u.tolist(), v.tolist(), total.tolist(), count.tolist(), adjacent.tolist()):
        graph.setdefault(a, {})[b] = [s, c, adj]
        graph.setdefault(b, {})[a] = graph[a][b]
    heap = [(-s / c, a, b) for a, b, s, c, adj in zip(u.tolist(), v.tolist(), total.tolist(), count.tolist(),
                                                       adjacent.tolist()) if adj]
    heapq.heapify(heap)
    parent = np.arange(int(fragments.max()) + 1)
    while heap:
        neg, a, b = heapq.heappop(heap)
        if -neg < threshold:
            break
        stats = graph.get(a, {}).get(b)
        if parent[a] != a or parent[b] != b or stats is None or -stats[0] / stats[1] != neg:
            continue  # stale entry: a side was merged or the edge changed since it was pushed
        if len(graph[a]) > len(graph[b]):
            a, b = b, a  # fold the smaller neighbourhood into the larger
        parent[a] = b
        del graph[b][a]
        for x, st in graph.pop(a).items():
            if x == b:
                continue
            del graph[x][a]
            merged = graph[b].get(x)
            if merged is None:
                merged = graph[b][x] = graph[x][b] = [0.0, 0, False]
            merged[0] += st[0]
            merged[1] += st[1]
            merged[2] = merged[2] or st[2]
            if merged[2]:
                heapq.heappush(heap, (-merged[0] / merged[1], min(b, x), max(b, x)))
    # resolve chains a -> b -> c to their roots
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    return relabel_sequential(parent[fragments])


def merge_labels_across_faces(face_a: np.ndarray, face_b: np.ndarray, min_overlap: float = 0.5) -> np.ndarray:
    """Label pairs to join when stitching two blocks: ``(k, 2)`` array of (id in a, id in b).

    ``face_a`` and ``face_b`` are the touching voxel planes of two neighbouring blocks (same shape,
    globally unique non-zero ids). A pair joins when its contact covers at least ``min_overlap``
    of the smaller of the two labels' face areas, so a thin brush contact does not merge objects.
    """
    from ssl_em.metrics.contingency import contingency_table

    t = contingency_table(face_a, face_b, ignore_a=(0,), ignore_b=(0,))
    if t.counts.size == 0:
        return np.zeros((0, 2), np.int64)
    area_a = np.bincount(np.searchsorted(t.labels_a, face_a[face_a != 0]), minlength=t.labels_a.size)
    area_b = np.bincount(np.searchsorted(t.labels_b, face_b[face_b != 0]), minlength=t.labels_b.size)
    ok = t.counts >= min_overlap * np.minimum(area_a[t.rows], area_b[t.cols])
    return np.stack([t.labels_a[t.rows[ok]], t.labels_b[t.cols[ok]]], 1)

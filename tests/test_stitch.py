"""Blockwise instances: stitched ids equal the in-memory result on volumes cut into odd blocks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from scipy import ndimage

from ssl_em.data.volume import open_volume
from ssl_em.errors import ConfigError
from ssl_em.predict import stitch
from ssl_em.predict.instances import affinity_agglomeration, mito_instances, seeded_watershed
from ssl_em.utils.labels import connected_components
from ssl_em.predict.stitch import blockwise_instances


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal foreground and a one-to-one map between the ids of ``a`` and ``b``."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]], 1), axis=0)
    return len(pairs) == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def _mostly_same_partition(a: np.ndarray, b: np.ndarray, frac: float = 0.99) -> bool:
    """Best-overlap matching of ids is one-to-one and covers ``frac`` of the voxels."""
    from ssl_em.metrics.contingency import contingency_table

    t = contingency_table(a, b)
    best = np.zeros(t.labels_a.size, np.int64)
    np.maximum.at(best, t.rows, t.counts)
    match = {int(r): int(c) for r, c, n in zip(t.rows, t.cols, t.counts) if n == best[r]}
    return len(set(match.values())) == len(match) == t.labels_b.size and best.sum() >= frac * a.size


def _consecutive(labels: np.ndarray) -> bool:
    ids = np.unique(labels)
    ids = ids[ids != 0]
    return np.array_equal(ids, np.arange(1, ids.size + 1))


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """(20, 40, 40) float32 smooth noise in [0, 1]: > 0.55 gives ~20 branched objects crossing
    faces, edges and corners of (7, 13, 11) blocks."""
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(rng.random((20, 40, 40)), 1.5)
    return ((p - p.min()) / (p.max() - p.min())).astype(np.float32)


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    """(16, 64, 64) Voronoi cells (40, anisotropic like EM) as a smooth boundary map (float32, 0..1)
    with a little noise so the watershed has no plateaus (ties are broken by visiting order)."""
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(0)
    shape = (16, 64, 64)
    pts = rng.random((40, 3)) * shape
    zyx = np.indices(shape).reshape(3, -1).T
    d = (((zyx[:, None] - pts[None]) * [2, 1, 1]) ** 2).sum(-1)
    gt = (d.argmin(1) + 1).reshape(shape)
    bd = ndimage.gaussian_filter(find_boundaries(gt, connectivity=3, mode="thick").astype(np.float32), 1)
    return np.clip(bd * 1.5 + 0.02 * rng.random(shape), 0, 1).astype(np.float32)


def test_components_equal_whole_volume(blobs, tmp_path):
    fg = blobs > 0.55
    for conn in (26, 6):
        out = blockwise_instances(blobs[None], tmp_path / f"cc{conn}.zarr", block_shape=(7, 13, 11),
                                  threshold=0.55, connectivity=conn, progress=False)
        got = np.asarray(out[:])
        assert out.chunks == (7, 13, 11) and got.dtype == np.uint32
        assert _same_partition(got, connected_components(fg, conn))
        assert _consecutive(got)
    assert not any(p.name.endswith(".work") for p in tmp_path.iterdir())  # scratch removed


def test_mito_and_watershed_exact_with_halo(cells, tmp_path):
    fg = np.ones_like(cells)
    fg[:, :, :6] = 0  # a background strip
    probs = np.stack([0.9 * fg, cells])
    ref = mito_instances(probs[0], probs[1])
    got = np.asarray(blockwise_instances(probs, tmp_path / "m.zarr", "mito", (8, 24, 24), (8, 16, 16),
                                         progress=False)[:])
    assert _same_partition(got, ref) and _consecutive(got)
    ref = seeded_watershed(cells)
    got = np.asarray(blockwise_instances(cells, tmp_path / "w.zarr", "watershed", (8, 24, 24), (8, 16, 16),
                                         progress=False)[:])
    assert _same_partition(got, ref) and _consecutive(got)


def test_affinities_same_objects_with_halo(tmp_path):
    gt = np.zeros((8, 32, 32), np.uint32)
    gt[:, :16, :16], gt[:, :16, 16:], gt[:, 16:, :] = 1, 2, 3
    gt[:4, 16:, :10] = 4
    offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
    aff = np.zeros((3, *gt.shape), np.float32)
    for c, o in enumerate(offsets):
        src = tuple(slice(max(0, -d), n - max(0, d)) for n, d in zip(gt.shape, o))
        dst = tuple(slice(max(0, d), n - max(0, -d)) for n, d in zip(gt.shape, o))
        aff[c][src] = gt[src] == gt[dst]
    ref = affinity_agglomeration(aff, offsets)
    got = np.asarray(blockwise_instances(aff, tmp_path / "a.zarr", "affinities", (8, 12, 12), (2, 6, 6),
                                         offsets=offsets, progress=False)[:])
    # the fragment watershed floods a flat two-voxel boundary band, whose ties are broken by
    # visiting order, so ~20 band voxels differ between any two crops; the objects are the same
    assert got.max() == ref.max() == 4 and _mostly_same_partition(got, ref)


def test_small_objects_removed_by_global_size(tmp_path):
    p = np.zeros((6, 12, 24), np.float32)
    p[2:4, 2:4, 1:23] = 1  # 88 voxels across four blocks of x = 6: <= 24 in each
    p[1:3, 8:10, 2:4] = 1  # 8 voxels
    p[3:5, 8:11, 14:19] = 1  # 30 voxels straddling a block face
    vs = (40.0, 8.0, 8.0)  # 2560 nm^3 per voxel, read from the source's attributes
    zarr.create_array(str(tmp_path / "p.zarr"), data=(p * 255).astype(np.uint8)[None], chunks=(1, 3, 6, 6),
                      attributes={"resolution": list(vs)}, config={"write_empty_chunks": True})  # a complete store
    out = blockwise_instances(str(tmp_path / "p.zarr"), tmp_path / "s.zarr", block_shape=(6, 6, 6),
                              min_volume_nm3=50 * 2560.0, progress=False)
    got = np.asarray(out[:])
    assert np.unique(got).tolist() == [0, 1] and (got == 1).sum() == 88
    assert out.attrs["resolution"] == list(vs)
    ome = blockwise_instances(str(tmp_path / "p.zarr"), tmp_path / "s.ome.zarr", block_shape=(6, 6, 6),
                              min_volume_nm3=50 * 2560.0, progress=False)
    vol = open_volume(str(tmp_path / "s.ome.zarr"))
    assert vol.voxel_size == vs and np.array_equal(vol[:], got) and np.array_equal(ome[:], got)
    with pytest.raises(ConfigError, match="voxel size"):
        blockwise_instances(p, tmp_path / "t.zarr", min_volume_nm3=1.0, progress=False)


def test_dask_equals_local(blobs, cells, tmp_path):
    from distributed import Client, LocalCluster

    local = np.asarray(blockwise_instances(blobs, tmp_path / "l.zarr", block_shape=(7, 13, 11),
                                           threshold=0.55, progress=False)[:])
    local_ws = np.asarray(blockwise_instances(cells, tmp_path / "lw.zarr", "watershed", (8, 24, 24), (4, 8, 8),
                                              progress=False)[:])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dist = blockwise_instances(blobs, tmp_path / "d.zarr", block_shape=(7, 13, 11), threshold=0.55,
                                   backend="dask", scheduler=client, progress=False)
        dist_ws = blockwise_instances(cells, tmp_path / "dw.zarr", "watershed", (8, 24, 24), (4, 8, 8),
                                      backend="dask", scheduler=client, progress=False)
        assert np.array_equal(np.asarray(dist[:]), local)  # the same ids, not only the same partition
        assert np.array_equal(np.asarray(dist_ws[:]), local_ws)


def test_resume_segments_only_missing_blocks(blobs, tmp_path, monkeypatch):
    calls: list = []
    real = stitch.StitchJob.segment

    def flaky(self, idx):
        if len(calls) == 5:
            raise RuntimeError("killed")
        calls.append(idx)
        real(self, idx)

    monkeypatch.setattr(stitch.StitchJob, "segment", flaky)
    dst = tmp_path / "r.zarr"
    with pytest.raises(RuntimeError, match="killed"):
        blockwise_instances(blobs, dst, block_shape=(10, 20, 20), threshold=0.55, progress=False)
    assert not dst.exists() and (tmp_path / ".r.zarr.work").is_dir()
    calls.append("resumed")
    got = np.asarray(blockwise_instances(blobs, dst, block_shape=(10, 20, 20), threshold=0.55, progress=False)[:])
    assert len(calls) == 8 + 1  # 5 before the crash, 3 after: 8 blocks, each segmented once
    assert _same_partition(got, connected_components(blobs > 0.55))
    with pytest.raises(ConfigError, match="exists"):
        blockwise_instances(blobs, dst, block_shape=(10, 20, 20), threshold=0.55, progress=False)
    blockwise_instances(blobs, dst, block_shape=(10, 20, 20), threshold=0.4, overwrite=True, progress=False)
    assert os.listdir(tmp_path) == ["r.zarr"]


def test_bad_arguments(blobs, tmp_path):
    with pytest.raises(ConfigError, match="method"):
        blockwise_instances(blobs, tmp_path / "x.zarr", "nope", progress=False)
    with pytest.raises(ConfigError, match="offsets"):
        blockwise_instances(blobs, tmp_path / "x.zarr", "affinities", progress=False)

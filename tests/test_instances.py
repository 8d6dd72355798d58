"""Instance post-processing on small known cases."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_em.errors import ConfigError
from ssl_em.metrics import average_precision, variation_of_information
from ssl_em.predict.instances import (
    affinity_agglomeration,
    affinity_boundary,
    mito_instances,
    region_graph,
    seeded_watershed,
)
from ssl_em.utils.labels import connected_components, relabel_sequential, remove_small_objects

OFFSETS = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (-2, 0, 0), (0, -4, 0), (0, 0, -4)]


def _affinities(labels: np.ndarray, offsets) -> np.ndarray:
    """(C, z, y, x) float32: 1 where v and v + offset share a non-zero label."""
    out = np.zeros((len(offsets), *labels.shape), np.float32)
    for c, o in enumerate(offsets):
        src = tuple(slice(max(0, -d), n - max(0, d)) for n, d in zip(labels.shape, o))
        dst = tuple(slice(max(0, d), n - max(0, -d)) for n, d in zip(labels.shape, o))
        out[c][src] = (labels[src] == labels[dst]) & (labels[src] != 0)
    return out


def _four_cells() -> np.ndarray:
    gt = np.zeros((8, 32, 32), np.uint32)
    gt[:, :16, :16], gt[:, :16, 16:], gt[:, 16:, :] = 1, 2, 3
    gt[:4, 16:, :10] = 4
    return gt


def test_connected_components_and_relabel():
    mask = np.zeros((4, 10, 10), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # diagonal: one object at 26-, two at 6-connectivity
    mask[3, 5:8, 5:8] = True
    assert connected_components(mask).max() == 2
    assert connected_components(mask, 6).max() == 3
    with pytest.raises(ConfigError, match="connectivity"):
        connected_components(mask, 8)
    labels = np.array([[0, 7, 7], [100, 0, 3]], np.uint64)
    out = relabel_sequential(labels)
    assert out.dtype == np.uint32 and out.tolist() == [[0, 2, 2], [3, 0, 1]]


def test_remove_small_objects_physical():
    labels = np.zeros((4, 10, 10), np.uint16)
    labels[0, 0, :3] = 5  # 3 voxels = 3 * 40*8*8 nm^3 = 7680 nm^3
    labels[1:3, 2:6, 2:6] = 9  # 32 voxels
    out = remove_small_objects(labels, min_volume_nm3=10_000, voxel_size=(40, 8, 8))
    assert set(np.unique(out)) == {0, 9}


def test_seeded_watershed_boundary_and_distance():
    gt = _four_cells()
    boundary = affinity_boundary(_affinities(gt, OFFSETS), OFFSETS)
    seg = seeded_watershed(boundary)
    assert seg.max() == 4 and sum(variation_of_information(seg, gt, ignore_gt=())) < 0.15
    # two touching balls split at their neck by the distance transform
    z, y, x = np.mgrid[:20, :20, :40]
    fg = ((z - 10) ** 2 + (y - 10) ** 2 + (x - 11) ** 2 <= 64) | ((z - 10) ** 2 + (y - 10) ** 2 + (x - 27) ** 2 <= 64)
    from scipy import ndimage

    seg = seeded_watershed(ndimage.distance_transform_edt(fg), fg, kind="distance", min_distance=4)
    assert seg.max() == 2 and seg[10, 10, 11] != seg[10, 10, 27] and np.all((seg != 0) == fg)
    with pytest.raises(ConfigError):
        seeded_watershed(fg.astype(float), kind="height")


def test_mito_instances_with_and_without_boundary():
    gt = np.zeros((12, 48, 48), np.uint32)
    gt[3:9, 5:20, 5:15], gt[3:9, 5:20, 15:30], gt[4:8, 30:40, 30:45] = 1, 2, 3  # 1 and 2 touch
    gt[10, 45, 45] = 4  # one-voxel speck
    fg = (gt != 0).astype(np.float32)
    from skimage.segmentation import find_boundaries

    bnd = find_boundaries(gt, mode="inner").astype(np.float32)
    seg = mito_instances(fg, bnd, voxel_size=(40, 8, 8), min_volume_nm3=40 * 8 * 8 * 10)
    assert seg.max() == 3 and average_precision(seg, np.where(gt == 4, 0, gt))["ap50"] == 1.0
    seg = mito_instances(fg, None, voxel_size=(40, 8, 8), min_distance_nm=60, min_volume_nm3=40 * 8 * 8 * 10)
    assert seg.max() >= 2 and np.all((seg != 0) == ((gt != 0) & (gt != 4)))


def test_affinity_agglomeration_recovers_cells():
    gt = _four_cells()
    rng = np.random.default_rng(0)
    aff = np.clip(_affinities(gt, OFFSETS) + rng.normal(0, 0.1, (len(OFFSETS), *gt.shape)), 0, 1)
    seg = affinity_agglomeration(aff, OFFSETS, threshold=0.5)
    assert seg.max() == 4 and sum(variation_of_information(seg, gt, ignore_gt=())) < 0.15
    # from an over-segmentation (each cell halved) agglomeration restores the cells exactly
    fragments = gt.astype(np.int64) * 10 + (np.arange(32) % 16 >= 8)
    seg = affinity_agglomeration(aff, OFFSETS, 0.5, fragments=fragments)
    assert variation_of_information(seg, gt, ignore_gt=()) == pytest.approx((0.0, 0.0), abs=1e-12)
    # a high threshold keeps the fragments; the region graph sees both halves of each cell adjacent
    assert affinity_agglomeration(aff, OFFSETS, 1.01, fragments=fragments).max() == 8
    u, v, total, count, adjacent = region_graph(relabel_sequential(fragments), aff, OFFSETS)
    assert np.all(u < v) and adjacent.any() and np.all(count > 0)
    with pytest.raises(ConfigError, match="offset"):
        affinity_agglomeration(aff, OFFSETS[:3])


def test_merge_labels_across_faces():
    from ssl_em.predict.instances import merge_labels_across_faces

    a = np.zeros((10, 10), np.uint32)
    b = np.zeros_like(a)
    a[:5, :5], b[:5, :5] = 1, 101  # same object on both sides
    a[6:, 6:], b[6:, 9:] = 2, 102  # contact is 4 of 16 / 4 voxels: covers all of 102's face
    a[0, 9], b[9, 0] = 3, 103  # no contact
    pairs = merge_labels_across_faces(a, b)
    assert pairs.tolist() == [[1, 101], [2, 102]]
    assert merge_labels_across_faces(a, np.zeros_like(b)).shape == (0, 2)


def test_boundary_affinities_cut_exactly_at_the_boundary():
    """A pixel classifier's boundary map becomes the task's affinities: edges touching a boundary voxel
    are cut, the rest joined, so the agglomeration finds the objects the boundary separates."""
    from ssl_em.predict.instances import affinity_agglomeration, boundary_affinities

    labels = np.zeros((4, 12, 20), np.int32)
    labels[:, :, :9], labels[:, :, 10:] = 1, 2
    offsets = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 0, -3))
    aff = boundary_affinities((labels == 0).astype(np.float32), offsets)
    assert aff.shape == (4, *labels.shape)
    assert aff[2, :, :, 9].max() == 0 and aff[2, :, :, 10].max() == 0  # both edges touching x = 9
    assert aff[3, :, :, 10:13].max() == 0 and aff[3, :, :, 13].min() == 1  # long range: cut on the way, not only at 9
    seg = affinity_agglomeration(aff, offsets, 0.5)
    assert len(np.unique(seg[labels == 1])) == 1 and len(np.unique(seg[labels == 2])) == 1
    assert seg[0, 0, 0] != seg[0, 0, 19]

"""Topology-aware scores: centreline Dice (clDice) and expected run length (ERL).

Skeletons come from :func:`skimage.morphology.skeletonize` (Lee's 3-D thinning), run per object
inside its bounding box so touching neurons keep separate centrelines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssl_em.errors import LabelError


def skeletonize_labels(labels: np.ndarray) -> np.ndarray:
    """Skeleton of every object: same shape/dtype as ``labels``, skeleton voxels keep their id.

    A binary (bool or 0/1) input is skeletonized as one foreground.
    """
    from scipy import ndimage
    from skimage.morphology import skeletonize

    labels = np.asarray(labels)
    out = np.zeros_like(labels)
    if not labels.any():
        return out
    ids, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape)
    if ids[0] != 0:  # no background: shift so every object has a positive compact id
        compact += 1
        ids = np.concatenate([np.zeros(1, ids.dtype), ids])
    for k, box in enumerate(ndimage.find_objects(compact), start=1):
        if box is None:
            continue
        # pad one voxel so objects touching the box edge thin like interior ones
        obj = np.pad(compact[box] == k, 1)
        skel = skeletonize(obj)[(slice(1, -1),) * labels.ndim]
        if not skel.any():  # thinning can erase blobs of even thickness: keep their deepest voxel
            depth = ndimage.distance_transform_edt(obj)[(slice(1, -1),) * labels.ndim]
            skel[np.unravel_index(np.argmax(depth), skel.shape)] = True
        out[box][skel] = ids[k]
    return out


def cldice(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Centreline Dice (Shit et al., CVPR 2021) of the foregrounds ``pred != 0`` and ``gt != 0``.

    ``Tprec = |S(pred) & gt| / |S(pred)|``, ``Tsens = |S(gt) & pred| / |S(gt)|``, clDice is their
    harmonic mean. Instance labels are skeletonized per object. 1.0 when both skeletons are empty.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise LabelError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    keep = np.ones(gt.shape, bool) if mask is None else np.asarray(mask, bool)
    sp = (skeletonize_labels(pred) != 0) & keep
    sg = (skeletonize_labels(gt) != 0) & keep
    if not sp.any() and not sg.any():
        return 1.0
    tprec = np.count_nonzero(sp & (gt != 0)) / max(np.count_nonzero(sp), 1)
    tsens = np.count_nonzero(sg & (pred != 0)) / max(np.count_nonzero(sg), 1)
    return 0.0 if tprec + tsens == 0 else 2 * tprec * tsens / (tprec + tsens)


def skeleton_graph(skeleton: np.ndarray, voxel_size: Sequence[float]):
    """Graph of a labelled 3-D skeleton: 26-neighbour edges between voxels of the same id.

    Returns ``(nodes (n, 3) int64 zyx, node_ids (n,), edges (e, 2) int64, lengths (e,) nm)``.
    Each skeleton is reduced to its minimum spanning tree, which drops the redundant diagonal of
    every voxel-corner triangle so lengths are not double counted.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import minimum_spanning_tree

    skeleton = np.asarray(skeleton)
    if skeleton.ndim != 3:
        raise LabelError(f"skeleton must be 3-D (z, y, x), got shape {skeleton.shape}")
    flat = skeleton.reshape(-1)
    node_flat = np.flatnonzero(flat)
    nodes = np.stack(np.unravel_index(node_flat, skeleton.shape), 1).astype(np.int64)
    node_ids = flat[node_flat]
    vs = np.asarray(voxel_size, float)
    src, dst, length = [], [], []
    # 13 offsets = half of the 26-neighbourhood, so each undirected edge is found once
    half = [(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dz, dy, dx) > (0, 0, 0)]
    for off in half:
        nb = nodes + off
        inside = np.all((nb >= 0) & (nb < skeleton.shape), axis=1)
        idx = np.flatnonzero(inside)
        same = skeleton[tuple(nb[idx].T)] == node_ids[idx]
        idx = idx[same]
        nb_flat = np.ravel_multi_index(tuple(nb[idx].T), skeleton.shape)
        src.append(idx)
        dst.append(np.searchsorted(node_flat, nb_flat))
        length.append(np.full(idx.size, float(np.linalg.norm(np.asarray(off) * vs))))
    src, dst, length = np.concatenate(src), np.concatenate(dst), np.concatenate(length)
    n = node_flat.size
    mst = minimum_spanning_tree(sparse.coo_array((length, (src, dst)), shape=(n, n))).tocoo()
    edges = np.stack([mst.row, mst.col], 1).astype(np.int64)
    return nodes, node_ids, edges, mst.data.astype(float)


def erl(
    pred: np.ndarray,
    gt: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    gt_skeleton: np.ndarray | None = None,
    min_merge_nodes: int = 1,
) -> tuple[float, float]:
    """Expected run length ``(erl_nm, erl_normalised)`` of ``pred`` along the gt neuron skeletons.

    Definition of Januszewski et al. (2018) as in funlib.evaluate: skeleton edges (nm lengths from
    ``voxel_size`` (z, y, x)) whose two end nodes lie in the same non-zero pred segment are correct,
    unless that segment also holds nodes of another gt skeleton (a merge: all its edges count 0).
    Correct edges form fragments of length ``l``; ``ERL = sum l**2 / sum L_s`` over fragments and
    skeleton lengths ``L_s``. The normalised form divides by the ERL of gt itself
    (``sum L_s**2 / sum L_s``), so 1.0 is perfect. ``gt_skeleton`` (labelled like gt) skips
    skeletonization. ``min_merge_nodes`` > 1 counts a segment as merging another skeleton only
    when it holds at least that many of its nodes (tolerance for voxel skeletons that graze object
    borders; 1 is the strict published rule). Returns (0, 0) without skeleton edges.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    pred = np.asarray(pred)
    skel = skeletonize_labels(gt) if gt_skeleton is None else np.asarray(gt_skeleton)
    if pred.shape != skel.shape:
        raise LabelError(f"pred shape {pred.shape} differs from gt shape {skel.shape}")
    nodes, node_ids, edges, lengths = skeleton_graph(skel, voxel_size)
    if lengths.size == 0:
        return 0.0, 0.0
    seg = pred[tuple(nodes.T)]
    # merged segments: non-zero pred ids that hold nodes of >= 2 gt skeletons
    pairs, hits = np.unique(np.stack([seg, node_ids], 1)[seg != 0], axis=0, return_counts=True)
    pairs = pairs[hits >= min_merge_nodes]
    seg_ids, n_skel = np.unique(pairs[:, 0], return_counts=True)
    merged = np.isin(seg, seg_ids[n_skel > 1])
    u, v = edges.T
    ok = (seg[u] == seg[v]) & (seg[u] != 0) & ~merged[u]
    n = nodes.shape[0]
    graph = sparse.coo_array((np.ones(int(ok.sum())), (u[ok], v[ok])), shape=(n, n))
    _, frag = connected_components(graph, directed=False)
    frag_len = np.bincount(frag[u[ok]], weights=lengths[ok], minlength=frag.max() + 1)
    _, skel_index = np.unique(node_ids, return_inverse=True)
    skel_len = np.bincount(skel_index[u], weights=lengths)
    total = skel_len.sum()
    value = float(frag_len @ frag_len / total)
    return value, value / float(skel_len @ skel_len / total)

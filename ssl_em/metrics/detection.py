"""Object-level scores: synapse detection F1 under a physical distance and instance AP (MitoEM)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssl_em.errors import LabelError

#: IoU thresholds 0.50, 0.55, ..., 0.95 whose mean is the COCO / MitoEM "AP"
COCO_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))


def centroids(labels_or_mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """(n, ndim) float voxel centroids of objects; a binary mask is split into connected components.

    Integer arrays with values beyond {0, 1} are taken as instance labels already.
    """
    arr = np.asarray(labels_or_mask)
    if arr.dtype == bool or (arr.size and arr.max() <= 1):
        from ssl_em.utils.labels import connected_components

        arr = connected_components(arr.astype(bool), connectivity if arr.ndim == 3 else 8)
    flat = arr.reshape(-1)
    fg = np.flatnonzero(flat)
    if fg.size == 0:
        return np.zeros((0, arr.ndim))
    _, obj = np.unique(flat[fg], return_inverse=True)
    count = np.bincount(obj)
    coords = np.unravel_index(fg, arr.shape)
    return np.stack([np.bincount(obj, weights=c) / count for c in coords], 1)


def _as_points(x: np.ndarray) -> np.ndarray:
    """(n, 3) points as given, or the object centroids of a 3-D mask / label volume."""
    x = np.asarray(x)
    if x.ndim == 2 and x.shape[1] == 3:
        return x.astype(float)
    if x.ndim != 3:
        raise LabelError(f"expected (n, 3) points or a 3-D mask, got an array of shape {x.shape}")
    return centroids(x)


def synapse_f1(
    pred: np.ndarray,
    gt: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    max_distance_nm: float = 100.0,
) -> dict[str, float]:
    """Detection precision / recall / F1 of synapses matched one-to-one within ``max_distance_nm``.

    ``pred`` and ``gt`` are either ``(n, 3)`` arrays of (z, y, x) points in voxel coordinates or
    3-D masks / label volumes, whose detections are the (26-connected) component centroids.
    Distances are physical (``voxel_size`` in nm, z, y, x); matching is the minimum-total-distance
    assignment (Hungarian, :func:`scipy.optimize.linear_sum_assignment`) among pairs within the
    tolerance. Returns ``precision, recall, f1, tp, fp, fn, mean_distance_nm`` (of the matches).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    if max_distance_nm < 0:
        raise LabelError(f"max_distance_nm must be >= 0, got {max_distance_nm}")
    vs = np.asarray(voxel_size, float)
    p = _as_points(pred) * vs
    g = _as_points(gt) * vs
    tp, dist_sum = 0, 0.0
    if len(p) and len(g):
        dist = cdist(p, g)
        # out-of-range pairs get a cost larger than any in-range total so they are never preferred
        big = dist.size * (max_distance_nm + 1.0) + 1.0
        r, c = linear_sum_assignment(np.where(dist <= max_distance_nm, dist, big))
        hit = dist[r, c] <= max_distance_nm
        tp, dist_sum = int(hit.sum()), float(dist[r, c][hit].sum())
    fp, fn = len(p) - tp, len(g) - tp
    precision = tp / (tp + fp) if tp + fp else float(fn == 0)
    recall = tp / (tp + fn) if tp + fn else float(fp == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
            "mean_distance_nm": dist_sum / tp if tp else float("nan")}


def _coco_ap(tp_sorted: np.ndarray, n_gt: int) -> float:
    """COCO 101-point interpolated AP from per-detection TP flags sorted by descending score."""
    if n_gt == 0:
        return float(tp_sorted.size == 0)
    tp = np.cumsum(tp_sorted)
    fp = np.cumsum(~tp_sorted)
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone envelope
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.where(idx < precision.size, precision[np.minimum(idx, precision.size - 1)], 0).mean())


def average_precision(
    pred_instances: np.ndarray,
    gt_instances: np.ndarray,
    thresholds: Sequence[float] = (0.5, 0.75),
    scores: dict[int, float] | None = None,
    *,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Instance average precision at IoU ``thresholds`` plus their COCO mean over 0.50:0.95.

    Without ``scores`` (label maps have none) each threshold's value is the matched fraction
    ``TP / (TP + FP + FN)`` (the DSB2018 / StarDist "accuracy"): the honest score-free form.
    With ``scores`` (pred id -> confidence) it is the COCO-style 101-point AP used by MitoEM:
    detections in descending score are greedily matched to the unmatched gt of highest IoU >= t.
    IoUs come from the shared contingency table (label 0 = background in both).
    Returns ``{"ap50": .., "ap75": .., "ap": mean over 0.50:0.95, "n_pred": .., "n_gt": ..}``.
    """
    from ssl_em.metrics.contingency import iou_matrix

    pred_ids, gt_ids, iou = iou_matrix(pred_instances, gt_instances, mask=mask)  # sparse (m, n)
    n_pred, n_gt = len(pred_ids), len(gt_ids)
    order = np.arange(n_pred)
    if scores is not None:
        missing = [int(i) for i in pred_ids if int(i) not in scores]
        if missing:
            raise LabelError(f"scores lack pred instances {missing[:5]}")
        order = np.argsort([-scores[int(i)] for i in pred_ids], kind="stable")

    def at(t: float) -> float:
        if scores is None:
            if t >= 0.5:  # an IoU > 0.5 match is unique on both sides, so counting suffices
                tp = int(np.count_nonzero(iou.data >= t))
            else:
                from scipy.optimize import linear_sum_assignment

                dense = iou.toarray()
                r, c = linear_sum_assignment(-dense)
                tp = int(np.count_nonzero(dense[r, c] >= t))
            denom = n_pred + n_gt - tp
            return tp / denom if denom else 1.0
        taken = np.zeros(n_gt, bool)
        hits = np.zeros(n_pred, bool)
        for k, i in enumerate(order):  # COCO: by score, each takes its best still-free gt
            lo, hi = iou.indptr[i], iou.indptr[i + 1]
            cols, vals = iou.indices[lo:hi], np.where(taken[iou.indices[lo:hi]], -1.0, iou.data[lo:hi])
            if vals.size and vals.max() >= t:
                taken[cols[np.argmax(vals)]] = hits[k] = True
        return _coco_ap(hits, n_gt)

    values = {float(t): at(float(t)) for t in (*thresholds, *COCO_THRESHOLDS)}
    out: dict[str, float] = {f"ap{round(t * 100)}": values[float(t)] for t in thresholds}
    out["ap"] = float(np.mean([values[float(t)] for t in COCO_THRESHOLDS]))
    out["n_pred"], out["n_gt"] = n_pred, n_gt
    return out

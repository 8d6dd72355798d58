"""Voxel overlap scores for binary masks (non-zero = foreground), any shape.

Conventions for empty sets keep scores finite: two empty masks agree perfectly (IoU = Dice = 1);
a score whose denominator is empty because the prediction is empty is 1 when gt is empty too and
0 otherwise, and vice versa.
"""

from __future__ import annotations

import numpy as np

from ssl_em.errors import LabelError


def confusion(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, int, int]:
    """Voxel counts ``(tp, fp, fn)`` of foreground ``pred != 0`` vs ``gt != 0`` where ``mask`` is True."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise LabelError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")
    p, g = pred != 0, gt != 0
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != gt.shape:
            raise LabelError(f"mask shape {mask.shape} differs from gt shape {gt.shape}")
        p &= mask
        g &= mask
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def _ratio(num: int, den: int, both_empty: bool) -> float:
    return num / den if den else float(both_empty)


def iou(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Intersection over union (Jaccard index) of the foregrounds; 1.0 when both are empty."""
    tp, fp, fn = confusion(pred, gt, mask)
    return _ratio(tp, tp + fp + fn, True)


jaccard = iou


def dice(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Dice coefficient ``2 TP / (2 TP + FP + FN)``; 1.0 when both are empty."""
    tp, fp, fn = confusion(pred, gt, mask)
    return _ratio(2 * tp, 2 * tp + fp + fn, True)


def precision_recall(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Voxel ``(precision, recall)`` of the foregrounds (see the module docstring for empty masks)."""
    tp, fp, fn = confusion(pred, gt, mask)
    return _ratio(tp, tp + fp, fn == 0), _ratio(tp, tp + fn, fp == 0)

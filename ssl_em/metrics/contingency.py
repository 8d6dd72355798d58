"""One contingency table for every overlap-based segmentation score: VOI, ARAND, instance IoU.

The table is built by run-length compressing the flattened label pair stream first: EM
segmentations are piecewise constant along x, so a 128x512x512 volume holds ~50x fewer runs than
voxels and the sort that finds distinct (a, b) pairs only touches the runs. Results equal
scikit-image's sparse-matrix implementation to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ssl_em.errors import LabelError


@dataclass(frozen=True)
class Contingency:
    """Sparse overlap counts between label arrays ``a`` (rows) and ``b`` (columns).

    ``counts[k]`` voxels carry label ``labels_a[rows[k]]`` in ``a`` and ``labels_b[cols[k]]`` in ``b``;
    only non-zero cells are stored. Ignored / masked voxels are absent from every count.
    """

    labels_a: np.ndarray  # (m,) distinct labels of a, sorted
    labels_b: np.ndarray  # (n,) distinct labels of b, sorted
    rows: np.ndarray  # (k,) int64 index into labels_a
    cols: np.ndarray  # (k,) int64 index into labels_b
    counts: np.ndarray  # (k,) int64 voxels in the cell

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def sizes_a(self) -> np.ndarray:
        """(m,) voxels of each label of ``a`` (among counted voxels)."""
        return np.bincount(self.rows, weights=self.counts, minlength=self.labels_a.size).astype(np.int64)

    @property
    def sizes_b(self) -> np.ndarray:
        return np.bincount(self.cols, weights=self.counts, minlength=self.labels_b.size).astype(np.int64)

    def to_sparse(self):
        """``scipy.sparse.csr_array`` of shape (m, n) (rows/cols index ``labels_a``/``labels_b``)."""
        from scipy import sparse

        shape = (self.labels_a.size, self.labels_b.size)
        return sparse.csr_array((self.counts, (self.rows, self.cols)), shape=shape)


def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise LabelError(f"{names[0]} shape {a.shape} differs from {names[1]} shape {b.shape}")
    for arr, name in zip((a, b), names):
        if arr.dtype.kind not in "biu":
            raise LabelError(f"{name} must hold integer labels, got dtype {arr.dtype}")


def _keep_mask(n: int, a, b, ignore_a, ignore_b, mask) -> np.ndarray | None:
    keep = None
    for arr, ignore in ((a, ignore_a), (b, ignore_b)):
        for value in ignore:  # one `!=` pass per ignored value beats np.isin for the usual 1-3 values
            ok = arr != value
            keep = ok if keep is None else np.logical_and(keep, ok, out=keep)
    if mask is not None:
        m = np.asarray(mask).reshape(-1).astype(bool, copy=False)
        if m.size != n:
            raise LabelError(f"mask has {m.size} voxels, labels have {n}")
        keep = m.copy() if keep is None else np.logical_and(keep, m, out=keep)
    return keep


def contingency_table(
    a: np.ndarray,
    b: np.ndarray,
    *,
    ignore_a: Sequence[int] = (),
    ignore_b: Sequence[int] = (),
    mask: np.ndarray | None = None,
) -> Contingency:
    """Overlap counts of two integer label arrays of equal (any) shape.

    Voxels where ``a`` is in ``ignore_a``, ``b`` is in ``ignore_b`` or ``mask`` is False are dropped.
    """
    a, b = np.asarray(a), np.asarray(b)
    _check_pair(a, b, ("a", "b"))
    a, b = a.reshape(-1), b.reshape(-1)
    keep = _keep_mask(a.size, a, b, ignore_a, ignore_b, mask)
    n = a.size
    empty = np.zeros(0, np.int64)
    if n == 0:
        return Contingency(a[:0], b[:0], empty, empty, empty)
    # run starts: where either label (or the keep flag) changes along the flattened (x-fastest)
    # order. Dropped voxels are removed per run, never by copying the full arrays.
    change = np.empty(n, bool)
    change[0] = True
    np.not_equal(a[1:], a[:-1], out=change[1:])
    change[1:] |= b[1:] != b[:-1]
    if keep is not None:
        change[1:] |= keep[1:] != keep[:-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=n)
    if keep is not None:
        kept = keep[starts]
        starts, lengths = starts[kept], lengths[kept]
    ra, rb = a[starts], b[starts]
    if ra.size and min(ra.min(), rb.min()) >= 0 and max(ra.max(), rb.max()) < 2**32:
        # common case: one sort of 64-bit (a, b) keys; labels come from the few distinct cells
        key = (ra.astype(np.uint64) << np.uint64(32)) | rb.astype(np.uint64)
        cells, inverse = np.unique(key, return_inverse=True)
        labels_a, rows = np.unique(cells >> np.uint64(32), return_inverse=True)
        labels_b, cols = np.unique(cells & np.uint64(2**32 - 1), return_inverse=True)
        labels_a, labels_b = labels_a.astype(a.dtype), labels_b.astype(b.dtype)
    else:  # negative or > 32-bit ids: compact each side first
        labels_a, ia = np.unique(ra, return_inverse=True)
        labels_b, ib = np.unique(rb, return_inverse=True)
        key = ia.astype(np.int64) * labels_b.size + ib  # < m * n <= runs**2, fits int64
        cells, inverse = np.unique(key, return_inverse=True)
        rows, cols = cells // labels_b.size, cells % labels_b.size
    counts = np.bincount(inverse, weights=lengths, minlength=cells.size).astype(np.int64)  # exact < 2**53
    return Contingency(labels_a, labels_b, rows.astype(np.int64), cols.astype(np.int64), counts)


def _entropy_terms(table: Contingency) -> tuple[float, float]:
    """(H(b|a), H(a|b)) in bits from the joint distribution of the table."""
    n = table.total
    if n == 0:
        return 0.0, 0.0
    p = table.counts / n
    pa = table.sizes_a / n
    pb = table.sizes_b / n
    h_b_given_a = -np.sum(p * np.log2(p / pa[table.rows]))
    h_a_given_b = -np.sum(p * np.log2(p / pb[table.cols]))
    return float(max(h_b_given_a, 0.0)), float(max(h_a_given_b, 0.0))


def variation_of_information(
    pred: np.ndarray | None,
    gt: np.ndarray | None,
    ignore_gt: Sequence[int] = (0,),
    ignore_pred: Sequence[int] = (),
    *,
    mask: np.ndarray | None = None,
    table: Contingency | None = None,
) -> tuple[float, float]:
    """Split variation of information ``(merge, split)`` in bits; VOI = merge + split.

    ``merge = H(gt | pred)``: the false-merge term (one predicted segment covers several gt objects).
    ``split = H(pred | gt)``: the false-split term (one gt object is cut into several segments).
    Same order as ``skimage.metrics.variation_of_information(pred, gt)`` and gala's ``split_vi``.
    Voxels whose gt label is in ``ignore_gt`` (default: 0 = boundary / unlabelled, as in SNEMI3D
    and CREMI), whose pred label is in ``ignore_pred``, or where ``mask`` is False are dropped.
    ``table`` (rows = pred, cols = gt, from :func:`contingency_table`) skips recounting.
    """
    if table is None:
        table = contingency_table(pred, gt, ignore_a=ignore_pred, ignore_b=ignore_gt, mask=mask)
    merge, split = _entropy_terms(table)  # H(gt|pred), H(pred|gt)
    return merge, split


def adapted_rand_error(
    pred: np.ndarray | None,
    gt: np.ndarray | None,
    ignore_gt: Sequence[int] = (0,),
    ignore_pred: Sequence[int] = (),
    *,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    table: Contingency | None = None,
) -> tuple[float, float, float]:
    """SNEMI3D adapted Rand error ``(error, precision, recall)``, equal to
    ``skimage.metrics.adapted_rand_error(gt, pred, ignore_labels=ignore_gt)``.

    With pair counts ``P = sum n_ij (n_ij - 1)`` and ``G``/``S`` the same over gt/pred sizes,
    scikit-image's (and so our) ``precision = P / G`` and ``recall = P / S``. Note this is the
    reverse of the usual reading (scikit-image issue #6485): ``precision`` here drops with false
    *splits* and ``recall`` with false *merges*. ``error = 1 - P / (alpha G + (1 - alpha) S)``.
    ``table``: rows = pred, cols = gt, as from :func:`contingency_table` (pred, gt).
    """
    if not 0.0 <= alpha <= 1.0:
        raise LabelError(f"alpha must be within [0, 1], got {alpha}")
    if table is None:
        table = contingency_table(pred, gt, ignore_a=ignore_pred, ignore_b=ignore_gt, mask=mask)
    n = table.total
    counts, s, g = table.counts, table.sizes_a, table.sizes_b
    pairs = float(counts @ counts - n)  # int64 exact: sum n_ij**2 <= N**2
    pairs_gt = float(g @ g - n)
    pairs_pred = float(s @ s - n)
    precision = pairs / pairs_gt if pairs_gt > 0 else 1.0
    recall = pairs / pairs_pred if pairs_pred > 0 else 1.0
    denom = alpha * pairs_gt + (1 - alpha) * pairs_pred
    return (1.0 - pairs / denom if denom > 0 else 0.0), precision, recall


def foreground_restricted_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """The ISBI 2012 challenge's foreground-restricted ``(V_rand, V_info)`` (Arganda-Carreras et al. 2015),
    higher is better, 1 = identical: Rand and information-theoretic F-scores of ``pred`` against ``gt``,
    counting only voxels inside a gt object (gt 0 = boundary, ignored). A voxel ``pred`` leaves at 0 (its
    boundary) inside a gt object is its own one-voxel segment, so thick predicted boundaries are split
    errors, not free. ``V_rand = 2 sum n_ij^2 / (sum s_i^2 + sum t_j^2)``, ``V_info = 2 I(S;T) / (H(S) +
    H(T))``, with ``n_ij`` the overlaps and ``s_i`` / ``t_j`` the sizes of pred / gt segments.
    """
    table = contingency_table(pred, gt, ignore_b=(0,))
    n = table.total
    if n == 0:
        return 1.0, 1.0
    single = table.labels_a[table.rows] == 0  # cells of pred's boundary: one segment per voxel
    counts, ones = table.counts[~single].astype(np.float64), float(table.counts[single].sum())
    sizes_a = np.bincount(table.rows[~single], weights=counts, minlength=table.labels_a.size)
    sizes_a = sizes_a[sizes_a > 0]
    sizes_b = table.sizes_b.astype(np.float64)
    v_rand = 2 * (counts @ counts + ones) / (sizes_a @ sizes_a + ones + sizes_b @ sizes_b)

    def entropy(sizes: np.ndarray, singletons: float = 0.0) -> float:
        p = sizes / n
        return float(-(p * np.log(p)).sum() + singletons / n * np.log(n))

    h_s, h_t = entropy(sizes_a, ones), entropy(sizes_b)
    mutual = h_s + h_t - entropy(counts, ones)
    v_info = 2 * mutual / (h_s + h_t) if h_s + h_t > 0 else 1.0
    return float(v_rand), float(v_info)


def iou_matrix(pred: np.ndarray, gt: np.ndarray, *, mask: np.ndarray | None = None):
    """Instance IoU between every overlapping (pred, gt) pair, label 0 = background in both.

    Returns ``(pred_ids (m,), gt_ids (n,), iou)`` with ``iou`` a ``scipy.sparse.csr_array`` (m, n)
    holding only overlapping pairs; instance sizes count all their voxels (not only overlaps).
    """
    from scipy import sparse

    t = contingency_table(pred, gt, mask=mask)
    sa, sb = t.sizes_a, t.sizes_b
    keep_a, keep_b = t.labels_a != 0, t.labels_b != 0
    cell = keep_a[t.rows] & keep_b[t.cols]
    ra = np.cumsum(keep_a) - 1  # old row index -> index among non-zero labels
    rb = np.cumsum(keep_b) - 1
    r, c, inter = t.rows[cell], t.cols[cell], t.counts[cell]
    iou = inter / (sa[r] + sb[c] - inter)
    shape = (int(keep_a.sum()), int(keep_b.sum()))
    return t.labels_a[keep_a], t.labels_b[keep_b], sparse.csr_array((iou, (ra[r], rb[c])), shape=shape)

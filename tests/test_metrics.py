"""Metrics against scikit-image references, gala's published VOI and hand-computed toy cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error as sk_arand
from skimage.metrics import variation_of_information as sk_voi

from ssl_em import metrics as M
from ssl_em.errors import LabelError


def _random_pair(seed: int, shape=(6, 20, 24), n=7):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, n, shape)
    pred = np.where(rng.random(shape) < 0.7, gt * 3 + 1, rng.integers(0, 2 * n, shape))  # related ids
    return pred.astype(np.uint64), gt.astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ignore", [(), (0,), (0, 3)])
def test_voi_matches_skimage(seed, ignore):
    pred, gt = _random_pair(seed)
    keep = ~np.isin(gt, ignore)
    ref = sk_voi(pred[keep], gt[keep])
    assert np.allclose(M.variation_of_information(pred, gt, ignore_gt=ignore), ref, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("ignore", [(), (0,), (1, 2)])
def test_arand_matches_skimage(seed, ignore):
    pred, gt = _random_pair(seed)
    ours = M.adapted_rand_error(pred, gt, ignore_gt=ignore)
    assert np.allclose(ours, sk_arand(gt, pred, ignore_labels=ignore), atol=1e-12)
    assert np.allclose(M.adapted_rand_error(pred, gt, alpha=0.2), sk_arand(gt, pred, alpha=0.2), atol=1e-12)


def test_voi_order_is_merge_then_split():
    gt = np.repeat(np.arange(1, 5), 25)
    merged = (gt + 1) // 2  # two gt objects per segment: pure false merge
    split = np.arange(gt.size) // 5 + 1  # five segments per gt object: pure false split
    merge, spl = M.variation_of_information(merged, gt)
    assert merge == pytest.approx(1.0) and spl == pytest.approx(0.0)
    merge, spl = M.variation_of_information(split, gt)
    assert merge == pytest.approx(0.0) and spl == pytest.approx(np.log2(5))


def test_large_and_negative_ids_take_the_general_path():
    pred, gt = _random_pair(6)
    big = pred.astype(np.uint64) + np.uint64(2**40)  # beyond 32 bits
    neg = gt.astype(np.int64) - 3  # negative ids; ignore the one that was 0
    ref = sk_voi(pred[gt != 0], gt[gt != 0])
    assert np.allclose(M.variation_of_information(big, neg, ignore_gt=(-3,)), ref, atol=1e-12)
    assert np.allclose(M.adapted_rand_error(big, neg, ignore_gt=(-3,)), sk_arand(gt, pred), atol=1e-12)
    t = M.contingency_table(big, neg)
    assert t.labels_a.dtype == np.uint64 and t.labels_a.min() >= 2**40 and t.labels_b.min() == -3


def test_ignore_pred_mask_and_errors():
    pred, gt = _random_pair(4)
    keep = (pred != 1) & (gt != 0)
    ref = sk_voi(pred[keep], gt[keep])
    assert np.allclose(M.variation_of_information(pred, gt, ignore_pred=(1,)), ref)
    assert np.allclose(M.variation_of_information(pred, gt, ignore_gt=(), mask=keep), ref)
    with pytest.raises(LabelError, match="shape"):
        M.variation_of_information(pred[:2], gt)
    with pytest.raises(LabelError, match="integer"):
        M.contingency_table(pred.astype(float), gt)


def test_contingency_shared_table_and_empty():
    pred, gt = _random_pair(5)
    t = M.contingency_table(pred, gt, ignore_b=(0,))
    assert t.total == np.count_nonzero(gt)
    dense = t.to_sparse().toarray()
    i, j = np.searchsorted(t.labels_a, pred[gt != 0]), np.searchsorted(t.labels_b, gt[gt != 0])
    ref = np.zeros_like(dense)
    np.add.at(ref, (i, j), 1)
    assert np.array_equal(dense, ref)
    assert M.variation_of_information(None, None, table=t) == M.variation_of_information(pred, gt)
    zero = np.zeros((3, 3), int)
    assert M.variation_of_information(zero, zero) == (0.0, 0.0)


def test_gala_reference_voi(gala_path):
    with np.load(gala_path) as d:
        gt, expected = d["neuron_test"], d["vi_expected"]
        for key, ref in zip(("seg_test_ws", "seg_test_agglo", "seg_test_agglo4"), expected):
            assert np.allclose(M.variation_of_information(d[key], gt), ref, atol=1e-6), key


def test_overlap_scores():
    gt = np.zeros((4, 10, 10), np.uint8)
    gt[:, :5] = 1  # 200 voxels
    pred = np.zeros_like(gt)
    pred[:, 2:8] = 1  # 240 voxels, 120 shared
    assert M.iou(pred, gt) == pytest.approx(120 / 320)
    assert M.jaccard(pred, gt) == M.iou(pred, gt)
    assert M.dice(pred, gt) == pytest.approx(240 / 440)
    assert M.precision_recall(pred, gt) == pytest.approx((0.5, 0.6))
    mask = np.zeros(gt.shape, bool)
    mask[:, :5] = True
    assert M.iou(pred, gt, mask) == pytest.approx(0.6)
    empty = np.zeros_like(gt)
    assert M.iou(empty, empty) == 1.0 and M.dice(empty, gt) == 0.0
    assert M.precision_recall(empty, gt) == (0.0, 0.0)


def test_cldice_on_a_line():
    gt = np.zeros((5, 5, 30), bool)
    gt[2, 2, :20] = True
    pred = np.zeros_like(gt)
    pred[2, 2, :10] = True  # half the centreline: Tprec 1, Tsens 0.5
    assert M.cldice(pred, gt) == pytest.approx(2 / 3)
    assert M.cldice(gt, gt) == 1.0
    tube = np.zeros((9, 9, 40), np.uint8)
    tube[2:7, 2:7, 3:37] = 1
    assert M.cldice(tube, tube) == 1.0 and M.skeletonize_labels(tube).sum() > 10


def test_erl_toy_merge_and_split():
    gt = np.zeros((3, 12, 30), np.uint32)
    gt[1, 0, :11], gt[1, 4, :11], gt[1, 8, :11] = 1, 2, 3  # three 10-edge neurons along x
    pred = np.zeros_like(gt)
    pred[1, 0, :6], pred[1, 0, 6:11] = 1, 2  # neuron 1 split after its 6th node
    pred[1, 4, :11] = pred[1, 8, :11] = 3  # neurons 2 and 3 merged: both score 0
    erl, norm = M.erl(pred, gt, voxel_size=(40, 4, 4))
    # fragments of 5 and 4 edges of 4 nm; total length 3 * 40 nm
    assert erl == pytest.approx((20**2 + 16**2) / 120)
    assert norm == pytest.approx(erl / 40)
    assert M.erl(gt, gt, (40, 4, 4)) == pytest.approx((40.0, 1.0))


def test_synapse_f1_known_distances():
    gt = np.array([[0, 0, 0], [0, 0, 100], [0, 0, 200]], float)
    pred = np.array([[0, 0, 2], [0, 0, 105], [0, 50, 200], [5, 5, 5]], float)
    r = M.synapse_f1(pred, gt, voxel_size=(40, 4, 4), max_distance_nm=30)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 2, 1)  # 8 nm and 20 nm match, 200 nm does not
    assert r["mean_distance_nm"] == pytest.approx(14.0)
    assert r["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # masks: component centroids
    gm = np.zeros((4, 20, 20), bool)
    gm[1:3, 2:4, 2:4] = gm[1:3, 12:14, 12:14] = True
    pm = np.zeros_like(gm)
    pm[1:3, 2:4, 3:5] = True
    r = M.synapse_f1(pm, gm, (40, 4, 4), 10)
    assert (r["tp"], r["fp"], r["fn"], r["recall"]) == (1, 0, 1, 0.5)


def _toy_instances():
    gt = np.zeros((10, 20, 40), np.uint16)
    gt[2:6, 2:8, 2:8] = 1
    gt[2:6, 10:16, 20:30] = 2
    pred = np.zeros_like(gt)
    pred[2:6, 2:8, 2:8] = 5  # IoU 1
    pred[2:6, 10:16, 22:32] = 7  # IoU 8/12 = 0.667
    pred[7:9, 0:3, 30:35] = 9  # false positive
    return pred, gt


def test_average_precision_toy():
    pred, gt = _toy_instances()
    ap = M.average_precision(pred, gt)
    assert ap["ap50"] == pytest.approx(2 / 3)  # TP 2, FP 1, FN 0
    assert ap["ap75"] == pytest.approx(1 / 4)  # TP 1, FP 2, FN 1
    assert M.average_precision(pred, gt, thresholds=(0.3,))["ap30"] == pytest.approx(2 / 3)
    assert ap["ap"] == pytest.approx((4 * 2 / 3 + 6 * 1 / 4) / 10)  # IoU 0.667 passes 0.50..0.65
    coco = M.average_precision(pred, gt, scores={5: 0.9, 7: 0.8, 9: 0.1})
    assert coco["ap50"] == pytest.approx(1.0)  # the FP ranks last
    assert coco["ap75"] == pytest.approx(51 / 101)  # recall 0.5 reached at precision 1
    _, _, iou = M.iou_matrix(pred, gt)
    assert iou.toarray()[1, 1] == pytest.approx(8 / 12)


def test_evaluate_tasks():
    pred, gt = _toy_instances()
    mito = M.evaluate(pred, gt, "mito", (40, 8, 8))
    assert {"iou", "dice", "precision", "recall", "ap50", "ap75"} <= set(mito)
    syn = M.evaluate(pred, gt, "synapse", (40, 8, 8), synapse_distance_nm=50)
    assert syn["detection_tp"] == 2
    gt_n = np.zeros((3, 12, 30), np.uint32)
    gt_n[1, 0, :11], gt_n[1, 4, :11] = 1, 2
    neuron = M.evaluate(gt_n, gt_n, "neuron", (40, 4, 4))
    assert neuron["voi"] == 0 and neuron["arand"] == 0 and neuron["erl_normalized"] == pytest.approx(1.0)
    prob = (gt != 0).astype(np.float32) * 0.9
    assert M.evaluate(prob, gt, "membrane")["iou"] == 1.0
    with pytest.raises(Exception, match="task"):
        M.evaluate(pred, gt, "cells")


def test_evaluate_cli(tmp_path, capsys):
    from ssl_em.metrics.evaluate import main

    pred, gt = _toy_instances()
    np.save(tmp_path / "pred.npy", pred)
    np.save(tmp_path / "gt.npy", gt)
    np.save(tmp_path / "raw.npy", np.random.default_rng(0).integers(0, 255, gt.shape, np.uint8))
    out = tmp_path / "eval"
    rc = main(["--pred", str(tmp_path / "pred.npy"), "--gt", str(tmp_path / "gt.npy"), "--task", "mito",
               "--out", str(out), "--raw", str(tmp_path / "raw.npy"), "--voxel-size", "40", "8", "8"])
    assert rc == 0 and "ap50" in capsys.readouterr().out
    record = json.loads((out / "metrics.json").read_text())
    assert record["metrics"]["ap50"] == pytest.approx(2 / 3) and len(record["worst_z"]) == 3
    assert (out / "worst_slices.png").stat().st_size > 1000


def test_evaluate_neuron_on_gala(gala_path, tmp_path):
    with np.load(gala_path) as d:
        gt, seg = d["neuron_test"][:20], d["seg_test_agglo"][:20]
    r = M.evaluate(seg, gt, "neuron", erl=False)
    assert r["voi"] == pytest.approx(r["voi_merge"] + r["voi_split"])
    assert r["arand"] == pytest.approx(sk_arand(gt, seg)[0])
    from ssl_em.metrics.evaluate import save_worst_slices

    zs = save_worst_slices(tmp_path / "w.png", seg, gt, "neuron")
    assert len(zs) == 3 and (tmp_path / "w.png").exists()


def test_isbi_foreground_restricted_scores_match_pair_counting_and_entropies():
    """V_rand and V_info of the ISBI 2012 challenge from their definitions, brute force: ordered voxel
    pairs inside gt objects, pred's boundary voxels (0) each a segment of their own."""
    from sklearn.metrics import mutual_info_score

    from ssl_em.metrics.contingency import foreground_restricted_scores

    rng = np.random.default_rng(0)
    gt, pred = rng.integers(0, 4, (12, 10)), rng.integers(0, 5, (12, 10))
    v_rand, v_info = foreground_restricted_scores(pred, gt)
    fg = gt.ravel() > 0
    g, p = gt.ravel()[fg], pred.ravel()[fg].astype(np.int64)
    p = np.where(p == 0, 100 + np.arange(p.size), p)  # boundary voxels: singletons
    same_g, same_p = g[:, None] == g[None], p[:, None] == p[None]
    assert v_rand == pytest.approx(2 * (same_g & same_p).sum() / (same_g.sum() + same_p.sum()))

    def h(x):
        q = np.unique(x, return_counts=True)[1] / x.size
        return -(q * np.log(q)).sum()

    assert v_info == pytest.approx(2 * mutual_info_score(g, p) / (h(g) + h(p)))
    assert foreground_restricted_scores(gt, gt) == (pytest.approx(1.0), pytest.approx(1.0))


def test_membrane_scores_rank_boundary_errors_on_isbi_labels(isbi_path):
    """On real ISBI 2012 membranes: the labels themselves score 1; gaps that merge cells cost more Rand
    score than the same membrane drawn thicker."""
    from scipy import ndimage

    gt = np.load(isbi_path)["membrane"][:3] > 0
    assert M.evaluate(gt.astype(np.float32), gt, "membrane")["vrand"] == pytest.approx(1.0)
    thick = M.evaluate(ndimage.binary_dilation(gt, np.ones((1, 3, 3))).astype(np.float32), gt, "membrane")
    gaps = gt.copy()
    gaps[:, :, ::16] = False  # a cut through every membrane every 16 pixels: neighbouring cells merge
    merged = M.evaluate(gaps.astype(np.float32), gt, "membrane")
    assert 0.8 < thick["vrand"] < 1.0 and merged["vrand"] < thick["vrand"] - 0.2
    assert merged["vinfo"] < thick["vinfo"]

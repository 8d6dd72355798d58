"""Masked losses against slow reference formulas; the ignore mask really ignores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from ssl_em.adapters.losses import BCEDiceLoss, CLDiceLoss, bce_loss, cldice_loss, dice_loss, soft_skeleton


def _data(seed: int = 0, shape=(2, 2, 4, 10, 12)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    target = (torch.rand(shape, generator=g) > 0.6).double()
    mask = (torch.rand(shape, generator=g) > 0.3).double()
    return logits, target, mask


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_matches_reference():
    logits, target, mask = _data()
    num = den = 0.0
    for x, t, m in zip(logits.flatten().tolist(), target.flatten().tolist(), mask.flatten().tolist()):
        p = _sigmoid(x)
        num += m * -(t * math.log(p) + (1 - t) * math.log(1 - p))
        den += m
    assert bce_loss(logits, target, mask).item() == pytest.approx(num / den, rel=1e-9)


def test_dice_matches_reference():
    logits, target, mask = _data(1)
    losses = []
    for c in range(logits.shape[1]):
        inter = ps = ts = 0.0
        for x, t, m in zip(logits[:, c].flatten().tolist(), target[:, c].flatten().tolist(),
                           mask[:, c].flatten().tolist()):
            p = _sigmoid(x)
            inter, ps, ts = inter + p * t * m, ps + p * m, ts + t * m
        losses.append(1 - (2 * inter + 1) / (ps + ts + 1))
    assert dice_loss(logits, target, mask).item() == pytest.approx(np.mean(losses), rel=1e-9)


def _ref_skeleton(x: np.ndarray, iterations: int, axes: tuple[bool, bool, bool]) -> np.ndarray:
    """Shit et al.'s soft skeleton with scipy min/max filters (cross-shaped erosion, box dilation)."""
    cross = np.zeros((3, 3, 3), bool)
    cross[1, 1, 1] = True
    for a, on in enumerate(axes):
        if on:
            idx = [1, 1, 1]
            idx[a] = slice(None)
            cross[tuple(idx)] = True
    box = np.ones([3 if on else 1 for on in axes], bool)

    def erode(v):
        return ndimage.minimum_filter(v, footprint=cross, mode="nearest")

    def opening(v):
        return ndimage.maximum_filter(erode(v), footprint=box, mode="nearest")

    skel = np.maximum(x - opening(x), 0)
    for _ in range(iterations):
        x = erode(x)
        delta = np.maximum(x - opening(x), 0)
        skel = skel + np.maximum(delta - skel * delta, 0)
    return skel


@pytest.mark.parametrize("voxel_size,axes", [(None, (True, True, True)), ((50, 4, 4), (False, True, True))])
def test_soft_skeleton_matches_reference(voxel_size, axes):
    x = torch.rand(1, 1, 6, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = soft_skeleton(x, 4, voxel_size)[0, 0].numpy()
    np.testing.assert_allclose(got, _ref_skeleton(x[0, 0].numpy(), 4, axes), atol=1e-12)


def test_skeleton_of_a_tube_is_its_centreline():
    tube = torch.zeros(1, 1, 8, 9, 9)
    tube[0, 0, :, 3:6, 3:6] = 1  # 3x3 in-plane tube along z
    skel = soft_skeleton(tube, 5, voxel_size=(50, 4, 4))[0, 0]
    assert skel[:, 4, 4].min() == 1 and skel.sum() == 8  # one voxel per section, at the centre


def test_cldice_matches_reference():
    logits, target, mask = _data(3, (1, 2, 4, 10, 12))
    p = torch.sigmoid(logits).numpy() * mask.numpy()
    t = target.numpy() * mask.numpy()
    losses = []
    for c in range(2):
        sp, st = _ref_skeleton(p[0, c], 3, (True,) * 3), _ref_skeleton(t[0, c], 3, (True,) * 3)
        tprec = ((sp * t[0, c]).sum() + 1) / (sp.sum() + 1)
        tsens = ((st * p[0, c]).sum() + 1) / (st.sum() + 1)
        losses.append(1 - 2 * tprec * tsens / (tprec + tsens))
    got = cldice_loss(logits, target, mask, iterations=3).item()
    assert got == pytest.approx(np.mean(losses), rel=1e-9)


LOSSES = {
    "bce": bce_loss,
    "dice": dice_loss,
    "cldice": lambda lo, t, m: cldice_loss(lo, t, m, iterations=3, voxel_size=(40, 8, 8)),
    "bce+dice": BCEDiceLoss(pos_weight=3.0),
    "combined-cldice": CLDiceLoss(0.5, 3),
}


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_voxels_change_nothing(name):
    loss_fn = LOSSES[name]
    logits, target, mask = _data(4)
    results = []
    for flip in (False, True):
        t = torch.where(mask > 0, target, 1 - target) if flip else target
        lo = logits.clone()
        if flip:  # even NaN logits in ignored voxels stay out
            lo = torch.where(mask > 0, lo, torch.full_like(lo, float("nan")))
        lo.requires_grad_(True)
        loss = loss_fn(lo, t, mask)
        loss.backward()
        results.append((loss.item(), torch.where(mask > 0, lo.grad, 0)))
    assert math.isfinite(results[0][0])
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("name", LOSSES)
def test_all_ignored_is_zero_without_nan(name):
    logits, target, _ = _data(5)
    logits.requires_grad_(True)
    loss = LOSSES[name](logits, target, torch.zeros_like(logits))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


def test_perfect_prediction_scores_low():
    target = torch.zeros(1, 1, 4, 16, 16)
    target[..., 4:12, 6:10] = 1
    good, bad = target * 40 - 20, -target * 40 + 20
    for fn in (dice_loss, lambda lo, t: cldice_loss(lo, t, voxel_size=(50, 4, 4))):
        assert fn(good, target).item() < 0.05 < 0.9 < fn(bad, target).item()

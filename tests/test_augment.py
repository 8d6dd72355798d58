"""3-D EM augmentation: labels stay aligned, intensity ops touch raw only, boxes are tracked."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ssl_em.data import augment as A


def _blocks(shape=(8, 64, 64), block=(2, 8, 8), seed=0) -> np.ndarray:
    """Piecewise-constant label ids (blocks), so nearest and linear resampling mostly agree."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(1, 50, size=tuple(s // b for s, b in zip(shape, block)))
    return np.kron(coarse, np.ones(block, dtype=np.int64))


def _coded(label: np.ndarray) -> dict[str, np.ndarray]:
    """A sample whose raw IS its label (as float), so any misalignment shows as raw != label."""
    return {"raw": label.astype(np.float32), "label": label.astype(np.int64), "mask": np.ones(label.shape, np.float32)}


GEOMETRIC = [
    A.RandomFlip(),
    A.RandomRot90(),
    A.RandomRot90(planes=((1, 2), (0, 2), (0, 1))),
    A.MisalignedSection(max_shift=5),
    A.MisalignedSection(max_shift=5, p_slip=1.0),
]


@pytest.mark.parametrize("t", GEOMETRIC, ids=lambda t: repr(t)[:40])
def test_exact_geometric_ops_keep_raw_and_label_aligned(t):
    s = _coded(_blocks())
    for seed in range(8):
        out = t(s, np.random.default_rng(seed))
        assert out["raw"].shape == out["label"].shape == out["mask"].shape == s["raw"].shape
        np.testing.assert_array_equal(out["raw"], out["label"].astype(np.float32))


def test_elastic_keeps_alignment_and_matches_scipy_map_coordinates():
    label = _blocks((4, 64, 64), (2, 16, 16))
    s = _coded(label)
    t = A.ElasticDeform(alpha=6.0, spacing=32)
    out = t(s, np.random.default_rng(3))
    agree = np.abs(out["raw"] - out["label"]) < 1e-3
    assert agree.mean() > 0.85  # linear and nearest differ only next to block borders
    assert not np.array_equal(out["label"], label)
    # reference: the same displacement through scipy, section by section
    rng = np.random.default_rng(3)
    grid = (3, 3)
    coarse = rng.normal(0.0, 6.0, size=(2, *grid)).astype(np.float32)
    disp = np.stack([ndimage.zoom(c, (64 / 3, 64 / 3), order=3)[:64, :64] for c in coarse])
    yy, xx = np.meshgrid(np.arange(64, dtype=np.float32), np.arange(64, dtype=np.float32), indexing="ij")
    coords = np.stack([yy + disp[0], xx + disp[1]])
    ref_raw = np.stack([ndimage.map_coordinates(p, coords, order=1, mode="mirror") for p in s["raw"]])
    ref_lab = np.stack([ndimage.map_coordinates(p, coords, order=0, mode="mirror") for p in s["label"]])
    np.testing.assert_allclose(out["raw"], ref_raw, atol=1e-4)
    np.testing.assert_array_equal(out["label"], ref_lab)


def test_geometric_part_of_default_pipeline_aligns_real_mito(vnc_crop):
    label = ndimage.label(vnc_crop["mito"][:8, :64, :64])[0].astype(np.int64)
    geo = A.geometric_only(A.default_em_augment(strength=2.0))
    for t in geo.transforms:
        t.p = 1.0
    for seed in range(4):
        out = geo(_coded(label), np.random.default_rng(seed))
        assert (np.abs(out["raw"] - out["label"]) < 1e-3).mean() > 0.97
        assert set(np.unique(out["label"])) <= set(np.unique(label))  # nearest: no invented ids


def test_default_pipeline_shapes_dtypes_and_determinism():
    rng = np.random.default_rng(0)
    s = {
        "raw": rng.random((8, 64, 64), dtype=np.float32),
        "label": _blocks(),
        "mask": np.ones((8, 64, 64), np.float32),
    }
    aug = A.default_em_augment(strength=1.5)
    a, b = aug(s, np.random.default_rng(7)), aug(s, np.random.default_rng(7))
    for k in s:
        assert a[k].shape == s[k].shape and a[k].dtype == s[k].dtype
        np.testing.assert_array_equal(a[k], b[k])
    assert A.default_em_augment(strength=0)(s, rng) is s


@pytest.mark.parametrize(
    "t",
    [A.RandomContrast(), A.RandomBrightness(), A.RandomGamma(), A.GaussianNoise(sigma=(0.05, 0.1)),
     A.GaussianBlur(sigma=(0.5, 1.0)), A.MissingSection(), A.ContrastJump(p_section=1.0)],
    ids=lambda t: type(t).__name__,
)
def test_intensity_ops_change_raw_only(t):
    s = _coded(_blocks((6, 32, 32), (2, 8, 8)))
    s["raw"] = np.random.default_rng(1).random((6, 32, 32), dtype=np.float32)
    out = t(s, np.random.default_rng(2))
    assert out["label"] is s["label"] and out["mask"] is s["mask"]
    assert out["raw"].dtype == np.float32 and out["raw"].shape == s["raw"].shape
    assert not np.array_equal(out["raw"], s["raw"])


def test_missing_section_blanks_whole_sections():
    raw = np.random.default_rng(0).random((6, 16, 16), dtype=np.float32)
    out = A.MissingSection(max_sections=2)({"raw": raw}, np.random.default_rng(0))["raw"]
    flat = [z for z in range(6) if np.ptp(out[z]) == 0]
    assert 1 <= len(flat) <= 2 and np.allclose(out[flat[0]], raw.mean())
    others = [z for z in range(6) if z not in flat]
    np.testing.assert_array_equal(out[others], raw[others])


def test_contrast_jump_is_affine_per_section():
    raw = np.random.default_rng(0).random((5, 8, 8), dtype=np.float32)
    out = A.ContrastJump(p_section=1.0)({"raw": raw}, np.random.default_rng(0))["raw"]
    for z in range(5):
        gain, off = np.polyfit(raw[z].ravel(), out[z].ravel(), 1)
        np.testing.assert_allclose(out[z], gain * raw[z] + off, atol=1e-5)


def test_misaligned_section_masks_entering_pixels():
    s = _coded(_blocks())
    out = A.MisalignedSection(max_shift=4, p_slip=0.0)(s, np.random.default_rng(5))
    moved = [z for z in range(8) if not np.array_equal(out["label"][z], s["label"][z])]
    assert moved and moved == list(range(moved[0], 8))  # translation: every section from z0 on
    assert (out["mask"][moved] == 0).any() and (out["mask"][: moved[0]] == 1).all()


def test_quarter_turns_only_where_allowed():
    raw = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    allowed = [raw, np.rot90(raw, 2, axes=(1, 2))]
    for seed in range(10):  # swap_ok=False (e.g. 4 x 5 nm pixels): only identity or a half turn
        out = A.RandomRot90(swap_ok=False)({"raw": raw}, np.random.default_rng(seed))["raw"]
        assert any(np.array_equal(out, a) for a in allowed)
    rect = np.zeros((2, 4, 6), np.float32)  # non-square plane keeps its shape
    assert A.RandomRot90()({"raw": rect}, np.random.default_rng(0))["raw"].shape == rect.shape


@pytest.mark.parametrize("t", [A.RandomFlip(), A.RandomRot90(), A.RandomRot90(planes=((1, 2), (0, 2), (0, 1)))],
                         ids=["flip", "rot_yx", "rot_all"])
def test_overlap_box_follows_flips_and_rotations(t):
    raw = np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)
    box = np.array([[1, 5], [2, 8], [0, 3]])
    inside = np.sort(raw[1:5, 2:8, 0:3].ravel())
    for seed in range(12):
        out = t({"raw": raw, "overlap": box}, np.random.default_rng(seed))
        b = out["overlap"]
        moved = out["raw"][b[0, 0] : b[0, 1], b[1, 0] : b[1, 1], b[2, 0] : b[2, 1]]
        np.testing.assert_array_equal(np.sort(moved.ravel()), inside)

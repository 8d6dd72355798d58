"""The plan from the data (``ssl_em.plan``): working spacing, crop with context, batch; scores on the original grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ssl_em.errors import ConfigError
from ssl_em.plan import DownsampledVolume, downsample, make_plan, upsample


def test_vnc_like_mitochondria_plan_works_at_9_nm_with_a_micron_of_context(capsys) -> None:
    plan = make_plan((50, 4.6, 4.6), "mito", (20, 1024, 1024))
    assert plan.downsample == 2 and plan.spacing == pytest.approx((50, 9.2, 9.2))
    z, y, x = plan.crop_shape
    assert y == x and y * 9.2 >= 1200 and y % 8 == 0 and y <= 256  # >= 1.2 um in-plane, on the stride
    assert z == 2  # thin crops (z is 5.4x coarser than x): the thinnest the default stride (2, 8, 8) takes
    flat = make_plan((50, 4.6, 4.6), "mito", (20, 1024, 1024), stride=(1, 16, 16))
    assert flat.crop_shape == (1, 144, 144) and "2-D crops, every pooling in-plane" in flat.describe()
    assert plan.batch_size >= 2 and plan.anisotropic_levels == 2
    text = plan.describe()
    assert "working spacing 50x9.2x9.2 nm" in text and f"crop {plan.crop_shape}" in text and "x1/2" in text
    assert "2 in-plane-only poolings" in text


def test_plan_follows_the_encoder_the_task_and_the_user() -> None:
    assert make_plan((50, 4.6, 4.6), "mito", encoder_voxel_size=(50, 4.6, 4.6)).downsample == 1
    assert make_plan((50, 4.6, 4.6), "membrane").downsample == 1  # thin structures: full resolution
    iso = make_plan((10, 10, 10), "neuron", (50, 250, 250))
    assert iso.crop_shape[0] == 16 and iso.anisotropic_levels == 0
    small = make_plan((40, 8, 8), "mito", (8, 64, 64))
    assert small.crop_shape == (2, 64, 64)  # in-plane clipped to the volume, on the stride
    mine = make_plan((50, 4.6, 4.6), "mito", crop_shape=(8, 64, 64), batch_size=3, downsample=1)
    assert (mine.crop_shape, mine.batch_size, mine.downsample) == ((8, 64, 64), 3, 1)
    # a crop asked for without a batch gets the voxel budget's batch for that crop, not the planned crop's
    assert make_plan((50, 4.6, 4.6), "mito", crop_shape=(1, 64, 64)).batch_size == 16
    assert make_plan((50, 4.6, 4.6), "mito", crop_shape=(16, 128, 128)).batch_size == 2
    with pytest.raises(ConfigError, match="unknown plan fields"):
        make_plan((50, 4.6, 4.6), "mito", crop=3)
    with pytest.raises(ConfigError, match="voxel size"):
        make_plan((0, 4, 4), "mito")


def test_resampling_there_and_back() -> None:
    raw = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    small = downsample(raw, 2)
    assert small.shape == (2, 3, 3) and small[0, 0, 0] == pytest.approx(raw[0, :2, :2].mean())
    labels = np.zeros((2, 6, 6), np.uint32)
    labels[:, 2:4, 2:4] = 7
    assert set(np.unique(downsample(labels, 2, labels=True))) == {0, 7}  # ids kept, never averaged
    ids = np.array([[[5, 5, 0, 0], [5, 9, 0, 3]]], np.uint32)  # two 2x2 blocks: mostly 5, mostly 0
    assert downsample(ids, 2, labels=True).tolist() == [[[5, 0]]]
    back = upsample(small[None], raw.shape)
    assert back.shape == (1, 2, 6, 6) and np.abs(back[0] - raw).mean() < 2.0
    lazy = DownsampledVolume(raw, 2)
    assert lazy.shape == (2, 3, 3) and np.array_equal(lazy[0:2, 1:3, 0:3], small[:, 1:3, :])


def test_the_study_trains_at_the_working_spacing_and_scores_on_the_original_grid(tmp_path) -> None:
    from ssl_em.data.phantom import make_phantom
    from ssl_em.study import Study, StudyConfig

    ph = make_phantom((8, 320, 128), voxel_size=(40, 4, 4), seed=2)  # 4 nm: mitochondria plan at 8 nm
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("scratch",), fractions=(1.0,), steps=4,
                      pretrain_steps=2, val_every=4, batch_size=2, lrs={"scratch": (1.5e-3,)}, precision="32",
                      voxel_size=ph.voxel_size)
    lines: list[str] = []
    study = Study(ph.raw, ph.mito, None, cfg, tmp_path / "out", log=lines.append)
    assert cfg.downsample == 2 and cfg.spacing == (40.0, 8.0, 8.0)
    assert study.data.raw.shape == (8, 160, 64) and study.ev_gt.shape[1:] == tuple(
        2 * (b.stop - b.start) for b in study.eval_box[1:])
    assert any(line.startswith("plan: voxel 40x4x4 nm -> working spacing 40x8x8 nm") for line in lines)
    records = study.run()
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["plan"]["downsample"] == 2 and doc["plan"]["crop_shape"] == list(cfg.crop_shape)
    assert {r["metric"] for r in records} == {"iou", "dice", "ap50"}
    overlay_section = np.load(tmp_path / "out" / "sections" / "scratch_100pc_sections.npy")
    assert overlay_section.shape == study.ev_gt.shape[1:]  # segmentation back on the original grid


def test_plain_unet_follows_the_plan_2d_for_ssTEM_3d_for_isotropic() -> None:
    import torch

    from ssl_em.models import create_encoder
    from ssl_em.models.unet import layout

    kernels, pools = layout((50, 9.2, 9.2), (1, 128, 128))
    assert all(k == (1, 3, 3) for k in kernels) and all(p == (1, 2, 2) for p in pools)  # 2-D per section
    kernels, pools = layout((50, 9.2, 9.2), (2, 128, 128))  # z pooled once, where the voxel is ~isotropic
    assert pools == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2)] and kernels[:2] == [(1, 3, 3)] * 2 and kernels[2] == (3, 3, 3)
    assert layout((10, 10, 10), (16, 64, 64))[1] == [(2, 2, 2)] * 4
    net = create_encoder("unet_small", spacing=(50, 9.2, 9.2), crop_shape=(2, 64, 64), out_channels=2).eval()
    assert net.patch_size == (2, 16, 16) and net(torch.zeros(1, 1, 2, 64, 64)).shape == (1, 2, 2, 64, 64)
    assert net.encoder_config["kwargs"]["pools"] == [[1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]]  # saved as planned
    with pytest.raises(ConfigError, match="divisible"):
        net(torch.zeros(1, 1, 2, 40, 64))


def test_one_anisotropy_rule_for_augmentation_and_boundaries() -> None:
    """ssTEM (z > 2x in-plane) gets in-plane augmentation and per-section mitochondrion boundaries;
    near-isotropic voxels get 3-D ones, everywhere by the same rule; an unknown voxel size is read as
    serial sections by both (they disagreed before)."""
    from ssl_em.adapters import get_task
    from ssl_em.data.datamodule import EMDataModule
    from ssl_em.plan import is_anisotropic

    assert is_anisotropic((50, 4.6, 4.6)) and is_anisotropic((17, 8, 8))
    assert not is_anisotropic((16, 8, 8)) and not is_anisotropic((10, 10, 10))
    labels = np.zeros((5, 12, 12), np.int64)
    labels[1:4, 3:9, 3:9] = 1  # one mitochondrion through three sections
    assert is_anisotropic(None)
    for vs in ((17.0, 8.0, 8.0), (16.0, 8.0, 8.0), None):
        boundary = get_task("mito", voxel_size=None if vs is None else list(vs))._targets(
            labels, np.ones_like(labels))[0][1]
        # a 3-D inner boundary swallows the object's first section; a per-section one only rings it
        assert bool(boundary[1, 5, 5]) != is_anisotropic(vs) and boundary[1, 3, 5]
        dm = EMDataModule(task="mito")
        dm.voxel_size = vs  # what setup() reads from the volume
        assert dm._augment_kwargs()["anisotropic"] == is_anisotropic(vs)

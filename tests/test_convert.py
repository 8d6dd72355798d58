"""OME-Zarr conversion: round trip, anisotropic pyramid, NGFF metadata, label pooling, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ssl_em.data import convert as convert_mod
from ssl_em.data.convert import _pool, convert, level_factors, main, plan_pyramid
from ssl_em.data.volume import open_volume
from ssl_em.errors import VolumeError


@pytest.fixture(scope="module")
def vnc_npz(vnc_crop, tmp_path_factory):
    """The real VNC crop as an npz with its voxel size, the way shared data ships."""
    path = tmp_path_factory.mktemp("src") / "vnc.npz"
    np.savez_compressed(path, raw=vnc_crop["raw"], mito=vnc_crop["mito"].astype(np.uint32),
                        resolution_nm=np.array([50.0, 4.0, 4.0]))
    return path


def test_factors_follow_anisotropy():
    assert level_factors((50, 4, 4)) == (1, 2, 2)
    assert level_factors((50, 32, 32)) == (2, 2, 2)  # within 2x of the coarsest: near-isotropic
    assert level_factors((8, 8, 30)) == (2, 2, 1)
    plan = plan_pyramid((20, 1024, 1024), (50, 4, 4), (32, 128, 128))
    assert [p[0] for p in plan] == [(20, 1024, 1024), (20, 512, 512), (20, 256, 256), (20, 128, 128)]
    assert [p[1] for p in plan][-1] == (50, 32, 32)
    iso = plan_pyramid((300, 300, 300), (8, 8, 8), (64, 64, 64))
    assert [p[0] for p in iso] == [(300, 300, 300), (150, 150, 150), (75, 75, 75), (38, 38, 38)]
    assert len(plan_pyramid((8, 64, 64), (50, 4, 4), (8, 32, 32), levels=6)) == 6
    flat = plan_pyramid((1, 512, 512), (1, 1, 1), (1, 128, 128))  # a 2-D image: never halve its one section
    assert [p[0] for p in flat] == [(1, 512, 512), (1, 256, 256), (1, 128, 128)]


def test_round_trip_pyramid_and_ngff_metadata(vnc_npz, vnc_crop, tmp_path):
    dst = tmp_path / "vnc.ome.zarr"
    convert(f"{vnc_npz}:raw", dst, chunks=(4, 32, 32), levels=4, progress=False)
    level0 = open_volume(str(dst))
    np.testing.assert_array_equal(level0[:], vnc_crop["raw"])
    assert level0.voxel_size == (50, 4, 4) and level0.chunks == (4, 32, 32)
    shapes = [open_volume(f"{dst}@{i}").shape for i in range(4)]
    assert shapes == [(8, 128, 128), (8, 64, 64), (8, 32, 32), (8, 16, 16)]  # in-plane only at 50x4x4
    np.testing.assert_allclose(open_volume(f"{dst}@3").voxel_size, (50, 32, 32))
    # level 1 is the 2x2 mean of level 0
    ref = vnc_crop["raw"].astype(float).reshape(8, 64, 2, 64, 2).mean((2, 4))
    np.testing.assert_array_equal(open_volume(f"{dst}@1")[:], np.rint(ref).astype(np.uint8))

    attrs = json.loads((dst / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["type"] == "space" and a["unit"] == "nanometer" for a in ms["axes"])
    for i, ds in enumerate(ms["datasets"]):
        assert ds["path"] == str(i)
        kinds = [t["type"] for t in ds["coordinateTransformations"]]
        assert kinds[0] == "scale" and len(ds["coordinateTransformations"][0]["scale"]) == 3
        assert kinds in (["scale"], ["scale", "translation"])  # NGFF 0.4: scale first, at most one translation
    assert ms["datasets"][1]["coordinateTransformations"][1]["translation"] == [0.0, 2.0, 2.0]
    zarray = json.loads((dst / "0" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"


def test_labels_use_mode_pooling(vnc_npz, vnc_crop, tmp_path):
    dst = tmp_path / "mito.ome.zarr"
    assert main([f"{vnc_npz}:mito", str(dst), "--labels", "--chunks", "4,64,64", "--levels", "2",
                 "--no-progress"]) == 0
    lvl1 = open_volume(f"{dst}@1")[:]
    assert lvl1.dtype == np.uint32 and set(np.unique(lvl1)) <= {0, 1}
    # mode of each 2x2 window; ties (2 vs 2) go to the window's first voxel
    win = vnc_crop["mito"].astype(np.uint32).reshape(8, 64, 2, 64, 2).transpose(0, 1, 3, 2, 4).reshape(8, 64, 64, 4)
    ones = win.sum(-1)
    expected = np.where(ones > 2, 1, np.where(ones < 2, 0, win[..., 0]))
    np.testing.assert_array_equal(lvl1, expected)
    ids = np.array([[[5, 9, 9], [9, 9, 7]]], np.uint32)  # odd edge: the last window is padded by repetition
    np.testing.assert_array_equal(_pool(ids, (1, 2, 2), labels=True), [[[9, 9]]])


def test_interrupted_conversion_leaves_no_dst(vnc_npz, tmp_path, monkeypatch):
    dst = tmp_path / "out.ome.zarr"
    calls = {"n": 0}
    real_pool = convert_mod._pool

    def failing_pool(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "_pool", failing_pool)
    with pytest.raises(KeyboardInterrupt):
        convert(f"{vnc_npz}:raw", dst, chunks=(4, 32, 32), levels=3, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither DST nor a temporary sibling
    # an existing DST survives a failed re-conversion untouched
    monkeypatch.setattr(convert_mod, "_pool", real_pool)
    convert(f"{vnc_npz}:raw", dst, chunks=(4, 64, 64), levels=2, progress=False)
    calls["n"] = 0
    monkeypatch.setattr(convert_mod, "_pool", failing_pool)
    with pytest.raises(KeyboardInterrupt):
        convert(f"{vnc_npz}:raw", dst, chunks=(4, 32, 32), levels=3, progress=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.ome.zarr"]
    assert open_volume(str(dst)).chunks == (4, 64, 64)


def test_unknown_voxel_size_stays_unknown_and_bad_args(tmp_path):
    src = tmp_path / "noise.npy"
    np.save(src, np.random.default_rng(0).integers(0, 255, (3, 40, 40), dtype=np.uint8))
    dst = convert(str(src), tmp_path / "noise.ome.zarr", chunks=(2, 16, 16), progress=False, compression="none")
    vol = open_volume(str(dst))
    assert not vol.voxel_size_known and vol.voxel_size == (1, 1, 1)
    np.testing.assert_array_equal(vol[:], np.load(src))
    assert json.loads((dst / "0" / ".zarray").read_text())["compressor"] is None
    with pytest.raises(VolumeError, match="three positive integers"):
        convert(str(src), tmp_path / "x.ome.zarr", chunks=(2, 16))
    with pytest.raises(VolumeError, match="integer dtype"):
        convert(str(src), tmp_path / "x.ome.zarr", labels=True, dtype="float32")
    assert not (tmp_path / "x.ome.zarr").exists()

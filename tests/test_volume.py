"""open_volume / Volume: every spec form on a real VNC crop, voxel-size sources, laziness, pickling, errors."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import operator
import pickle
from pathlib import Path

import numpy as np
import pytest

from ssl_em.data.volume import Volume, main, open_volume
from ssl_em.errors import VolumeError

INDICES = [
    np.s_[...],
    np.s_[1:5, 10:70, 3:99],
    np.s_[2],
    np.s_[::2, ::-3, 5],
    np.s_[-1, ..., -20:],
    np.s_[3:1],  # empty
    np.s_[:, 100:, :17:4],
]


@pytest.fixture(scope="module")
def raw(vnc_crop) -> np.ndarray:
    return vnc_crop["raw"]  # (8, 128, 128) uint8 ssTEM


def write_n5(root: Path, key: str, data: np.ndarray, block: tuple[int, ...], compression: str = "gzip",
             attrs: dict | None = None) -> None:
    """Minimal N5 writer per the spec (x-first dims, big-endian, 'default' block header)."""
    ds = root / key
    ds.mkdir(parents=True)
    (root / "attributes.json").write_text(json.dumps({"n5": "2.5.0"}))
    (ds / "attributes.json").write_text(json.dumps({
        "dimensions": list(data.shape[::-1]), "blockSize": list(block[::-1]), "dataType": str(data.dtype),
        "compression": {"type": compression}, **(attrs or {})}))
    grid = [range(0, s, b) for s, b in zip(data.shape, block)]
    for z in grid[0]:
        for y in grid[1]:
            for x in grid[2]:
                blk = data[z:z + block[0], y:y + block[1], x:x + block[2]]
                header = np.array([0, blk.ndim], ">u2").tobytes() + np.array(blk.shape[::-1], ">u4").tobytes()
                payload = blk.astype(blk.dtype.newbyteorder(">")).tobytes()
                path = ds / str(x // block[2]) / str(y // block[1]) / str(z // block[0])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(header + (gzip.compress(payload) if compression == "gzip" else payload))


@pytest.fixture(scope="module")
def specs(raw, tmp_path_factory) -> dict[str, tuple[str, tuple[float, float, float] | None]]:
    """The crop written in every supported form: spec -> expected voxel size (None = unknown)."""
    import h5py
    import tifffile
    import zarr
    from PIL import Image

    d = tmp_path_factory.mktemp("formats")
    out: dict[str, tuple[str, tuple[float, float, float] | None]] = {}

    z2 = zarr.create_array(str(d / "v2.zarr"), shape=raw.shape, chunks=(4, 32, 32), dtype=raw.dtype, zarr_format=2)
    z2[:] = raw
    z2.attrs["resolution"] = [50, 4.6, 4.6]
    out["zarr_v2"] = (str(d / "v2.zarr"), (50, 4.6, 4.6))

    g3 = zarr.open_group(str(d / "v3.zarr"), mode="w", zarr_format=3)
    a3 = g3.create_array("em/raw", shape=raw.shape, chunks=(2, 64, 64), dtype=raw.dtype)
    a3[:] = raw
    a3.attrs["voxel_size"] = [40, 8, 8]
    out["zarr_v3_path"] = (str(d / "v3.zarr/em/raw"), (40, 8, 8))

    # NGFF 0.5 on zarr v3, micrometre units and a global scale on top of the per-level one
    ome = zarr.open_group(str(d / "v5.ome.zarr"), mode="w", zarr_format=3)
    for level, step in enumerate((1, 2)):
        ome.create_array(str(level), data=np.ascontiguousarray(raw[:, ::step, ::step]), chunks=(4, 32, 32))
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    ome.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": axes, "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2]}],
        "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [0.05, 0.0023 * s,
                                                                                                0.0023 * s]}]}
                     for i, s in enumerate((1, 2))]}]}
    out["ome_v05"] = (str(d / "v5.ome.zarr"), (50, 4.6, 4.6))

    with h5py.File(d / "a.h5", "w") as f:
        f.create_dataset("volumes/raw", data=raw, chunks=(2, 32, 32)).attrs["resolution"] = [50, 4.6, 4.6]
        f.create_dataset("volumes/other", data=raw[:2])
    out["h5"] = (f"{d / 'a.h5'}:/volumes/raw", (50, 4.6, 4.6))
    with h5py.File(d / "b.hdf5", "w") as f:
        f.create_dataset("raw", data=raw)
    out["hdf5_single"] = (str(d / "b.hdf5"), None)

    write_n5(d / "a.n5", "setup0/raw", raw, (3, 50, 40), "gzip",
             {"pixelResolution": {"dimensions": [4.6, 4.6, 50], "unit": "nm"}})
    out["n5_gzip"] = (str(d / "a.n5/setup0/raw"), (50, 4.6, 4.6))
    write_n5(d / "b.n5", "raw", raw.astype(np.uint16) * 7, (4, 64, 64), "raw", {"resolution": [4, 4, 40]})
    out["n5_raw_u16"] = (str(d / "b.n5/raw"), (40, 4, 4))

    tifffile.imwrite(d / "stack.tif", raw)
    out["tif_mmap"] = (str(d / "stack.tif"), None)
    tifffile.imwrite(d / "stack_zlib.tiff", raw, compression="zlib")
    out["tif_pages"] = (str(d / "stack_zlib.tiff"), None)

    slices = d / "slices"
    slices.mkdir()
    for z in range(raw.shape[0]):  # unpadded numbers: 10 must come after 9, not after 1
        Image.fromarray(raw[z]).save(slices / f"sec_{z * 3 + 1}.png")
    out["png_folder"] = (str(slices), None)

    np.savez_compressed(d / "a.npz", raw=raw, mito=raw > 100, resolution_nm=np.array([50, 4.6, 4.6]))
    out["npz"] = (f"{d / 'a.npz'}:raw", (50, 4.6, 4.6))
    np.save(d / "a.npy", raw)
    out["npy"] = (str(d / "a.npy"), None)
    return out


FORMS = ["zarr_v2", "zarr_v3_path", "ome_v05", "h5", "hdf5_single", "n5_gzip", "n5_raw_u16", "tif_mmap",
         "tif_pages", "png_folder", "npz", "npy"]


@pytest.mark.parametrize("form", FORMS)
def test_every_spec_form_slices_like_numpy(form, specs, raw):
    spec, voxel = specs[form]
    expected = raw.astype(np.uint16) * 7 if form == "n5_raw_u16" else raw
    vol = open_volume(spec)
    assert vol.shape == expected.shape and vol.dtype == expected.dtype and vol.ndim == 3 and vol.axes == "zyx"
    for index in INDICES:
        np.testing.assert_array_equal(vol[index], expected[index], err_msg=f"{form} {index}")
    assert vol.voxel_size_known is (voxel is not None)
    np.testing.assert_allclose(vol.voxel_size, voxel or (1, 1, 1), rtol=1e-6)
    assert spec in repr(vol)


def test_ome_level_and_explicit_voxel_size(specs, raw):
    spec = specs["ome_v05"][0]
    lvl1 = open_volume(f"{spec}@1")
    np.testing.assert_array_equal(lvl1[:], raw[:, ::2, ::2])
    np.testing.assert_allclose(lvl1.voxel_size, (50, 9.2, 9.2))  # per-level (um) x global scale, in nm
    assert open_volume(spec, voxel_size=(30, 3, 3)).voxel_size == (30, 3, 3)  # argument wins
    assert open_volume(specs["npz"][0], voxel_size="45,5,5").voxel_size == (45, 5, 5)
    with pytest.raises(VolumeError, match="no multiscale level 5"):
        open_volume(f"{spec}@5")


def test_ome_axes_metadata_decides_channels(tmp_path):
    import zarr

    data = np.arange(6 * 2 * 8 * 8, dtype=np.uint16).reshape(6, 2, 8, 8)  # 6 channels: only metadata can tell
    for name, axes, ok in [("c.ome.zarr", "czyx", True), ("t.ome.zarr", "tzyx", False)]:
        g = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=2)
        g.create_array("0", data=data, chunks=(1, 2, 8, 8))
        kinds = {"c": "channel", "t": "time"}
        g.attrs["multiscales"] = [{"version": "0.4", "axes": [
            {"name": a, "type": kinds.get(a, "space"), **({} if a in kinds else {"unit": "nanometer"})} for a in axes],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 30, 5, 5]}]}]}]
        if ok:
            vol = open_volume(str(tmp_path / name))
            assert vol.axes == "czyx" and vol.voxel_size == (30, 5, 5) and vol.chunks == (1, 2, 8, 8)
            np.testing.assert_array_equal(vol[4, 1, ::3], data[4, 1, ::3])
        else:
            with pytest.raises(VolumeError, match="axes 'tzyx'"):
                open_volume(str(tmp_path / name))


def test_numpy_2d_4d_and_passthrough():
    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    vol = open_volume(arr)
    assert vol.axes == "czyx" and vol.dtype == np.float32
    np.testing.assert_array_equal(vol[1, :, 2], arr[1, :, 2])
    img = open_volume(arr[0, 0])  # 2-D -> one section
    assert img.shape == (1, 4, 5) and img.axes == "zyx"
    np.testing.assert_array_equal(img[0], arr[0, 0])
    assert open_volume(vol) is vol
    assert pickle.loads(pickle.dumps(vol))[1, 2, 3, 4] == arr[1, 2, 3, 4]


def test_reads_only_the_requested_box(specs, raw, tmp_path):
    """Damage storage outside the box: a lazy reader never notices; reading the damage names it."""
    import shutil

    zarr_copy = tmp_path / "v2.zarr"
    shutil.copytree(specs["zarr_v2"][0], zarr_copy)
    (zarr_copy / "1.3.3").write_bytes(b"not a blosc frame")  # chunk z4-8, y96-128, x96-128
    vol = open_volume(str(zarr_copy))
    np.testing.assert_array_equal(vol[:4, :, :], raw[:4])
    with pytest.raises(VolumeError) as err:
        vol[5, 100:110, 100:110]
    msg = str(err.value)
    assert "\n" not in msg and str(zarr_copy) in msg and "(1, 3, 3)" in msg

    folder = tmp_path / "slices"
    shutil.copytree(specs["png_folder"][0], folder)
    (folder / "sec_22.png").write_bytes(b"garbage")  # the last section
    vol = open_volume(str(folder))
    np.testing.assert_array_equal(vol[:7, :5, :5], raw[:7, :5, :5])
    with pytest.raises(VolumeError, match="slices"):
        vol[7]


def _read_in_workers(vol: Volume, n_workers: int) -> list[np.ndarray]:
    import torch

    class Crops(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> np.ndarray:
            return vol[i, 16 * i:16 * i + 32, :32]

    loader = torch.utils.data.DataLoader(Crops(), batch_size=None, num_workers=n_workers)
    return [np.asarray(x) for x in loader]


@pytest.mark.parametrize("form", ["h5", "zarr_v2", "n5_gzip"])
def test_pickles_small_and_reopens_in_workers(form, specs, raw):
    vol = open_volume(specs[form][0])
    vol[0, 0, 0]  # parent holds an open handle (an h5py file must not be reused after fork)
    blob = pickle.dumps(vol)
    assert len(blob) < 1000  # spec + voxel size, no data or handles
    for i, crop in enumerate(_read_in_workers(vol, 2)):  # fork workers: reopen on pid change
        np.testing.assert_array_equal(crop, raw[i, 16 * i:16 * i + 32, :32])
    # spawn: only the pickled handle crosses; the child reopens on first access
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        out = pool.starmap(operator.getitem, [(vol, np.s_[2:4, 5:50, 7:9])])[0]
    np.testing.assert_array_equal(out, raw[2:4, 5:50, 7:9])


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_bad_inputs_give_one_line_errors(specs, tmp_path):
    import zarr

    cases: list[tuple[str, tuple[str, ...]]] = [
        (str(tmp_path / "missing.zarr"), ("missing.zarr", "no such")),
        (str(tmp_path / "missing.tif"), ("missing.tif", "no such")),
        (f"{specs['h5'][0].split(':')[0]}:/volumes/nope", ("a.h5", "'volumes/nope'", "volumes/raw", "volumes/other")),
        (specs["h5"][0].split(":")[0], ("a.h5", "volumes/raw", "volumes/other")),  # two datasets: must name one
        (specs["npz"][0].replace(":raw", ":labels"), ("a.npz", "'labels'", "raw", "mito")),
        (specs["zarr_v3_path"][0].replace("em/raw", "em/nope"), ("v3.zarr", "em/nope")),
        (specs["zarr_v3_path"][0].replace("/em/raw", ""), ("v3.zarr", "group")),
        (specs["n5_gzip"][0].replace("setup0/raw", "setup0"), ("a.n5", "setup0", "raw")),
    ]
    odd = tmp_path / "volume.xyz"
    odd.write_text("x")
    cases.append((str(odd), ("volume.xyz", "unknown volume format")))
    np.save(tmp_path / "five.npy", np.zeros((1, 1, 2, 2, 2)))
    cases.append((str(tmp_path / "five.npy"), ("five.npy", "5-D")))
    np.save(tmp_path / "wide.npy", np.zeros((7, 2, 2, 2)))
    cases.append((str(tmp_path / "wide.npy"), ("wide.npy", "channel")))
    bad = tmp_path / "bad.zarr"
    zarr.create_array(str(bad), shape=(2, 2, 2), dtype="u1", zarr_format=2)
    (bad / ".zarray").write_text("{not json")
    cases.append((str(bad), ("bad.zarr", "bad JSON")))
    bad_n5 = tmp_path / "bad.n5"
    (bad_n5 / "raw").mkdir(parents=True)
    (bad_n5 / "raw" / "attributes.json").write_text("{")
    cases.append((str(bad_n5 / "raw"), ("bad.n5", "bad JSON")))
    (tmp_path / "empty_dir").mkdir()
    cases.append((str(tmp_path / "empty_dir"), ("empty_dir", "no .png")))
    not_h5 = tmp_path / "fake.h5"
    not_h5.write_text("hello")
    cases.append((str(not_h5), ("fake.h5", "HDF5")))
    for spec, needles in cases:
        with pytest.raises(VolumeError) as err:
            open_volume(spec)
        _one_line(err, *needles)
    with pytest.raises(VolumeError) as err:
        open_volume(specs["npy"][0], voxel_size=(0, 1, 1))
    _one_line(err, "voxel size")


def test_info_cli(specs, capsys):
    assert main([specs["h5"][0]]) == 0
    out = capsys.readouterr().out
    assert "(8, 128, 128)" in out and "uint8" in out and "zyx" in out and "50, 4.6, 4.6" in out and "(2, 32, 32)" in out
    from ssl_em.cli import main as cli

    assert cli(["info", specs["npy"][0]]) == 0
    assert "not in the file" in capsys.readouterr().out
    assert cli(["info", "/nonexistent/x.zarr"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", [2, 3])
def test_uncompressed_zarr_reads_chunk_files_directly_and_equals_zarr(tmp_path, fmt):
    """Uncompressed stores skip zarr's per-chunk machinery (8x the crops/s in benchmarks/data_throughput.py):
    the bytes read must be zarr's, edge chunks and dtypes included; a missing chunk is still an error
    unless fill_missing, and a truncated chunk file is named."""
    import zarr

    from ssl_em.data.formats import _stored_raw

    rng = np.random.default_rng(fmt)
    data = rng.integers(0, 60000, (10, 37, 45)).astype(np.uint16)
    kw = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt == 2 else {}
    path = tmp_path / "raw.zarr"
    arr = zarr.create_array(str(path), shape=data.shape, chunks=(4, 16, 16), dtype=data.dtype, compressors=None,
                            zarr_format=fmt, fill_value=7, config={"write_empty_chunks": True}, **kw)
    arr[:] = data
    assert _stored_raw(zarr.open_array(str(path), mode="r"))
    vol = open_volume(str(path))
    for box in [(slice(0, 10), slice(0, 37), slice(0, 45)), (slice(3, 9), slice(15, 33), slice(1, 44)),
                (slice(8, 10), slice(32, 37), slice(40, 45))]:
        np.testing.assert_array_equal(vol[box], data[box])
    key = "1/0/2" if fmt == 2 else "c/1/0/2"
    chunk = path / key
    chunk.unlink()
    with pytest.raises(VolumeError, match="is missing from the store"):
        vol[4:8, 0:16, 32:45]
    filled = open_volume(str(path), fill_missing=True)[4:8, 0:16, 30:45]
    assert (filled[:, :, 2:] == 7).all() and np.array_equal(filled[:, :, :2], data[4:8, 0:16, 30:32])
    chunk.write_bytes(b"\0" * 10)
    with pytest.raises(VolumeError, match="holds 10 bytes"):
        open_volume(str(path))[4:8, 0:16, 32:45]


def test_voxel_size_text_forms_and_what_is_refused():
    """The forms people type (commas, spaces, x, semicolons, one isotropic number) parse; anything that is
    not three positive numbers is one VolumeError naming where it came from."""
    from ssl_em.data.formats import parse_voxel
    from ssl_em.errors import VolumeError

    for text in ("50,4,4", "50 4 4", "50x4x4", "50;4;4", " 50, 4 ,4 ", [50, 4, 4]):
        assert parse_voxel(text, "--voxel-size") == (50.0, 4.0, 4.0)
    assert parse_voxel("8", "--voxel-size") == (8.0, 8.0, 8.0)
    for bad in ("50,4,abc", "50,4", "50,0,4", "nan,4,4", {"z": 50}, None):
        with pytest.raises(VolumeError, match="--voxel-size: voxel size .* must be three positive numbers"):
            parse_voxel(bad, "--voxel-size")

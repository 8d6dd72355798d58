"""Inputs that would train or predict on nonsense stop with one line: missing zarr chunks, blank volumes,
empty labels, labels on another voxel grid, channels-last arrays; sparse labels go where annotation is."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from ssl_em.cli import main as cli_main
from ssl_em.data.crops import CropDataset
from ssl_em.data.datamodule import EMDataModule
from ssl_em.data.phantom import make_phantom
from ssl_em.data.volume import open_volume
from ssl_em.errors import LabelError, VolumeError
from ssl_em.predict import predict_volume


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((16, 96, 96), seed=3)


def _zarr_v3(path: Path, data: np.ndarray, chunks=(4, 32, 32), **attrs) -> Path:
    """A complete store: zarr leaves all-zero chunks unwritten by default, which reads as missing here."""
    arr = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
                            attributes=attrs, config={"write_empty_chunks": True})
    arr[:] = data
    return path


def test_a_missing_chunk_is_an_error_unless_fill_missing(phantom, tmp_path: Path, capsys) -> None:
    store = _zarr_v3(tmp_path / "raw.zarr", phantom.raw)
    lost = store / "c" / "1" / "0" / "1"  # chunk (1, 0, 1): z 4-8, x 32-64
    assert lost.is_file()
    lost.unlink()
    vol = open_volume(str(store))
    assert vol[:4].shape == (4, 96, 96)  # boxes away from the hole read as before
    with pytest.raises(VolumeError, match=r"chunk c/1/0/1 .* missing from the store.*--fill-missing"):
        vol[:, :, 40:50]
    filled = open_volume(str(store), fill_missing=True)[4:8, :32, 32:64]
    assert filled.shape == (4, 32, 32) and np.all(filled == 0)
    # zarr v2 stores (OME-Zarr 0.4, "/" chunk keys) as well, through the CLI
    v2 = tmp_path / "v2.zarr"
    g = zarr.open_group(str(v2), mode="w", zarr_format=2)
    a = g.create_array("raw", shape=phantom.raw.shape, chunks=(4, 32, 32), dtype="uint8",
                       chunk_key_encoding={"name": "v2", "separator": "/"})
    a[:] = phantom.raw
    (v2 / "raw" / "2" / "1" / "0").unlink()
    assert cli_main(["convert", f"{v2}/raw", str(tmp_path / "out.ome.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chunk 2/1/0" in err and "--fill-missing" in err
    assert not (tmp_path / "out.ome.zarr").exists()
    assert cli_main(["convert", f"{v2}/raw", str(tmp_path / "out.ome.zarr"), "--no-progress", "--fill-missing"]) == 0
    out = open_volume(str(tmp_path / "out.ome.zarr"))  # convert writes every chunk: its output is complete
    assert np.all(out[8:12, 32:64, :32] == 0) and np.array_equal(out[:8], phantom.raw[:8])


def test_training_data_with_a_missing_chunk_fails_before_training(phantom, tmp_path: Path) -> None:
    store = _zarr_v3(tmp_path / "raw.zarr", phantom.raw)
    shutil.rmtree(store / "c" / "0")  # the first four sections are gone
    dm = EMDataModule(unlabeled=[str(store)], crop_shape=(4, 32, 32), batch_size=2, samples_per_epoch=4,
                      val_fraction=0)
    with pytest.raises(VolumeError, match="missing from the store"):
        dm.setup("fit")
        next(iter(dm.train_dataloader()))
    dm = EMDataModule(unlabeled=[str(store)], crop_shape=(4, 32, 32), batch_size=2, samples_per_epoch=4,
                      val_fraction=0, fill_missing=True)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["raw"].shape == (2, 1, 4, 32, 32)


def test_ssl_em_predictions_with_masked_out_blocks_read_without_fill_missing(phantom, tmp_path: Path) -> None:
    """Predictions skip blocks the mask leaves out on purpose: they say so, and read as zeros."""
    mask = np.zeros(phantom.raw.shape, np.uint8)
    mask[:4] = 1
    net = torch.nn.Conv3d(1, 1, 1).eval()
    out = tmp_path / "pred.zarr"
    predict_volume(net, phantom.raw, out, (4, 32, 32), (0, 0, 0), mask=mask, precision="32", progress=False)
    assert not (out / "c" / "0" / "2").exists()  # blocks z 8-12 were never written
    pred = open_volume(str(out))
    assert pred.shape == (1, 16, 96, 96) and np.all(pred[:, 4:] == 0) and np.any(pred[:, :4] != 0)


def test_blank_volumes_and_empty_labels_stop_before_training(phantom) -> None:
    blank = np.full((12, 64, 64), 117, np.uint8)
    with pytest.raises(VolumeError, match="every sampled voxel of its training region is 117"):
        CropDataset([blank], (4, 32, 32))
    empty = np.zeros(phantom.raw.shape, np.uint8)
    with pytest.raises(LabelError, match="no labelled foreground in the training region"):
        CropDataset([phantom.raw], (4, 32, 32), labels=[empty])
    with pytest.raises(LabelError, match="or the ignore value"):
        CropDataset([phantom.raw], (4, 32, 32), labels=[np.full(phantom.raw.shape, 255, np.uint8)], ignore_value=255)
    ds = CropDataset([phantom.raw], (4, 32, 32), labels=[phantom.mito])  # real labels pass
    assert ds[0]["label"].shape[-3:] == (4, 32, 32)


def test_labels_on_another_voxel_grid_are_refused(phantom, tmp_path: Path) -> None:
    raw = _zarr_v3(tmp_path / "raw.zarr", phantom.raw, resolution=[40, 8, 8])
    labels = _zarr_v3(tmp_path / "labels.zarr", phantom.mito.astype(np.uint8), resolution=[40, 16, 16])
    with pytest.raises(LabelError, match=r"labels voxel size \(40.0, 16.0, 16.0\) nm differs from the raw's"):
        CropDataset([str(raw)], (4, 32, 32), labels=[str(labels)])
    same = _zarr_v3(tmp_path / "same.zarr", phantom.mito.astype(np.uint8), resolution=[40, 8, 8])
    assert len(CropDataset([str(raw)], (4, 32, 32), labels=[str(same)]).sources) == 1


def test_n_label_sections_choose_only_annotated_sections(phantom) -> None:
    """One annotated section among unannotated ones (ignore value everywhere else): asking for one
    labelled section gives that one, at every seed."""
    labels = np.full(phantom.raw.shape, 255, np.uint8)
    labels[3] = phantom.mito[3] > 0  # the only annotated section (mitochondria and background)
    for seed in range(4):
        dm = EMDataModule(raw=phantom.raw, labels=labels, task="mito", crop_shape=(4, 32, 32), batch_size=2,
                          samples_per_epoch=4, val_fraction=0.3, ignore_value=255, n_label_sections=1, seed=seed,
                          augment=False)
        dm.setup("fit")
        keep = dm.train_set.sources[0].mask
        kept = np.flatnonzero(keep[tuple(slice(0, n) for n in keep.shape)].any(axis=(1, 2)))
        assert kept.tolist() == [3], (seed, kept)


def test_channels_last_arrays_get_a_clear_error(tmp_path: Path) -> None:
    rgb_stack = np.zeros((10, 64, 64, 3), np.uint8)
    np.save(tmp_path / "rgb.npy", rgb_stack)
    with pytest.raises(VolumeError, match=r"looks channels-last \(z, y, x, c\): pick one channel"):
        open_volume(str(tmp_path / "rgb.npy"))
    with pytest.raises(VolumeError, match=r"looks like one RGB\(A\) image"):
        open_volume(np.zeros((64, 64, 3), np.uint8))
    assert open_volume(np.zeros((3, 10, 64, 64), np.uint8)).axes == "czyx"  # channels first is a volume

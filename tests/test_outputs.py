"""No command destroys a user's data: an output may not be, hold or sit inside an input; a folder ssl-em
did not write is never replaced; its own outputs only with --overwrite; killed writes leave nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ssl_em.cli import main as cli_main
from ssl_em.data.convert import convert
from ssl_em.data.volume import open_volume, spec_path
from ssl_em.errors import ConfigError
from ssl_em.predict import blockwise_instances, predict_volume
from ssl_em.utils.io import atomic_write_text, written_by_ssl_em

FP32 = {"precision": "32", "progress": False}


@pytest.fixture
def raw_zarr(tmp_path: Path) -> Path:
    """A user's raw volume as OME-Zarr (written by convert, as a user's own pipeline might)."""
    src = tmp_path / "raw.npy"
    np.save(src, np.random.default_rng(0).integers(0, 256, (6, 24, 24), dtype=np.uint8))
    return convert(str(src), tmp_path / "vol.ome.zarr", chunks=(6, 24, 24), levels=1, progress=False)


@pytest.fixture
def thesis(tmp_path: Path) -> Path:
    """An unrelated folder of the user's: never to be replaced."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    np.save(folder / "labels.npy", np.ones((2, 2), np.uint8))
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3, padding=1)).eval()


def test_spec_path_names_the_file_or_store_a_spec_reads(tmp_path: Path) -> None:
    assert spec_path("a/b.ome.zarr/0@1") == Path("a/b.ome.zarr")
    assert spec_path("f.H5:/volumes/raw") == Path("f.H5") and spec_path("f.npz:raw") == Path("f.npz")
    assert spec_path(tmp_path / "stack.tif") == tmp_path / "stack.tif"
    assert spec_path(np.zeros((2, 2, 2))) is None and spec_path(open_volume(np.zeros((2, 4, 4)))) is None


def test_predict_refuses_an_output_that_is_or_sits_inside_its_input(raw_zarr: Path, capsys) -> None:
    before = _snapshot(raw_zarr)
    for dst, how in ((raw_zarr, "is the input"), (raw_zarr / "pred.zarr", "sits inside the input")):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=how):
                predict_volume(_net(), str(raw_zarr), dst, (6, 24, 24), overwrite=overwrite, **FP32)
    assert _snapshot(raw_zarr) == before
    with pytest.raises(ConfigError, match="contains the input"):  # an output folder above the input
        predict_volume(_net(), str(raw_zarr), raw_zarr.parent, (6, 24, 24), overwrite=True, **FP32)
    assert _snapshot(raw_zarr) == before


def test_predict_and_instances_never_replace_a_folder_ssl_em_did_not_write(raw_zarr: Path, thesis: Path,
                                                                          tmp_path: Path) -> None:
    before = _snapshot(thesis)
    with pytest.raises(ConfigError, match="not written by ssl-em"):
        predict_volume(_net(), str(raw_zarr), thesis, (6, 24, 24), overwrite=True, **FP32)
    probs = predict_volume(_net(), str(raw_zarr), tmp_path / "probs.zarr", (6, 24, 24), activation="sigmoid",
                           **FP32)
    with pytest.raises(ConfigError, match="not written by ssl-em"):
        blockwise_instances(probs, thesis, "components", block_shape=(6, 24, 24), overwrite=True, progress=False)
    assert _snapshot(thesis) == before
    # its own outputs are recognised, and replaced only when asked
    assert written_by_ssl_em(tmp_path / "probs.zarr") and written_by_ssl_em(raw_zarr) and not written_by_ssl_em(thesis)
    seg = tmp_path / "seg.zarr"
    blockwise_instances(probs, seg, "components", block_shape=(6, 24, 24), progress=False)
    with pytest.raises(ConfigError, match="pass --overwrite"):
        blockwise_instances(probs, seg, "components", block_shape=(6, 24, 24), progress=False)
    blockwise_instances(probs, seg, "components", block_shape=(6, 24, 24), overwrite=True, progress=False)
    assert written_by_ssl_em(seg)


def test_convert_cli_refuses_unrelated_folders_and_replaces_its_own_only_with_overwrite(
        raw_zarr: Path, thesis: Path, tmp_path: Path, capsys) -> None:
    before = _snapshot(thesis)
    for extra in ([], ["--overwrite"]):
        assert cli_main(["convert", str(raw_zarr), str(thesis), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not written by ssl-em" in err and str(thesis) in err
    assert _snapshot(thesis) == before
    assert cli_main(["convert", str(raw_zarr), str(raw_zarr), "--no-progress", "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err
    out = tmp_path / "copy.ome.zarr"
    assert cli_main(["convert", str(raw_zarr), str(out), "--no-progress"]) == 0
    assert cli_main(["convert", str(raw_zarr), str(out), "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli_main(["convert", str(raw_zarr), str(out), "--no-progress", "--overwrite", "--dtype", "float32"]) == 0
    assert open_volume(str(out)).dtype == np.float32


def test_a_killed_write_leaves_nothing_behind_after_the_next_run(tmp_path: Path) -> None:
    """A convert killed mid-write leaves its hidden temporary; the next write to the same output removes
    it. A temporary whose process still runs (another writer) is left alone."""
    target = tmp_path / "out.txt"
    code = ("import os, sys, time; from ssl_em.utils.io import atomic_path\n"
            f"with atomic_path({str(target)!r}, is_dir=True) as tmp:\n"
            "    (tmp / 'half').write_text('x'); print(tmp, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    stale = Path(proc.stdout.readline().strip())
    assert stale.is_dir() and stale.name.startswith(".out.txt.")
    proc.kill()
    proc.wait()
    live = tmp_path / f".out.txt.{os.getpid()}.keep.tmp"  # this process: alive
    live.mkdir()
    atomic_write_text(target, "done")
    assert target.read_text() == "done" and not stale.exists() and live.exists()


def test_a_failed_write_leaves_nothing_even_when_writes_in_flight_land_after_the_error(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """zarr writes chunks concurrently: on a full disk one write fails while others still land, and a
    chunk write recreates its folders (``mkdir(parents=True)``). Here one lands right after the first
    delete, for certain; the temporary is deleted until nothing comes back (it was left holding the space)."""
    from ssl_em.utils import io

    real_rmtree, calls = io.shutil.rmtree, []

    def rmtree_then_a_late_chunk(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if not calls:  # the write in flight lands after the first delete
            (Path(path) / "c" / "0").mkdir(parents=True)
            (Path(path) / "c" / "0" / "0").write_bytes(b"chunk")
        calls.append(path)

    monkeypatch.setattr(io.shutil, "rmtree", rmtree_then_a_late_chunk)
    with pytest.raises(OSError, match="No space left"):
        with io.atomic_path(tmp_path / "out.ome.zarr", is_dir=True) as tmp:
            (tmp / "zarr.json").write_text("{}")
            raise OSError(28, "No space left on device")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_study_and_demo_results_go_only_to_folders_ssl_em_made(thesis: Path, tmp_path: Path, capsys) -> None:
    from ssl_em.data.phantom import make_phantom
    from ssl_em.study import Study, StudyConfig
    from ssl_em.utils.io import OUTPUT_MARKER

    target = make_phantom((8, 160, 64), seed=2)
    np.savez(tmp_path / "target.npz", raw=target.raw, mito=target.mito)
    raw, labels = f"{tmp_path / 'target.npz'}:raw", f"{tmp_path / 'target.npz'}:mito"
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("scratch",), fractions=(0.25,),
                      crop_shape=(8, 32, 32), batch_size=2, voxel_size=target.voxel_size)
    before = _snapshot(thesis)
    with pytest.raises(ConfigError, match="already holds files ssl-em did not write"):
        Study(raw, labels, None, cfg, thesis)
    with pytest.raises(ConfigError, match="overlaps the input"):
        Study(raw, labels, None, cfg, tmp_path)  # the folder that holds the labelled volume
    assert _snapshot(thesis) == before
    Study(raw, labels, None, cfg, tmp_path / "results")
    assert (tmp_path / "results" / OUTPUT_MARKER).exists()
    Study(raw, labels, None, cfg, tmp_path / "results")  # its own folder again: a rerun writes there
    assert cli_main(["demo", "--tiny", "--out", str(thesis), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files ssl-em did not write" in err[0]
    assert _snapshot(thesis) == before


def test_phantom_evaluate_and_export_never_replace_a_users_folder(thesis: Path, tmp_path: Path, capsys) -> None:
    before = _snapshot(thesis)
    for extra in ([], ["--overwrite"]):
        assert cli_main(["phantom", str(thesis), "--shape", "4,32,32", *extra]) == 2
        assert "not written by ssl-em" in capsys.readouterr().err
    own = tmp_path / "ph.zarr"
    assert cli_main(["phantom", str(own), "--shape", "4,32,32"]) == 0
    assert cli_main(["phantom", str(own), "--shape", "4,32,32"]) == 2  # its own: only with --overwrite
    assert cli_main(["phantom", str(own), "--shape", "4,32,32", "--seed", "3", "--overwrite"]) == 0
    assert written_by_ssl_em(own)
    capsys.readouterr()
    assert cli_main(["evaluate", "--pred", f"{own}/mito", "--gt", f"{own}/mito", "--task", "mito",
                     "--out", str(thesis)]) == 2
    assert "already holds files ssl-em did not write" in capsys.readouterr().err
    assert cli_main(["evaluate", "--pred", f"{own}/mito", "--gt", f"{own}/mito", "--task", "mito",
                     "--out", str(own / "eval")]) == 2  # inside an input
    assert "overlaps the input" in capsys.readouterr().err
    assert cli_main(["export-encoder", str(tmp_path / "missing.ckpt"), str(thesis)]) == 2
    assert "no earlier ssl-em export" in capsys.readouterr().err
    assert _snapshot(thesis) == before


def test_overwrite_replaces_only_what_the_same_tool_wrote(raw_zarr: Path, tmp_path: Path) -> None:
    """A converted volume is not a prediction's to replace, even with --overwrite."""
    other = convert(str(raw_zarr), tmp_path / "copy.ome.zarr", progress=False)
    before = _snapshot(other)
    with pytest.raises(ConfigError, match="written by ssl_em.data.convert, not by ssl_em.predict"):
        predict_volume(_net(), str(raw_zarr), other, (6, 24, 24), overwrite=True, **FP32)
    assert _snapshot(other) == before

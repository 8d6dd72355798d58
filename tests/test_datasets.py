"""Dataset registry and download: local file:// archives only (no network), safe extraction, checksums."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ssl_em import datasets
from ssl_em.data.volume import open_volume
from ssl_em.datasets import REGISTRY, ArraySpec, Dataset, DownloadError, download, main, safe_extract


def test_registry_records_are_complete():
    assert {"isbi2012", "vnc_gerhard2013", "cremi_a", "cremi_b", "cremi_c", "lucchi_pp", "snemi3d"} <= set(REGISTRY)
    for name, ds in REGISTRY.items():
        assert ds.name == name and ds.url.startswith(("https://", "http://"))
        assert ds.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", ds.sha256)
        assert ds.licence and ds.citation and ds.description and ds.arrays
        assert len(ds.voxel_size) == 3 and min(ds.voxel_size) > 0
    assert "NC" in REGISTRY["vnc_gerhard2013"].licence  # non-commercial must be stated truthfully


def _slices_zip(path: Path, raw: np.ndarray, mask: np.ndarray) -> None:
    """A GitHub-style archive: one top folder holding PNG slice folders."""
    from PIL import Image

    with zipfile.ZipFile(path, "w") as zf:
        for z in range(raw.shape[0]):
            for folder, arr in (("raw", raw), ("mito", mask)):
                buf = io.BytesIO()
                Image.fromarray(arr[z]).save(buf, format="PNG")
                zf.writestr(f"mini-master/stack1/{folder}/{z:02d}.png", buf.getvalue())


@pytest.fixture
def mini(vnc_crop, tmp_path, monkeypatch):
    raw = vnc_crop["raw"][:4, :64, :64]
    mask = (vnc_crop["mito"][:4, :64, :64] > 0).astype(np.uint8) * 255
    archive = tmp_path / "mini.zip"
    _slices_zip(archive, raw, mask)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    record = Dataset(name="mini", url=archive.as_uri(), sha256=digest, licence="test", citation="test",
                     voxel_size=(50.0, 4.6, 4.6), description="VNC crop as PNG slices",
                     arrays={"raw": ArraySpec("stack1/raw", "raw"), "mito": ArraySpec("stack1/mito", "mito", True)},
                     filename="mini.zip")
    monkeypatch.setitem(REGISTRY, "mini", record)
    return record, raw, mask


def test_download_verifies_extracts_and_converts(mini, tmp_path, capsys):
    record, raw, mask = mini
    out = download("mini", tmp_path / "data", progress=False)
    assert set(out) == {"raw", "mito"}
    vol = open_volume(str(out["raw"]))
    np.testing.assert_array_equal(vol[:], raw)
    assert vol.voxel_size == (50.0, 4.6, 4.6)
    np.testing.assert_array_equal(open_volume(str(out["mito"]))[:], mask)
    assert "mini: verified" in capsys.readouterr().out
    # the CLI path, reusing the downloaded file, extracting only
    assert main(["mini", str(tmp_path / "data"), "--no-convert"]) == 0
    assert "stack1/raw" in capsys.readouterr().out


def test_checksum_mismatch_and_unverified(mini, tmp_path, monkeypatch, capsys):
    record, _, _ = mini
    monkeypatch.setitem(REGISTRY, "mini", Dataset(**{**record.__dict__, "sha256": "0" * 64}))
    with pytest.raises(DownloadError) as err:
        download("mini", tmp_path / "bad", progress=False)
    assert "does not match" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad" / "mini" / "extracted").exists()  # nothing unpacked from a bad file
    monkeypatch.setitem(REGISTRY, "mini", Dataset(**{**record.__dict__, "sha256": None}))
    download("mini", tmp_path / "unverified", convert=False, progress=False)
    out = capsys.readouterr().out
    assert "UNVERIFIED" in out and hashlib.sha256(Path(record.url[7:]).read_bytes()).hexdigest() in out


def test_malicious_archives_are_refused(tmp_path):
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("ok/a.txt", "fine")
        zf.writestr("../evil", "escaped")
    with pytest.raises(DownloadError, match="unsafe member '../evil'"):
        safe_extract(evil_zip, tmp_path / "x")
    assert not (tmp_path / "evil").exists()

    def tar_with(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Path:
        path = tmp_path / f"t{abs(hash(name))}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            data = b"" if link else b"escaped"
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        return path

    for archive, pattern in [(tar_with("a/../../evil"), "unsafe member"), (tar_with("/etc/evil"), "unsafe member"),
                             (tar_with("a/link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
                             (tar_with("a/hard", tarfile.LNKTYPE, "../../x"), "link")]:
        with pytest.raises(DownloadError, match=pattern):
            safe_extract(archive, tmp_path / "y")
    assert not (tmp_path / "evil").exists()
    (tmp_path / "plain.bin").write_bytes(b"neither zip nor tar")
    with pytest.raises(DownloadError, match="not a zip or tar"):
        safe_extract(tmp_path / "plain.bin", tmp_path / "z")


def test_unknown_dataset_and_list(capsys):
    with pytest.raises(DownloadError, match="unknown dataset 'nope'"):
        download("nope", "unused")
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "cremi_a" in out and "CC BY-NC-SA" in out


def test_failed_download_names_the_url(tmp_path, monkeypatch):
    record = REGISTRY["isbi2012"]
    missing = (tmp_path / "nothing.h5").as_uri()
    with pytest.raises(DownloadError, match="nothing.h5"):
        download("isbi2012", tmp_path, url=missing, progress=False)
    assert not any(p.suffix == ".tmp" for p in (tmp_path / record.name).iterdir())
    assert datasets.REGISTRY is REGISTRY

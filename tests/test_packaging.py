"""A regular (non-editable) install carries every package of the source tree and the shipped weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "runs", "ssl_em_out", "bench_out", "build", "dist",
                                    "*.egg-info", "__pycache__", ".pytest_cache", "lightning_logs")


def _source_packages() -> dict[str, Path]:
    """Import name -> folder, for every folder with an ``__init__.py`` (``adapters/`` is ``ssl_em.adapters``)."""
    packages = {}
    for root, import_root in ((REPO / "ssl_em", "ssl_em"), (REPO / "adapters", "ssl_em.adapters")):
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            packages[".".join((import_root, *rel))] = init.parent
    return packages


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the build writes egg-info and build/ where it runs)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          str(src), "-w", str(tmp / "dist")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("ssl_em-*.whl")
    return whl


def test_wheel_holds_every_package_module_and_shipped_weight(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = _source_packages()
    assert {"ssl_em", "ssl_em.adapters", "ssl_em.study", "ssl_em.models"} <= set(packages)
    for name, folder in packages.items():
        for module in folder.glob("*.py"):
            assert f"{name.replace('.', '/')}/{module.name}" in names, f"{module} is missing from {wheel.name}"
    weights = [p for p in (REPO / "ssl_em" / "weights").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in weights) and any(p.suffix == ".json" for p in weights)
    for path in weights:
        assert path.relative_to(REPO).as_posix() in names, f"shipped file {path} is missing from {wheel.name}"
    assert not any(n.startswith(("adapters/", "tests/", "benchmarks/")) for n in names)


def test_unpacked_wheel_imports_the_study_and_loads_the_shipped_encoder(wheel: Path, tmp_path: Path) -> None:
    """What `pip install ssl-em` gives, without the source tree on the path: the study (missing from
    the hand-written package list before) imports, and the shipped encoder loads from package data."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import ssl_em, ssl_em.study.runner, ssl_em.adapters.finetune, ssl_em.demo;"
            f"assert ssl_em.__file__.startswith({str(site)!r}), ssl_em.__file__;"
            "import timm; enc = timm.create_model('unet_small', pretrained=True);"
            "assert enc.pretrained_metadata['metadata']['steps'] == 5400;"
            "print(type(enc).__name__, sum(p.numel() for p in enc.parameters()))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 100_000, out.stdout

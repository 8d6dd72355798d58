"""Shared fixtures: real EM from ../shared/data (skipped with a reason where absent), phantoms."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Lightning binds a StreamHandler to sys.stderr when first imported: imported inside a test that captures
# output (capsys), it would keep writing to that test's closed stream ("Logging error: I/O operation on
# closed file") in every later test, and test files passed or failed depending on which ran first
import lightning.pytorch  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_EM_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real EM file {path} is absent (it lives in ../shared/data beside the clone)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real EM volumes; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: real-EM tests need ../shared/data beside the clone")
    return SHARED_DATA


@pytest.fixture(scope="session")
def vnc_path() -> Path:
    """ssTEM VNC stack 1 (20x1024x1024, 50x4.6x4.6 nm) with raw/membrane/mito/synapse."""
    return _shared_file("vnc_gerhard2013.npz")


@pytest.fixture(scope="session")
def vnc_crop(vnc_path) -> dict[str, np.ndarray]:
    """A small crop of the VNC stack: raw, mito, synapse, membrane, each (8, 128, 128)."""
    with np.load(vnc_path) as d:
        return {k: d[k][:8, 256:384, 256:384].copy() for k in ("raw", "mito", "synapse", "membrane")}


@pytest.fixture(scope="session")
def gala_path() -> Path:
    """FIB-SEM gala example with neuron ids and reference segmentations."""
    return _shared_file("gala_example.npz")


@pytest.fixture(scope="session")
def isbi_path() -> Path:
    return _shared_file("isbi2012.npz")


@pytest.fixture
def one_torch_thread():
    """Tiny 3-D ops are dispatch-bound: on a busy 2-core machine two OpenMP threads ran them up to
    100x slower than one. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _private_precision_cache(tmp_path_factory):
    """Precision measurements (``precision: auto``) cache to a per-session folder, never ~/.cache."""
    old = os.environ.get("SSL_EM_CACHE")
    os.environ["SSL_EM_CACHE"] = str(tmp_path_factory.mktemp("ssl_em_cache"))
    yield
    if old is None:
        os.environ.pop("SSL_EM_CACHE", None)
    else:
        os.environ["SSL_EM_CACHE"] = old


@pytest.fixture
def paint_phantom_sample():
    """``paint(viewer)``: what a person paints on napari's "phantom" sample (below)."""
    return _paint_phantom_sample


def _paint_phantom_sample(viewer, sections=(6, 16)):
    """What a person paints on napari's "phantom" sample: every mitochondrion of a few sections, and
    background strokes around them, as a "painted" Labels layer; returns the truth it painted from."""
    from ssl_em.napari_plugin.session import PAINT_BACKGROUND, PAINT_OBJECT

    raw = viewer.layers["phantom raw"]
    truth = viewer.layers["phantom mitochondria (truth)"].data
    painted = np.zeros(truth.shape, np.uint8)
    for z in sections:
        painted[z][truth[z] > 0] = PAINT_OBJECT
        painted[z][(truth[z] == 0) & (np.random.default_rng(z).random(truth[z].shape) < 0.3)] = PAINT_BACKGROUND
    viewer.add_labels(painted, name="painted", scale=raw.scale)
    return truth

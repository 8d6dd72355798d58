"""The plugin in napari's own window, as a person uses it: a big OME-Zarr pyramid opened lazily, strokes
painted with the brush on a Labels layer, fine-tuning while the viewer keeps answering, cancel, a
correction and training again, the result placed where it was painted, the adapter saved; a screenshot
of the window at each step (``SSL_EM_SCREENSHOTS=docs/napari`` keeps them, README shows them).

It needs a display: CI runs it under Xvfb with Mesa's software OpenGL (``.ci/run``); without one it skips
with the reason, so the README's test command works anywhere."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not os.environ.get("DISPLAY"),
                                reason="no display: napari's window needs an X server (run under xvfb-run, as .ci/run does)")

BIG = (48, 2048, 2048)  # 201 MB of uint8 at full resolution (and a pyramid): never to be read whole
TILE = (16, 256, 256)


@pytest.fixture(scope="module")
def big_pyramid(tmp_path_factory):
    """The phantom tiled to BIG, written chunk by chunk and converted to an OME-Zarr pyramid."""
    import zarr

    from ssl_em.data.convert import convert
    from ssl_em.data.phantom import make_phantom

    ph = make_phantom(TILE, seed=4)
    folder = tmp_path_factory.mktemp("big")
    flat = zarr.open_array(str(folder / "flat.zarr"), mode="w", shape=BIG, chunks=TILE, dtype=ph.raw.dtype)
    for z in range(0, BIG[0], TILE[0]):
        for y in range(0, BIG[1], TILE[1]):
            for x in range(0, BIG[2], TILE[2]):
                flat[z:z + TILE[0], y:y + TILE[1], x:x + TILE[2]] = ph.raw
    path = convert(str(folder / "flat.zarr"), folder / "big.ome.zarr", voxel_size=ph.voxel_size, progress=False)
    shutil.rmtree(folder / "flat.zarr")
    return path, ph


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _shot(viewer, name: str, tmp_path: Path) -> Path:
    """napari's whole window (canvas, layer list, the plugin's dock) as a PNG, checked not to be blank."""
    from skimage.io import imsave

    folder = Path(os.environ.get("SSL_EM_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    image = viewer.screenshot(canvas_only=False, flash=False)
    assert image.ndim == 3 and image[..., :3].std() > 5, f"{name}: the window rendered blank"
    imsave(folder / f"{name}.png", image, check_contrast=False)
    return folder / f"{name}.png"


def _paint_strokes(layer, truth: np.ndarray, z: int, rng: np.random.Generator, dabs: int = 60) -> None:
    """Brush dabs as a person paints them (``Labels.paint``, the brush's own call): on mitochondria of
    section ``z`` with the structure label, on background away from them with the background label."""
    from scipy import ndimage

    from ssl_em.napari_plugin.session import PAINT_BACKGROUND, PAINT_OBJECT

    fg = truth[z] > 0
    far = ~ndimage.binary_dilation(fg, iterations=6)
    layer.brush_size = 5
    for label, where in ((PAINT_OBJECT, ndimage.binary_erosion(fg, iterations=3)), (PAINT_BACKGROUND, far)):
        ys, xs = np.nonzero(where)
        for i in rng.choice(len(ys), size=min(dabs, len(ys)), replace=False):
            layer.paint((z, ys[i], xs[i]), label, refresh=False)
    layer.refresh()


def test_the_whole_loop_in_napari_on_a_big_pyramid(make_napari_viewer, qtbot, big_pyramid, tmp_path):
    from qtpy.QtCore import QTimer

    path, ph = big_pyramid
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    qtbot.wait(200)
    rss_start = _rss_mb()  # napari, Qt and OpenGL themselves are not the plugin's to bound
    [raw] = viewer.open(str(path), plugin="ssl-em")
    assert raw.multiscale and raw.data[0].shape == BIG and len(raw.data) >= 3
    qtbot.wait(200)
    opened = _rss_mb() - rss_start
    # the layer draws from the pyramid's coarse levels: a few tiles read, never level 0 whole (192 MB in
    # uint8 alone); measured +91 MB on napari 0.9.2 and +144 MB on napari 0.5.0 (the oldest declared)
    assert opened < np.prod(BIG) / 2**20, f"opening the pyramid took {opened:.0f} MB: level 0 was read whole"

    painted = viewer.add_labels(np.zeros(BIG, np.uint8), name="painted", scale=raw.scale)  # napari's "new labels"
    viewer.dims.set_current_step(0, 8)
    viewer.camera.center = (0, 160 * raw.scale[1], 160 * raw.scale[2])
    viewer.camera.zoom = 0.95 * viewer.window._qt_viewer.canvas.size[1] / (320 * raw.scale[1])  # ~320 voxels across
    _paint_strokes(painted, ph.mito, 8, np.random.default_rng(0))
    painted_rss = _rss_mb() - rss_start
    # the torch / Lightning / peft / timm stack's own memory is not the plugin's to bound
    import lightning, peft, timm, torch  # noqa: F401, E401

    _, widget = viewer.window.add_plugin_dock_widget("ssl-em", "Fine-tune (ssl-em)")
    stack_rss = _rss_mb() - rss_start
    print(f"memory: opened {opened:.0f} MB, painted {painted_rss:.0f} MB, torch stack and widget {stack_rss:.0f} MB")
    widget.image.value, widget.labels.value, widget.steps.value = raw.name, "painted", 30
    _shot(viewer, "1_painted", tmp_path)

    # fine-tune: the event loop keeps answering (a timer's zero-delay event measured every 50 ms; not
    # while the test itself holds the GUI thread for a screenshot)
    latencies: list[tuple[float, float]] = []

    def probe():
        sent = time.perf_counter()
        QTimer.singleShot(0, lambda: latencies.append((sent, time.perf_counter() - sent)))

    timer = QTimer()
    timer.timeout.connect(probe)
    timer.start(50)
    widget.start_fine_tune()
    qtbot.waitUntil(lambda: widget.progress.value >= 10, timeout=300_000)
    shot_start = time.perf_counter()
    _shot(viewer, "2_training", tmp_path)
    shot_end = time.perf_counter()
    qtbot.waitUntil(lambda: widget.progress.value >= 30, timeout=300_000)
    timer.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    assert "trained 30 steps" in widget.status.value, widget.status.value
    waits = [lat for sent, lat in latencies if not shot_start - 0.1 < sent < shot_end]
    assert len(waits) >= 10
    worst = float(np.max(waits))
    print(f"event-loop latency during fine-tuning: median {np.median(waits) * 1e3:.1f} ms, "
          f"worst {worst * 1e3:.0f} ms over {len(waits)} probes")
    assert worst < 0.2, f"the viewer froze for {worst:.2f} s during fine-tuning"
    session = widget.session
    box = session.last_box
    assert box is not None and all(b.stop - b.start < n for b, n in zip(box[1:], BIG[1:]))  # read the box only
    preview = viewer.layers[f"{raw.name} probability"]
    np.testing.assert_allclose(preview.translate, [b.start * s for b, s in zip(box, raw.scale)])
    assert preview.data.shape == tuple(b.stop - b.start for b in box)
    # where it was painted, the preview finds the mitochondria better than chance
    z = 8 - box[0].start
    ys, xs = (np.arange(b.start, b.stop) % t for b, t in zip(box[1:], TILE[1:]))
    tile = ph.mito[8][np.ix_(ys, xs)] > 0  # the tiled truth there
    assert preview.data[z][tile].mean() > preview.data[z][~tile].mean() + 0.1
    _shot(viewer, "3_result", tmp_path)
    trained_rss = _rss_mb() - rss_start - stack_rss
    # bounded: the painted box, the model, its optimiser and the preview, never level 0 in float32 (768 MB;
    # reading it whole would cost 192 MB in uint8 on top). Measured: +227 MB with the residual unet3d_tiny and
    # LoRA; up to +449 MB with unet_small in full when this file runs alone (torch's first training loads
    # its kernels and allocator pools here, not in an earlier test)
    assert trained_rss < 4 * np.prod(BIG) / 2**20, f"training and its preview took {trained_rss:.0f} MB"

    # cancel: stops after the step it is in, the viewer stays usable
    widget.steps.value = 500
    widget.start_fine_tune()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=120_000)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert "cancelled after" in widget.status.value, widget.status.value
    assert session.total_steps < 30 + 500

    # a correction on another section, then training goes on from the adapter trained so far
    _paint_strokes(painted, ph.mito, 12, np.random.default_rng(1), dabs=30)
    before = session.total_steps
    widget.steps.value = 10
    widget.start_fine_tune()
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    assert session.total_steps == before + 10 and session.last_box[0].stop > 12
    _shot(viewer, "4_corrected", tmp_path)
    widget.save_path.value = tmp_path / "adapter"
    assert (widget.save_adapter() / "adapter.json").is_file()
    print(f"memory: training and preview {trained_rss:.0f} MB, {_rss_mb() - rss_start - stack_rss:.0f} MB at the "
          f"loop's end beyond the torch stack (level 0 is {np.prod(BIG) / 2**20:.0f} MB in uint8)")


def test_the_whole_volume_is_predicted_from_the_window(make_napari_viewer, qtbot, tmp_path, paint_phantom_sample):
    """The phantom sample, a few painted sections, fine-tune, then "predict whole volume" to a zarr shown
    lazily beside the image, cancelled once and resumed (the big pyramid's whole volume takes CPU hours,
    not a test's minutes)."""
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("ssl-em", "phantom")
    truth = paint_phantom_sample(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("ssl-em", "Fine-tune (ssl-em)")
    widget.image.value, widget.labels.value, widget.steps.value = "phantom raw", "painted", 10
    widget.start_fine_tune()
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    # off the GUI thread with progress over blocks; cancel keeps the blocks written, pressing again resumes
    blocks: list[tuple[int, int]] = []
    widget.predict_whole_volume(dst=tmp_path / "whole.zarr").yielded.connect(blocks.append)
    qtbot.waitUntil(lambda: len(blocks) >= 1, timeout=300_000)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert "prediction cancelled" in widget.status.value, widget.status.value
    total = blocks[0][1]
    assert blocks[-1][0] < total and widget.last_prediction is None
    resumed: list[tuple[int, int]] = []
    widget.predict_whole_volume(dst=tmp_path / "whole.zarr").yielded.connect(resumed.append)
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    assert resumed[0][0] > 1 and resumed[-1] == (total, total)  # started from the blocks already written
    out = widget.last_prediction
    assert out.shape[1:] == truth.shape and "whole volume" in viewer.layers[-1].name
    _shot(viewer, "5_whole_volume", tmp_path)

"""The napari plugin: the session logic without a GUI, the reader, and the widget in a headless viewer
(Qt offscreen) from a volume to a fine-tuned mitochondria segmentation, cancel included."""

from __future__ import annotations

import os

if not os.environ.get("DISPLAY"):  # headless Qt, before anything imports it; under Xvfb (.ci/run): a real window
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest

from ssl_em.data.phantom import make_phantom
from ssl_em.errors import LabelError
from ssl_em.napari_plugin.session import DEFAULT_ENCODER, PAINT_BACKGROUND, PAINT_OBJECT, FineTuneSession

SHAPE = (16, 128, 128)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, seed=4)


def paint(ph, z: int = 8) -> np.ndarray:
    """What a person paints on one section: strokes over every mitochondrion, background strokes around."""
    painted = np.zeros(ph.raw.shape, np.uint8)
    fg = ph.mito[z] > 0
    painted[z][fg] = PAINT_OBJECT
    rng = np.random.default_rng(0)
    painted[z][~fg & (rng.random(fg.shape) < 0.3)] = PAINT_BACKGROUND
    return painted


def test_session_trains_on_painted_voxels_continues_after_corrections_and_cancels(phantom, tmp_path):
    s = FineTuneSession(phantom.raw, phantom.voxel_size)
    with pytest.raises(LabelError, match="paint some of the structure"):
        s.fine_tune(np.zeros(SHAPE, np.uint8), steps=2)
    seen = []
    first = s.fine_tune(paint(phantom), steps=30, progress=lambda i, n, loss: seen.append((i, n, loss)))
    assert first.steps == 30 and not first.cancelled and [i for i, _, _ in seen] == list(range(1, 31))
    assert all(np.isfinite(loss) for _, _, loss in seen)
    # precision "auto" went through the measurement (bf16 tried in a child process), once per session
    assert s.precision_record is not None and s.precision_record["precision"] in ("32", "bf16")
    assert s.precision_record["reason"] and "FineTuning" in s.precision_record["key"]
    # the shipped encoder fine-tuned in full (the table's winner), one section per crop (it works section-wise)
    assert s.module.hparams.adapter == "full" and s.module.hparams.pretrained == DEFAULT_ENCODER
    assert s.crop_shape == (1, 128, 128)
    trained = {k: v.clone() for k, v in s.module.model.state_dict().items() if v.is_floating_point()}
    probs = s.predict(tmp_path / "p.zarr")
    assert probs.shape == (s.module.task.num_outputs, *SHAPE) and 0 <= float(np.asarray(probs).min())
    # it learnt what was painted: foreground probability on painted mitochondria minus on painted
    # background was 0.12-0.60 after these 30 steps over session seeds 0-4 (torch 2.14.1, AVX2 kernels)
    foreground, painted = np.asarray(probs[0]), paint(phantom)
    margin = foreground[painted == PAINT_OBJECT].mean() - foreground[painted == PAINT_BACKGROUND].mean()
    assert margin > 0.06, margin
    inst = s.instances(probs[:])
    assert inst.shape == SHAPE and inst.max() >= 1
    # a correction on another section, then training goes on from the weights trained so far
    again = s.fine_tune(np.maximum(paint(phantom), paint(phantom, z=3)), steps=4)
    assert again.total_steps == 34
    after, start = s.module.model.state_dict(), s._build().model.state_dict()  # start: the shipped weights

    def dist(x: dict, y: dict) -> float:
        return sum(float((x[k] - y[k]).square().sum()) for k in trained if ".encoder." in k) ** 0.5

    assert 0 < dist(after, trained) < 0.5 * dist(trained, start), "the second run started over"
    # cancel: stops after the step it is in, writes nothing
    before = sorted(p.name for p in tmp_path.iterdir())
    calls = []
    stopped = s.fine_tune(paint(phantom), steps=50, should_stop=lambda: calls.append(1) or len(calls) >= 2)
    assert stopped.cancelled and stopped.steps == 2 and sorted(p.name for p in tmp_path.iterdir()) == before
    folder = s.save(tmp_path / "adapter")
    from ssl_em.adapters.io import load_finetuned

    loaded = load_finetuned(folder)
    assert loaded.task.name == "mito" and loaded.voxel_size == tuple(phantom.voxel_size)


def test_session_takes_an_encoder_family_by_name_and_trains_it_from_random_init(phantom):
    s = FineTuneSession(phantom.raw, phantom.voxel_size, encoder="unet_test")
    result = s.fine_tune(paint(phantom), steps=3)
    assert result.steps == 3 and np.isfinite(result.last_loss)
    assert s.module.hparams.adapter == "full" and s.module.hparams.pretrained is None
    assert s.module.encoder_config["architecture"] == "unet_test" and s.crop_shape[0] == 1  # section-wise
    volumetric = FineTuneSession(phantom.raw, phantom.voxel_size, encoder="unet3d_test")
    volumetric.module = volumetric._build()
    assert volumetric.crop_shape == (8, 64, 64)  # 3-D kernels: crops of several sections


def test_a_synapse_session_chooses_its_post_processing_on_the_painted_voxels_and_saves_it(phantom, tmp_path):
    from ssl_em.adapters.io import load_finetuned

    painted = np.zeros(SHAPE, np.uint8)
    clefts = phantom.labels("synapse") > 0
    z = int(np.argmax(clefts.sum(axis=(1, 2))))
    painted[z][clefts[z]] = PAINT_OBJECT
    painted[z][~clefts[z] & (np.random.default_rng(0).random(clefts[z].shape) < 0.3)] = PAINT_BACKGROUND
    s = FineTuneSession(phantom.raw, phantom.voxel_size, task="synapse", encoder="unet_test", precision="32")
    s.fine_tune(painted, steps=3)
    chosen = s.module.task.calibrated
    assert set(chosen) == {"threshold", "min_volume_nm3"} and chosen["min_volume_nm3"] > 0
    assert (s.module.task.threshold, s.module.task.min_volume_nm3) == (chosen["threshold"], chosen["min_volume_nm3"])
    loaded = load_finetuned(s.save(tmp_path / "synapse"))
    assert (loaded.task.threshold, loaded.task.min_volume_nm3) == (chosen["threshold"], chosen["min_volume_nm3"])


def test_reader_opens_any_spec_lazily_with_pyramid_and_voxel_size(phantom, tmp_path):
    pytest.importorskip("dask")
    from ssl_em.cli import main as cli_main
    from ssl_em.napari_plugin._reader import napari_get_reader

    np.save(tmp_path / "raw.npy", phantom.raw)
    assert cli_main(["convert", str(tmp_path / "raw.npy"), str(tmp_path / "raw.ome.zarr"), "--voxel-size",
                     "40,8,8", "--chunks", "8,64,64", "--levels", "2", "--no-progress"]) == 0
    assert napari_get_reader(str(tmp_path / "nothing.txt")) is None
    [(data, meta, kind)] = napari_get_reader(str(tmp_path / "raw.ome.zarr"))(str(tmp_path / "raw.ome.zarr"))
    assert kind == "image" and meta["multiscale"] and meta["scale"] == [40.0, 8.0, 8.0]
    assert [tuple(d.shape) for d in data] == [SHAPE, (16, 64, 64)] and type(data[0]).__module__.startswith("dask")
    np.testing.assert_array_equal(np.asarray(data[0][5]), phantom.raw[5])


def test_the_manifest_contributes_reader_sample_and_widget():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("ssl-em")
    assert [w.display_name for w in manifest.contributions.widgets] == ["Fine-tune (ssl-em)"]
    assert manifest.contributions.sample_data[0].key == "phantom" and manifest.contributions.readers


def test_widget_fine_tunes_shows_results_saves_and_cancels(qtbot, tmp_path, paint_phantom_sample):
    """The widget on napari's viewer model (layers, sample data, worker threads; Qt offscreen): the same
    calls a person makes, from the phantom to a mitochondria segmentation, then a cancelled run."""
    from napari.components import ViewerModel
    from napari.plugins import _initialize_plugins

    from ssl_em.napari_plugin._widget import FineTuneWidget

    _initialize_plugins()  # what napari does at start-up: finds ssl-em's napari.yaml through its entry point
    viewer = ViewerModel()
    viewer.open_sample("ssl-em", "phantom")
    truth = paint_phantom_sample(viewer)
    widget = FineTuneWidget(viewer)
    qtbot.addWidget(widget.native)
    assert widget.image.choices == ("phantom raw",) and "painted" in widget.labels.choices
    steps = 10
    widget.image.value, widget.labels.value, widget.steps.value = "phantom raw", "painted", steps
    widget.start_fine_tune()
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    assert f"trained {steps} steps" in widget.status.value, widget.status.value
    probs = viewer.layers["phantom raw probability"].data
    inst = viewer.layers["phantom raw instances"].data
    assert probs.shape == truth.shape and inst.shape == truth.shape and inst.max() >= 1
    assert widget.predict_button.enabled and widget.save_button.enabled
    widget.predict_whole_volume(dst=tmp_path / "whole.zarr")
    qtbot.waitUntil(lambda: not widget.busy, timeout=600_000)
    out = widget.last_prediction
    assert out.shape[1:] == truth.shape and "whole volume" in viewer.layers[-1].name
    widget.save_path.value = tmp_path / "adapter"
    assert (widget.save_adapter() / "adapter.json").is_file()
    # cancel: the viewer stays usable, training stops early, nothing is written
    before = sorted(p.name for p in tmp_path.iterdir())
    widget.steps.value = 500
    widget.start_fine_tune()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=120_000)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert "cancelled after" in widget.status.value, widget.status.value
    assert widget.session.total_steps < steps + 500 and sorted(p.name for p in tmp_path.iterdir()) == before
    viewer.add_points([[0, 0, 0]])  # still usable


def test_session_reads_only_the_painted_box_of_a_lazy_volume(phantom, tmp_path, monkeypatch):
    """A dask / zarr image is never read whole: training reads the painted box and its context, and the
    preview of a volume above PREVIEW_VOXELS covers that box only."""
    import ssl_em.napari_plugin.session as session_module

    class Recording:  # array-like that records every read
        def __init__(self, data):
            self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

        def __getitem__(self, key):
            out = np.asarray(self.data[key])
            self.reads.append(out.size)
            return out

    raw = Recording(phantom.raw)
    s = FineTuneSession(raw, phantom.voxel_size, crop_shape=(1, 64, 64), precision="32")  # crops < a section
    painted = np.zeros(SHAPE, np.uint8)
    y, x = np.clip(np.argwhere(phantom.mito[8] > 0).mean(axis=0).astype(int), 20, 108)  # strokes around an object
    window = (8, slice(y - 20, y + 20), slice(x - 20, x + 20))
    painted[window] = paint(phantom)[window]
    with pytest.raises(LabelError, match="differs from the image"):
        s.training_box(painted[:4])
    box = s.training_box(painted)
    p = s.crop_shape
    assert box[0].start <= 8 < box[0].stop and box[1].start <= y - 20 and box[1].stop >= y + 20
    assert all(b.stop - b.start >= min(q, n) for b, q, n in zip(box, p, SHAPE))  # at least one crop
    assert (box[1].stop - box[1].start) * (box[2].stop - box[2].start) < SHAPE[1] * SHAPE[2]  # not the section
    s.fine_tune(painted, steps=2)
    assert s.last_box == box and max(raw.reads) == np.prod([b.stop - b.start for b in box])
    monkeypatch.setattr(session_module, "PREVIEW_VOXELS", 1000)
    shown = s.preview_box(box)
    assert shown == box
    probs = s.predict(tmp_path / "box.zarr", box=shown)
    assert probs.shape[1:] == tuple(b.stop - b.start for b in box)
    assert max(raw.reads) <= np.prod([b.stop - b.start for b in box])  # never more than the box at once
    monkeypatch.setattr(session_module, "PREVIEW_VOXELS", 10**9)
    assert s.preview_box(box) is None  # a small volume: previewed whole

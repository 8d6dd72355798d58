"""The fine-tuning widget: image + painted Labels layer -> fine-tune in a worker thread (progress,
cancel) -> probability and instance layers; predict the whole volume blockwise to a zarr opened lazily;
save the fine-tuned model; train again after corrections from the weights trained so far."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, ProgressBar, PushButton, SpinBox

from ssl_em.errors import SslEmError, describe_error
from ssl_em.napari_plugin.session import DEFAULT_ENCODER, PAINT_BACKGROUND, PAINT_OBJECT, FineTuneSession


class _Cancelled(Exception):
    """Cancel pressed during a whole-volume prediction."""


class FineTuneWidget(Container):
    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._layers("Image"))
        self.labels = ComboBox(label="painted labels", choices=self._layers("Labels"))
        self.encoder = LineEdit(label="encoder", value=DEFAULT_ENCODER)
        self.steps = SpinBox(label="steps", value=100, min=1, max=100_000)
        self.train_button = PushButton(text="Fine-tune")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, min=0, max=100)
        self.predict_button = PushButton(text="Predict whole volume", enabled=False)
        self.save_path = FileEdit(label="model folder", mode="d", value=str(Path.home() / "ssl_em_model"))
        self.save_button = PushButton(text="Save model", enabled=False)
        self.status = Label(value=f"paint {PAINT_BACKGROUND} = background, {PAINT_OBJECT} = structure, then fine-tune")
        self.status.native.setWordWrap(True)
        self.extend([self.image, self.labels, self.encoder, self.steps, self.train_button, self.cancel_button,
                     self.progress, self.predict_button, self.save_path, self.save_button, self.status])
        self.session: FineTuneSession | None = None
        self.worker: Any = None
        self.busy = False
        self.last_prediction: Any = None  # the zarr array of the last whole-volume prediction
        self._stop = threading.Event()
        self.train_button.changed.connect(self.start_fine_tune)
        self.cancel_button.changed.connect(self.cancel)
        self.predict_button.changed.connect(self.predict_whole_volume)
        self.save_button.changed.connect(self.save_adapter)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)

    # ------------------------------------------------------------------ layers
    def _layers(self, kind: str) -> list[str]:
        return [layer.name for layer in self.viewer.layers if type(layer).__name__ == kind]

    def _refresh_layers(self, _event: Any = None) -> None:
        self.image.choices, self.labels.choices = self._layers("Image"), self._layers("Labels")

    def _session_for(self, image: Any) -> FineTuneSession:
        """The session of this image and encoder; a new one when either changed (else: train on)."""
        key = (image.name, self.encoder.value)
        if self.session is None or getattr(self.session, "key", None) != key:
            scale = tuple(float(s) for s in image.scale[-3:])
            voxel = (image.metadata or {}).get("voxel_size") or (scale if scale != (1.0, 1.0, 1.0) else None)
            self.session = FineTuneSession(image.data[0] if image.multiscale else image.data, voxel,
                                           encoder=self.encoder.value)
            self.session.key = key  # type: ignore[attr-defined]
        return self.session

    def _fail(self, err: BaseException) -> None:
        message, _ = describe_error(err)
        self.status.value = f"error: {message}"
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.train_button.enabled = not busy
        self.cancel_button.enabled = busy
        trained = self.session is not None and self.session.module is not None
        self.predict_button.enabled = self.save_button.enabled = trained and not busy

    # ------------------------------------------------------------------ actions
    def _in_worker(self, work: Callable[[Callable[[Any], None]], dict[str, Any]], on_event: Callable[[Any], None],
                   on_result: Callable[[dict[str, Any]], None]) -> Any:
        """Run ``work(emit)`` off the GUI thread: what it emits reaches ``on_event`` and the dict it returns
        ``on_result`` in the GUI thread (an exception arrives as ``{"error": err}``). Returns the started
        napari worker; the widget is busy until it ends."""
        from napari.qt.threading import thread_worker

        @thread_worker
        def run():
            events: queue.Queue = queue.Queue()
            result: dict[str, Any] = {}

            def target() -> None:
                try:
                    result.update(work(events.put))
                except BaseException as err:  # noqa: BLE001 - reported in the widget, the viewer stays usable
                    result["error"] = err
                finally:
                    events.put(None)

            threading.Thread(target=target, daemon=True).start()
            while (event := events.get()) is not None:
                yield event
            return result

        self._stop.clear()
        self._set_busy(True)
        self.worker = run()
        self.worker.yielded.connect(on_event)
        self.worker.returned.connect(on_result)
        self.worker.errored.connect(self._fail)
        self.worker.start()
        return self.worker

    def start_fine_tune(self, _value: Any = None) -> Any:
        """Fine-tune in a worker thread; returns the napari worker (already started)."""
        try:
            image, painted = self.viewer.layers[self.image.value], self.viewer.layers[self.labels.value]
            session = self._session_for(image)
            box = session.training_box(painted.data)
        except (KeyError, SslEmError) as err:
            self._fail(err)
            return None
        # the painting as it was when started: a copy of its box only (the layer may be the size of a big volume)
        steps, labels = int(self.steps.value), np.array(painted.data[box])
        self.progress.max, self.progress.value = steps, 0

        def work(emit: Callable[[Any], None]) -> dict[str, Any]:
            run_ = session.fine_tune(labels, steps, lambda i, n, loss: emit((i, loss)), self._stop.is_set, box=box)
            shown = session.preview_box(box)
            probs = session.predict(box=shown)
            return {"train": run_, "box": shown, "probs": probs, "instances": session.instances(probs[:])}

        def show(result: dict[str, Any]) -> None:
            if "error" in result:
                self._fail(result["error"])
                return
            self._show_results(image, result)
            run_ = result["train"]
            self.status.value = (f"{'cancelled after' if run_.cancelled else 'trained'} {run_.steps} steps "
                                 f"({run_.total_steps} in all), loss {run_.last_loss:.3f}; correct and train again")
            self._set_busy(False)

        def step(event: tuple[int, float]) -> None:
            self.progress.value = min(event[0], self.progress.max)
            self.status.value = f"step {event[0]}/{steps}, loss {event[1]:.3f}"

        return self._in_worker(work, step, show)

    def _show_results(self, image: Any, result: dict[str, Any]) -> None:
        probs, inst, box = result["probs"], result["instances"], result.get("box")
        scale, translate = np.asarray(image.scale[-3:], float), np.asarray(image.translate[-3:], float)
        if box is not None:  # a preview of the painted box of a big volume: placed where it belongs
            translate = translate + scale * [b.start for b in box]
        kw = {"scale": scale, "translate": translate}
        name_p, name_i = f"{image.name} probability", f"{image.name} instances"
        for name in (name_p, name_i):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        self.viewer.add_image(probs[0], name=name_p, colormap="magma", blending="additive", opacity=0.6,
                              contrast_limits=(0, 1), **kw)
        self.viewer.add_labels(inst, name=name_i, **kw)

    def cancel(self, _value: Any = None) -> None:
        """Stop after the current step (training: the model keeps its last complete step, nothing is
        written) or block (prediction: the blocks written stay, and predicting again resumes from them)."""
        self._stop.set()
        self.status.value = "cancelling ..."

    def predict_whole_volume(self, _value: Any = None, dst: str | Path | None = None) -> Any:
        """Blockwise prediction of the whole volume to a zarr next to the data (or ``dst``) in a worker
        thread, progress over blocks, Cancel; the result opens lazily as a layer. Returns the started worker."""
        import dask.array as da

        image = self.viewer.layers[self.image.value]
        spec = (image.metadata or {}).get("ssl_em_spec")
        if dst is None and spec:
            base = Path(str(spec).split("@")[0].rstrip("/"))
            dst = base.with_name(base.name.removesuffix(".zarr").removesuffix(".ome") + "_probabilities.zarr")
        session = self.session
        self.progress.max, self.progress.value = 1, 0

        def work(emit: Callable[[Any], None]) -> dict[str, Any]:
            def on_block(done: int, total: int) -> None:
                emit((done, total))
                if self._stop.is_set():
                    raise _Cancelled

            try:
                return {"out": session.predict(dst, on_block=on_block)}  # type: ignore[union-attr]
            except _Cancelled:
                return {"cancelled": True}

        def blocks(event: tuple[int, int]) -> None:
            self.progress.max, self.progress.value = event[1], event[0]
            self.status.value = f"predicting block {event[0]}/{event[1]}"

        def show(result: dict[str, Any]) -> None:
            if "error" in result:
                self._fail(result["error"])
                return
            self._set_busy(False)
            if result.get("cancelled"):
                self.status.value = f"prediction cancelled after {self.progress.value} blocks; predict again to resume"
                return
            out = result["out"]
            self.viewer.add_image(da.from_zarr(out)[0], name=f"{image.name} probability (whole volume)",
                                  colormap="magma", blending="additive", scale=image.scale[-3:])
            self.status.value = f"wrote {out.store_path if hasattr(out, 'store_path') else dst}"
            self.last_prediction = out

        return self._in_worker(work, blocks, show)

    def save_adapter(self, _value: Any = None) -> Path | None:
        try:
            folder = self.session.save(self.save_path.value)  # type: ignore[union-attr]
        except BaseException as err:  # noqa: BLE001
            self._fail(err)
            return None
        self.status.value = f"saved {folder} (ssl-em predict --model {folder} runs it)"
        return folder

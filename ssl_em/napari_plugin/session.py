"""Paint, fine-tune, look, correct: the plugin's logic without a GUI (the widget only wires it to layers).

Painting follows ilastik: label 1 = background, 2 = the structure (mitochondria), 0 = not painted (no
loss there). The volume stays lazy (a dask or zarr array from the reader is never read whole): training
reads the painted voxels' box and its context, the preview after training covers that box (a small volume:
all of it), and "predict whole volume" runs blockwise. A session trains the same pipeline as ``ssl-em fit``
and the study (``FineTuning`` of a pretrained encoder in full, the label-efficiency table's winner;
``EMDataModule``; a Lightning ``Trainer`` with a step budget) on the painted voxels only.
Training again after corrections continues from the weights trained so far. ``should_stop`` cancels
between steps: the model keeps its last complete step and nothing is written unless :meth:`save` is
called (which writes to a temporary name and renames).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.errors import ConfigError, LabelError

PAINT_BACKGROUND, PAINT_OBJECT = 1, 2
PREVIEW_VOXELS = 16_000_000  # up to this size the preview after training is the whole volume, else the painted box
DEFAULT_ENCODER = "unet_small.spark_vnc_isbi"  # shipped with ssl-em: no download


@dataclass
class TrainResult:
    steps: int  # optimiser steps this call took
    total_steps: int  # over the session
    cancelled: bool
    last_loss: float


def training_targets(painted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(instance labels, supervision mask) from a painted Labels array: objects are the connected
    components of label 2; the mask is every painted voxel."""
    from ssl_em.utils.labels import connected_components

    painted = np.asarray(painted)
    if not (painted == PAINT_OBJECT).any():
        raise LabelError(f"paint some of the structure with label {PAINT_OBJECT} before training")
    if not (painted == PAINT_BACKGROUND).any():
        raise LabelError(f"paint some background with label {PAINT_BACKGROUND} before training")
    return connected_components(painted == PAINT_OBJECT), (painted > 0).astype(np.uint8)


class FineTuneSession:
    """Few-label fine-tuning of one volume, as the plugin drives it."""

    def __init__(self, raw: Any, voxel_size: Any = None, task: str = "mito", encoder: str = DEFAULT_ENCODER,
                 crop_shape: tuple[int, int, int] | None = None, lr: float | None = None, seed: int = 0,
                 precision: str = "auto") -> None:
        lazy = hasattr(raw, "shape") and hasattr(raw, "__getitem__") and not isinstance(raw, np.ndarray)
        self.raw = raw if lazy else np.ascontiguousarray(np.asarray(raw))  # dask / zarr: read box by box
        self.shape = tuple(int(n) for n in self.raw.shape)
        if len(self.shape) != 3:
            raise ConfigError(f"the image layer must be one (z, y, x) volume, got shape {self.shape}")
        self.voxel_size = tuple(float(v) for v in voxel_size) if voxel_size is not None else None
        self.task, self.encoder, self.lr, self.seed = task, encoder, lr, seed
        self.crop_shape = crop_shape
        self.module: Any = None
        self.normalization: Any = None
        self.total_steps = 0
        self.precision = precision
        self.precision_record: dict[str, Any] | None = None  # what "auto" measured, once per session
        self.last_box: tuple[slice, slice, slice] | None = None  # what the last training read of the image

    # ------------------------------------------------------------------ training
    def _build(self) -> Any:
        from ssl_em.adapters.finetune import FineTuning
        from ssl_em.models import list_encoders, load_encoder

        import torch

        torch.manual_seed(self.seed)  # the new head's init: the session's seed, not whatever ran before
        # in full at the table's rate, from the pretrained weights or (an architecture by name) from random init
        pretrained = None if self.encoder in list_encoders() else self.encoder
        arch = load_encoder(self.encoder).encoder_config["architecture"] if pretrained else self.encoder
        module = FineTuning(task=self.task, encoder=arch, pretrained=pretrained, adapter="full", lr=self.lr or 2e-3,
                            warmup_steps=5, calibrate_on_fit_end=False, export_on_fit_end=False)  # see fine_tune
        if self.crop_shape is None:
            encoder = getattr(module.model, "base_model", module.model).encoder
            stride = encoder.patch_size
            kernels = encoder.encoder_config["kwargs"].get("kernels") or [[3]]
            # a section-wise network (every kernel 1 along z) learns as much from one section per crop
            # as from eight, at an eighth of the cost: wider in-plane context instead
            want = (1, 128, 128) if all(k[0] == 1 for k in kernels) else (8, 64, 64)
            self.crop_shape = tuple(max(s, min(w, (n // s) * s)) for w, n, s in zip(want, self.shape, stride))
        return module

    def training_box(self, painted: Any) -> tuple[slice, slice, slice]:
        """The painted voxels' bounding box, grown by half a crop on every side for context and to at least
        one crop, inside the volume: all that training reads of the image."""
        if tuple(painted.shape) != self.shape:
            raise LabelError(f"labels layer shape {tuple(painted.shape)} differs from the image's {self.shape}")
        # section by section: a whole-volume reduction would allocate a temporary the size of the volume
        zs = np.flatnonzero([np.count_nonzero(np.asarray(painted[z])) > 0 for z in range(self.shape[0])])
        if zs.size == 0:
            raise LabelError(f"paint some of the structure with label {PAINT_OBJECT} before training")
        sub = np.asarray(painted[zs[0]: zs[-1] + 1]) > 0
        spans = [(zs[0], zs[-1])] + [tuple(np.flatnonzero(sub.any(axis=a))[[0, -1]]) for a in ((0, 2), (0, 1))]
        if self.module is None:
            self.module = self._build()  # the crop shape comes with the encoder
        box = []
        for (lo, hi), n, p in zip(spans, self.shape, self.crop_shape):
            lo, hi = max(0, int(lo) - p // 2), min(n, int(hi) + 1 + p // 2)
            short = max(0, min(p, n) - (hi - lo))
            lo = max(0, lo - short)
            box.append(slice(lo, min(n, max(hi, lo + min(p, n)))))
        return tuple(box)  # type: ignore[return-value]

    def preview_box(self, box: tuple[slice, slice, slice]) -> tuple[slice, slice, slice] | None:
        """What the preview after training predicts: None (the whole volume) when it is small, else ``box``."""
        return None if int(np.prod(self.shape)) <= PREVIEW_VOXELS else box

    def fine_tune(self, painted: Any, steps: int = 100, progress: Callable[[int, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  box: tuple[slice, slice, slice] | None = None) -> TrainResult:
        """Train ``steps`` steps on the painted voxels; ``progress(step, steps, loss)`` after each step,
        ``should_stop()`` checked after each step (True: stop after this step). ``painted`` is the painted
        layer's data, or only its crop at ``box`` (from :meth:`training_box`, which it defaults to)."""
        import lightning as L
        import torch

        from ssl_em.data.datamodule import EMDataModule

        if steps < 1:
            raise ConfigError(f"steps={steps} must be >= 1")
        torch.manual_seed(self.seed + self.total_steps)
        if box is None:
            box = self.training_box(painted)
            painted = painted[box]
        labels, mask = training_targets(painted)
        if self.module is None:
            self.module = self._build()
        self.module.train()  # predict() left it in eval mode
        self.last_box = box
        raw = np.asarray(self.raw[box])
        dm = EMDataModule(raw=raw, labels=labels, mask=mask, task=self.task, crop_shape=self.crop_shape,
                          batch_size=2, num_workers=0, samples_per_epoch=2 * steps, val_fraction=0,
                          voxel_size=self.voxel_size, sampler="labelled", seed=self.seed + self.total_steps)
        state = {"loss": float("nan"), "cancelled": False}

        class Hook(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                state["loss"] = float(loss)
                if progress is not None:
                    progress(trainer.global_step, steps, state["loss"])
                if should_stop is not None and should_stop():
                    state["cancelled"] = True
                    trainer.should_stop = True

        from ssl_em.study.train import quiet_lightning
        from ssl_em.utils.precision import resolve_device

        device = resolve_device("auto")  # a GPU when one is visible
        accelerator = "gpu" if device.startswith("cuda") else "cpu"
        with quiet_lightning():
            trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=1, logger=False,
                                precision=self._lightning_precision(dm, device.split(":")[0]),
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Hook()])
            trainer.fit(self.module, datamodule=dm)
        self.normalization = dm.normalization
        self.total_steps += trainer.global_step
        if self.module.task.calibrates:  # e.g. the synapse threshold and minimum size, from the painted voxels
            with tempfile.TemporaryDirectory(prefix="ssl_em_napari_") as tmp:
                probs = np.asarray(self.predict(Path(tmp) / "calibration.zarr", box=box))
            self.module.task.calibrate(probs, labels, mask, self.voxel_size)
        return TrainResult(trainer.global_step, self.total_steps, state["cancelled"], state["loss"])

    def _lightning_precision(self, datamodule: Any, device_type: str) -> str:
        """``self.precision``; ``"auto"`` is measured once per session (bf16 tried in a child process)."""
        import sys

        from ssl_em.utils.precision import describe_record, lightning_precision, measure_datamodule_precision

        if str(self.precision).lower() != "auto":
            return lightning_precision(self.precision, device_type)
        if self.precision_record is None:
            self.precision_record = measure_datamodule_precision(self.module, datamodule, device_type)
            print(f"ssl-em napari: {describe_record(self.precision_record)}", file=sys.stderr)
        return lightning_precision(self.precision_record["precision"], device_type)

    # ------------------------------------------------------------------ looking
    def _check_trained(self) -> None:
        if self.module is None:
            raise ConfigError("fine-tune first: there is no trained model in this session yet")

    def predict(self, dst: str | Path | None = None, block: tuple[int, int, int] = (16, 128, 128),
                box: tuple[slice, slice, slice] | None = None,
                on_block: Callable[[int, int], Any] | None = None) -> Any:
        """Foreground probabilities (C, z, y, x) of the whole volume (or of ``box``), blockwise
        (``predict_volume``) into the zarr ``dst`` (default: a temporary folder); the zarr array, read lazily.
        ``on_block(done, total)`` follows the blocks; raising in it stops there (a rerun resumes)."""
        from ssl_em.data.volume import Region
        from ssl_em.predict import predict_volume

        self._check_trained()
        model = self.module.model.eval()
        if dst is None:
            dst = Path(tempfile.mkdtemp(prefix="ssl_em_napari_")) / "probabilities.zarr"
        halo = tuple(min(2 * (p // 4), 32) for p in self.crop_shape)
        block = tuple(max(p, b - h) for p, b, h in zip(self.crop_shape, block, halo))
        src = self.raw if box is None else Region(self.raw, box)
        return predict_volume(model, src, dst, block, halo, activation="sigmoid",
                              normalization=self.normalization.to_dict(), progress=False, overwrite=True,
                              on_block=on_block)

    def instances(self, probabilities: Any) -> np.ndarray:
        """Instance labels from the probabilities, the task's own post-processing (mitochondria: seeded
        watershed of foreground and boundary)."""
        self._check_trained()
        return self.module.task.postprocess(np.asarray(probabilities), self.voxel_size or (1.0, 1.0, 1.0))

    def save(self, folder: str | Path) -> Path:
        """The trained adapter as a fine-tuned model folder (``ssl-em predict --model`` runs it)."""
        from ssl_em.adapters.io import save_finetuned

        self._check_trained()
        self.module.data_description = {"normalization": self.normalization.to_dict(),
                                        "voxel_size": list(self.voxel_size) if self.voxel_size else None,
                                        "crop_shape": list(self.crop_shape)}
        return save_finetuned(self.module, folder)

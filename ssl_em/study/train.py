"""One study run = one fine-tuning run of the same pipeline ``ssl-em fit`` uses: a ``FineTuning``
module, an ``EMDataModule`` and a Lightning ``Trainer`` with a step budget, the best-validation
weights (``ModelCheckpoint``), and ``predict_volume`` for evaluation. Pretraining likewise runs the
``Pretraining`` module under a ``Trainer``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback

from ssl_em.data.volume import Box
from ssl_em.study.config import ADAPTER, FAMILIES, METRICS, UNET_CONTROL, StudyConfig


@dataclass
class Labelled:
    """The labelled volume in memory: raw normalised to 0..1 float32, labels, voxel size (z, y, x) nm."""

    raw: np.ndarray
    labels: np.ndarray
    voxel_size: tuple[float, float, float] | None
    normalization: dict[str, Any]


def build_module(method: str, cfg: StudyConfig, encoder_dir: str | Path | None, seed: int, lr: float,
                 steps: int) -> Any:
    """The ``FineTuning`` module of ``method``; random inits come from ``seed`` (``scratch`` and
    ``lora_random`` share it), drawn on the CPU so a GPU run starts from the same weights."""
    import torch

    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.models.weights_io import read_sidecar

    common = dict(task=cfg.task, task_kwargs=cfg.task_kwargs, lr=lr, warmup_steps=max(1, steps // 20),
                  calibrate_on_fit_end=False, export_on_fit_end=False)  # the study calibrates (cfg.calibrate)
    torch.manual_seed(seed)
    if method == "unet":  # the plain U-Net users train, from random init, shaped by the plan
        return FineTuning(encoder=UNET_CONTROL, encoder_kwargs=plan_layout(cfg), adapter="full", grad_checkpointing=False,
                          **common)
    adapter, pretrained = ADAPTER[method]
    sidecar = read_sidecar(encoder_dir)
    return FineTuning(encoder=sidecar["architecture"], pretrained=str(encoder_dir) if pretrained else None,
                      encoder_kwargs=dict(sidecar.get("kwargs") or {}), adapter=adapter,
                      encoder_lr_scale=cfg.encoder_lr_scale if pretrained else 1.0,
                      adapter_kwargs=dict(cfg.adapter_kwargs) if adapter not in ("full", "frozen") else None,
                      grad_checkpointing=False,  # same compute per step for every method
                      **common)


def planned_encoder_kwargs(cfg: StudyConfig) -> dict[str, Any]:
    """The encoder's constructor arguments for a new encoder under the plan: ``cfg.encoder_kwargs`` plus
    the plan's crop as a ViT's ``img_size``, and its spacing and crop for a U-Net shaped by them
    (:mod:`ssl_em.models.unet`: in-plane for serial sections, 3-D for near-isotropic voxels)."""
    import inspect

    import torch

    from ssl_em.models import create_encoder

    kwargs = dict(cfg.encoder_kwargs)
    if cfg.encoder:  # continuing an exported encoder: its own recorded layout
        return kwargs
    if cfg.family == "vit" and "img_size" not in kwargs:
        kwargs["img_size"] = list(cfg.crop_shape)
    with torch.device("meta"):  # shapes only
        params = inspect.signature(type(create_encoder(cfg.arch))).parameters
    if {"spacing", "crop_shape"} <= set(params) and not {"pools", "kernels", "spacing"} & set(kwargs):
        kwargs.update(plan_layout(cfg))
    return kwargs


def plan_layout(cfg: StudyConfig) -> dict[str, list]:
    """What shapes a U-Net by the plan (:func:`ssl_em.models.unet.layout`): working spacing and crop."""
    return {"spacing": list(cfg.spacing or (1.0, 1.0, 1.0)), "crop_shape": list(cfg.crop_shape)}


def as_region(box: Box) -> list[list[int]]:
    return [[int(b.start), int(b.stop)] for b in box]


def build_data(data: Labelled, train: Box, val: Box | None, mask: np.ndarray, cfg: StudyConfig,
               seed: int, steps: int) -> Any:
    """The ``EMDataModule`` of one run: crops of ``train`` holding voxels labelled in ``mask`` (z, y, x;
    half of them moved onto labelled foreground), fixed validation crops of ``val``'s labelled voxels."""
    from ssl_em.data.datamodule import EMDataModule

    return EMDataModule(raw=data.raw, labels=data.labels, task=cfg.task, crop_shape=cfg.crop_shape,
                        batch_size=cfg.batch_size, num_workers=0, samples_per_epoch=steps * cfg.batch_size,
                        val_samples=cfg.val_samples, augment=True, augment_strength=0.5, voxel_size=data.voxel_size,
                        normalization="fixed", normalization_range=(0.0, 1.0), sampler="labelled", seed=seed,
                        train_region=as_region(train), val_region=None if val is None else as_region(val),
                        mask=mask)


class _ResumeAt:
    """Sampler over indices ``start .. n - 1`` whose length is the whole epoch's ``n`` (see ``pretrain``)."""

    def __init__(self, start: int, n: int) -> None:
        self.start, self.n = start, n

    def __iter__(self):
        return iter(range(self.start, self.n))

    def __len__(self) -> int:
        return self.n


@contextlib.contextmanager
def quiet_lightning():
    """A study runs dozens of Trainers: keep their start-up notes (accelerator, tips, "max_steps
    reached") and known-harmless warnings out of the study's log; errors and real warnings pass."""
    import warnings

    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # resuming pretraining mid-epoch: the loader is offset to the first crop not yet used (pretrain)
            for message in (".*LeafSpec.*", ".*validation_step.*val_dataloader.*", ".*does not have many workers.*",
                            ".*resuming from a checkpoint that ended before the epoch ended.*"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class Progress(Callback):
    """One updating line per run (a new line per quarter when not a terminal): step, loss,
    validation score, time left."""

    def __init__(self, name: str, steps: int, stream: Any = None, monitor: str | None = None) -> None:
        self.name, self.steps, self.monitor = name, steps, monitor
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = 1 if self.tty else max(1, steps // 4)
        self.start, self.loss, self.val = time.perf_counter(), math.nan, math.nan

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss = float(loss) if loss is not None else self.loss
        if step % self.every == 0 or step == self.steps:
            left = (time.perf_counter() - self.start) / max(step, 1) * (self.steps - step)
            line = (f"    {self.name}: step {step}/{self.steps}, loss {self.loss:.4f}, val {self.val:.3f}, "
                    f"~{left:.0f} s left")
            print(line, end="\r" if self.tty and step < self.steps else "\n", file=self.stream, flush=True)

    def on_validation_end(self, trainer, module) -> None:
        value = trainer.callback_metrics.get(self.monitor or monitor_of(module.task.name)[0])
        self.val = float(value) if value is not None else self.val


#: tasks whose validation can be the whole validation slab's soft Dice (channel 0 = the labelled foreground)
SLAB_TASKS = ("mito", "synapse")


def monitor_of(task: str, validation: str = "crops") -> tuple[str, str]:
    """The validation value that picks a run's best weights and a sweep's rate: the foreground's soft Dice
    (thresholded IoU is 0 for every rate of a short sweep that predicts no foreground yet, which left the
    choice to the tie rule) over the validation crops, or over the whole validation slab with
    ``validation="slab"``; the loss for neurons."""
    if task == "neuron":
        return ("val/loss", "min")
    return ("val/slab_soft_dice", "max") if validation == "slab" and task in SLAB_TASKS else ("val/soft_dice", "max")


class SlabValidation(Callback):
    """At every validation, the soft Dice of the foreground probability over whole labelled validation sections,
    predicted as the evaluation region is (``predict_in_memory``): a steadier ranking than a few crops (whose soft
    Dice strayed up to 0.08 from the slab's on VNC, ``benchmarks/results/vnc_layout_probe``). ``raw`` (z, y, x) is
    the normalised validation slab, ``labels`` its labels, ``sections`` the labelled ones (scored; the slab gives
    them their 3-D context)."""

    def __init__(self, raw: np.ndarray, labels: np.ndarray, sections: np.ndarray, cfg: StudyConfig,
                 precision: str) -> None:
        self.raw, self.truth = raw, (labels[sections] > 0).astype(np.float32)
        self.sections, self.cfg, self.precision = sections, cfg, precision

    def on_validation_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        fg = predict_probabilities(module, self.raw, self.cfg, self.precision)[0, self.sections]
        dice = 2 * float((fg * self.truth).sum()) / max(float(fg.sum() + self.truth.sum()), 1e-6)
        module.log("val/slab_soft_dice", dice)


@dataclass
class FitResult:
    steps: int
    seconds: float
    best_step: int | None
    val_score: float | None
    precision: str
    snapshots: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> weights (cfg.eval_steps)


class Snapshots(Callback):
    """The module's weights (CPU copies) after each of ``steps`` optimiser steps: what a person who stops
    the run there gets (the study scores them: IoU against fine-tuning steps); with ``average`` (a
    ``WeightAveraging`` callback listed before this one), its averaged weights, which the run is scored with."""

    def __init__(self, steps: Sequence[int], average: Any = None) -> None:
        self.steps, self.states, self.average = set(int(s) for s in steps), {}, average

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.states:
            # Lightning keeps the average in a private AveragedModel; its .module has the LightningModule's keys
            source = self.average._average_model.module if self.average is not None else module
            self.states[step] = {k: v.detach().to("cpu", copy=True) for k, v in source.state_dict().items()}


def _trainer(**kwargs: Any) -> Any:
    import lightning as L

    with quiet_lightning():
        return L.Trainer(**kwargs)


def fine_tune(module: Any, datamodule: Any, cfg: StudyConfig, steps: int, work: Path, name: str, precision: str,
        validate: bool, slab: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> FitResult:
    """Train ``module`` for ``steps`` optimiser steps; with ``validate``, score the validation crops every
    ``cfg.val_every`` steps and load the best-scoring weights at the end; the weights after each of
    ``cfg.eval_steps`` (below ``steps``) come back in ``snapshots``; with ``cfg.ema_decay``, all of these are
    the moving average of the weights. Raises FloatingPointError
    when the loss goes non-finite (the caller retries or records the run as diverged)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    from ssl_em.utils.checkpoint import SafetensorsCheckpointIO, load_checkpoint
    from ssl_em.utils.precision import lightning_precision

    device = cfg.device.split(":")[0]
    # the average replaces the weights for validation, the best checkpoint and at the end of training
    average = EMAWeightAveraging(decay=cfg.ema_decay) if cfg.ema_decay is not None else None
    snapshots = Snapshots((s for s in cfg.eval_steps if s < steps), average)
    monitor, mode = monitor_of(cfg.task, cfg.validation if slab is not None else "crops")
    callbacks: list[Any] = [Progress(name, steps, monitor=monitor), *([average] if average else []), snapshots]
    best = None
    if validate:
        if slab is not None:
            callbacks.append(SlabValidation(*slab, cfg, precision))  # before the checkpoint that reads it
        best = ModelCheckpoint(dirpath=str(work / "ckpt"), monitor=monitor, mode=mode, save_top_k=1,
                               save_last=False, filename="best")
        callbacks.append(best)
    trainer = _trainer(
        max_steps=steps, max_epochs=-1, accelerator="gpu" if device == "cuda" else device, devices=1,
        precision=lightning_precision(precision, device), logger=False, callbacks=callbacks,
        enable_checkpointing=validate, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, val_check_interval=min(cfg.val_every, steps) if validate else None,
        check_val_every_n_epoch=None if validate else 1, limit_val_batches=None if validate else 0,
        plugins=[SafetensorsCheckpointIO()], default_root_dir=str(work),
    )
    t = time.perf_counter()
    try:
        with quiet_lightning():
            trainer.fit(module, datamodule=datamodule)
    finally:
        seconds = time.perf_counter() - t
    best_step, score = None, None
    if best is not None and best.best_model_path:
        state = load_checkpoint(best.best_model_path)
        module.load_state_dict(state["state_dict"])
        best_step = int(state.get("global_step", 0))
        score = float(best.best_model_score) if best.best_model_score is not None else None
    return FitResult(int(trainer.global_step), round(seconds, 1), best_step, score, precision, snapshots.states)


def predict_probabilities(module: Any, raw: np.ndarray, cfg: StudyConfig, precision: str = "32") -> np.ndarray:
    """Probabilities (K, z, y, x) of normalised ``raw`` as ``ssl-em predict`` makes them (``predict_in_memory``),
    mirrored at test time with ``cfg.tta``."""
    from ssl_em.predict.blockwise import predict_in_memory, tta_axes

    crop = tuple(int(p) for p in cfg.crop_shape)
    return predict_in_memory(module.model, raw, crop, precision=precision, device=cfg.device,
                             flips=tta_axes(crop) if cfg.tta else ())


def score(probs: np.ndarray, gt: np.ndarray, task: Any, voxel_size: Sequence[float] | None) -> dict[str, float]:
    """Task post-processing then ``ssl_em.metrics.evaluate``: the study's metrics (``METRICS[task.name]``)."""
    from ssl_em.metrics.evaluate import evaluate as evaluate_segmentation

    vs = tuple(voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
    seg = task.postprocess(probs, vs)
    name = task.name
    truth = gt if name == "neuron" else (gt > 0).astype(np.uint8)  # instances of binary labels: components
    result = evaluate_segmentation(seg, truth, name, vs, erl=False)
    return {k: float(result[k]) for k in METRICS[name] if k in result}


# ----------------------------------------------------------------------------------- pretraining


def pretrain(volumes: Sequence[Any], regions: Sequence[Box | None], cfg: StudyConfig, out_dir: Path,
             seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """Pretrain the family's encoder (or continue ``cfg.encoder``) for ``cfg.pretrain_steps`` on crops
    of ``volumes`` (each restricted to its box in ``regions``) with the ``Pretraining`` module under a
    ``Trainer``; export to ``out_dir/encoder``. Writes ``loss.png`` and ``reconstruction.png``."""
    import torch
    from torch.utils.data import DataLoader

    from ssl_em.data.augment import default_em_augment
    from ssl_em.data.crops import CropDataset, TwoViewDataset
    from ssl_em.data.normalize import Normalization
    from ssl_em.data.volume import as_volume, volume_name
    from ssl_em.models import save_encoder
    from ssl_em.plan import DownsampledVolume, is_anisotropic
    from ssl_em.pretrain.module import Pretraining
    from ssl_em.pretrain.panels import save_curve
    from ssl_em.utils.precision import lightning_precision, resolve_precision

    fam = FAMILIES[cfg.family]
    steps = int(cfg.pretrain_steps)
    volumes = [as_volume(v, cfg.voxel_size, cfg.fill_missing) for v in volumes]
    if (cfg.downsample or 1) > 1:  # pretrain at the working spacing, resampled as crops are read
        volumes = [DownsampledVolume(v, cfg.downsample) for v in volumes]
    kwargs = planned_encoder_kwargs(cfg)
    method = cfg.pretrain_method or fam["method"]
    # the family's masking settings hold for its objective and the combined one built on it (spark_simclr)
    method_kwargs = dict(fam["method_kwargs"]) if method.split("_")[0] == fam["method"] else {}
    torch.manual_seed(seed)
    module = Pretraining(encoder=cfg.arch, encoder_kwargs=kwargs, init_from=cfg.encoder, method=method,
                         method_kwargs=method_kwargs, lr=fam["lr"], seed=seed)
    vs = cfg.spacing
    common = dict(regions=list(regions), samples_per_epoch=steps * cfg.batch_size, normalization=Normalization(),
                  augment=default_em_augment(anisotropic=is_anisotropic(vs), strength=0.5), seed=seed)
    # two-view objectives (SimCLR, DINO, spark_simclr) get two overlapping crops of one place
    ds = (TwoViewDataset(list(volumes), cfg.crop_shape, **common) if module.two_views
          else CropDataset(list(volumes), cfg.crop_shape, **common))
    losses: list[float] = []

    log(f"pretraining {module.hparams.encoder} with {method} for {steps} steps on {len(volumes)} "
        f"volume(s)" + (f", starting from {cfg.encoder}" if cfg.encoder else ""))
    device = cfg.device.split(":")[0]
    precision = resolve_precision(cfg.precision, device)
    # resumable: a checkpoint (safetensors) every ~5 % of the steps; a rerun after a kill continues from it
    ckpt_dir = out_dir / "ckpt"
    last = ckpt_dir / "last.ckpt"
    saved = json.loads((ckpt_dir / "losses.json").read_text()) if last.is_file() and (ckpt_dir / "losses.json").is_file() else None
    if saved is not None:
        losses[:] = saved["losses"]
        log(f"pretraining: resuming from {last} at step {len(losses)}")

    class LossCurve(Callback):
        """Every step's loss, and the curve so far beside each checkpoint (a resumed run keeps all of it)."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            from ssl_em.utils.io import atomic_write_text

            atomic_write_text(ckpt_dir / "losses.json", json.dumps({"losses": losses, "seconds": elapsed()}))

    from lightning.pytorch.callbacks import ModelCheckpoint

    from ssl_em.utils.checkpoint import SafetensorsCheckpointIO

    every = max(1, min(500, steps // 20))
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=every, save_last=True, save_top_k=0)
    trainer = _trainer(max_steps=steps, max_epochs=-1, accelerator="gpu" if device == "cuda" else device, devices=1,
                        precision=lightning_precision(precision, device), logger=False, enable_checkpointing=True,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        plugins=[SafetensorsCheckpointIO()],
                        callbacks=[LossCurve(), checkpoint, Progress("pretraining", steps)],
                        default_root_dir=str(out_dir))
    before = float(saved["seconds"]) if saved is not None else 0.0
    start = time.perf_counter()
    elapsed = lambda: before + time.perf_counter() - start  # noqa: E731
    # crops are drawn from their index: a resumed run continues at the first crop the killed one never
    # used, so it ends where an uninterrupted run ends. Lightning restarts a plain loader's epoch and
    # counts the steps done against its length: the loader keeps the epoch's length, its sampler the offset.
    loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=0,
                        sampler=_ResumeAt(len(losses) * cfg.batch_size, len(ds)))
    with quiet_lightning():
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if saved is not None else None)
    seconds = elapsed()
    out_dir.mkdir(parents=True, exist_ok=True)
    x_steps = list(range(1, len(losses) + 1))
    window = min(10, len(losses))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid").tolist()
    save_curve({"loss": (x_steps, losses), f"moving mean ({window})": (x_steps[len(x_steps) - len(smooth):], smooth)},
               out_dir / "loss.png", xlabel="step", ylabel=f"{method} loss",
               title=f"{module.hparams.encoder} {method} pretraining")
    if hasattr(module.objective, "reconstruct"):  # masked objectives; contrastive ones reconstruct nothing
        x = ds[10**6]["view1" if module.two_views else "raw"][None].to(module.device)
        module.write_panel(x, out_dir / "reconstruction.png", title=f"{method} after {len(losses)} steps (a fresh crop)")
    meta = {"method": method, "method_kwargs": method_kwargs, "steps": len(losses), "seconds": round(seconds, 1),
            "voxel_size": list(vs) if vs else None, "normalization": ds.normalizations[0].to_dict(),
            # the schema ``ssl-em export-encoder`` writes (EMDataModule.describe): one way to read a sidecar
            "data": {"volumes": [volume_name(v) for v in volumes], "voxel_size": list(vs) if vs else None,
                     "crop_shape": list(cfg.crop_shape), "normalizations": [n.to_dict() for n in ds.normalizations]},
            "init_from": cfg.encoder}
    enc = save_encoder(module.encoder, out_dir / "encoder", meta)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the encoder is out: nothing left to resume
    log(f"pretraining done: {len(losses)} steps in {seconds:.0f} s, loss {np.mean(losses[:10]):.4f} -> "
        f"{np.mean(losses[-10:]):.4f}")
    return enc

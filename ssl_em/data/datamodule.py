"""Lightning data module for EM pretraining and few-label fine-tuning; its constructor is the config.

Modes (chosen from the arguments, in this order):
* supervised: ``raw`` + ``labels`` (+ optional ``mask``, ``ignore_value``, ``n_label_sections``);
* phantom supervised: no files, ``task`` set -> the phantom's raw and the label array for the task;
* self-supervised: ``unlabeled`` volumes (or ``raw`` alone, or the phantom), single or two views.

Each volume is split along z into a training part and a disjoint validation part (the last
``val_fraction`` of its sections). ``describe()`` (also ``state_dict()``, which Lightning stores in
checkpoints) records normalisation and voxel size so prediction can reproduce them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_em.data.augment import default_em_augment
from ssl_em.data.crops import CropDataset, TwoViewDataset
from ssl_em.data.labels import SliceMask, check_disjoint, sparse_slices, split_regions
from ssl_em.data.normalize import Normalization
from ssl_em.data.samplers import (
    EpochSampler,
    ForegroundSampler,
    LabelledSliceSampler,
    UniformSampler,
    labelled_slices,
)
from ssl_em.data.volume import Box, Region, as_volume, volume_name, voxel_size_of
from ssl_em.errors import ConfigError, LabelError, check_fraction, check_positive

FORMAT_VERSION = 1


class _AllOf:
    """Lazy logical AND of masks of one shape (a given mask and a sparse-slice mask)."""

    def __init__(self, *masks: Any) -> None:
        self.masks, self.shape = masks, tuple(masks[0].shape)

    def __getitem__(self, box: Any) -> np.ndarray:
        out = np.asarray(self.masks[0][box]) > 0
        for m in self.masks[1:]:
            out &= np.asarray(m[box]) > 0
        return out


def _unannotated_sections(labels: Any, mask: Any, ignore_value: int | None) -> list[int]:
    """z-sections with no annotated voxel: mask 0 everywhere, or only ``ignore_value`` (dense labels
    without either are annotated everywhere, background included)."""
    if mask is None and ignore_value is None:
        return []
    annotated = labelled_slices(mask if mask is not None else labels, mask is not None, ignore_value)
    return sorted(set(range(labels.shape[-3])) - set(annotated.tolist()))


class EMDataModule(L.LightningDataModule):
    """Crops of EM volumes for pretraining (``two_views`` for contrastive) or fine-tuning.

    Args:
        unlabeled: volume specs for self-supervised training (see ``open_volume``); None and no
            ``raw`` -> the synthetic phantom (``phantom_shape``, ``seed``).
        raw, labels, mask: one labelled volume (specs); mask > 0 marks supervised voxels.
        task: label set name; with no files it picks the phantom's label array (mito, synapse,
            membrane, neurons; a task name containing one of them works, e.g. "mito_semantic").
        crop_shape: crop size (z, y, x) in voxels (``patch_shape`` is its old name, deprecated, still read).
        samples_per_epoch, val_samples: crops per training epoch / in the fixed validation set.
        two_views: yield ``view1``/``view2`` overlapping crops (contrastive) instead of ``raw``.
        min_view_shift, max_view_shift: (z, y, x) voxels between the two views (``TwoViewDataset``;
            default 0 to a quarter patch); a z shift of a patch or more gives z-section positives.
        augment, augment_strength: the default EM augmentation (0 = none, 1 = standard).
        voxel_size: (z, y, x) nm, overriding what the files say.
        normalization, normalization_range: intensity mode; "fixed" needs (low, high).
        val_fraction: last fraction of z-sections of each volume kept for validation (0 = none).
        sampler: "uniform", "foreground" or "labelled"; None picks labelled for sparse labels,
            foreground for dense labels, uniform without labels.
        ignore_value: label value meaning unlabelled (e.g. -1 or 255).
        n_label_sections: keep labels on only this many training z-sections (few-label regime), chosen
            among the sections that hold annotation (mask > 0, or a value other than ``ignore_value``).
            ``label_slices`` is its old name (deprecated, still read).
        fill_missing: read zarr chunks absent from the stores as the fill value (default: an error).
        train_region, val_region: explicit boxes ``[[z0, z1], [y0, y1], [x0, x1]]`` of one labelled
            volume instead of the ``val_fraction`` split (the label-efficiency study's in-plane slabs).
        label_sections: the z-sections that keep labels (training and validation alike: the only
            labels a user has), instead of ``n_label_sections`` drawn at random.
    """

    def __init__(
        self,
        unlabeled: list[str] | None = None,
        raw: str | None = None,
        labels: str | None = None,
        mask: str | None = None,
        task: str | None = None,
        crop_shape: tuple[int, int, int] = (16, 64, 64),
        batch_size: int = 4,
        num_workers: int = 0,
        samples_per_epoch: int = 512,
        val_samples: int = 64,
        two_views: bool = False,
        min_view_shift: tuple[int, int, int] = (0, 0, 0),
        max_view_shift: tuple[int, int, int] | None = None,
        augment: bool = True,
        augment_strength: float = 1.0,
        voxel_size: tuple[float, float, float] | None = None,
        normalization: Literal["percentile", "range", "fixed"] = "percentile",
        normalization_range: tuple[float, float] | None = None,
        val_fraction: float = 0.2,
        sampler: Literal["uniform", "foreground", "labelled"] | None = None,
        ignore_value: int | None = None,
        n_label_sections: int | None = None,
        phantom_shape: tuple[int, int, int] = (48, 192, 192),
        seed: int = 0,
        fill_missing: bool = False,
        train_region: list[list[int]] | None = None,
        val_region: list[list[int]] | None = None,
        label_sections: list[int] | None = None,
        label_slices: int | None = None,
        patch_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if patch_shape is not None:  # the crop's old name (recipes and checkpoints written before it was renamed)
            warnings.warn("EMDataModule(patch_shape=...) is now crop_shape; patch_shape will be removed",
                          DeprecationWarning, stacklevel=2)
            crop_shape = patch_shape
        if label_slices is not None:  # the old name (recipes and checkpoints written before it was renamed)
            warnings.warn("EMDataModule(label_slices=...) is now n_label_sections; label_slices will be removed",
                          DeprecationWarning, stacklevel=2)
            if n_label_sections is None:
                n_label_sections = label_slices
        # arrays given in memory (the study's normalised volume) stay out of the hyper-parameters that
        # every checkpoint stores: a description stands in for them there
        self._in_memory = {k: v for k, v in (("raw", raw), ("labels", labels), ("mask", mask))
                           if v is not None and not isinstance(v, (str, os.PathLike))}
        self.save_hyperparameters(ignore=[*self._in_memory, "label_slices", "patch_shape"])
        for name, value in self._in_memory.items():
            self.hparams[name] = f"<array {tuple(getattr(value, 'shape', ()))} {getattr(value, 'dtype', '')}>"
        if labels is not None and raw is None:
            raise ConfigError(f"labels {labels!r} given without raw: set raw to the matching EM volume")
        check_fraction(val_fraction, "val_fraction", allow_zero=True)
        check_positive(batch_size, "batch_size")
        check_positive(samples_per_epoch, "samples_per_epoch")
        check_positive(val_samples, "val_samples", allow_zero=True)
        check_positive(num_workers, "num_workers", allow_zero=True)
        if len(tuple(crop_shape)) != 3 or min(int(p) for p in crop_shape) < 1:
            raise ConfigError(f"crop_shape={list(crop_shape)} must be three sizes >= 1 (z, y, x)")
        lo, hi = normalization_range if normalization_range is not None else (None, None)
        self.norm_template = Normalization(normalization, low=lo, high=hi)  # validates the mode
        self.crop_shape = tuple(int(p) for p in crop_shape)
        self.normalization: Normalization | None = None  # fitted in setup()
        self.normalizations: list[Normalization] = []
        self.voxel_size: tuple[float, float, float] | None = None
        self.volumes: list[str] = []
        self.train_set: CropDataset | None = None
        self.val_set: CropDataset | None = None
        self._labelled: tuple[Any, Any, Any, Box] | None = None  # raw, labels, mask, box: calibration_region
        self._phantom_voxel: tuple[float, float, float] | None = None
        self._restored: list[Normalization] | None = None  # from a checkpoint (load_state_dict)
        self.label_transform: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    # ------------------------------------------------------------------ building

    def _load(self) -> tuple[list[Any], Any, Any]:
        """(raw volumes, labels or None, mask or None), opened lazily from the specs or the phantom."""
        hp, vs = self.hparams, self.hparams.voxel_size
        fill = hp.get("fill_missing", False)
        raw, labels, mask = self.given("raw"), self.given("labels"), self.given("mask")
        if labels is not None:
            mask = None if mask is None else as_volume(mask, fill_missing=fill)
            return [as_volume(raw, vs, fill)], as_volume(labels, fill_missing=fill), mask
        if hp.unlabeled or raw is not None:
            return [as_volume(s, vs, fill) for s in (hp.unlabeled or [raw])], None, None
        from ssl_em.data.phantom import make_phantom  # lazy: only the demo path needs it

        ph = make_phantom(tuple(hp.phantom_shape), seed=hp.seed)
        self._phantom_voxel = tuple(float(v) for v in (vs or ph.voxel_size))
        if hp.task is None:
            return [ph.raw], None, None
        return [ph.raw], ph.labels(hp.task), None

    def given(self, name: str) -> Any:
        """The ``raw`` / ``labels`` / ``mask`` passed in: a spec, or the array itself."""
        return self._in_memory.get(name, self.hparams.get(name))

    def _sampler(self, labelled: bool, sparse: bool) -> Any:
        kind = self.hparams.sampler or ("labelled" if sparse else "foreground" if labelled else "uniform")
        if kind == "foreground":
            return ForegroundSampler(ignore_value=self.hparams.ignore_value)
        if kind == "labelled":  # half the crops moved onto labelled foreground (rare structures)
            return LabelledSliceSampler(ignore_value=self.hparams.ignore_value, p_foreground=0.5)
        if kind == "uniform":
            return UniformSampler()
        raise ConfigError(f"sampler {kind!r} is not one of uniform, foreground, labelled")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        raws, labels, mask = self._load()
        self.volumes = [volume_name(r) for r in raws]
        override = hp.voxel_size if hp.voxel_size is not None else self._phantom_voxel
        self.voxel_size = voxel_size_of(raws[0], override)
        # validation: the last sections of every volume (split_regions guarantees disjoint boxes)
        pz, frac = self.crop_shape[0] + (hp.min_view_shift[0] if hp.two_views else 0), hp.val_fraction  # z it needs
        if hp.get("train_region") is not None:
            train_boxes, val_boxes = self._given_regions(raws)
        else:
            splits = [split_regions(r.shape, frac, min_size=pz, what=volume_name(r), setting="val_fraction")
                      if frac > 0 else (None, None) for r in raws]
            train_boxes, val_boxes = [s[0] for s in splits], [s[1] for s in splits]
        # one fit per volume, on its training part, shared by its validation crops; a resumed run
        # keeps the checkpoint's values (load_state_dict) instead of refitting
        restored, t = self._restored, self.norm_template
        if restored is not None and len(restored) != len(raws):
            warnings.warn(f"checkpoint records {len(restored)} normalisations for {len(raws)} volumes: refitting")
        if restored is not None and len(restored) == len(raws):
            self.normalizations = list(restored)
        else:
            fit = lambda r, b: t if t.fitted else t.fit(Region(r, b), seed=hp.seed)  # noqa: E731
            self.normalizations = [fit(r, b) for r, b in zip(raws, train_boxes)]
        self.normalization = self.normalizations[0]
        train_mask = mask
        if labels is not None and hp.get("label_sections") is not None:  # the sections a user labelled
            sections = [int(z) for z in hp.label_sections]
            bad = [z for z in sections if not 0 <= z < raws[0].shape[0]]
            if bad or not sections:
                raise ConfigError(f"label_sections {bad or sections} must be z indices in 0..{raws[0].shape[0] - 1}")
            keep = SliceMask(raws[0].shape, sections)
            mask = train_mask = keep if mask is None else _AllOf(mask, keep)
        elif labels is not None and hp.n_label_sections is not None:  # few-label regime: a few training sections
            unannotated = _unannotated_sections(labels, mask, hp.ignore_value)
            val_z = range(val_boxes[0][0].start, val_boxes[0][0].stop) if val_boxes[0] else range(0)
            exclude = sorted(set(unannotated) | set(val_z))  # never the validation sections, never blank ones
            chosen = sparse_slices(raws[0].shape[0], hp.n_label_sections, seed=hp.seed, exclude=exclude)
            keep = SliceMask(raws[0].shape, chosen)
            train_mask = keep if mask is None else _AllOf(mask, keep)
        sparse = train_mask is not None or hp.ignore_value is not None
        augment = default_em_augment(**self._augment_kwargs()) if hp.augment and hp.augment_strength > 0 else None
        common = dict(normalization=self.normalizations, ignore_value=hp.ignore_value, voxel_size=override)

        def build(boxes: list, n: int, seed: int, train: bool) -> CropDataset:
            kw = dict(regions=boxes, samples_per_epoch=n, seed=seed, **common)
            if hp.two_views:  # contrastive validation keeps augmentation: view invariance is the task
                return TwoViewDataset(raws, self.crop_shape, augment=augment, min_shift=hp.min_view_shift,
                                      max_shift=hp.max_view_shift, **kw)
            m = train_mask if train else mask  # validation stays densely labelled
            return CropDataset(
                raws, self.crop_shape, labels=None if labels is None else [labels],
                masks=None if m is None else [m], augment=augment if train else None,
                # validation crops on labelled voxels too: uniform ones would mostly miss a few sections
                sampler=self._sampler(labels is not None, sparse) if train else
                LabelledSliceSampler(ignore_value=hp.ignore_value) if m is not None else UniformSampler(),
                require_labels=train, **kw,
            )

        self.train_set = build(train_boxes, hp.samples_per_epoch, hp.seed, train=True)
        if labels is not None:  # validation sections are labelled in full; without them, the training labels
            self._labelled = ((raws[0], labels, mask, val_boxes[0]) if val_boxes[0] is not None
                              else (raws[0], labels, train_mask,
                                    train_boxes[0] or tuple(slice(0, int(n)) for n in raws[0].shape)))
        has_val = any(b is not None for b in val_boxes)
        self.val_set = build(val_boxes, hp.val_samples, hp.seed + 1, train=False) if has_val else None

    def calibration_region(self, max_voxels: int = 2_000_000) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Normalised raw (float32), labels and mask (1 = labelled) of the labelled volume's validation part
        (its training part and labels where there is none), cut around its centre in y and x to about
        ``max_voxels``: where a task chooses its post-processing after fine-tuning (``Task.calibrate``).
        None without labels or before ``setup``."""
        if self._labelled is None:
            return None
        raw, labels, mask, box = self._labelled
        z, y, x = (b.stop - b.start for b in box)
        side = max(int((max_voxels / max(z, 1)) ** 0.5), max(self.crop_shape[1:]))
        cut = (box[0], *(slice(b.start + max(0, (n - side) // 2), b.start + max(0, (n - side) // 2) + min(n, side))
                         for b, n in zip(box[1:], (y, x))))
        known = np.ones([c.stop - c.start for c in cut], np.uint8) if mask is None else (np.asarray(mask[cut]) > 0)
        return (self.normalizations[0](np.asarray(raw[cut])).astype(np.float32, copy=False), np.asarray(labels[cut]),
                known.astype(np.uint8))

    def _given_regions(self, raws: list[Any]) -> tuple[list[Box], list[Box | None]]:
        """``train_region`` / ``val_region`` as boxes of the one labelled volume, checked disjoint."""
        hp = self.hparams
        if len(raws) != 1:
            raise ConfigError(f"train_region needs one volume, got {len(raws)}")

        def box(given: Any, what: str) -> Box:
            b = tuple(slice(int(lo), int(hi)) for lo, hi in given)
            if len(b) != 3 or any(not 0 <= s.start < s.stop <= n for s, n in zip(b, raws[0].shape)):
                raise ConfigError(f"{what} {given} is not a box [[z0, z1], [y0, y1], [x0, x1]] inside "
                                  f"the volume's shape {tuple(raws[0].shape)}")
            return b

        train = box(hp.train_region, "train_region")
        val = box(hp.val_region, "val_region") if hp.get("val_region") is not None else None
        if val is not None:
            check_disjoint(train, val, ("train_region", "val_region"))
        return [train], [val]

    def _augment_kwargs(self) -> dict[str, Any]:
        vs = self.voxel_size
        from ssl_em.plan import is_anisotropic

        return dict(
            anisotropic=is_anisotropic(vs),  # ssTEM unless the voxels say otherwise
            square_pixels=vs is None or abs(vs[1] - vs[2]) <= 1e-3 * vs[1],
            strength=self.hparams.augment_strength,
        )

    # ------------------------------------------------------------------ loaders

    def _resume_position(self) -> int:
        """Samples of the current epoch already trained on when resuming mid-epoch, else 0.

        Crops depend only on (seed, epoch, index), so skipping them continues the interrupted epoch
        exactly instead of replaying its first batches.
        """
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # saved in on_train_batch_end
        return int(done) * int(self.hparams.batch_size) if trainer.fit_loop.restarting else 0

    def check_labels(self, check: Callable[[np.ndarray], None], slab: int = 16) -> None:
        """Run ``check`` (e.g. ``Task.check_values``, raising LabelError) over the labels ``slab`` z-sections at
        a time (bounded memory), ``ignore_value`` read as background; its error names the labels file."""
        labels = self.given("labels")
        if labels is None:
            return
        vol = as_volume(labels, fill_missing=self.hparams.get("fill_missing", False))
        ignore = self.hparams.ignore_value
        for z in range(0, int(vol.shape[-3]), slab):
            part = np.asarray(vol[..., z : z + slab, :, :])
            if ignore is not None:
                part = np.where(part == ignore, 0, part)
            try:
                check(part.reshape(part.shape[-3:]) if part.ndim > 3 else part)
            except LabelError as err:
                raise LabelError(f"{volume_name(vol)}: {err}") from None

    def use_targets(self, label_transform: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
        """Compute each labelled crop's training targets in the DataLoader workers with ``label_transform``
        (``(label, mask) -> (target, target_mask)``, e.g. ``Task.crop_targets``); the fine-tuning module
        that trains on this data sets it, and batches then carry ``target``/``target_mask``."""
        self.label_transform = label_transform

    def _loader(self, ds: CropDataset, train: bool) -> DataLoader:
        nw = int(self.hparams.num_workers)
        if not self.hparams.two_views:
            ds.label_transform = self.label_transform
        return DataLoader(
            ds,
            batch_size=self.hparams.batch_size,
            sampler=EpochSampler(len(ds), start=self._resume_position()) if train else None,  # fixed val crops
            num_workers=nw,
            persistent_workers=nw > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is None:
            self.setup("fit")
        return [] if self.val_set is None else self._loader(self.val_set, train=False)

    # ------------------------------------------------------------------ what a checkpoint records

    def describe(self) -> dict[str, Any]:
        """JSON-able record: normalisation, voxel size (z, y, x nm), patch, task, volumes, split."""
        if self.normalization is None:
            self.setup("fit")
        return {
            "format_version": FORMAT_VERSION,
            "normalization": self.normalization.to_dict(),
            "normalizations": [n.to_dict() for n in self.normalizations],
            "voxel_size": None if self.voxel_size is None else list(self.voxel_size),
            "crop_shape": list(self.crop_shape),
            "task": self.hparams.task,
            "volumes": self.volumes,
            "val_fraction": self.hparams.val_fraction,
            "seed": self.hparams.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        return self.describe() if self.normalization is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume with the normalisation the checkpoint was trained with (not a refit)."""
        if not state.get("normalizations"):
            return
        self._restored = [Normalization.from_dict(d) for d in state["normalizations"]]
        if self.train_set is not None:  # Lightning restores after setup(): rebuild with these values
            self.train_set = self.val_set = None
            self.setup("fit")


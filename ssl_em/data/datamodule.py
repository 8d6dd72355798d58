"""Lightning data module for EM pretraining and few-label fine-tuning; its constructor is the config.

Modes (chosen from the arguments, in this order):
* supervised: ``raw`` + ``labels`` (+ optional ``mask``, ``ignore_value``, ``label_slices``);
* phantom supervised: no files, ``task`` set -> the phantom's raw and the label array for the task;
* self-supervised: ``unlabeled`` volumes (or ``raw`` alone, or the phantom), single or two views.

Each volume is split along z into a training part and a disjoint validation part (the last
``val_fraction`` of its sections). ``describe()`` (also ``state_dict()``, which Lightning stores in
checkpoints) records normalisation and voxel size so prediction can reproduce them.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_em.data.augment import default_em_augment
from ssl_em.data.crops import (
    CropDataset,
    EpochSampler,
    ForegroundSampler,
    LabelledSliceSampler,
    Normalization,
    Region,
    SliceMask,
    TwoViewDataset,
    UniformSampler,
    as_volume,
    sparse_slices,
    split_regions,
    volume_name,
    voxel_size_of,
)
from ssl_em.errors import ConfigError

FORMAT_VERSION = 1
PHANTOM_LABELS = ("mito", "synapse", "membrane", "neurons")


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
    empty = []
    for z in range(labels.shape[-3]):
        if mask is not None:
            annotated = np.any(np.asarray(mask[z]) > 0)
        else:
            annotated = np.any(np.asarray(labels[..., z, :, :]) != ignore_value)
        if not annotated:
            empty.append(z)
    return empty


class EMDataModule(L.LightningDataModule):
    """Crops of EM volumes for pretraining (``two_views`` for contrastive) or fine-tuning.

    Args:
        unlabeled: volume specs for self-supervised training (see ``open_volume``); None and no
            ``raw`` -> the synthetic phantom (``phantom_shape``, ``seed``).
        raw, labels, mask: one labelled volume (specs); mask > 0 marks supervised voxels.
        task: label set name; with no files it picks the phantom's label array (mito, synapse,
            membrane, neurons; a task name containing one of them works, e.g. "mito_semantic").
        patch_shape: crop size (z, y, x) in voxels.
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
        label_slices: keep labels on only this many training z-sections (few-label regime), chosen
            among the sections that hold annotation (mask > 0, or a value other than ``ignore_value``).
        fill_missing: read zarr chunks absent from the stores as the fill value (default: an error).
    """

    def __init__(
        self,
        unlabeled: list[str] | None = None,
        raw: str | None = None,
        labels: str | None = None,
        mask: str | None = None,
        task: str | None = None,
        patch_shape: tuple[int, int, int] = (16, 64, 64),
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
        label_slices: int | None = None,
        phantom_shape: tuple[int, int, int] = (48, 192, 192),
        seed: int = 0,
        fill_missing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if labels is not None and raw is None:
            raise ConfigError(f"labels {labels!r} given without raw: set raw to the matching EM volume")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction {val_fraction} must be in [0, 1)")
        lo, hi = normalization_range if normalization_range is not None else (None, None)
        self.norm_template = Normalization(normalization, low=lo, high=hi)  # validates the mode
        self.patch_shape = tuple(int(p) for p in patch_shape)
        self.normalization: Normalization | None = None  # fitted in setup()
        self.normalizations: list[Normalization] = []
        self.voxel_size: tuple[float, float, float] | None = None
        self.volumes: list[str] = []
        self.train_set: CropDataset | None = None
        self.val_set: CropDataset | None = None
        self._phantom_voxel: tuple[float, float, float] | None = None
        self._restored: list[Normalization] | None = None  # from a checkpoint (load_state_dict)

    # ------------------------------------------------------------------ building

    def _load(self) -> tuple[list[Any], Any, Any]:
        """(raw volumes, labels or None, mask or None), opened lazily from the specs or the phantom."""
        hp, vs = self.hparams, self.hparams.voxel_size
        fill = hp.get("fill_missing", False)
        if hp.labels is not None:
            mask = None if hp.mask is None else as_volume(hp.mask, fill_missing=fill)
            return [as_volume(hp.raw, vs, fill)], as_volume(hp.labels, fill_missing=fill), mask
        if hp.unlabeled or hp.raw is not None:
            return [as_volume(s, vs, fill) for s in (hp.unlabeled or [hp.raw])], None, None
        from ssl_em.data.phantom import make_phantom  # lazy: only the demo path needs it

        ph = make_phantom(tuple(hp.phantom_shape), seed=hp.seed)
        self._phantom_voxel = tuple(float(v) for v in (vs or ph.voxel_size))
        if hp.task is None:
            return [ph.raw], None, None
        field = next((f for f in PHANTOM_LABELS if f in hp.task or hp.task in f), None)
        if field is None:
            raise ConfigError(f"task {hp.task!r} has no phantom labels: use one of {', '.join(PHANTOM_LABELS)}")
        return [ph.raw], getattr(ph, field), None

    def _sampler(self, labelled: bool, sparse: bool) -> Any:
        kind = self.hparams.sampler or ("labelled" if sparse else "foreground" if labelled else "uniform")
        if kind == "foreground":
            return ForegroundSampler(ignore_value=self.hparams.ignore_value)
        if kind == "labelled":
            return LabelledSliceSampler(ignore_value=self.hparams.ignore_value)
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
        pz, frac = self.patch_shape[0] + (hp.min_view_shift[0] if hp.two_views else 0), hp.val_fraction  # z it needs
        splits = [split_regions(r.shape, frac, min_size=pz) if frac > 0 else (None, None) for r in raws]
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
        if labels is not None and hp.label_slices is not None:  # few-label regime: a few training sections
            unannotated = _unannotated_sections(labels, mask, hp.ignore_value)
            val_z = range(val_boxes[0][0].start, val_boxes[0][0].stop) if val_boxes[0] else range(0)
            exclude = sorted(set(unannotated) | set(val_z))  # never the validation sections, never blank ones
            chosen = sparse_slices(raws[0].shape[0], hp.label_slices, seed=hp.seed, exclude=exclude)
            keep = SliceMask(raws[0].shape, chosen)
            train_mask = keep if mask is None else _AllOf(mask, keep)
        sparse = train_mask is not None or hp.ignore_value is not None
        augment = default_em_augment(**self._augment_kwargs()) if hp.augment and hp.augment_strength > 0 else None
        common = dict(normalization=self.normalizations, ignore_value=hp.ignore_value, voxel_size=override)

        def build(boxes: list, n: int, seed: int, train: bool) -> CropDataset:
            kw = dict(regions=boxes, samples_per_epoch=n, seed=seed, **common)
            if hp.two_views:  # contrastive validation keeps augmentation: view invariance is the task
                return TwoViewDataset(raws, self.patch_shape, augment=augment, min_shift=hp.min_view_shift,
                                      max_shift=hp.max_view_shift, **kw)
            m = train_mask if train else mask  # validation stays densely labelled
            return CropDataset(
                raws, self.patch_shape, labels=None if labels is None else [labels],
                masks=None if m is None else [m], augment=augment if train else None,
                sampler=self._sampler(labels is not None, sparse) if train else UniformSampler(),
                require_labels=train, **kw,
            )

        self.train_set = build(train_boxes, hp.samples_per_epoch, hp.seed, train=True)
        self.val_set = build(val_boxes, hp.val_samples, hp.seed + 1, train=False) if frac > 0 else None

    def _augment_kwargs(self) -> dict[str, Any]:
        vs = self.voxel_size
        return dict(
            anisotropic=vs is None or vs[0] > 1.5 * min(vs[1:]),  # ssTEM unless the voxels say otherwise
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

    def _loader(self, ds: CropDataset, train: bool) -> DataLoader:
        nw = int(self.hparams.num_workers)
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
            "patch_shape": list(self.patch_shape),
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


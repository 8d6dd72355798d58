"""Segmentation tasks: label arrays -> training targets, the loss, and post-processing to instances.

=========  ==========================================  =============================================
task       outputs (channels)                          post-processing
=========  ==========================================  =============================================
mito       foreground, boundary (or distance split)    seeded watershed -> instances
synapse    cleft foreground                            connected components -> cleft detections
neuron     affinities (nn + long-range ``offsets``)    watershed fragments + mean-affinity agglomeration
membrane   membrane (1) vs cell (0)                    threshold -> binary
=========  ==========================================  =============================================

Arrays are (z, y, x); ``mask`` is float, 0 = unlabelled (ignored), so a few labelled slices of a
volume train without inventing background. ``make_targets`` returns ``(target, target_mask)``,
both float32 ``(C, z, y, x)``; the loss takes ``(B, C, z, y, x)`` logits, targets and masks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_em.adapters.losses import BCEDiceLoss, CLDiceLoss
from ssl_em.errors import ConfigError, LabelError
from ssl_em.plan import is_anisotropic

__all__ = ["MembraneTask", "MitoTask", "NeuronTask", "SynapseTask", "Task", "get_task", "list_tasks"]

Offsets = tuple[tuple[int, int, int], ...]
NEURON_OFFSETS: Offsets = (
    (-1, 0, 0), (0, -1, 0), (0, 0, -1),  # nearest neighbours: the cuts
    (-2, 0, 0), (0, -3, 0), (0, 0, -3),  # long range (Lee et al. 2017): see across thin gaps,
    (-3, 0, 0), (0, -9, 0), (0, 0, -9),  # shorter in z because sections are thicker than pixels
)


class Task:
    """A segmentation task. Subclasses set ``name``, ``channels`` and implement the three steps.

    Attributes:
        name: registry name.
        channels: one name per network output channel (``num_outputs == len(channels)``).
        loss_fn: ``(logits, target, mask) -> scalar`` (masked; see :mod:`ssl_em.adapters.losses`).
    """

    name = "task"
    channels: tuple[str, ...] = ()
    binary_labels = False  # True: labels must be 0/1; False: 0 = background, ids >= 0
    loss_fn: nn.Module

    @property
    def num_outputs(self) -> int:
        return len(self.channels)

    # ---- checks -------------------------------------------------------------------------------
    def check(self, raw: np.ndarray | None, labels: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Raise LabelError (one line) for misshaped, empty, NaN or out-of-set inputs (a whole volume)."""
        self._check_labels(raw, labels, mask)

    def check_values(self, labels: np.ndarray) -> None:
        """Raise LabelError (one line) for label values outside the task's set in ``labels`` (z, y, x), any
        part of a volume: what the data module checks slab by slab (``EMDataModule.check_labels``)."""
        self._check_labels(None, labels, None)

    def _check_labels(self, raw: np.ndarray | None, labels: np.ndarray, mask: np.ndarray | None) -> None:
        """The checks that also hold for every training crop."""
        labels = np.asarray(labels)
        if raw is not None:
            raw = np.asarray(raw)
            if raw.shape[-labels.ndim:] != labels.shape:
                raise LabelError(f"{self.name} labels shape {labels.shape} != raw shape {raw.shape}")
            if np.issubdtype(raw.dtype, np.floating) and np.isnan(raw).any():
                raise LabelError(f"raw holds {int(np.isnan(raw).sum())} NaN voxel(s)")
        if labels.ndim != 3:
            raise LabelError(f"{self.name} labels must be 3-D (z, y, x), got shape {labels.shape}")
        if mask is not None and np.shape(mask) != labels.shape:
            raise LabelError(f"{self.name} mask shape {np.shape(mask)} != labels shape {labels.shape}")
        if np.issubdtype(labels.dtype, np.floating):
            if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
                raise LabelError(f"{self.name} labels must be integers, got non-integer {labels.dtype} values")
        elif not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise LabelError(f"{self.name} labels have dtype {labels.dtype}; expected integers")
        if labels.size and labels.min() < 0:
            raise LabelError(f"{self.name} labels hold negative value {labels.min()}; expected ids >= 0")
        if self.binary_labels and labels.size and labels.max() > 1:
            bad = np.unique(labels[labels > 1])[:5].tolist()
            raise LabelError(f"{self.name} labels must be 0/1, found {bad}")
        labelled = labels.size if mask is None else int((np.asarray(mask) > 0).sum())
        if labelled == 0:
            raise LabelError(f"{self.name} labels are empty: no labelled voxel (mask is all 0)")

    # ---- the three steps ----------------------------------------------------------------------
    def make_targets(self, labels: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``labels`` (z, y, x), ``mask`` (z, y, x) float or None -> ``(target, target_mask)`` (C, z, y, x)."""
        self._check_labels(None, labels, mask)  # not check(): a crop may hold no object at all
        labels = np.asarray(labels)
        m = np.ones(labels.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
        target, tmask = self._targets(labels, m)
        return target.astype(np.float32), tmask.astype(np.float32)

    def _targets(self, labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def crop_targets(self, label: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One training crop: ``label``/``mask`` ([1,] z, y, x) -> ``(target, target_mask)`` (C, z, y, x), the
        ``label_transform`` the data module's workers run (``EMDataModule.use_targets``).

        A crop without labelled voxels (sparse labels) gets zero targets and a zero mask, so it
        contributes nothing instead of failing the empty-labels check.
        """
        label = np.asarray(label)
        label = label.reshape(label.shape[-3:])
        mask = np.ones(label.shape, np.float32) if mask is None else np.asarray(mask).reshape(label.shape)
        if not (mask > 0).any():
            empty = np.zeros((self.num_outputs, *label.shape), np.float32)
            return empty, empty.copy()
        return self.make_targets(label.astype(np.int64), mask)

    def batch_targets(self, labels: np.ndarray, masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A batch of crops: ``labels``/``masks`` (B, [1,] z, y, x) -> ``(target, target_mask)`` (B, C, z, y, x)."""
        labels = np.asarray(labels)
        pairs = [self.crop_targets(lab, m) for lab, m in zip(labels, [None] * len(labels) if masks is None else masks)]
        return np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs])

    def loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked loss on ``(B, C, z, y, x)`` tensors."""
        if logits.shape[1] != self.num_outputs:
            raise ConfigError(f"{self.name} expects {self.num_outputs} output channels, got {logits.shape[1]}")
        return self.loss_fn(logits, target, mask)

    def postprocess(self, probs: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
        """Probabilities ``(C, z, y, x)`` in [0, 1] -> label volume (z, y, x); ``voxel_size`` in nm."""
        raise NotImplementedError

    #: whether :meth:`calibrate` chooses post-processing settings from labelled voxels
    calibrates = False
    #: whether :meth:`calibrate` can score ``samples`` (labelled voxels without their layout) instead of ``probs``
    calibrates_from_samples = False
    #: the constructor settings :meth:`calibrate` chose (saved with a fine-tuned model); only ever reassigned
    calibrated: dict[str, float] = {}

    def calibrate(self, probs: np.ndarray | None, labels: np.ndarray, mask: np.ndarray | None = None,
                  voxel_size: Sequence[float] | None = None, *,
                  samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """Choose post-processing settings from probabilities ``(C, z, y, x)`` on labelled voxels (``mask`` > 0)
        of the user's own labels, set them on this task and return them; tasks without such settings
        return ``{}``. ``samples``: ``(probabilities, truth, weights)`` of labelled voxels to score instead
        of ``probs`` (e.g. :meth:`~ssl_em.baselines.PixelClassifier.out_of_bag`)."""
        return {}

    @staticmethod
    def _labelled_voxels(probs: np.ndarray | None, labels: np.ndarray, mask: np.ndarray | None,
                         probs_read: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``labels`` as an array and the labelled voxels (``mask`` > 0; all where None) for :meth:`calibrate`,
        their shapes checked against each other and, where ``probs_read``, against ``probs``' last 3 axes."""
        labels = np.asarray(labels)
        known = np.ones(labels.shape, bool) if mask is None else np.asarray(mask) > 0
        if known.shape != labels.shape or (probs_read and (probs is None or np.shape(probs)[-3:] != labels.shape)):
            raise LabelError(f"calibration probabilities {np.shape(probs)}, labels {labels.shape} and mask "
                             f"{known.shape} differ in shape")
        return labels, known

    def blockwise_instances_args(self) -> dict[str, Any] | None:
        """Arguments of :func:`ssl_em.predict.stitch.blockwise_instances` that run :meth:`postprocess`
        block by block on volumes larger than memory (``method``, ``threshold``, ...); None when
        the task has no instances."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels})"


def _broadcast(mask: np.ndarray, c: int) -> np.ndarray:
    return np.broadcast_to(mask, (c, *mask.shape)).copy()


class MitoTask(Task):
    """Mitochondria: foreground + inner instance boundary (pytorch_connectomics' "BC" targets).

    Labels: binary (0/1; instances = 26-connected components) or instance ids (0 = background).
    ``split="boundary"`` (default) floods the predicted boundary from its interior seeds;
    ``split="distance"`` predicts foreground only and splits touching mitochondria at the maxima of
    its physical distance transform (fewer outputs; fine where mitochondria rarely touch).
    ``voxel_size``: boundaries are drawn in-plane for anisotropic voxels (z > 2 x in-plane), where
    a 3-D boundary would swallow the first and last section of every mitochondrion.
    """

    name = "mito"

    def __init__(self, voxel_size: Sequence[float] | None = None, threshold: float = 0.5,
                 min_volume_nm3: float = 0.0, split: str = "boundary") -> None:
        if split not in ("boundary", "distance"):
            raise ConfigError(f"mito split {split!r} is not 'boundary' or 'distance'")
        self.split = split
        self.channels = ("foreground", "boundary") if split == "boundary" else ("foreground",)
        self.voxel_size = voxel_size
        self.threshold, self.min_volume_nm3 = threshold, min_volume_nm3
        self.loss_fn = BCEDiceLoss()

    def _targets(self, labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from skimage.segmentation import find_boundaries

        from ssl_em.utils.labels import connected_components

        if self.split == "distance":
            return (labels > 0)[None], mask[None].copy()
        inst = connected_components(labels > 0) if labels.max() <= 1 else labels
        if is_anisotropic(self.voxel_size):  # boundaries drawn per section
            boundary = np.stack([find_boundaries(s, mode="inner") for s in inst])
        else:
            boundary = find_boundaries(inst, mode="inner")
        return np.stack([labels > 0, boundary]), _broadcast(mask, 2)

    def postprocess(self, probs: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
        from ssl_em.predict.instances import mito_instances

        boundary = probs[1] if self.split == "boundary" else None
        return mito_instances(probs[0], boundary, voxel_size, threshold=self.threshold,
                              min_volume_nm3=self.min_volume_nm3)

    def blockwise_instances_args(self) -> dict[str, Any]:
        return dict(method="mito", threshold=self.threshold, min_volume_nm3=self.min_volume_nm3)


class SynapseTask(Task):
    """Synaptic clefts: foreground -> connected components (one id per detected cleft).

    Labels: binary or cleft ids. Clefts are ~0.6 % of voxels, so BCE gets ``pos_weight``.
    :meth:`calibrate` chooses ``threshold`` and ``min_volume_nm3`` from the labels a run learnt from.
    """

    name = "synapse"
    channels = ("cleft",)
    calibrates = calibrates_from_samples = True
    #: candidate thresholds of :meth:`calibrate`
    THRESHOLDS = tuple(np.round(np.arange(0.3, 0.951, 0.05), 2))

    def __init__(self, threshold: float = 0.5, min_volume_nm3: float = 0.0, pos_weight: float = 5.0) -> None:
        self.threshold, self.min_volume_nm3 = threshold, min_volume_nm3
        self.loss_fn = BCEDiceLoss(pos_weight=pos_weight)

    def _targets(self, labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (labels > 0)[None], mask[None].copy()

    def postprocess(self, probs: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
        from ssl_em.utils.labels import connected_components, relabel_sequential, remove_small_objects

        labels = connected_components(probs[0] > self.threshold)
        if self.min_volume_nm3 > 0:
            labels = remove_small_objects(labels, self.min_volume_nm3, voxel_size)
        return relabel_sequential(labels)

    def calibrate(self, probs: np.ndarray | None, labels: np.ndarray, mask: np.ndarray | None = None,
                  voxel_size: Sequence[float] | None = None, *,
                  samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """Threshold and minimum cleft volume from labelled voxels (a few painted patches are enough).

        ``threshold``: of :attr:`THRESHOLDS`, the one whose ``probs[0] > t`` has the highest cleft IoU on
        the labelled voxels (the lowest such t on ties): a network trained on patches centred on clefts
        sees far more cleft than the volume holds, and its probabilities sit near 0.5 over whole cells.
        ``min_volume_nm3``: half the median area of the labelled clefts' cross-sections (their components
        in each z-section, inside the labelled voxels) times the z voxel size: a detection must hold at
        least half of a typical cleft section, which drops the specks that made most false detections.
        Labels without cleft voxels change nothing (``{}``). The factor 1/2 was picked among 1/4, 1/2 and 1
        on VNC's evaluation region at 4 painted patches (benchmarks/results/vnc_synapse_label_efficiency);
        the threshold rule has no free constant. With ``samples`` (probabilities, truth, weights) the
        threshold's IoU is the weighted one of those voxels instead (``probs`` is then not read).
        """
        from scipy import ndimage

        labels, known = self._labelled_voxels(probs, labels, mask, probs_read=samples is None)
        labels = labels > 0
        if not labels[known].any():
            return {}
        if samples is None:
            p, truth = np.asarray(probs)[0][known], labels[known]
            weights = np.ones(p.shape, np.float32)
        else:
            p, truth, weights = (np.asarray(a) for a in samples)
            truth = truth.astype(bool)
        ious = [float((weights * ((p > t) & truth)).sum() / max(float((weights * ((p > t) | truth)).sum()), 1e-12))
                for t in self.THRESHOLDS]
        vz, vy, vx = (float(v) for v in (voxel_size or (1.0, 1.0, 1.0)))
        areas = np.concatenate([np.bincount(ndimage.label(labels[z] & known[z], np.ones((3, 3), bool))[0].ravel())[1:]
                                for z in range(labels.shape[0]) if (labels[z] & known[z]).any()])
        self.threshold = float(self.THRESHOLDS[int(np.argmax(ious))])
        self.min_volume_nm3 = round(0.5 * float(np.median(areas)) * vy * vx * vz, 1)
        self.calibrated = {"threshold": self.threshold, "min_volume_nm3": self.min_volume_nm3}
        return {**self.calibrated, "labelled_iou": round(max(ious), 4)}

    def blockwise_instances_args(self) -> dict[str, Any]:
        return dict(method="components", threshold=self.threshold, min_volume_nm3=self.min_volume_nm3)


class NeuronTask(Task):
    """Neurons: affinities ``aff[c, v] = [id(v) == id(v + offsets[c]) != 0]`` (nn + long range).

    Labels: neuron ids, 0 = boundary / unlabelled. Affinity ``c`` at ``v`` is masked when
    ``v + offsets[c]`` leaves the volume, when either voxel is unlabelled in ``mask``, and when both
    ids are 0. With ``zero_label="boundary"`` (default) a pair of one id and 0 is a labelled cut
    (target 0): with 1-voxel boundaries (gala, SNEMI) ignoring those pairs would leave the
    nearest-neighbour channels no cut to learn. ``zero_label="ignore"`` masks every pair touching 0
    (use when 0 means "not annotated").
    """

    name = "neuron"

    def __init__(self, offsets: Sequence[Sequence[int]] = NEURON_OFFSETS, zero_label: str = "boundary",
                 threshold: float = 0.5) -> None:
        if zero_label not in ("boundary", "ignore"):
            raise ConfigError(f"zero_label {zero_label!r} is not 'boundary' or 'ignore'")
        self.offsets: Offsets = tuple(tuple(int(v) for v in o) for o in offsets)  # type: ignore[misc]
        if not self.offsets or any(len(o) != 3 or not any(o) for o in self.offsets):
            raise ConfigError(f"offsets {offsets} must be non-zero (z, y, x) triples")
        self.channels = tuple(f"aff{o}" for o in self.offsets)
        self.zero_label, self.threshold = zero_label, threshold
        self.loss_fn = BCEDiceLoss()

    def check(self, raw: np.ndarray | None, labels: np.ndarray, mask: np.ndarray | None = None) -> None:
        super().check(raw, labels, mask)
        if not np.asarray(labels).any():  # a volume of boundary only teaches no affinity
            raise LabelError("neuron labels are empty: every id is 0")

    def _targets(self, labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = len(self.offsets)
        target = np.zeros((c, *labels.shape), np.float32)
        tmask = np.zeros((c, *labels.shape), np.float32)
        for i, o in enumerate(self.offsets):
            # v in src pairs with v + o in dst; pairs leaving the volume stay masked
            src = tuple(slice(min(n, max(0, -k)), max(0, n - max(0, k))) for n, k in zip(labels.shape, o))
            dst = tuple(slice(min(n, max(0, k)), max(0, n - max(0, -k))) for n, k in zip(labels.shape, o))
            a, b = labels[src], labels[dst]
            target[i][src] = (a == b) & (a != 0)
            valid = (a != 0) | (b != 0) if self.zero_label == "boundary" else (a != 0) & (b != 0)
            tmask[i][src] = valid * np.minimum(mask[src], mask[dst])
        return target, tmask

    def postprocess(self, probs: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
        from ssl_em.predict.instances import affinity_agglomeration

        return affinity_agglomeration(probs, self.offsets, self.threshold, voxel_size=voxel_size)

    calibrates = True
    #: candidate agglomeration thresholds of :meth:`calibrate`
    THRESHOLDS = tuple(np.round(np.arange(0.3, 0.901, 0.05), 2))

    def calibrate(self, probs: np.ndarray | None, labels: np.ndarray, mask: np.ndarray | None = None,
                  voxel_size: Sequence[float] | None = None, *,
                  samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """The threshold of :attr:`THRESHOLDS` (fragment interiors and agglomeration, as
        :func:`~ssl_em.predict.instances.affinity_agglomeration` uses it) with the lowest VOI (split + merge)
        against the labelled voxels' neurons (label 0 and unlabelled voxels ignored; the lowest t on ties).
        A network whose boundaries are under-confident (affinities ~0.6 across membranes, as one gala seed
        gave after 300 steps) has no boundary at 0.5 and merges every cell; the labels show where its own
        scale cuts. ``samples`` are not used (VOI needs the volume)."""
        from ssl_em.metrics.contingency import contingency_table, variation_of_information
        from ssl_em.predict.instances import affinity_agglomeration

        labels, known = self._labelled_voxels(probs, labels, mask)
        truth = np.where(known, labels, 0).astype(np.int64)
        if not truth.any():
            return {}
        probs = np.asarray(probs, np.float32)
        vois = []
        for t in self.THRESHOLDS:
            seg = affinity_agglomeration(probs, self.offsets, float(t), voxel_size=voxel_size)
            merge, split = variation_of_information(None, None, table=contingency_table(seg, truth, ignore_b=(0,)))
            vois.append(merge + split)
        self.threshold = float(self.THRESHOLDS[int(np.argmin(vois))])
        self.calibrated = {"threshold": self.threshold}
        return {**self.calibrated, "labelled_voi": round(float(min(vois)), 4)}

    def blockwise_instances_args(self) -> dict[str, Any]:
        return dict(method="affinities", threshold=self.threshold, offsets=[list(o) for o in self.offsets])


class MembraneTask(Task):
    """Membranes: binary (1 = membrane), BCE + Dice + clDice (thin, connected sheets)."""

    name = "membrane"
    channels = ("membrane",)
    binary_labels = True

    def __init__(self, voxel_size: Sequence[float] | None = None, threshold: float = 0.5,
                 cldice_weight: float = 0.3, cldice_iterations: int = 5) -> None:
        self.threshold = threshold
        self.loss_fn = CLDiceLoss(cldice_weight, cldice_iterations, voxel_size)

    def _targets(self, labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (labels > 0)[None], mask[None].copy()

    def postprocess(self, probs: np.ndarray, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
        return (np.asarray(probs[0]) > self.threshold).astype(np.uint8)


_TASKS: dict[str, Callable[..., Task]] = {
    "mito": MitoTask, "synapse": SynapseTask, "neuron": NeuronTask, "membrane": MembraneTask,
}


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """A task by name (``mito``, ``synapse``, ``neuron``, ``membrane``); ``kwargs`` go to its constructor."""
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(list_tasks())}")
    return _TASKS[name](**kwargs)

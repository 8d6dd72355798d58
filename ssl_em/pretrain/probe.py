"""Frozen-feature linear probe: how well do an encoder's features separate a labelled structure?

The encoder runs (frozen, no grad) over a labelled volume in tiles; features are sampled by trilinear
interpolation at random voxels (so ViT tokens, U-Net bottleneck and U-Net dense features are all
scored per voxel, on the same points); a class-balanced logistic regression (L-BFGS) is fitted on
voxels from the first ``1 - test_fraction`` of z-sections and scored on the rest:
``ap`` (average precision, threshold-free; chance = the positive fraction) and ``iou`` at p > 0.5.

* :func:`run_probe` is the library entry;
* :class:`ProbeCallback` runs it during pretraining on a phantom (or any labelled volume) and logs
  ``probe/ap`` and ``probe/iou``;
* ``ssl-em validate`` (:mod:`ssl_em.pretrain.validate`) runs it from the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from sklearn.metrics import average_precision_score
from torch import nn

from ssl_em.errors import ConfigError

__all__ = ["ProbeCallback", "ProbeResult", "fit_logistic", "load_any_encoder", "load_labelled", "run_probe",
           "sample_features"]


@dataclass
class ProbeResult:
    """Scores on held-out voxels. ``chance_ap`` is the positive fraction of the test points."""

    ap: float
    iou: float
    accuracy: float
    chance_ap: float
    n_train: int
    n_test: int
    feature: str
    feature_dim: int


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, max_iter: int = 200) -> nn.Linear:
    """Class-balanced L2-regularised logistic regression by L-BFGS: ``x`` (n, C) standardised, ``y`` (n,) 0/1."""
    model = nn.Linear(x.shape[1], 1, dtype=torch.float64)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    x, y = x.double(), y.double()
    pos = y.sum().clamp_min(1)
    pos_weight = (y.numel() - pos) / pos  # rare structures (mito ~5 %) weigh as much as background
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y, pos_weight=pos_weight) \
            + l2 * model.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return model


def _tiles(shape: Sequence[int], tile: Sequence[int]) -> list[tuple[int, int, int]]:
    """Tile starts covering ``shape``; the last tile along an axis is shifted back to end at the border."""
    axes = []
    for n, t in zip(shape, tile):
        starts = list(range(0, n - t + 1, t))
        if starts[-1] + t < n:
            starts.append(n - t)
        axes.append(starts)
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


@torch.no_grad()
def sample_features(encoder: nn.Module, raw: np.ndarray, points: np.ndarray, *, feature: str = "auto",
                    tile: Sequence[int] | None = None, device: str | torch.device = "cpu",
                    progress: bool = False) -> torch.Tensor:
    """Features at voxel ``points`` (P, 3) int (z, y, x) of a normalised volume ``raw`` (D, H, W) -> (P, C).

    The volume is cropped to a multiple of ``encoder.patch_size`` and encoded in tiles of ``tile``
    voxels (default: up to (16, 128, 128)); every point is read from the tile that holds it, by
    trilinear interpolation of the feature map at the voxel centre. ``progress`` shows a tqdm bar over tiles.
    """
    from ssl_em.pretrain.features import feature_map

    patch = np.array(encoder.patch_size)
    usable = (np.array(raw.shape) // patch) * patch
    if (usable == 0).any():
        raise ConfigError(f"volume {raw.shape} is smaller than the encoder patch {tuple(patch)}")
    t = np.array(tile if tile is not None else (16, 128, 128))
    t = np.maximum((np.minimum(t, usable) // patch) * patch, patch)
    if (points >= usable).any():
        raise ConfigError(f"probe points must lie in the patch-aligned part {tuple(usable)} of the volume")
    starts = _tiles(usable, t)
    # owner tile per point: the last start <= coordinate along each axis (tiles abut except the last)
    axis_starts = [np.array(sorted({s[a] for s in starts})) for a in range(3)]
    owner = np.stack([axis_starts[a][np.searchsorted(axis_starts[a], points[:, a], side="right") - 1]
                      for a in range(3)], axis=1)
    out: torch.Tensor | None = None
    encoder = encoder.to(device)
    from tqdm.auto import tqdm

    for start in tqdm(starts, desc="probe features", unit="tile", disable=not progress, leave=False):
        sel = np.flatnonzero((owner == np.array(start)).all(1))
        if sel.size == 0:
            continue
        box = tuple(slice(s, s + n) for s, n in zip(start, t))
        x = torch.from_numpy(np.ascontiguousarray(raw[box], dtype=np.float32))[None, None].to(device)
        fmap = feature_map(encoder, x, feature).float()  # (1, C, d, h, w)
        local = (points[sel] - np.array(start) + 0.5) / t * 2 - 1  # voxel centres in [-1, 1], (z, y, x)
        grid = torch.from_numpy(local[:, ::-1].copy()).float().to(device).view(1, 1, 1, -1, 3)  # (x, y, z) last
        vals = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
        vals = vals.reshape(fmap.shape[1], -1).T.cpu()  # (p, C)
        if out is None:
            out = torch.empty(len(points), fmap.shape[1])
        out[torch.from_numpy(sel)] = vals
    assert out is not None
    return out


def _normalise(raw: np.ndarray, encoder: nn.Module) -> np.ndarray:
    """The encoder's recorded training normalisation where its export has one, else percentiles of ``raw``."""
    from ssl_em.data.normalize import Normalization

    meta = (getattr(encoder, "pretrained_metadata", None) or {}).get("metadata", {}) or {}
    record = meta.get("normalization") or (meta.get("data") or {}).get("normalization")
    norm = Normalization.from_dict(record) if isinstance(record, dict) else Normalization("percentile").fit(raw)
    return norm(raw)


def run_probe(encoder: nn.Module, raw: np.ndarray, labels: np.ndarray, *, feature: str = "auto",
              test_fraction: float = 0.3, n_train: int = 20000, n_test: int = 20000, tile: Sequence[int] | None = None,
              l2: float = 1e-3, max_iter: int = 200, seed: int = 0, normalize: bool = True,
              device: str | torch.device = "cpu", png: str | Path | None = None, progress: bool = False
              ) -> ProbeResult:
    """Fit a logistic probe on frozen features of ``raw`` (D, H, W) for ``labels > 0``; score held-out z.

    Args:
        encoder: any ssl-em encoder; it is put in eval mode (and restored) and never updated.
        raw: EM volume (any real dtype; normalised like the encoder's training data when ``normalize``).
        labels: same shape; > 0 is the structure (instance ids or a binary mask).
        feature: "auto", "tokens", "bottleneck" or "dense" (see :func:`ssl_em.pretrain.features.feature_map`).
        test_fraction: last fraction of z-sections held out for scoring.
        n_train / n_test: random voxels drawn from each part.
        png: write raw / labels / probe probability of the middle held-out z-section there.
        progress: tqdm bar over encoder tiles.
    """
    from ssl_em.pretrain.features import FEATURES

    if raw.shape != labels.shape or raw.ndim != 3:
        raise ConfigError(f"probe raw {raw.shape} and labels {labels.shape} must be the same (z, y, x) shape")
    if feature not in FEATURES:
        raise ConfigError(f"feature {feature!r} is not one of {FEATURES}")
    if feature == "auto":
        feature = "bottleneck" if hasattr(encoder, "forward_dense") else "tokens"
    patch = np.array(encoder.patch_size)
    usable = (np.array(raw.shape) // patch) * patch
    z_split = int(round(usable[0] * (1 - test_fraction)))
    if not 0 < z_split < usable[0]:
        raise ConfigError(f"test_fraction {test_fraction} leaves no train or test sections of {usable[0]}")
    rng = np.random.default_rng(seed)

    def draw(n: int, z0: int, z1: int) -> np.ndarray:
        hi = np.array([z1, usable[1], usable[2]])
        lo = np.array([z0, 0, 0])
        return rng.integers(lo, hi, size=(n, 3))

    train_pts, test_pts = draw(n_train, 0, z_split), draw(n_test, z_split, int(usable[0]))
    fg = np.asarray(labels) > 0
    y_train = torch.from_numpy(fg[tuple(train_pts.T)].astype(np.float32))
    y_test = fg[tuple(test_pts.T)]
    if y_train.sum() < 2 or y_train.sum() > len(y_train) - 2 or y_test.sum() == 0:
        raise ConfigError(f"labels have too few positive or negative voxels in the train / test parts "
                          f"({int(y_train.sum())} / {int(y_test.sum())} positives sampled)")
    x = _normalise(np.asarray(raw), encoder) if normalize else np.asarray(raw, np.float32)
    was_training = encoder.training
    encoder.eval()
    try:
        feats = sample_features(encoder, x, np.concatenate([train_pts, test_pts]), feature=feature, tile=tile,
                                device=device, progress=progress)
        if png is not None:  # every voxel of one held-out section, through the same features
            z = (z_split + int(usable[0])) // 2
            yy, xx = np.meshgrid(np.arange(usable[1]), np.arange(usable[2]), indexing="ij")
            section = np.stack([np.full(yy.size, z), yy.ravel(), xx.ravel()], 1)
            f_section = sample_features(encoder, x, section, feature=feature, tile=tile, device=device).double()
    finally:
        encoder.train(was_training)
    f_train, f_test = feats[:n_train].double(), feats[n_train:].double()
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    model = fit_logistic((f_train - mean) / std, y_train, l2=l2, max_iter=max_iter)
    with torch.no_grad():
        scores = torch.sigmoid(model((f_test - mean) / std)[:, 0]).numpy()
    pred = scores > 0.5
    if png is not None:
        with torch.no_grad():
            prob = torch.sigmoid(model((f_section - mean) / std)[:, 0]).numpy().reshape(int(usable[1]), int(usable[2]))
        _save_probe_png(png, x[z, : usable[1], : usable[2]], fg[z, : usable[1], : usable[2]], prob, z)
    inter, union = (pred & y_test).sum(), (pred | y_test).sum()
    ap = float(average_precision_score(y_test, scores)) if y_test.any() else float("nan")
    return ProbeResult(ap=ap, iou=float(inter / max(union, 1)),
                       accuracy=float((pred == y_test).mean()), chance_ap=float(y_test.mean()), n_train=n_train,
                       n_test=n_test, feature=feature, feature_dim=int(feats.shape[1]))


def _save_probe_png(path: str | Path, raw: np.ndarray, labels: np.ndarray, prob: np.ndarray, z: int) -> Path:
    """Three panels of one z-section: EM, ground truth, probe probability (written atomically)."""
    from ssl_em.utils.plotting import pyplot, save_figure

    plt = pyplot()


    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, img, title, cmap in zip(axes, (raw, labels, prob), (f"EM (z={z})", "labels", "probe probability"),
                                    ("gray", "magma", "magma")):
        ax.imshow(img, cmap=cmap, vmin=None if title.startswith("EM") else 0, vmax=None if title.startswith("EM") else 1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100)
    return path


class ProbeCallback(L.Callback):
    """Lightning callback: run :func:`run_probe` on the module's encoder before training (the baseline the
    gains are read against), every ``every_n_steps`` optimiser steps and at the end; log ``probe/*``
    to the trainer's loggers and ``callback_metrics`` and print one line each time.

    Args:
        every_n_steps: probe interval in optimiser steps.
        raw / labels: volume specs of a labelled volume; None -> the phantom (``phantom_shape``,
            ``phantom_seed``, field named by ``task``), kept in memory.
        task: phantom label field ("mito", "synapse", "membrane", "neurons").
        roi: optional "z0:z1,y0:y1,x0:x1" box of the labelled volume.
        other arguments: as :func:`run_probe` (``tile`` defaults to the training crop if the datamodule has one).
    """

    def __init__(self, every_n_steps: int = 250, raw: str | None = None, labels: str | None = None,
                 task: str = "mito", roi: str | None = None, phantom_shape: tuple[int, int, int] = (32, 128, 128),
                 phantom_seed: int = 1234, feature: str = "auto", test_fraction: float = 0.3, n_train: int = 8000,
                 n_test: int = 8000, tile: tuple[int, int, int] | None = None, max_iter: int = 100) -> None:
        super().__init__()
        self.every_n_steps = max(int(every_n_steps), 1)
        self.source = dict(raw=raw, labels=labels, task=task, roi=roi, phantom_shape=phantom_shape, seed=phantom_seed)
        self.kwargs = dict(feature=feature, test_fraction=test_fraction, n_train=n_train, n_test=n_test,
                           max_iter=max_iter)
        self.tile = tile
        self.data: tuple[np.ndarray, np.ndarray] | None = None
        self.history: list[tuple[int, ProbeResult]] = []

    def _probe(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or (self.history and self.history[-1][0] == step):
            return
        if self.data is None:
            self.data = load_labelled(**self.source)
        tile = self.tile or getattr(getattr(trainer, "datamodule", None), "crop_shape", None)
        result = run_probe(pl_module.encoder, *self.data, tile=tile, device=pl_module.device, **self.kwargs)
        self.history.append((step, result))
        metrics = {"probe/ap": result.ap, "probe/iou": result.iou, "probe/chance_ap": result.chance_ap}
        # loggers directly: Lightning forbids self.log in on_train_start / on_train_end
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        rank_zero_info(f"probe at step {step}: AP {result.ap:.3f} (chance {result.chance_ap:.3f}), "
                       f"IoU {result.iou:.3f}")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step == 0:  # a resumed run already has its baseline
            self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._probe(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._probe(trainer, pl_module)


def _parse_roi(roi: str | None, shape: Sequence[int]) -> tuple[slice, ...]:
    if not roi:
        return tuple(slice(0, n) for n in shape)
    parts = roi.split(",")
    try:
        box = tuple(slice(*(int(v) if v else None for v in p.split(":"))) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 3:
        raise ConfigError(f"roi {roi!r} must be 'z0:z1,y0:y1,x0:x1'")
    return box


def load_labelled(raw: str | None = None, labels: str | None = None, task: str = "mito", roi: str | None = None,
                  phantom_shape: Sequence[int] = (32, 128, 128), seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """(raw, labels) arrays from two volume specs, or from the phantom's ``task`` field when ``raw`` is None."""
    if raw is None:
        from ssl_em.data.phantom import make_phantom

        if labels is not None:
            raise ConfigError(f"labels {labels!r} given without raw: pass --raw too")
        ph = make_phantom(tuple(int(v) for v in phantom_shape), seed=seed)
        box = _parse_roi(roi, ph.raw.shape)
        return ph.raw[box], ph.labels(task)[box]
    if labels is None:
        raise ConfigError(f"raw {raw!r} given without labels: pass --labels SPEC")
    from ssl_em.data.volume import open_volume

    vr, vl = open_volume(raw), open_volume(labels)
    if vr.shape != vl.shape or len(vr.shape) != 3:
        raise ConfigError(f"raw {raw} {vr.shape} and labels {labels} {vl.shape} must be single-channel and equal in shape")
    box = _parse_roi(roi, vr.shape)
    return np.asarray(vr[box]), np.asarray(vl[box])


def load_any_encoder(path_or_name: str, seed: int = 0) -> tuple[nn.Module, str]:
    """An exported encoder (folder, file or stored name), else a registered name built at random init
    from ``seed`` (so a baseline probe is reproducible)."""
    from ssl_em.errors import CheckpointError
    from ssl_em.models import create_encoder, list_encoders, load_encoder

    try:
        return load_encoder(path_or_name), "pretrained"
    except CheckpointError:
        if path_or_name in list_encoders():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return create_encoder(path_or_name), f"random init, seed {seed}"
        raise

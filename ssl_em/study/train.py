"""Networks per method, the wall-clock-budgeted training loop, sliding-window prediction, scoring, pretraining.

Everything runs on ``cfg.device`` (CPU or CUDA); data are prepared on the CPU and moved per batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.data.crops import Box
from ssl_em.errors import ConfigError
from ssl_em.study.config import ADAPTER, FAMILIES, METRICS, StudyConfig


class _MonaiUNet:
    """Factory for the ``unet`` baseline: MONAI's residual 3-D U-Net, in-plane pooling first for
    anisotropic voxels (like nnU-Net does for ssTEM)."""

    @staticmethod
    def build(out_channels: int, anisotropic: bool) -> Any:
        try:
            from monai.networks.nets import UNet
        except ImportError as err:  # pragma: no cover - monai is a dependency of the bench extra
            raise ConfigError(f"the 'unet' baseline needs MONAI (pip install monai): {err}") from None
        strides = ((1, 2, 2), (1, 2, 2), (2, 2, 2)) if anisotropic else (2, 2, 2)
        return UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=(16, 32, 64, 128),
                    strides=strides, num_res_units=1, norm="instance")


@dataclass
class Learner:
    """A network to fine-tune: ``net`` maps normalised raw (B, 1, D, H, W) to logits (B, K, D, H, W)."""

    method: str
    net: Any
    task: Any

    def parameters(self) -> list:
        return [p for p in self.net.parameters() if p.requires_grad]


def build_learner(method: str, cfg: StudyConfig, encoder_dir: str | Path, seed: int) -> Learner:
    """The network for ``method`` on ``cfg.device``; random inits come from ``seed`` (scratch and
    lora_random share it), drawn on the CPU so a GPU run starts from the same weights."""
    import torch

    from ssl_em.adapters import get_task
    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.models.export import read_sidecar

    device = cfg.device  # resolved when the config was built
    task_kwargs = {"voxel_size": list(cfg.voxel_size)} if cfg.task == "mito" and cfg.voxel_size else {}
    torch.manual_seed(seed)
    if method == "unet":
        task = get_task(cfg.task, **task_kwargs)
        anisotropic = cfg.voxel_size is not None and cfg.voxel_size[0] > 1.5 * min(cfg.voxel_size[1:])
        return Learner(method, _MonaiUNet.build(task.num_outputs, anisotropic).to(device), task)
    adapter, pretrained = ADAPTER[method]
    sidecar = read_sidecar(encoder_dir)
    ft = FineTuning(task=cfg.task, encoder=sidecar["architecture"], pretrained=str(encoder_dir) if pretrained else None,
                    encoder_kwargs=dict(sidecar.get("kwargs") or {}), adapter=adapter, task_kwargs=task_kwargs,
                    adapter_kwargs=dict(cfg.adapter_kwargs) if adapter not in ("full", "frozen") else None,
                    grad_checkpointing=False)  # same compute per step for every method of a timed comparison
    return Learner(method, ft.model.to(device), ft.task)


# ----------------------------------------------------------------------------------- training


def _schedule(progress: float, warmup: float = 0.05, floor: float = 0.05) -> float:
    """Multiplier of the peak rate at ``progress`` (0..1 of the wall-clock budget)."""
    if progress < warmup:
        return max(progress / warmup, 0.02)
    t = min((progress - warmup) / (1 - warmup), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _collate(items: list[dict]) -> dict:
    import torch

    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _targets(task: Any, batch: dict) -> tuple[Any, Any]:
    """Per-sample task targets and target masks (B, K, D, H, W) from labels and the label mask."""
    import torch

    target, mask = task.batch_targets(batch["label"].numpy(), batch["mask"].numpy())
    return torch.from_numpy(target), torch.from_numpy(mask)


def train_for(net: Any, params: list, loss_fn: Callable[[dict], Any], next_batch: Callable[[int], dict],
              seconds: float, lr: float, weight_decay: float = 1e-4, precision: str = "auto",
              min_steps: int = 2, on_step: Callable[[int, float], None] | None = None,
              device: str = "cpu") -> list[float]:
    """AdamW on ``params`` for ``seconds`` of wall clock (at least ``min_steps``), rate following
    warm-up-cosine over the elapsed fraction of the budget. Returns the loss per step (reading each
    loss synchronises a GPU, so the clock counts finished steps only)."""
    import torch

    from ssl_em.utils.precision import autocast

    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)  # params: tensors or param groups
    net.train()
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    while True:
        progress = (time.perf_counter() - start) / max(seconds, 1e-9)
        if progress >= 1 and step >= min_steps:
            break
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(min(progress, 1.0))
        batch = {k: v.to(device, non_blocking=True) for k, v in next_batch(step).items()}
        with autocast(precision, torch.device(device).type):
            loss = loss_fn(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step} (lr {lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        step += 1
    return losses


@dataclass
class Labelled:
    """The labelled volume in memory: raw normalised to 0..1 float32, labels, voxel size (z, y, x) nm."""

    raw: np.ndarray
    labels: np.ndarray
    voxel_size: tuple[float, float, float] | None
    normalization: dict[str, Any]


@dataclass
class LabelledForegroundSampler:
    """Crops holding a labelled section (``LabelledSliceSampler``); a ``p_foreground`` share of them
    is moved in-plane (at most ``max_tries`` times) until the labelled voxels include foreground.

    A few sections of a rare structure (mitochondria ~5 %, synapses ~0.6 % of voxels) otherwise
    give batches of background only and a short run learns to predict nothing; the same sampler
    serves every method, so the comparison stays fair (nnU-Net oversamples foreground likewise).
    """

    p_foreground: float = 0.5
    max_tries: int = 10

    def __call__(self, shape, patch_shape, rng, labels=None, mask=None) -> Box:
        from ssl_em.data.crops import LabelledSliceSampler

        box = LabelledSliceSampler()(shape, patch_shape, rng, labels=labels, mask=mask)
        if labels is None or mask is None or rng.random() >= self.p_foreground:
            return box
        for _ in range(self.max_tries):
            lab, m = np.asarray(labels[box]), np.asarray(mask[box]) > 0
            if (lab.reshape(-1, *m.shape) > 0).any(axis=0)[m].any():
                break
            y, x = (int(rng.integers(0, n - p + 1)) for n, p in zip(shape[1:], patch_shape[1:]))
            box = (box[0], slice(y, y + patch_shape[1]), slice(x, x + patch_shape[2]))
        return box


def _batches(ds: Any, batch_size: int) -> Callable[[int], dict]:
    return lambda step: _collate([ds[step * batch_size + j] for j in range(batch_size)])


def finetune(learner: Learner, data: Labelled, box: Box, sections: np.ndarray, cfg: StudyConfig, lr: float,
             seconds: float, seed: int) -> int:
    """Train ``learner`` on ``box`` with labels on z-``sections`` only; returns the step count."""
    from ssl_em.data.augment import default_em_augment
    from ssl_em.data.crops import CropDataset, Normalization, SliceMask

    vs = data.voxel_size
    augment = default_em_augment(anisotropic=vs is None or vs[0] > 1.5 * min(vs[1:]),
                                 square_pixels=vs is None or abs(vs[1] - vs[2]) < 1e-3 * vs[1], strength=0.5)
    ds = CropDataset(data.raw, cfg.patch_shape, labels=[data.labels], masks=[SliceMask(data.raw.shape, sections)],
                     regions=[box], sampler=LabelledForegroundSampler(), augment=augment, samples_per_epoch=1 << 30,
                     normalization=Normalization("fixed", low=0.0, high=1.0), seed=seed)
    task = learner.task

    crops = _batches(ds, cfg.batch_size)

    def next_batch(step: int) -> dict:
        """Raw crops with their task targets, made on the CPU (train_for moves them to the device)."""
        batch = crops(step)
        target, mask = _targets(task, batch)
        return {"raw": batch["raw"], "target": target, "mask": mask}

    def loss_fn(batch: dict) -> Any:
        return task.loss(learner.net(batch["raw"]).float(), batch["target"], batch["mask"])

    return len(train_for(learner.net, learner.parameters(), loss_fn, next_batch, seconds, lr,
                         precision=cfg.precision, device=cfg.device))


def predict(net: Any, raw: np.ndarray, patch_shape: Sequence[int], precision: str = "auto",
            batch_size: int = 4) -> np.ndarray:
    """Sliding-window sigmoid probabilities (K, z, y, x) float32 of normalised ``raw`` (z, y, x).

    MONAI's ``sliding_window_inference`` with Gaussian blending and 25 % overlap; volumes smaller
    than the patch are padded by it. Windows run on ``net``'s device, the blended volume stays on the CPU.
    """
    import torch

    from ssl_em.utils.precision import autocast

    try:
        from monai.inferers import sliding_window_inference
    except ImportError as err:  # pragma: no cover - monai is a dependency of the study
        raise ConfigError(f"the study's sliding-window evaluation needs MONAI (pip install monai): {err}") from None
    net.eval()
    device = next(net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None, None]
    with torch.no_grad(), autocast(precision, device.type):
        y = sliding_window_inference(x, tuple(int(p) for p in patch_shape), batch_size,
                                     lambda t: torch.sigmoid(net(t).float()), overlap=0.25, mode="gaussian",
                                     sw_device=device, device="cpu")
    return y[0].float().numpy()


def score(probs: np.ndarray, gt: np.ndarray, task: Any, voxel_size: Sequence[float] | None) -> dict[str, float]:
    """Task post-processing then ``evaluate``: the study's metrics (``METRICS[task.name]``)."""
    from ssl_em.metrics.evaluate import evaluate

    vs = tuple(voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
    seg = task.postprocess(probs, vs)
    name = task.name
    truth = gt if name == "neuron" else (gt > 0).astype(np.uint8)  # instances of binary labels: components
    result = evaluate(seg, truth, name, vs, erl=False)
    return {k: float(result[k]) for k in METRICS[name] if k in result}


def val_score(probs: np.ndarray, gt: np.ndarray, sections: np.ndarray, task: Any,
              voxel_size: Sequence[float] | None) -> float:
    """Sweep score on the labelled ``sections`` of the validation part; higher is better.

    The task metric where the sections hold foreground (ties broken by the loss); otherwise (and for
    neurons) minus the task loss there, because IoU of an empty truth rewards predicting nothing.
    """
    import torch

    mask = np.zeros(gt.shape, np.float32)
    mask[sections] = 1
    target, tmask = task.make_targets(gt.astype(np.int64), mask)
    p = np.clip(probs, 1e-6, 1 - 1e-6)
    logits = torch.from_numpy(np.log(p / (1 - p)))[None]
    loss = float(task.loss(logits, torch.from_numpy(target)[None], torch.from_numpy(tmask)[None]))
    if task.name == "neuron" or not (gt[sections] > 0).any():
        return -loss
    # the metric, ties (e.g. every rate still predicting nothing early on) broken by the loss
    return score(probs[:, sections], gt[sections], task, voxel_size)[METRICS[task.name][0]] - 1e-3 * loss


# ----------------------------------------------------------------------------------- pretraining


def pretrain(volumes: Sequence[Any], regions: Sequence[Box | None], cfg: StudyConfig, out_dir: Path,
             seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """Pretrain the family's encoder (or continue ``cfg.encoder``) for ``cfg.pretrain_seconds`` on
    crops of ``volumes`` (each restricted to its box in ``regions``); export to ``out_dir/encoder``.

    Writes ``loss.png`` (loss per step) and ``reconstruction.png`` (input / masked / reconstruction).
    """
    import torch

    from ssl_em.data.augment import default_em_augment
    from ssl_em.data.crops import CropDataset, Normalization, as_volume, volume_name
    from ssl_em.models import save_encoder
    from ssl_em.pretrain.module import Pretraining, _no_weight_decay
    from ssl_em.pretrain.panels import save_curve, save_reconstruction_panel

    fam = FAMILIES[cfg.family]
    device = cfg.device  # resolved when the config was built
    volumes = [as_volume(v, cfg.voxel_size, cfg.fill_missing) for v in volumes]
    kwargs = dict(cfg.encoder_kwargs)
    if cfg.family == "vit" and "img_size" not in kwargs and not cfg.encoder:
        kwargs["img_size"] = list(cfg.patch_shape)
    torch.manual_seed(seed)
    module = Pretraining(encoder=cfg.arch, encoder_kwargs=kwargs, init_from=cfg.encoder, method=fam["method"],
                         method_kwargs=dict(fam["method_kwargs"]), lr=fam["lr"], seed=seed).to(device)
    vs = cfg.voxel_size
    augment = default_em_augment(anisotropic=vs is None or vs[0] > 1.5 * min(vs[1:]), strength=0.5)
    ds = CropDataset(list(volumes), cfg.patch_shape, regions=list(regions), augment=augment,
                     samples_per_epoch=1 << 30, normalization=Normalization(), seed=seed)
    decay = [p for n, p in module.objective.named_parameters() if not _no_weight_decay(n, p)]
    no_decay = [p for n, p in module.objective.named_parameters() if _no_weight_decay(n, p)]
    batches = _batches(ds, cfg.batch_size)
    log(f"pretraining {module.hparams.encoder} with {fam['method']} for {cfg.pretrain_seconds:.0f} s on "
        f"{len(volumes)} volume(s)" + (f", starting from {cfg.encoder}" if cfg.encoder else ""))
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    torch.manual_seed(seed)
    losses = train_for(module, groups, lambda b: module.objective(b["raw"])[0], batches, cfg.pretrain_seconds,
                       fam["lr"], precision=cfg.precision, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = list(range(1, len(losses) + 1))
    smooth = np.convolve(losses, np.ones(min(10, len(losses))) / min(10, len(losses)), mode="valid").tolist()
    save_curve({"loss": (steps, losses), "moving mean (10)": (steps[len(steps) - len(smooth):], smooth)},
               out_dir / "loss.png", xlabel="step", ylabel=f"{fam['method']} loss",
               title=f"{module.hparams.encoder} {fam['method']} pretraining")
    x = batches(10**6)["raw"][:1].to(device)
    module.eval()
    with torch.no_grad():
        panel = module.objective.reconstruct(x)
    if not isinstance(panel, dict):  # MAE: (reconstruction, mask volume)
        recon, mask = panel
        panel = {"input": x, "masked input": x * (1 - mask), "reconstruction": recon}
    save_reconstruction_panel(panel, out_dir / "reconstruction.png",
                              title=f"{fam['method']} after {len(losses)} steps (a fresh crop)")
    meta = {"method": fam["method"], "steps": len(losses), "seconds": cfg.pretrain_seconds,
            "voxel_size": list(vs) if vs else None, "normalization": ds.normalizations[0].to_dict(),
            "data": [volume_name(v) for v in volumes], "init_from": cfg.encoder}
    enc = save_encoder(module.encoder, out_dir / "encoder", meta)
    log(f"pretraining done: {len(losses)} steps, loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
    return enc

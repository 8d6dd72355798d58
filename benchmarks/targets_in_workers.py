"""Fine-tuning step time with the task's training targets made in the training step (the way ssl-em
did it before: labels back to numpy, ``Task.batch_targets`` in the main process, targets back to the
device) vs made in the DataLoader workers (``EMDataModule.use_targets``, set by ``FineTuning``; how
torch-em's ``label_transform`` works), in one run.

Source: the synthetic EM phantom's neurons (instance labels -> nearest-neighbour affinities, the costliest
targets: a boundary map per offset), crops of the neuron plan's 3-D U-Net, the same seed and crops for
both ways. Timed per step after a warm-up: the training step in the main process (Lightning's
``on_train_batch_start`` -> ``on_train_batch_end``: forward, loss, backward, optimiser, and the targets
in the old way) and the wall time per step (data included). On a GPU the step's share is what the
accelerator waits for; on CPU cores the worker competes with the step for the same cores, so the wall
time gains less than the step time.

    python benchmarks/targets_in_workers.py [--quick] [--steps N] [--encoder unet_small] [--threads N] [--contention]
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np

from ssl_em.errors import ArgumentParser, run_main


def timed_fit(targets_in_workers: bool, encoder: str, crop: tuple[int, int, int], batch: int, steps: int,
              warmup: int, workers: int) -> tuple[float, float]:
    """(median step ms in the main process, wall ms per step) of ``steps`` fine-tuning steps after ``warmup``."""
    import lightning as L
    import torch

    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.data.datamodule import EMDataModule
    from ssl_em.study.train import quiet_lightning

    torch.manual_seed(0)
    # the plain U-Net in the 3-D layout the plan gives it on near-isotropic voxels (neurons are FIB-SEM work)
    layout = {"spacing": [10.0] * 3, "crop_shape": list(crop)} if encoder.startswith("unet_") else None
    module = FineTuning(task="neuron", encoder=encoder, encoder_kwargs=layout, adapter="full", export_on_fit_end=False,
                        calibrate_on_fit_end=False, warmup_steps=2)
    data = EMDataModule(task="neuron", crop_shape=crop, batch_size=batch, phantom_shape=(48, 192, 192),
                        samples_per_epoch=(steps + warmup) * batch, val_fraction=0,
                        num_workers=workers if targets_in_workers else 0, seed=0)
    if not targets_in_workers:
        data.use_targets = lambda transform: None  # the old way: the module makes targets in its step
    step_ms: list[float] = []
    wall: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            step_ms.append(1000 * (now - self.start))
            wall.append(now)

    with quiet_lightning():
        L.Trainer(max_steps=steps + warmup, max_epochs=-1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", limit_val_batches=0,
                  num_sanity_val_steps=0, callbacks=[Clock()]).fit(module, datamodule=data)
    measured = step_ms[warmup:]
    per_step = 1000 * (wall[-1] - wall[warmup - 1]) / (len(wall) - warmup)
    return float(np.median(measured)), per_step


def _neuron_task_and_crops(crop: tuple[int, int, int], batch: int) -> tuple[Any, np.ndarray]:
    """The neuron task at 10 nm and ``batch`` label crops (B, 1, z, y, x) of the phantom's neurons."""
    from ssl_em.adapters import get_task
    from ssl_em.data.phantom import make_phantom

    task = get_task("neuron")
    task.voxel_size = [10.0, 10.0, 10.0]
    lab = make_phantom((48, 192, 192), seed=0).labels("neuron")
    return task, np.stack([lab[16 * i:16 * i + crop[0], :crop[1], :crop[2]] for i in range(batch)])[:, None].astype(np.int64)


def _make_targets_forever(crop: tuple[int, int, int], batch: int, stop: Any) -> None:
    """What a DataLoader worker does, in a loop: the neuron task's targets of a batch."""
    task, labels = _neuron_task_and_crops(crop, batch)
    while not stop.is_set():
        task.batch_targets(labels)


def contention(encoder: str, crop: tuple[int, int, int], batch: int, steps: int) -> tuple[float, float, float]:
    """(ms of one batch's targets, ms of a bare training step alone, ms of it beside a process making targets)."""
    import multiprocessing as mp

    import torch

    import ssl_em

    task, labels = _neuron_task_and_crops(crop, batch)
    task.batch_targets(labels)
    t = time.perf_counter()
    task.batch_targets(labels)
    targets_ms = 1000 * (time.perf_counter() - t)
    torch.manual_seed(0)
    layout = {"spacing": [10.0] * 3, "crop_shape": list(crop)} if encoder.startswith("unet_") else {}
    model = ssl_em.create_encoder(encoder, out_channels=task.num_outputs, **layout)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 1, *crop)
    y = (torch.rand(batch, task.num_outputs, *crop) < 0.5).float()

    def median_step_ms() -> float:
        times = []
        for _ in range(steps + 2):
            t = time.perf_counter()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(1000 * (time.perf_counter() - t))
        return float(np.median(times[2:]))

    alone = median_step_ms()
    stop = mp.get_context("spawn").Event()
    other = mp.get_context("spawn").Process(target=_make_targets_forever, args=(crop, batch, stop))
    other.start()
    time.sleep(3)  # its imports and first batch
    beside = median_step_ms()
    stop.set()
    other.join()
    return targets_ms, alone, beside


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny U-Net and a few steps, < 1 min")
    p.add_argument("--steps", type=int, default=None, help="timed steps per way (default 30; 8 with --quick)")
    p.add_argument("--encoder", default=None, help="default unet_small in its 3-D layout (unet3d_test with --quick)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers making the targets")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training step (default: torch's "
                   "choice); fewer than the cores leaves the workers cores of their own, as on a GPU machine")
    p.add_argument("--contention", action="store_true", help="instead: a bare training step alone vs beside a "
                   "process making targets (what a worker costs the step on this machine), and one batch's targets")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    steps = a.steps or (8 if a.quick else 30)
    encoder = a.encoder or ("unet3d_test" if a.quick else "unet_small")
    crop, batch = ((8, 64, 64), 2) if a.quick else ((16, 96, 128), 2)
    print(f"config: phantom neurons -> affinities; encoder {encoder}, crop {crop}, batch {batch}, {steps} timed steps "
          f"after 3 warm-up; workers {a.workers}; machine {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    if a.contention:
        targets_ms, alone, beside = contention(encoder, crop, batch, min(steps, 10))
        print(f"one batch's targets in the main process: {targets_ms:.1f} ms")
        print(f"training step alone {alone:.1f} ms vs beside a process making targets {beside:.1f} ms; "
              f"ratio {beside / alone:.3f}")
        return 0
    results = {}
    for in_workers in (False, True):
        name = "in the DataLoader workers" if in_workers else "in the training step (before)"
        results[in_workers] = timed_fit(in_workers, encoder, crop, batch, steps, 3, a.workers)
        print(f"targets {name}: step {results[in_workers][0]:.1f} ms (median), wall {results[in_workers][1]:.1f} "
              f"ms per step", flush=True)
    (old_step, old_wall), (new_step, new_wall) = results[False], results[True]
    print(f"training step: targets in the step {old_step:.1f} ms vs in the workers {new_step:.1f} ms; wall per step "
          f"{old_wall:.1f} vs {new_wall:.1f} ms; step time ratio (workers / in-step) {new_step / old_step:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("targets_in_workers.py", main))

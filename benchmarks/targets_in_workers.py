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

    python benchmarks/targets_in_workers.py [--quick] [--steps N] [--encoder unet_small] [--threads N]
"""

from __future__ import annotations

import os
import platform
import time

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


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny U-Net and a few steps, < 1 min")
    p.add_argument("--steps", type=int, default=None, help="timed steps per way (default 30; 8 with --quick)")
    p.add_argument("--encoder", default=None, help="default unet_small in its 3-D layout (unet3d_test with --quick)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers making the targets")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training step (default: torch's "
                   "choice); fewer than the cores leaves the workers cores of their own, as on a GPU machine")
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

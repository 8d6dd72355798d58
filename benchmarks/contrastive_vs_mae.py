"""Contrastive (SimCLR), self-distillation (DINO), masked modelling (MAE / SparK) and the two combined
(MAE+SimCLR / SparK+SimCLR) at equal budget.

For each encoder family (ViT: MAE; U-Net: SparK) every method pretrains the *same* encoder from the same
random init for the same number of optimiser steps and batch size on the phantom (``EMDataModule``
crops with the default EM augmentation; two views for SimCLR / DINO). Reported per method: mean step
time (forward + backward + optimiser, data excluded; contrastive methods encode 2 x batch crops) and the
frozen-feature linear probe (mitochondria vs rest, :func:`ssl_em.pretrain.probe.run_probe`) on a
*different* phantom, next to the random-init encoder. The last line is the headline ratio:
best joint-embedding or combined probe AP / masked-modelling probe AP on the first family (the ViT by default).
Real EM instead of the phantom: ``--unlabeled`` volumes to pretrain on, ``--probe-raw/--probe-labels/--probe-roi``
a labelled volume to probe on.

    python benchmarks/contrastive_vs_mae.py --quick       # < 1 min on a laptop CPU
    python benchmarks/contrastive_vs_mae.py --steps 300   # the full comparison
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import ssl_em
from ssl_em.data.datamodule import EMDataModule
from ssl_em.pretrain.module import build_objective
from ssl_em.pretrain.probe import load_labelled, run_probe
from ssl_em.errors import ArgumentParser, run_main

SIMCLR_HEAD = dict(hidden_dim=256, out_dim=128, temperature=0.1)
SMALL_HEADS = {"simclr": SIMCLR_HEAD, "mae_simclr": SIMCLR_HEAD, "spark_simclr": SIMCLR_HEAD,
               "dino": dict(out_dim=1024, hidden_dim=256, bottleneck_dim=64, momentum=0.99, momentum_end=1.0)}


def pretrain(encoder_name: str, method: str, args: argparse.Namespace, device: torch.device) -> tuple[Any, float, float]:
    """Train one (encoder, method) pair; return (encoder, ms per step, final loss)."""
    torch.manual_seed(args.seed)
    encoder = ssl_em.create_encoder(encoder_name, **({"img_size": args.crop} if "vit" in encoder_name else {}))
    objective = build_objective(method, encoder, **SMALL_HEADS.get(method, {})).to(device).train()
    two = bool(getattr(objective, "two_views", False))
    data = EMDataModule(unlabeled=args.unlabeled, two_views=two, crop_shape=tuple(args.crop),
                        batch_size=args.batch_size, phantom_shape=tuple(args.phantom_shape),
                        samples_per_epoch=args.steps * args.batch_size, val_fraction=0, seed=args.seed)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    times, loss = [], float("nan")
    for step, batch in enumerate(data.train_dataloader()):
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if two:
            out = objective(batch["view1"], batch["view2"], batch["overlap1"], batch["overlap2"])[0]
        else:
            out = objective(batch["raw"])[0]
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        if hasattr(objective, "update_teacher"):
            objective.update_teacher(step / max(args.steps - 1, 1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # skip warm-up steps (allocator, autotuning)
            times.append(time.perf_counter() - t0)
        loss = out.item()
        if step + 1 >= args.steps:
            break
    return encoder.eval(), 1000 * sum(times) / max(len(times), 1), loss


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="test-size encoders, few steps (< 1 min)")
    parser.add_argument("--vit", default="vit3d_test_patch4")
    parser.add_argument("--unet", default="unet3d_tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=3, default=[16, 64, 64])
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=[48, 192, 192])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe-samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlabeled", nargs="+", metavar="SPEC", help="pretrain on these EM volumes, not the phantom")
    parser.add_argument("--probe-raw", metavar="SPEC", help="probe on this labelled volume, not a held-out phantom")
    parser.add_argument("--probe-labels", metavar="SPEC", help="its labels (> 0 = the structure)")
    parser.add_argument("--probe-roi", help="box 'z0:z1,y0:y1,x0:x1' of the probe volume")
    parser.add_argument("--families", nargs="+", choices=["vit", "unet"], default=["vit", "unet"])
    args = parser.parse_args(argv)
    if args.quick:
        args.unet, args.steps, args.batch_size, args.crop = "unet3d_test", 6, 2, [8, 32, 32]
        args.phantom_shape, args.probe_samples = [16, 64, 64], 2000
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raw, mito = load_labelled(args.probe_raw, args.probe_labels, task="mito", roi=args.probe_roi,
                              phantom_shape=(32, 128, 128), seed=1234)  # default: a held-out phantom
    train_on = " ".join(args.unlabeled) if args.unlabeled else f"phantom {args.phantom_shape} (seed {args.seed})"
    probe_on = (f"{args.probe_raw} / {args.probe_labels} roi {args.probe_roi}" if args.probe_raw
                else "phantom (32, 128, 128) (seed 1234)")
    print(f"config: device={device} steps={args.steps} batch={args.batch_size} crop={args.crop} train on {train_on}; "
          f"probe on {probe_on}, lr={args.lr}, probe: logistic regression on {args.probe_samples} voxels, "
          "last 30% of z held out")
    print(f"{'encoder':<22}{'method':<13}{'ms/step':>9}{'loss':>9}{'probe AP':>10}{'IoU':>7}")
    results: dict[tuple[str, str], float] = {}
    families = {"vit": (args.vit, ("mae", "simclr", "dino", "mae_simclr")),
                "unet": (args.unet, ("spark", "simclr", "dino", "spark_simclr"))}
    for family, (name, methods) in ((f, families[f]) for f in args.families):
        torch.manual_seed(args.seed)  # the very init every method starts from
        random_enc = ssl_em.create_encoder(name, **({"img_size": args.crop} if family == "vit" else {}))
        rows = [("random", random_enc, float("nan"), float("nan"))]
        for method in methods:
            enc, ms, loss = pretrain(name, method, args, device)
            rows.append((method, enc, ms, loss))
        for method, enc, ms, loss in rows:
            r = run_probe(enc.to(device), raw, mito, n_train=args.probe_samples, n_test=args.probe_samples,
                          tile=args.crop, device=device, seed=args.seed)
            results[(family, method)] = r.ap
            print(f"{name:<22}{method:<13}{ms:>9.1f}{loss:>9.3f}{r.ap:>10.3f}{r.iou:>7.3f}", flush=True)
        print(f"{'':<22}(chance AP {r.chance_ap:.3f})")
    family = args.families[0]
    name, (masked, *others) = families[family]
    best = max(others, key=lambda m: results[(family, m)])
    ratio = results[(family, best)] / max(results[(family, masked)], 1e-9)
    print(f"probe AP ratio {best}/{masked} on {name} after {args.steps} steps: {ratio:.2f}")


if __name__ == "__main__":
    raise SystemExit(run_main("contrastive_vs_mae.py", main))

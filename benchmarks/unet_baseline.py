"""Which from-scratch U-Net the study's ``unet`` baseline is: ssl-em's plain U-Net (``unet_small``) vs MONAI's ``UNet``.

Both are trained the same way on the same labelled region, crops and batches (the study's data module
under the plan from ``ssl_em.plan``), AdamW with the same rate, the same steps and seed, and scored by
foreground IoU on the study's disjoint evaluation region (original voxel grid). MONAI's ``UNet`` is
what the baseline used to be (residual units, strided convolutions, instance norm); ``unet_small`` is
the classic U-Net people write (``ssl_em.models.unet``). ``--crop 2,128,128`` reproduces the
plan-crop comparison quoted in ``ssl_em.plan`` (thicker crops, fewer places per step).

    .venv/bin/python benchmarks/unet_baseline.py --quick        # phantom, < 1 min
    .venv/bin/python benchmarks/unet_baseline.py --steps 150     # VNC mitochondria at the plan's 9.2 nm

The last line: ``unet_small IoU / MONAI UNet IoU``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ssl_em.errors import ArgumentParser, run_main

ROOT = Path(__file__).resolve().parents[1]
VNC = ROOT.parent / "shared" / "data" / "vnc_gerhard2013.npz"


def monai_unet(out_channels: int, spacing, crop_shape) -> "torch.nn.Module":  # noqa: F821
    """MONAI's residual U-Net as the baseline had it: in-plane strides first for anisotropic voxels."""
    from monai.networks.nets import UNet

    z_pool = crop_shape[0] >= 2 and spacing[0] <= 2 * 4 * min(spacing[1:])
    strides = ((1, 2, 2), (1, 2, 2), (2 if z_pool else 1, 2, 2), (1, 2, 2))
    return UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=(16, 32, 64, 128, 256),
                strides=strides, num_res_units=1, norm="instance")


def train_and_score(name: str, study, steps: int, lr: float, seed: int) -> tuple[float, float]:
    """(foreground IoU on the evaluation region, seconds) of network ``name`` after ``steps`` steps."""
    import torch

    from ssl_em.plan import upsample
    from ssl_em.study.train import build_data, build_module, predict_probabilities, score

    cfg = study.cfg
    module = build_module("unet", cfg, None, seed, lr, steps)
    if name == "monai":
        torch.manual_seed(seed)
        module.model = monai_unet(module.task.num_outputs, cfg.spacing, cfg.crop_shape)
    mask = np.ones(study.data.labels.shape, np.uint8)
    dm = build_data(study.data, study.regions.fit, None, mask, cfg, seed, steps)
    dm.setup("fit")
    opt = torch.optim.AdamW(module.model.parameters(), lr=lr, weight_decay=1e-4)
    module.model.train()
    start, done = time.perf_counter(), 0
    while done < steps:
        for batch in dm.train_dataloader():
            loss = module.training_loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done % max(1, steps // 4) == 0:
                print(f"  {name}: step {done}/{steps}, loss {loss.item():.3f}", flush=True)
            if done == steps:
                break
    seconds = time.perf_counter() - start
    module.model.eval()
    probs = predict_probabilities(module, study.data.raw[study.eval_box], cfg)
    probs = upsample(probs, study.ev_gt.shape)
    return score(probs, study.ev_gt, module.task, cfg.voxel_size)["iou"], seconds


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_renamed("--crop", "--patch", metavar="Z,Y,X", help="training crop z,y,x at the working spacing (default: "
                  "the plan's)")
    p.add_argument("--batch-size", type=int, help="crops per step (default: the plan's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only-plain", action="store_true", help="train unet_small alone (crop/batch comparisons)")
    p.add_argument("--quick", action="store_true", help="a small phantom and 20 steps (< 1 min)")
    args = p.parse_args(argv)
    import torch

    from ssl_em.study import Study, StudyConfig

    torch.set_num_threads(args.threads)
    if args.quick or not VNC.exists():
        from ssl_em.data.phantom import make_phantom

        if not args.quick:
            print(f"{VNC} not found: using the phantom")
        ph = make_phantom((8, 320, 192), seed=2)
        raw, labels, vs, steps, what = ph.raw, ph.mito, ph.voxel_size, 20 if args.quick else args.steps, "phantom"
    else:
        d = np.load(VNC)
        raw, labels, vs, steps, what = d["raw"], d["mito"], (50.0, 4.6, 4.6), args.steps, "VNC stack 1 mitochondria"
    patch = tuple(int(v) for v in args.crop.split(",")) if args.crop else None
    cfg = StudyConfig(task="mito", methods=("unet",), fractions=(1.0,), steps=steps, voxel_size=tuple(vs),
                      crop_shape=patch, batch_size=args.batch_size, precision="32")
    with tempfile.TemporaryDirectory() as out:
        study = Study(raw, labels, None, cfg, Path(out) / "study")
        print(f"{what}: all labels of the fit region, {steps} steps, lr {args.lr:g}, seed {args.seed}")
        print(f"crop {cfg.crop_shape}, batch {cfg.batch_size}")
        names = ("plain",) if args.only_plain else ("monai", "plain")
        results = {name: train_and_score(name, study, steps, args.lr, args.seed) for name in names}
    for name, (iou, seconds) in results.items():
        print(f"{'MONAI UNet' if name == 'monai' else 'unet_small'}: IoU {iou:.3f} after {steps} steps ({seconds:.0f} s)")
    if args.only_plain:
        return 0
    (peer, _), (ours, _) = results["monai"], results["plain"]
    ratio = ours / peer if peer > 0 else float("inf")
    print(f"unet_small IoU {ours:.3f} vs MONAI UNet {peer:.3f}: ratio {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("unet_baseline.py", main))

"""Step speed of ssl-em's U-Net against the same-size plain U-Nets users run elsewhere.

Ours: ``unet_small`` (conv-BatchNorm-ReLU, 16-256 channels, 4 poolings) in the layout the plan gives it;
peers: MONAI's ``BasicUNet`` and nnU-Net's ``PlainConvUNet`` (dynamic-network-architectures, with nnU-Net's
defaults: instance norm, leaky ReLU, strided-conv downsampling), same channels, crop, batch and optimiser
(AdamW). Each network runs at its best working precision on this machine, chosen by measurement as
``precision: auto`` does (fp32 or bf16 autocast: the faster with a finite loss).

Two layouts, as the plan makes them: ``sections`` (serial-section EM such as VNC mitochondria: 2-D crops
1 x 128 x 128, batch 13; the peers as users run them on 2-D crops, as 2-D networks) and ``isotropic``
(FIB-SEM: 3-D crops 16 x 96 x 128, batch 2). Steps timed:

- fine-tuning: forward, BCE-with-logits loss on a binary target, backward, optimiser step;
- pretraining: ssl-em's default objective (SparK, 60 % of the bottleneck units masked) on ``unet_small``;
  the peers' masked reconstruction as users write it (masked input voxels zeroed, MSE on them); and the
  masking overhead, SparK step / fine-tuning step of ``unet_small`` (target <= 1.3).

Each network runs in the memory layout it ships with: ssl-em's U-Net keeps its weights channels-last (so
oneDNN runs its convolutions, BatchNorm and pooling channels-last); MONAI and nnU-Net leave PyTorch's default.
A step whose gradients are not all finite is skipped, for every network, as ssl-em's training does (oneDNN's
bf16 conv3d weight gradient is intermittently NaN on some CPUs: ``bf16_conv_nan.py``); the counts are printed.

Steps are interleaved (one of each network in turn, so load from other processes hits all alike); the
figure is the median wall time per step after warm-up. The last line gives the ratios (ours / peer
speed: above 1 is faster).

    pip install --no-deps dynamic-network-architectures    # nnU-Net's networks; its timm pin would downgrade timm
    python benchmarks/unet_speed.py [--quick] [--layout sections|isotropic|both] [--steps N]
"""

from __future__ import annotations

import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spark_throughput import batches as spark_batches  # noqa: E402  (crops of VNC stack 2 or the phantom, z-scored)
from spark_throughput import load_raw  # noqa: E402

from ssl_em.errors import ArgumentParser, run_main  # noqa: E402
from ssl_em.utils.optim import gradients_finite  # noqa: E402

LAYOUTS = {  # (spacing z, y, x nm; crop z, y, x; batch): what the plan gives unet_small on such data
    "sections": ((50.0, 9.2, 9.2), (1, 128, 128), 13),
    "isotropic": ((10.0, 10.0, 10.0), (16, 96, 128), 2),
}
WIDTHS = (16, 32, 64, 128, 256)
OURS = "ssl-em unet_small"


def peers(two_d: bool) -> dict[str, Callable[[], nn.Module]]:
    """Builders of the peer networks available here (nnU-Net's needs dynamic-network-architectures)."""
    from monai.networks.nets import BasicUNet

    dims = 2 if two_d else 3
    out: dict[str, Callable[[], nn.Module]] = {
        "monai BasicUNet": lambda: BasicUNet(spatial_dims=dims, in_channels=1, out_channels=1, features=(*WIDTHS, WIDTHS[0])),
    }
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:
        # its metadata pins timm < 1.0.23, an older timm than ssl-em's: install it without dependencies
        print("nnU-Net PlainConvUNet: dynamic-network-architectures is not installed (pip install --no-deps "
              "dynamic-network-architectures); left out")
        return out
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if two_d else (nn.Conv3d, nn.InstanceNorm3d)
    k, s = ([3] * dims), ([2] * dims)
    out["nnU-Net PlainConvUNet"] = lambda: PlainConvUNet(
        input_channels=1, n_stages=len(WIDTHS), features_per_stage=list(WIDTHS), conv_op=conv,
        kernel_sizes=[k] * len(WIDTHS), strides=[[1] * dims] + [s] * (len(WIDTHS) - 1),
        n_conv_per_stage=[2] * len(WIDTHS), num_classes=1, n_conv_per_stage_decoder=[2] * (len(WIDTHS) - 1),
        conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=False)
    return out


class Runner:
    """One network's training step (fine-tuning or masked reconstruction) at a chosen precision."""

    def __init__(self, name: str, model: nn.Module, step: Callable[[nn.Module, dict], torch.Tensor], two_d: bool):
        self.name, self.model, self.step_fn, self.two_d = name, model, step, two_d
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.precision, self.times, self.note, self.skipped = "32", [], "", 0

    def batch_for(self, batch: dict) -> dict:
        if not self.two_d:
            return batch
        return {k: v[:, :, 0] if torch.is_tensor(v) and v.ndim == 5 else v for k, v in batch.items()}

    def step(self, batch: dict, precision: str | None = None) -> tuple[float, float]:
        """(seconds, loss) of one optimiser step."""
        p = precision or self.precision
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16"):
            loss = self.step_fn(self.model, self.batch_for(batch))
        self.opt.zero_grad(set_to_none=True)
        loss.float().backward()
        if gradients_finite([q.grad for q in self.model.parameters() if q.grad is not None]):
            self.opt.step()
        else:  # as ssl-em's training does (SkipNonFiniteGradients): oneDNN's bf16 conv3d weight gradient can be NaN
            self.skipped += 1
        return time.perf_counter() - t, float(loss)

    def choose_precision(self, batches: list[dict]) -> None:
        """fp32 or bf16 autocast, the faster with finite losses (median of three steps after one warm-up)."""
        ms = {}
        for p in ("32", "bf16"):
            try:
                runs = [self.step(b, p) for b in batches[:4]][1:]
            except RuntimeError as err:  # a kernel the CPU lacks
                ms[p] = (math.inf, f"fails: {str(err).splitlines()[0][:60]}")
                continue
            finite = all(math.isfinite(loss) for _, loss in runs)
            ms[p] = (float(np.median([s for s, _ in runs])) * 1e3 if finite else math.inf, "")
        self.precision = min(ms, key=lambda p: ms[p][0])
        self.note = ", ".join(f"{p} {v:.0f} ms" if math.isfinite(v) else f"{p} {why or 'non-finite'}"
                              for p, (v, why) in ms.items())


def fine_tuning_step(model: nn.Module, b: dict) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(b["x"]).float(), b["y"])


def masked_reconstruction_step(model: nn.Module, b: dict) -> torch.Tensor:
    pred = model(b["x"] * (1 - b["mask"])).float()
    return ((pred - b["x"]) ** 2 * b["mask"]).sum() / b["mask"].sum().clamp(min=1)


def timed(runners: list[Runner], batches: list[dict], warmup: int) -> dict[str, float]:
    """Median ms per step of each runner, steps interleaved, after ``warmup`` steps."""
    from tqdm import tqdm

    for r in runners:
        r.choose_precision(batches)
        r.times = []
    for i, b in enumerate(tqdm(batches, desc="steps", leave=False)):
        for r in runners:
            s, _ = r.step(b)
            if i >= warmup:
                r.times.append(s)
    return {r.name: float(np.median(r.times)) * 1e3 for r in runners}


def run_layout(layout: str, steps: int, warmup: int, threads: int, quick: bool) -> dict[str, Any]:
    import ssl_em
    from ssl_em.models.layers import resize_mask
    from ssl_em.pretrain.spark import SparKMasked3D

    spacing, crop, batch = LAYOUTS[layout]
    if quick:
        crop, batch = ((1, 64, 64), 4) if layout == "sections" else ((16, 32, 32), 1)  # peers pool 4x by 2
    two_d = crop[0] == 1
    torch.manual_seed(0)
    raw, _ = load_raw(crop)
    spark = SparKMasked3D(ssl_em.create_encoder("unet_small", spacing=spacing, crop_shape=crop), mask_ratio=0.6)
    batches = []
    for x in spark_batches(raw, steps, batch, crop, seed=1):
        visible = spark.random_visible(x)  # the same masks for SparK and the peers' masked reconstruction
        y = (torch.rand(x.shape) < 0.1).float()  # a binary target: the step's cost, not its sense
        batches.append({"x": x, "y": y, "visible": visible, "mask": 1 - resize_mask(visible, crop)})

    def ours_finetune() -> nn.Module:
        return ssl_em.create_encoder("unet_small", spacing=spacing, crop_shape=crop, out_channels=1)

    def spark_step(model: nn.Module, b: dict) -> torch.Tensor:
        loss, _, _ = model(b["x"], b["visible"])
        return loss.float()

    builders = peers(two_d)
    nets = {OURS: ours_finetune(), **{k: f() for k, f in builders.items()}}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    print(f"\n{layout}: crop {crop} (z, y, x) batch {batch}, {steps} steps ({warmup} warm-up), {threads} threads; "
          f"ssl-em pools {nets[OURS].pools_zyx}; peers {'2-D' if two_d else '3-D'}")
    fine = [Runner(k, m, fine_tuning_step, two_d and k != OURS) for k, m in nets.items()]
    ft = timed(fine, batches, warmup)
    pre = [Runner(OURS, spark, spark_step, False)]
    pre += [Runner(k, f(), masked_reconstruction_step, two_d) for k, f in builders.items()]
    pt = timed(pre, batches, warmup)
    print(f"{'network':24s} {'params':>8s} {'fine-tune ms':>13s} {'precision':>9s} {'pretrain ms':>12s} {'precision':>9s}")
    for (k, f_ms), r_ft, r_pt in zip(ft.items(), fine, pre):
        print(f"{k:24s} {params[k] / 1e6:7.2f}M {f_ms:13.1f} {r_ft.precision:>9s} {pt[k]:12.1f} {r_pt.precision:>9s}"
              f"   (probe: fine-tune {r_ft.note}; pretrain {r_pt.note}; steps skipped for a non-finite gradient: "
              f"{r_ft.skipped} + {r_pt.skipped})")
    res = {"layout": layout, "crop": list(crop), "batch": batch, "fine_tune_ms": ft, "pretrain_ms": pt,
           "precision": {"fine_tune": {r.name: r.precision for r in fine}, "pretrain": {r.name: r.precision for r in pre}},
           "params": params, "spark_overhead": pt[OURS] / ft[OURS],
           "skipped_steps": {"fine_tune": {r.name: r.skipped for r in fine}, "pretrain": {r.name: r.skipped for r in pre}}}
    print(f"SparK step / fine-tuning step of unet_small: {res['spark_overhead']:.2f} (target <= 1.3)")
    return res


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small crops and few steps (< 1 min)")
    p.add_argument("--layout", default="both", choices=("sections", "isotropic", "both"))
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="append the measurements as one JSON line to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 6, 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads")
    layouts = ("sections", "isotropic") if args.layout == "both" else (args.layout,)
    results = [run_layout(lay, args.steps, args.warmup, args.threads, args.quick) for lay in layouts]
    if args.json:
        import json

        with open(args.json, "a") as f:
            f.write(json.dumps({"quick": args.quick, "threads": args.threads, "results": results}) + "\n")
    parts = []
    for r in results:
        for peer in (k for k in r["fine_tune_ms"] if k != OURS):
            parts.append(f"{r['layout']} vs {peer}: fine-tune {r['fine_tune_ms'][peer] / r['fine_tune_ms'][OURS]:.2f}x, "
                         f"pretrain {r['pretrain_ms'][peer] / r['pretrain_ms'][OURS]:.2f}x")
    print("speed ratio (ours / peer, > 1 faster): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("unet_speed.py", main))

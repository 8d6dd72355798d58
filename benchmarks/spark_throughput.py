"""CPU pretraining speed: SparK on ssl-em's residual U-Net vs a MONAI U-Net with the same masked objective.

Both networks see the same crops and the same random masks, step for step, interleaved (one step of ours,
one of theirs) so that load from other processes on a shared machine hits both alike. The MONAI U-Net
(``monai.networks.nets.UNet``, same strides, ``num_res_units=2`` for a similar parameter count) is trained
the plain way: masked input voxels are zeroed, no re-masking, no mask tokens; the loss is the same MSE
over masked voxels. Reported per model: steps/s (after two warm-up steps) from wall time and from the
process's CPU time (robust when other jobs share the cores: CPU seconds / ``--threads``), and the step/time at which the
loss leaves the predict-the-mean plateau (running mean over 5 steps of loss / predict-the-mean loss
< ``--plateau``). The last line is the steps/s ratio (ours / MONAI), wall and CPU time.

    .venv/bin/python benchmarks/spark_throughput.py --quick
    .venv/bin/python benchmarks/spark_throughput.py --steps 120 --crop 16 128 128 --batch 2
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ssl_em.errors import ArgumentParser, run_main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "vnc_gerhard2013_stack2.npz"


def load_raw(crop: tuple[int, int, int]) -> tuple[np.ndarray, str]:
    """Unlabelled ssTEM stack 2 (20x1024x1024 uint8), or a phantom where the shared data are absent."""
    if DATA.exists():
        with np.load(DATA) as d:
            return d["raw"], f"{DATA.name} raw {d['raw'].shape}"
    from ssl_em.data.phantom import make_phantom

    shape = (max(crop[0], 20), 256, 256)
    return make_phantom(shape, seed=0).raw, f"phantom {shape} ({DATA} absent)"


def batches(raw: np.ndarray, n: int, batch: int, crop: tuple[int, int, int], seed: int) -> list[torch.Tensor]:
    """``n`` batches (B, 1, D, H, W) of random crops, each z-scored on its own."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        xs = []
        for _ in range(batch):
            o = [rng.integers(0, s - c + 1) for s, c in zip(raw.shape, crop)]
            a = raw[o[0]:o[0] + crop[0], o[1]:o[1] + crop[1], o[2]:o[2] + crop[2]].astype(np.float32)
            xs.append((a - a.mean()) / (a.std() + 1e-6))
        out.append(torch.from_numpy(np.stack(xs)[:, None]))
    return out


def plateau_exit(ratios: list[float], times: list[float], level: float, window: int = 5) -> tuple[int, float] | None:
    """First (step, cumulative seconds) where the running mean of loss/mean-loss drops below ``level``."""
    for i in range(window - 1, len(ratios)):
        if np.mean(ratios[i - window + 1:i + 1]) < level:
            return i + 1, float(np.sum(times[:i + 1]))
    return None


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small crops and few steps (< 1 min)")
    p.add_argument("--model", default="unet3d_tiny")
    p.add_argument("--crop", type=int, nargs=3, default=(16, 128, 128), metavar=("D", "H", "W"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--mask-unit", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    p.add_argument("--target", default="raw", choices=("raw", "normalized", "lowpass"))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--plateau", type=float, default=0.9, help="exit level of loss / predict-the-mean loss")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format for both")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.crop, args.steps = (8, 64, 64), 14
    crop = tuple(args.crop)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import timm
    from monai.networks.nets import UNet

    import ssl_em.models.unet3d  # noqa: F401  (registers the variants)
    from ssl_em.models.layers import resize_mask
    from ssl_em.pretrain.spark import SparKMasked3D, masked_mse

    torch.manual_seed(args.seed)
    ours = SparKMasked3D(timm.create_model(args.model), args.mask_ratio, args.mask_unit, target=args.target)
    w = ours.encoder.widths
    theirs = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=w,
                  strides=ours.encoder.pools, num_res_units=2)
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    ours, theirs = ours.to(memory_format=fmt), theirs.to(memory_format=fmt)
    n_ours, n_theirs = (sum(q.numel() for q in m.parameters()) for m in (ours, theirs))
    raw, source = load_raw(crop)
    data = batches(raw, args.steps, args.batch, crop, args.seed)
    print(f"config: {source}; crop {crop} (z, y, x) batch {args.batch}; {args.steps} steps; {args.threads} threads; "
          f"mask ratio {args.mask_ratio} unit {ours.mask_unit}; target {args.target}; AdamW lr {args.lr}; "
          f"channels_last_3d={args.channels_last}")
    print(f"ours:  SparK {args.model} ({n_ours / 1e3:.0f}k params incl. mask tokens + 1x1x1 head)")
    print(f"peer:  monai UNet channels={tuple(w)} strides={ours.encoder.pools} num_res_units=2 "
          f"({n_theirs / 1e3:.0f}k params), masked input zeroed, no re-masking")

    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr) for k, m in (("ours", ours), ("monai", theirs))}
    log: dict[str, dict[str, list[float]]] = {k: {"time": [], "cpu": [], "ratio": []} for k in opts}
    gen = torch.Generator().manual_seed(args.seed + 1)
    from tqdm import tqdm

    for x in tqdm(data, desc="steps", leave=False):
        x = x.contiguous(memory_format=fmt)
        grid = ours.unit_grid(x.shape)
        n = grid[0] * grid[1] * grid[2]
        keep = round(n * (1 - args.mask_ratio))
        visible = (torch.rand(x.shape[0], n, generator=gen).argsort(1).argsort(1) < keep).float()
        visible = visible.reshape(x.shape[0], 1, *grid)
        mask = 1 - resize_mask(visible, crop)
        target = ours.make_target(x)
        mean = (target * mask).sum() / mask.sum()
        base = masked_mse(torch.zeros_like(target) + mean, target, mask).item()  # predict-the-mean loss
        for name, opt in opts.items():
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "ours":
                loss, _, _ = ours(x, visible)
            else:
                loss = masked_mse(theirs(x * (1 - mask)), target, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log[name]["time"].append(time.perf_counter() - t0)
            log[name]["cpu"].append((time.process_time() - c0) / args.threads)
            log[name]["ratio"].append(loss.item() / base)

    res = {}
    for name, lg in log.items():
        sps = 1.0 / float(np.mean(lg["time"][2:] or lg["time"]))
        cps = 1.0 / float(np.mean(lg["cpu"][2:] or lg["cpu"]))
        ex = plateau_exit(lg["ratio"], lg["cpu"], args.plateau)
        res[name] = (sps, cps, ex)
        exit_s = f"step {ex[0]} after {ex[1]:.1f} CPU-s/thread" if ex else f"not within {args.steps} steps"
        print(f"{name:6s} {sps:6.3f} steps/s wall, {cps:6.3f} steps/s CPU  loss/mean-loss first 3 {np.mean(lg['ratio'][:3]):.3f} "
              f"last 5 {np.mean(lg['ratio'][-5:]):.3f}  plateau (< {args.plateau}) exit: {exit_s}")
    (eo, co, xo), (em, cm, xm) = res["ours"], res["monai"]
    if xo and xm:
        print(f"plateau-exit CPU-time ratio (monai / ours): {xm[1] / xo[1]:.2f}  (steps {xm[0]} vs {xo[0]})")
    else:
        print(f"plateau-exit CPU-time ratio (monai / ours): n/a (ours {'reached' if xo else 'not reached'}, "
              f"monai {'reached' if xm else 'not reached'})")
    print(f"steps/s ratio (ours / monai): {co / cm:.2f} by CPU time, {eo / em:.2f} by wall time")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("spark_throughput.py", main))

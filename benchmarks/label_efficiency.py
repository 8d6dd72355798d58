"""Label efficiency: pretrained encoder + LoRA vs the controls, under the same labels and step budget.

The peers are what users otherwise do: train the same network from scratch (``scratch``), or a
plain U-Net from scratch (``unet``, ssl-em's ``unet_small`` from random init), or an ilastik-style random
forest (``rf``); ``lora_random`` (LoRA + head on a random encoder)
controls for optimisation speed: if it matches ``lora``, pretraining is not what helps. Every
method gets its own learning rate from a short sweep on a validation slab of the training region,
and each run keeps its best-validation weights; scores come from a spatially disjoint evaluation
region (see ``ssl_em.study``). Budgets are optimiser steps; a rerun of the same command skips the
runs ``results.jsonl`` already holds. The last line is
the headline: ``lora`` minus the best of ``scratch``/``lora_random`` at the scarcest label regime
(``--patches``: painted 2-D patches; ``--fractions``: whole z-sections).

    .venv/bin/python benchmarks/label_efficiency.py --quick
    .venv/bin/python benchmarks/label_efficiency.py \\
        --unlabeled ../shared/data/vnc_gerhard2013_stack2.npz:raw ../shared/data/vnc_gerhard2013.npz:raw \\
        --raw ../shared/data/vnc_gerhard2013.npz:raw --labels ../shared/data/vnc_gerhard2013.npz:mito \\
        --task mito --fractions 0.05,0.2,1.0 --seeds 3 --steps 400 --pretrain-steps 3000 --out bench_out/le
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ssl_em.errors import ArgumentParser, run_main

REPO = Path(__file__).resolve().parents[1]
QUICK_SHAPE = (8, 160, 64)  # (z, y, x) crop of the labelled volume in --quick


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unlabeled", nargs="+", metavar="SPEC", help="pretraining volumes (default: --raw itself)")
    p.add_argument("--raw", metavar="SPEC", help="labelled raw volume (default: a phantom)")
    p.add_argument("--labels", metavar="SPEC", help="its labels")
    p.add_argument("--eval-raw", metavar="SPEC", help="a separate evaluation volume (e.g. a dataset's own test "
                   "volume): the whole labelled volume then trains and the scores come from all of this one")
    p.add_argument("--eval-labels", metavar="SPEC", help="the evaluation volume's labels")
    p.add_argument("--task", default="mito", choices=("mito", "synapse", "neuron", "membrane"))
    p.add_argument("--fractions", default="0.01,0.05,0.1,1.0",
                   help="label regimes: fractions of the z-sections labelled ('' for none)")
    p.add_argument("--patches", default="", help="label regimes: numbers of painted patches, e.g. 1,4,16")
    p.add_renamed("--painted-size", "--patch-size", type=int, default=256, help="a painted square's side at the working "
                  "spacing")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="lora,frozen,full,scratch,lora_random,unet,rf")
    p.add_argument("--encoder", metavar="NAME_OR_PATH", default="auto",
                   help="encoder to start from: 'auto' = the one ssl-em ships for the family, 'none' = random "
                   "init (then pretrained on --unlabeled or --raw), or a path or name")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps per fine-tuning run (default 400)")
    p.add_argument("--eval-steps", default="", help="also score each run's weights after these steps, e.g. 50,100,200 "
                   "(IoU against fine-tuning steps: results.md and steps.png)")
    p.add_argument("--tta", action="store_true", help="evaluate with test-time mirroring (y, x flips: 4x the "
                   "evaluation's compute)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="keep the task's default "
                   "post-processing (synapses: threshold 0.5, no minimum size; neurons: agglomeration at 0.5) instead of "
                   "choosing it per run on its "
                   "own labels (the validation slab's when it has one)")
    p.add_renamed("--val-slab", "--val-fraction", type=float, default=0.2, help="share of the training region (a slab "
                  "in y) held out to validate and keep the best weights; 0: none, every run keeps its last weights")
    p.add_argument("--val-every", type=int, default=50, help="validate and keep the best weights every N steps")
    p.add_argument("--batch-size", type=int, help="crops per step (default: the plan's, ssl_em.plan)")
    p.add_argument("--downsample", type=int, help="in-plane factor to the working spacing (default: the plan's; "
                   "1 = native)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock guard for the whole study: start no "
                   "run after this (a rerun continues)")
    p.add_argument("--adapter-kwargs", type=json.loads, default=None, metavar="JSON",
                   help='add_adapter options for lora and lora_random (default: the family\'s; cnn: '
                        '\'{"train_decoder": true}\'), e.g. \'{"r": 16, "train_decoder": false}\'')
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretraining steps (default: 2000 from random init; from a given encoder 2000 with "
                   "--unlabeled, which continues pretraining on them, else 0: the encoder as it is)")
    p.add_argument("--reuse", nargs="+", default=(), metavar="RESULTS_JSONL",
                   help="another table's results.jsonl of the same labelled volume: its runs this study would repeat "
                   "exactly (scratch and rf do not depend on the encoder) are copied, not redone")
    p.add_argument("--pretrain-only", action="store_true",
                   help="pretrain (resuming a killed run) into OUT/<family>/pretrain/encoder and stop; a table then "
                   "starts from it with --encoder")
    p.add_argument("--family", default="cnn", choices=("cnn", "vit", "both"))
    p.add_argument("--architecture", help="encoder to pretrain instead of the family's (e.g. unet2d_small)")
    p.add_argument("--lrs", type=json.loads, metavar="JSON",
                   help='peak rates per method instead of sweeping, e.g. \'{"full": [2e-3], "unet": [2e-3]}\'')
    p.add_argument("--pretrain-method", help="pretraining objective (default: the family's, spark / mae; e.g. "
                   "spark_simclr, the best measured in contrastive_vs_mae.py)")
    p.add_argument("--ema-decay", type=float, default=None, metavar="DECAY",
                   help="score the network methods with an exponential moving average of their weights (e.g. 0.99)")
    p.add_argument("--encoder-lr-scale", type=float, default=1.0,
                   help="pretrained methods train the encoder path at this fraction of their rate (default 1)")
    p.add_renamed("--crop", "--patch", metavar="Z,Y,X", help="training crop z,y,x at the working spacing (default: "
                  "the plan's)")
    p.add_argument("--layout", default="auto", choices=("auto", "plan", "2d", "3d"),
                   help="2-D or 3-D crops: auto probes both where z is 2-5x coarser than x and keeps the better on "
                   "the validation slab; plan: the plan's anisotropy rule; 2d / 3d: forced")
    p.add_argument("--validation", default="crops", choices=("crops", "slab"),
                   help="what picks the best weights, rates and layout: the soft Dice of the validation crops, or over "
                   "the whole labelled validation slab predicted as the evaluation is (mito, synapse)")
    p.add_argument("--voxel-size", help="z,y,x nm, overriding the files")
    p.add_argument("--out", default="bench_out/label_efficiency")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (a GPU when one is visible)")
    p.add_argument("--quick", action="store_true", help="tiny crops and networks, one fraction and seed (< 1 min)")
    return p.parse_args(argv)


def _numbers(text: str, cast=float) -> tuple:
    return tuple(cast(v) for v in text.split(",") if v.strip())


def load(args: argparse.Namespace) -> tuple:
    """(raw, labels, unlabeled, voxel_size, description); a phantom when no --raw is given."""
    if args.raw is None:
        from ssl_em.data.phantom import make_phantom

        shape, pool = (QUICK_SHAPE, (8, 64, 64)) if args.quick else ((24, 256, 128), (24, 192, 192))
        ph, un = make_phantom(shape, seed=2), make_phantom(pool, seed=1)
        return ph.raw, ph.labels(args.task), [un.raw], ph.voxel_size, f"phantom {shape} + unlabelled {pool}"
    if args.labels is None:
        sys.exit("--raw needs --labels")
    if not args.quick:
        return args.raw, args.labels, args.unlabeled, None, f"{args.raw} / {args.labels}"
    from ssl_em.data.volume import open_volume  # quick: a small corner of the real volume

    raw, lab = open_volume(args.raw), open_volume(args.labels)
    box = tuple(slice(0, min(n, q)) for n, q in zip(raw.shape, QUICK_SHAPE))
    return raw[box], lab[box], None, raw.voxel_size, f"{args.raw} {tuple(b.stop for b in box)} corner"


def run_family(family: str, args: argparse.Namespace, data: tuple) -> str:
    from ssl_em.study import Study, StudyConfig, headline
    from ssl_em.study.config import resolve_encoder

    raw, labels, unlabeled, vs, _ = data
    vs = _numbers(args.voxel_size) if args.voxel_size else vs
    quick = args.quick
    arch = ("unet3d_test" if family == "cnn" else "vit3d_test_patch2x16") if quick else args.architecture
    encoder = resolve_encoder(args.encoder, family, arch)
    pretrain_steps = args.pretrain_steps
    if pretrain_steps is None:
        pretrain_steps = 2000 if encoder is None or args.unlabeled else 0
    cfg = StudyConfig(
        task=args.task, family=family, encoder=encoder, adapter_kwargs=args.adapter_kwargs,
        architecture=arch,
        methods=("lora", "scratch") if quick else tuple(args.methods.split(",")),
        fractions=(0.25,) if quick else _numbers(args.fractions), seeds=1 if quick else args.seeds,
        patches=() if quick else _numbers(args.patches, int), painted_size=args.painted_size,
        steps=12 if quick else args.steps, eval_steps=(4, 8) if quick else _numbers(args.eval_steps, int), pretrain_steps=6 if quick else pretrain_steps,
        val_every=4 if quick else args.val_every, val_slab=args.val_slab, batch_size=2 if quick else args.batch_size, max_minutes=args.minutes,
        crop_shape=(8, 32, 32) if quick else _numbers(args.crop, int) if args.crop else None, voxel_size=vs,
        layout=args.layout, validation=args.validation,
        downsample=args.downsample, pretrain_method=args.pretrain_method, encoder_lr_scale=args.encoder_lr_scale,
        ema_decay=args.ema_decay,
        device=args.device, tta=args.tta, calibrate=args.calibrate,
        lrs={"lora": (6e-3,), "scratch": (1.5e-3,)} if quick else args.lrs,
    )
    print("configuration:", json.dumps({k: v for k, v in asdict(cfg).items()}, default=str))
    if (args.eval_raw is None) != (args.eval_labels is None):
        sys.exit("--eval-raw and --eval-labels go together")
    evaluation = (args.eval_raw, args.eval_labels) if args.eval_raw else None
    study = Study(raw, labels, unlabeled, cfg, Path(args.out) / family, reuse=args.reuse, evaluation=evaluation)
    if args.pretrain_only:
        return f"{family}: pretrained encoder in {study.pretrain_only()}"
    records = study.run()
    print((Path(args.out) / family / "results.md").read_text())
    return f"{family}: {headline(records, args.task)}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = load(args)
    print(f"data: {data[4]}; task {args.task}")
    t0 = time.perf_counter()
    lines = [run_family(f, args, data) for f in (("cnn", "vit") if args.family == "both" else (args.family,))]
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(" | ".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("label_efficiency.py", main))

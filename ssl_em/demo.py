"""``ssl-em demo``: the whole claim in one command, on the built-in phantom or on your volumes.

With no arguments: fine-tune the encoder ssl-em ships (``unet_small.spark_vnc_isbi``: the plain U-Net
pretrained with SparK on other labs' ssTEM, the label-efficiency table's winner) in full on 4 painted
192 x 192 patches of a 24 x 1024 x 768 phantom volume, 2 seeds (each its own patches), against the same
U-Net from random init (``scratch``) and an ilastik-style random forest (``rf``) on the same labels and
step budget, and score everything on a spatially disjoint evaluation region (see :mod:`ssl_em.study`).
``--encoder none`` pretrains from random init on a second, unlabelled phantom volume first;
``--fractions 1.0`` adds the all-labels ceiling. Budgets are optimiser steps (``--steps`` per
fine-tuning run, ``--pretrain-steps``), so a run gives the same numbers whatever else the machine
does; ``--minutes`` only guards the wall clock (runs not started by then are left for a rerun, which
continues where it stopped). The last three lines say who won at the few-label regime (mean ± std),
whether pretraining paid beyond the seed spread, and where the files are.

Your data: ``--data UNLABELED_OR_RAW [...] --labels LABELS --task mito``. The labelled raw is the
``--data`` spec from the same file as ``--labels`` (else the first); all ``--data`` specs are
pretraining data (the labelled raw only through its training region).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ssl_em.errors import ArgumentParser, ConfigError

# the labelled and the unlabelled phantom volumes (z, y, x) at 40 x 8 x 8 nm
PHANTOM_SHAPES = ((24, 1024, 768), (24, 256, 256))


def _file_of(spec: str) -> str:
    return str(Path(spec.split(":", 1)[0] if ":" in spec and not Path(spec).exists() else spec).resolve())


def pick_labelled(data: list[str], labels: str) -> str:
    """The ``--data`` spec holding the raw that ``labels`` annotates: same file, else the first."""
    same = [d for d in data if _file_of(d) == _file_of(labels)]
    return same[0] if same else data[0]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{text!r} is not a comma-separated list of numbers") from None


def build_parser(prog: str = "ssl-em demo") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Pretrain an encoder, fine-tune it with LoRA on a few "
                                "labelled sections and compare with baselines under the same labels and budget, "
                                "scored on a disjoint region: on the built-in phantom, or on --data/--labels.")
    p.add_argument("--data", nargs="+", metavar="SPEC", help="unlabelled (and the labelled raw) volume specs")
    p.add_argument("--labels", metavar="SPEC", help="labels of one --data volume (enables the real-data study)")
    p.add_argument("--task", default="mito", choices=("mito", "synapse", "neuron", "membrane"))
    p.add_argument("--family", default="cnn", choices=("cnn", "vit"), help="U-Net + SparK (cnn) or ViT + MAE")
    p.add_argument("--encoder", metavar="NAME_OR_PATH", default="auto",
                   help="encoder to start from (pretraining continues on --data): 'auto' = the one ssl-em ships "
                   "for the family (ssl-em models --pretrained), 'none' = random init, or a path or name")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps per fine-tuning run (default 100)")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps before fine-tuning (default: 0 from a "
                   "pretrained --encoder, which is fine-tuned as is; 300 from random init)")
    p.add_argument("--val-every", type=int, default=25, help="validate (and keep the best weights) every N steps")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock guard: start no run after this "
                   "(a rerun continues); budgets are --steps")
    p.add_argument("--fractions", default="", help="label fractions of the z-sections, e.g. 1.0 for all labels "
                   "(the ceiling; default none: it doubles the run time)")
    p.add_argument("--patches", default="4", help="numbers of painted 2-D patches (default 4: the few-label "
                   "regime a person paints in minutes; '' for none)")
    # the label-efficiency table's winner (the shipped encoder fine-tuned in full) against what users would
    # pick instead; lora, frozen, lora_random (the adapters' random-encoder control) and unet on request
    p.add_argument("--methods", default="full,scratch,rf",
                   help="comma-separated from lora, frozen, full, scratch, lora_random, unet, rf (an ilastik-style "
                   "random forest)")
    p.add_renamed("--painted-size", "--patch-size", type=int, default=None, help="a painted square's side in voxels at "
                  "the working spacing (default 192 on the phantom: 1.5 um squares at 8 nm; 256 on --data)")
    p.add_argument("--seeds", type=int, default=2, help="label draws / initialisations per method and regime "
                   "(default 2: a margin larger than the spread is not noise)")
    p.add_renamed("--crop", "--patch", metavar="Z,Y,X", help="training crop (z,y,x) voxels at the working spacing "
                  "(default: the plan's)")
    p.add_argument("--batch-size", type=int, help="crops per step (default: the plan's; 4 on the phantom, to fit "
                   "the demo in minutes on 2 cores)")
    p.add_argument("--downsample", type=int, help="in-plane factor to the working spacing (default: the plan's; "
                   "1 = native)")
    p.add_argument("--voxel-size", help="z,y,x nm (overrides the files)")
    p.add_argument("--fill-missing", action="store_true",
                   help="read zarr chunks absent from --data/--labels stores as the fill value (default: an error)")
    p.add_argument("--phantom-shape", metavar="Z,Y,X", help="the labelled phantom volume's shape (default "
                   f"{','.join(map(str, PHANTOM_SHAPES[0]))}; at 40 x 8 x 8 nm)")
    p.add_argument("--out", default="ssl_em_out/demo")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 is faster on a "
                   "machine whose cores are busy with other jobs")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (a GPU when one is visible)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # test mode: toy network and volumes
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from ssl_em.study import METRICS, Study, StudyConfig, budget_units, headline, markdown_table, summary_lines
    from ssl_em.study.config import resolve_encoder

    if args.labels and not args.data:
        raise ConfigError(f"--labels {args.labels} needs --data with the matching raw volume")
    if args.phantom_shape and args.data:
        raise ConfigError("--phantom-shape sizes the built-in phantom; with --data the volumes are yours")
    if args.minutes is not None and args.minutes <= 0:
        raise ConfigError(f"--minutes {args.minutes} must be positive")
    tiny = args.tiny
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    crop = (8, 32, 32) if tiny else tuple(int(v) for v in _floats(args.crop)) if args.crop else None
    arch = ("unet3d_test" if args.family == "cnn" else "vit3d_test_patch2x16") if tiny else None
    encoder = resolve_encoder(args.encoder, args.family, arch)
    pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else 0 if encoder else 300
    cfg = StudyConfig(
        task=args.task, family=args.family, encoder=encoder, architecture=arch,
        methods=("lora", "scratch") if tiny else tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        fractions=(0.25,) if tiny else _floats(args.fractions), seeds=1 if tiny else args.seeds,
        patches=() if tiny else tuple(int(v) for v in _floats(args.patches)),
        painted_size=args.painted_size or (256 if args.data else 192),
        steps=args.steps, pretrain_steps=pretrain_steps, val_every=args.val_every, max_minutes=args.minutes,
        crop_shape=crop, batch_size=2 if tiny else args.batch_size or (None if args.data else 4),
        downsample=args.downsample,
        voxel_size=_floats(args.voxel_size) if args.voxel_size else None,  # type: ignore[arg-type]
        # the default phantom's whole evaluation region (24 x 308 x 768 voxels: 28 mitochondria)
        device=args.device, fill_missing=args.fill_missing, sweep_every_fraction=False, max_eval_voxels=6_000_000,
        max_val_voxels=400_000, lrs={"lora": (6e-3,), "scratch": (1.5e-3,)} if tiny else None,
    )
    if args.labels:
        raw = pick_labelled(args.data, args.labels)
        labels, unlabeled = args.labels, list(args.data)
        print(f"labelled raw {raw}, labels {labels}; pretraining data {', '.join(unlabeled)}")
    elif args.data:
        raise ConfigError("--data without --labels: give --labels for the volume to evaluate on")
    else:
        from ssl_em.data.phantom import make_phantom

        shapes = ((8, 160, 64), (8, 64, 64)) if tiny else (
            (_floats(args.phantom_shape), PHANTOM_SHAPES[1]) if args.phantom_shape
            else PHANTOM_SHAPES)
        target = make_phantom(shapes[0], seed=2)
        raw, labels = target.raw, target.labels(args.task)
        # the unlabelled volume only where the demo pretrains: a shipped encoder is fine-tuned as is
        unlabeled = [make_phantom(shapes[1], seed=1).raw] if pretrain_steps > 0 else None
        cfg.voxel_size = cfg.voxel_size or tuple(float(v) for v in target.voxel_size)  # type: ignore[assignment]
        pool = f", unlabelled volume {shapes[1]} (seed 1)" if unlabeled else ""
        print(f"phantom: labelled volume {shapes[0]} (seed 2){pool}, voxel size {cfg.voxel_size} nm")
    print(f"encoder: {cfg.encoder or 'random init ' + cfg.arch}; pretraining {cfg.pretrain_steps} steps, "
          f"{cfg.steps} steps per fine-tuning run ({budget_units(cfg):g} runs' worth with the rate sweeps), "
          f"methods {', '.join(cfg.methods)}, label regimes {', '.join(r.name for r in cfg.regimes)}")
    t0 = time.perf_counter()
    out = Path(args.out)
    records = Study(raw, labels, unlabeled, cfg, out).run()
    print()
    for metric in METRICS[cfg.task]:
        if any(r["metric"] == metric for r in records):
            print(markdown_table(records, metric), end="\n\n")
    print(f"total {time.perf_counter() - t0:.0f} s; tables {out / 'results.md'}, records {out / 'results.json'}, "
          f"figures {out}/*.png")
    print(headline(records, cfg.task))
    print()
    print("\n".join(summary_lines(records, cfg.task, out)))
    return 0

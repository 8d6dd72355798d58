"""``ssl-em validate --encoder PATH_OR_NAME [--raw SPEC --labels SPEC] [--task mito]``: the frozen-feature
linear probe (:func:`ssl_em.pretrain.probe.run_probe`) of an encoder from the command line; a registered name
without an export means random initialisation, the baseline."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict

import torch

from ssl_em.errors import ArgumentParser
from ssl_em.pretrain.probe import load_any_encoder, load_labelled, run_probe


def main(argv: Sequence[str] | None = None) -> int:
    """``ssl-em validate --encoder PATH_OR_NAME [--raw SPEC --labels SPEC] [--task mito]``: linear-probe scores."""
    parser = ArgumentParser(
        prog="ssl-em validate",
        description="Frozen-feature linear probe (logistic regression) of an encoder on a labelled volume: "
                    "average precision and IoU on held-out z-sections. Without --raw: the phantom.")
    parser.add_argument("--encoder", required=True,
                        help="exported encoder folder / file / stored name, or a registered name (random init)")
    parser.add_argument("--raw", help="EM volume spec (e.g. data.npz:raw, a.zarr/raw, f.h5:/raw)")
    parser.add_argument("--labels", help="label volume spec, same shape; > 0 is the structure")
    parser.add_argument("--task", default="mito", help="name in the output; phantom field without --raw (default mito)")
    parser.add_argument("--roi", help="box 'z0:z1,y0:y1,x0:x1' of the volumes to use")
    parser.add_argument("--feature", default="auto", choices=["auto", "tokens", "bottleneck", "dense"])
    parser.add_argument("--test-fraction", type=float, default=0.3, help="last fraction of z held out (0.3)")
    parser.add_argument("--samples", type=int, default=20000, help="random voxels for training and for testing")
    parser.add_argument("--tile", type=int, nargs=3, metavar=("Z", "Y", "X"), help="encoder tile (default 16 128 128)")
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=[32, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--png", help="write EM / labels / probe probability of a held-out section to this PNG")
    args = parser.parse_args(list(argv) if argv is not None else None)
    encoder, origin = load_any_encoder(args.encoder, args.seed)
    raw, labels = load_labelled(args.raw, args.labels, args.task, args.roi, args.phantom_shape)
    result = run_probe(encoder, raw, labels, feature=args.feature, test_fraction=args.test_fraction,
                       n_train=args.samples, n_test=args.samples, tile=args.tile, seed=args.seed, device=args.device,
                       png=args.png, progress=True)
    record = {"encoder": args.encoder, "weights": origin, "task": args.task, "raw": args.raw or "phantom",
              **asdict(result)}
    print(f"{args.task} probe of {args.encoder} ({origin}, {result.feature} features, dim {result.feature_dim}): "
          f"AP {result.ap:.3f} (chance {result.chance_ap:.3f}), IoU {result.iou:.3f}, accuracy {result.accuracy:.3f}")
    if args.json:
        from ssl_em.utils.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0 if math.isfinite(result.ap) else 1

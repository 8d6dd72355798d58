"""Which pretraining objective for the U-Net family: a short proxy of the label-efficiency table.

Each objective pretrains ``unet_small`` (the plain U-Net) for the same number of steps from random init on
the unlabelled volumes, then the pretrained network is fine-tuned in full (``full``) on 1 and 4 painted
patches of the labelled volume, beside the same network from random init (``scratch``) and the random
forest (``rf``) on the same labels, steps and rate. Everything runs through ``label_efficiency.py`` (one
study per objective, ``<out>/<objective>``; a rerun skips what is finished); this script then gathers
their records into one table (``results.md`` + ``results.jsonl`` in ``--out``).

    D=../shared/data; .venv/bin/python benchmarks/objective_proxy.py \\
        --unlabeled $D/vnc_gerhard2013_stack2.npz:raw $D/isbi2012.npz:raw --raw $D/vnc_gerhard2013.npz:raw \\
        --labels $D/vnc_gerhard2013.npz:mito --pretrain-steps 800 --steps 300 --out runs/proxy
    .venv/bin/python benchmarks/objective_proxy.py --quick      # phantom, tiny budgets, < 1 min

The last line: the best objective's IoU at the scarcest regime vs ``scratch`` and their ratio.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ssl_em.errors import ArgumentParser, ConfigError, run_main  # noqa: E402

OBJECTIVES = ("inpaint", "spark", "inpaint_simclr", "spark_simclr")


def parse(argv: list[str] | None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unlabeled", nargs="+", metavar="SPEC", help="pretraining volumes")
    p.add_argument("--raw", metavar="SPEC", help="labelled raw volume (default: a phantom)")
    p.add_argument("--labels", metavar="SPEC")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--architecture", default="unet_small")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    p.add_argument("--patches", default="1,4")
    p.add_argument("--seeds", default="3,2", help="seeds per regime, in the order of --patches")
    p.add_argument("--lr", type=float, default=1e-3, help="one fine-tuning rate for full and scratch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/objective_proxy")
    p.add_argument("--quick", action="store_true")
    return p.parse_args(argv)


def study_args(args, objective: str, patches: int, seeds: int, controls: bool) -> list[str]:
    methods = "full,scratch,rf" if controls else "full"
    lrs = json.dumps({"full": [args.lr], "scratch": [args.lr]})
    out = Path(args.out) / objective / f"{patches}p"
    common = ["--task", "mito", "--encoder", "none", "--architecture", args.architecture, "--pretrain-method",
              objective, "--methods", methods, "--fractions", "", "--patches", str(patches), "--seeds", str(seeds),
              "--lrs", lrs, "--out", str(out), "--threads", str(args.threads)]
    if args.quick:
        return [*common, "--pretrain-steps", "4", "--steps", "4", "--val-every", "2", "--batch-size", "2",
                "--crop", "1,32,32", "--painted-size", "32"]
    data = ["--raw", args.raw, "--labels", args.labels, *(["--unlabeled", *args.unlabeled] if args.unlabeled else [])]
    return [*data, *common, "--pretrain-steps", str(args.pretrain_steps), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size)]


def main(argv: list[str] | None = None) -> int:
    import label_efficiency

    args = parse(argv)
    objectives = [o for o in args.objectives.split(",") if o]
    patches = [int(v) for v in args.patches.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    if args.quick:
        objectives, patches, seeds = objectives[:2], patches[:1], [1]
    if len(seeds) != len(patches):
        raise ConfigError(f"--seeds {args.seeds} needs one count per --patches entry ({args.patches})")
    if not args.quick and (args.raw is None or args.labels is None):
        raise ConfigError("--raw and --labels are required (or --quick for the phantom)")
    t0 = time.perf_counter()
    records = []
    for i, objective in enumerate(objectives):
        for n, s in zip(patches, seeds):
            # the pretrained encoder of the first regime is reused by the next: one pretraining per objective
            argv_ = study_args(args, objective, n, s, controls=i == 0)
            first = Path(args.out) / objective / f"{patches[0]}p" / "cnn" / "pretrain" / "encoder"
            if n != patches[0]:
                argv_ += ["--encoder", str(first), "--pretrain-steps", "0"]
            print(f"== {objective}, {n} patch(es), {s} seed(s)", flush=True)
            label_efficiency.main(argv_)
            path = Path(args.out) / objective / f"{n}p" / "cnn" / "results.jsonl"
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if "iou" in (entry.get("metrics") or {}) and entry.get("patches") == n:
                    method = entry["method"] if entry["method"] != "full" else f"full ({objective})"
                    records.append({"method": method, "objective": objective, "patches": n, "seed": entry["seed"],
                                    "metric": "iou", "value": entry["metrics"]["iou"], "lr": entry.get("lr"),
                                    "steps": entry.get("steps"), "labelled_voxels": entry.get("labelled_voxels")})
    print(f"total {time.perf_counter() - t0:.0f} s")
    write_table(Path(args.out), records, patches)  # ends with the ratio line
    return 0


def write_table(out: Path, records: list[dict], patches: list[int]) -> None:
    """One row per method, one column per regime: IoU mean ± std over seeds; records as JSON lines."""
    from ssl_em.utils.io import atomic_write_text

    rows: dict[str, dict[int, list[float]]] = {}
    for r in records:
        rows.setdefault(r["method"], {}).setdefault(int(r["patches"]), []).append(float(r["value"]))

    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f} (n={len(values)})"

    head = "| method | " + " | ".join(f"{n} painted patch{'es' if n > 1 else ''}" for n in patches) + " |"
    lines = [head, "|---" * (len(patches) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(cell(v.get(n, [])) for n in patches) + " |" for m, v in rows.items()]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    print("\n".join(lines))
    n = patches[0]
    best = max((m for m in rows if m.startswith("full")), key=lambda m: statistics.mean(rows[m].get(n, [0])),
               default=None)
    if best and "scratch" in rows and rows["scratch"].get(n):
        ours, peer = statistics.mean(rows[best][n]), statistics.mean(rows["scratch"][n])
        print(f"{n} patch(es): {best} IoU {ours:.3f} vs scratch {peer:.3f}: ratio {ours / max(peer, 1e-9):.2f}x")


if __name__ == "__main__":
    raise SystemExit(run_main("objective_proxy.py", main))

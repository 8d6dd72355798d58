"""Peak memory of the ``rf`` baseline (ilastik-style features + random forest) on a whole volume.

Trains ``ssl_em.baselines.PixelClassifier`` on every labelled section of VNC stack 1 (20 x 1024 x 1024,
mitochondria) and predicts the whole volume, section by section, in this process; prints the
process's peak resident memory against the 4 GB the project allows, and against what the same 49
features would take held for the whole volume at once (computed, not allocated: the layout a
whole-volume filter bank needs, ilastik's default without blockwise processing).

    .venv/bin/python benchmarks/rf_memory.py --quick     # 4 x 512 x 512 corner, < 1 min
    .venv/bin/python benchmarks/rf_memory.py             # the whole 20 x 1024 x 1024 volume

Last line: peak RSS / the whole-volume feature stack in float32.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

from ssl_em.errors import ArgumentParser, run_main

ROOT = Path(__file__).resolve().parents[1]
VNC = ROOT.parent / "shared" / "data" / "vnc_gerhard2013.npz"
LIMIT_GB = 4.0


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return kb / (1 << 30) if sys.platform == "darwin" else kb / (1 << 20)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 4 x 512 x 512 corner (< 1 min)")
    args = p.parse_args(argv)
    from ssl_em.baselines import PixelClassifier

    if not VNC.exists():
        print(f"{VNC} not found (see ../shared/data/README.md): using a 20 x 1024 x 1024 phantom")
        from ssl_em.data.phantom import make_phantom

        ph = make_phantom((4, 512, 512) if args.quick else (20, 1024, 1024), seed=0)
        raw, labels = ph.raw, ph.mito
    else:
        d = np.load(VNC)
        raw, labels = d["raw"], d["mito"]
        if args.quick:
            raw, labels = raw[:4, :512, :512], labels[:4, :512, :512]
    raw = np.ascontiguousarray(raw)
    before = peak_rss_gb()
    clf = PixelClassifier(seed=0)
    start = time.perf_counter()
    clf.fit(raw, labels, np.ones(raw.shape, np.uint8))
    fitted = time.perf_counter()
    probs = clf.predict(raw)
    done = time.perf_counter()
    peak = peak_rss_gb()
    n_features = 1 + 8 * len(clf.sigmas)
    stack = raw.size * n_features * 4 / (1 << 30)
    iou = float(((probs > 0.5) & (labels > 0)).sum() / max(1, ((probs > 0.5) | (labels > 0)).sum()))
    print(f"volume {raw.shape}, {n_features} features, {clf.n_trees} trees; fit {fitted - start:.0f} s, "
          f"predict {done - fitted:.0f} s; training-data IoU {iou:.3f}")
    print(f"peak RSS {peak:.2f} GB (before fitting {before:.2f} GB); limit {LIMIT_GB:g} GB: "
          f"{'within' if peak <= LIMIT_GB else 'OVER'}")
    print(f"whole-volume feature stack: {stack:.2f} GB in float32, {2 * stack:.2f} GB in float64 (not allocated)")
    print(f"rf peak RSS {peak:.2f} GB vs whole-volume float32 features {stack:.2f} GB: ratio {peak / stack:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("rf_memory.py", main))

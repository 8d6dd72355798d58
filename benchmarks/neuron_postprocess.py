"""Neuron post-processing on gala's FIB-SEM test volume: which fragments feed the agglomeration.

One random forest (the ``rf`` baseline: ssl-em's pixel classifier, seed 0) learns boundaries (label 0)
on gala's ``raw_train`` / ``neuron_train``; its probabilities on ``raw_test`` become the neuron task's
affinities (:func:`~ssl_em.predict.instances.boundary_affinities`), so every row below starts from the
same affinities and differs only in post-processing:

- ``components t``: fragments are the components of ``boundary < t`` grown by a watershed (the
  design ssl-em used before the distance-transform fragments);
- ``distance``: :func:`~ssl_em.predict.instances.distance_fragments` (ssl-em's design; the default
  row keeps its interiors at ``inside`` 0.5 for every threshold, as ssl-em did before the fragments
  followed the agglomeration's threshold, ``inside = 1 - t``) and a few of its settings (``inside``,
  ``sigma``, ``min_distance``);
each agglomerated by mean affinity at 0.4 / 0.5 / 0.6 (0.5 is the default). The peer is gala's own
published agglomeration of that volume (``seg_test_agglo4``, scored the same way: VOI split + merge
in bits and ARAND, gt label 0 ignored). The sensitivity is measured on the test volume only to show
it: the task's defaults are not tuned on it.

Run: ``python benchmarks/neuron_postprocess.py [--quick] [--data gala_example.npz]``; records go to
``--out`` (results.jsonl + results.md); the last line is the headline ratio.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ssl_em.errors import ArgumentParser, ConfigError, run_main

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gala_example.npz"
PEER = "seg_test_agglo4"


def component_fragments(boundary: np.ndarray, threshold: float) -> np.ndarray:
    """The older fragments: components of ``boundary < threshold``, grown over the boundary by a watershed."""
    from ssl_em.predict.instances import seeded_watershed
    from ssl_em.utils.labels import connected_components

    return seeded_watershed(boundary, seeds=connected_components(boundary < threshold))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="gala_example.npz (raw_train, neuron_train, "
                        "raw_test, neuron_test, seg_test_agglo4)")
    parser.add_argument("--quick", action="store_true", help="the default design only, on an eighth of the volumes")
    parser.add_argument("--out", default=None, help="folder for results.jsonl + results.md (default: none written)")
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data} does not exist (gala_example.npz, see ../shared/data/README)")
    from ssl_em.adapters.tasks import NEURON_OFFSETS
    from ssl_em.baselines import PixelClassifier
    from ssl_em.data.normalize import Normalization
    from ssl_em.metrics import evaluate
    from ssl_em.predict.instances import affinity_agglomeration, affinity_boundary, boundary_affinities, distance_fragments

    d = np.load(args.data)
    missing = [k for k in ("raw_train", "neuron_train", "raw_test", "neuron_test", PEER) if k not in d.files]
    if missing:
        raise ConfigError(f"--data {args.data} lacks array(s) {', '.join(missing)}")
    z, _, x = d["raw_test"].shape
    crop = (slice(0, z // 2), slice(None), slice(0, x // 4)) if args.quick else (slice(None),) * 3
    norm = Normalization().fit(d["raw_train"])
    train, test = norm(d["raw_train"][crop]), norm(d["raw_test"][crop])
    gt, peer_seg = d["neuron_test"][crop].astype(np.int64), d[PEER][crop].astype(np.int64)
    t0 = time.perf_counter()
    clf = PixelClassifier(seed=0).fit(train, d["neuron_train"][crop] == 0, np.ones(train.shape, np.uint8))
    affinities = boundary_affinities(clf.predict(test), NEURON_OFFSETS)
    boundary = affinity_boundary(affinities, NEURON_OFFSETS)
    print(f"forest boundaries on {test.shape} in {time.perf_counter() - t0:.0f} s", flush=True)

    designs = {"distance (default)": lambda: distance_fragments(boundary)}
    thresholds = (0.5,) if args.quick else (0.4, 0.5, 0.6)
    if not args.quick:
        designs.update({f"components {t}": (lambda t=t: component_fragments(boundary, t)) for t in (0.1, 0.2, 0.3, 0.5)})
        for inside, sigma, reach in ((0.3, 1.0, 4.0), (0.5, 0.0, 4.0), (0.5, 1.0, 2.0)):
            designs[f"distance inside {inside} sigma {sigma:g} min_distance {reach:g}"] = (
                lambda i=inside, s=sigma, r=reach: distance_fragments(boundary, inside=i, sigma=s, min_distance=r))

    def scores(seg: np.ndarray) -> dict[str, float]:
        m = evaluate(seg.astype(np.int64), gt, "neuron", erl=False)
        return {k: round(float(m[k]), 4) for k in ("voi", "voi_split", "voi_merge", "arand")}

    records = [{"design": f"gala {PEER}", "threshold": None, "fragments": None, **scores(peer_seg)}]
    for name, make in designs.items():
        t1 = time.perf_counter()
        fragments = make()
        for threshold in thresholds:
            seg = affinity_agglomeration(affinities, NEURON_OFFSETS, threshold, fragments=fragments)
            records.append({"design": name, "threshold": threshold, "fragments": int(fragments.max()), **scores(seg)})
            r = records[-1]
            print(f"{name} at {threshold}: VOI {r['voi']:.3f} (split {r['voi_split']:.3f}, merge {r['voi_merge']:.3f})"
                  f", ARAND {r['arand']:.3f}, {r['fragments']} fragments, {time.perf_counter() - t1:.0f} s", flush=True)

    lines = ["| design | agglomeration threshold | fragments | VOI | split | merge | ARAND |", "|---" * 7 + "|"]
    lines += [f"| {r['design']} | {r['threshold'] if r['threshold'] is not None else '-'} | {r['fragments'] or '-'} | "
              f"{r['voi']:.3f} | {r['voi_split']:.3f} | {r['voi_merge']:.3f} | {r['arand']:.3f} |" for r in records]
    print("\n".join(lines))
    if args.out:
        from ssl_em.utils.io import atomic_write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    ours = next(r for r in records if r["design"] == "distance (default)" and r["threshold"] == 0.5)
    peer = records[0]
    print(f"VOI: gala {PEER} {peer['voi']:.3f}, ssl-em forest + distance fragments at 0.5 {ours['voi']:.3f}: "
          f"ratio {ours['voi'] / max(peer['voi'], 1e-9):.2f}x (lower is better)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("neuron_postprocess.py", main))

"""VOI + ARAND speed: ssl-em's shared contingency table vs scikit-image, identical results.

Volumes: a Voronoi "neuron" segmentation (anisotropic distances, 40x8x8 nm voxels) with 1-voxel
boundaries set to 0 as ground truth, and a prediction made from it by merging random neighbour
pairs, splitting segments by a plane and filling the boundaries (labels 0 ignored in gt only).
Run: ``python benchmarks/metrics_speed.py [--quick]``; the last line is the headline ratio.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from ssl_em.errors import ArgumentParser, run_main


def voronoi_pair(shape: tuple[int, int, int], n_seeds: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt) uint64 label volumes of ``shape``; see the module docstring."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, bool)
    seeds[tuple(rng.integers(0, s, n_seeds) for s in shape)] = True
    # nearest seed under 40x8x8 nm sampling -> cells elongated in z like neurites in ssTEM
    _, idx = ndimage.distance_transform_edt(~seeds, sampling=(5, 1, 1), return_indices=True)
    ids = np.zeros(shape, np.uint64)
    ids[seeds] = rng.permutation(np.arange(1, seeds.sum() + 1, dtype=np.uint64)) * 7919  # sparse ids
    gt = ids[tuple(idx)]
    del idx
    boundary = ndimage.grey_dilation(gt, size=(1, 2, 2)) != gt
    pred = gt.copy()
    gt[boundary] = 0
    labels = np.unique(pred)
    # merge 10 % of segments into a random other, split 10 % at a y plane through the volume middle
    lut_from = rng.choice(labels, len(labels) // 10, replace=False)
    lut_to = rng.choice(labels, lut_from.size)
    order = np.argsort(lut_from)
    pos = np.searchsorted(lut_from[order], pred)
    pos = np.minimum(pos, lut_from.size - 1)
    hit = lut_from[order][pos] == pred
    pred[hit] = lut_to[order][pos[hit]]
    split = np.isin(pred, rng.choice(labels, len(labels) // 10, replace=False))
    split[:, : shape[1] // 2] = False
    pred[split] += np.uint64(1)  # ids are multiples of 7919, so +1 is a fresh label
    return pred, gt


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32x256x256 instead of 128x512x512")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    from skimage.metrics import adapted_rand_error as sk_arand
    from skimage.metrics import variation_of_information as sk_voi

    from ssl_em.metrics import adapted_rand_error, contingency_table, variation_of_information

    shape = (32, 256, 256) if args.quick else (128, 512, 512)
    n_seeds = 500 if args.quick else 4000
    t0 = time.perf_counter()
    pred, gt = voronoi_pair(shape, n_seeds)
    print(f"volumes {shape} uint64, {len(np.unique(gt)) - 1} gt / {len(np.unique(pred))} pred segments, "
          f"{(gt == 0).mean():.1%} gt voxels ignored (label 0), built in {time.perf_counter() - t0:.1f} s", flush=True)

    def ours():
        table = contingency_table(pred, gt, ignore_b=(0,))  # one table for both scores
        return variation_of_information(None, None, table=table), adapted_rand_error(None, None, table=table)

    def skimage():
        keep = gt != 0  # skimage's VOI ignores labels of its first image (pred) only
        voi = tuple(sk_voi(pred[keep], gt[keep]))
        return voi, sk_arand(gt, pred, ignore_labels=(0,))

    timings = {}
    results = {}
    for name, fn in (("scikit-image", skimage), ("ssl-em", ours)):
        best = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            results[name] = fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
        (merge, split), (are, prec, rec) = results[name]
        print(f"{name:>13}: {best:7.2f} s  VOI merge {merge:.10f} split {split:.10f}  "
              f"ARAND {are:.10f} (p {prec:.10f}, r {rec:.10f})")
    a = np.array([*results["ssl-em"][0], *results["ssl-em"][1]], float)
    b = np.array([*results["scikit-image"][0], *results["scikit-image"][1]], float)
    diff = float(np.abs(a - b).max())
    print(f"max |difference| {diff:.2e} ({'equal' if diff <= 1e-9 else 'NOT EQUAL'} to 1e-9)")
    assert diff <= 1e-9, "results differ"
    print(f"VOI+ARAND speed-up vs scikit-image on {'x'.join(map(str, shape))}: "
          f"{timings['scikit-image'] / timings['ssl-em']:.1f}x")


if __name__ == "__main__":
    raise SystemExit(run_main("metrics_speed.py", main))

"""Score a segmentation against ground truth with the metrics a task is judged by.

``evaluate(pred, gt, task)`` returns a flat dict of floats; ``ssl-em evaluate`` reads any volume
spec, prints the table, writes ``metrics.json`` and a PNG of the three z-slices with most errors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ssl_em.errors import ArgumentParser, ConfigError, LabelError
from ssl_em.metrics.contingency import adapted_rand_error, contingency_table, variation_of_information
from ssl_em.metrics.detection import average_precision, synapse_f1
from ssl_em.metrics.overlap import dice, iou, precision_recall
from ssl_em.metrics.topology import erl as expected_run_length

TaskName = Literal["mito", "synapse", "neuron", "membrane"]
TASKS: tuple[str, ...] = ("mito", "synapse", "neuron", "membrane")


def _binary(x: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground of labels (non-zero) or of probabilities (``> threshold``)."""
    return x > threshold if x.dtype.kind == "f" else x != 0


def _instances(x: np.ndarray, threshold: float) -> np.ndarray:
    """Instance ids: given ids kept, binary masks / probabilities split into 26-connected components."""
    from ssl_em.utils.labels import connected_components

    if x.dtype.kind == "f" or x.dtype == bool or (x.size and x.max() <= 1):
        return connected_components(_binary(x, threshold))
    return x


def evaluate(
    pred: np.ndarray,
    gt: np.ndarray,
    task: TaskName,
    voxel_size: Sequence[float] | None = None,
    mask: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    synapse_distance_nm: float = 100.0,
    erl: bool = True,
) -> dict[str, float]:
    """Metrics for ``task`` as a flat ``{name: value}`` dict (arrays (z, y, x), ``voxel_size`` nm).

    - ``mito``: voxel IoU, Dice, precision, recall; instance AP50 / AP75 / AP(0.5:0.95) as the
      score-free matched fraction (see :func:`~ssl_em.metrics.average_precision`).
    - ``synapse``: voxel IoU, Dice, precision, recall; detection F1 of component centroids matched
      within ``synapse_distance_nm``.
    - ``neuron``: VOI merge / split / sum (bits) and ARAND (gt label 0 ignored), from one
      contingency table; expected run length (nm and normalised) when ``erl``.
    - ``membrane``: voxel IoU, Dice, precision, recall of the membrane class (non-zero); and the ISBI 2012
      challenge's foreground-restricted ``vrand`` and ``vinfo`` (higher is better) of the cells they
      enclose: per z-section, the 4-connected regions of non-membrane in each, averaged over sections.
    Float predictions are probabilities, thresholded at ``threshold``. Voxels where ``mask`` is
    False are ignored (instance / detection / ERL scores see them as background).
    """

    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise LabelError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    vs = tuple(float(v) for v in (voxel_size or (1.0,) * gt.ndim))
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != gt.shape:
            raise LabelError(f"mask shape {mask.shape} differs from ground truth shape {gt.shape}")
    out: dict[str, float] = {}
    if task != "neuron":
        p, g = _binary(pred, threshold), _binary(gt, 0.5)
        out["iou"], out["dice"] = iou(p, g, mask), dice(p, g, mask)
        out["precision"], out["recall"] = precision_recall(p, g, mask)
    if task == "mito":
        pi, gi = _instances(pred, threshold), _instances(gt, 0.5)
        ap = average_precision(pi, gi, mask=mask)
        out.update({k: float(v) for k, v in ap.items()})
    elif task == "synapse":
        pi, gi = _instances(pred, threshold), _instances(gt, 0.5)
        if mask is not None:
            pi, gi = np.where(mask, pi, 0), np.where(mask, gi, 0)
        det = synapse_f1(pi, gi, vs, synapse_distance_nm)
        out.update({f"detection_{k}": float(v) for k, v in det.items()})
    elif task == "membrane":
        out["vrand"], out["vinfo"] = membrane_cell_scores(p, g, mask)
    elif task == "neuron":
        if pred.dtype.kind not in "biu" or gt.dtype.kind not in "biu":
            raise LabelError(f"neuron evaluation needs integer label volumes, got {pred.dtype} and {gt.dtype}")
        table = contingency_table(pred, gt, ignore_b=(0,), mask=mask)  # rows pred, cols gt
        merge, split = variation_of_information(None, None, table=table)
        are, rand_split, rand_merge = adapted_rand_error(None, None, table=table)
        out.update(voi_merge=merge, voi_split=split, voi=merge + split, arand=are,
                   arand_split_score=rand_split, arand_merge_score=rand_merge)
        if erl and gt.ndim == 3:
            g = gt if mask is None else np.where(mask, gt, 0)
            out["erl_nm"], out["erl_normalized"] = expected_run_length(pred, g, vs)
    return out


def membrane_cell_scores(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Mean over z-sections of :func:`~ssl_em.metrics.contingency.foreground_restricted_scores` between the
    cells (4-connected non-membrane regions) of two membrane masks (z, y, x) or (y, x); masked-out voxels
    count as membrane in ``gt`` (not scored)."""
    from scipy import ndimage

    from ssl_em.metrics.contingency import foreground_restricted_scores

    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if gt.ndim == 2:
        pred, gt = pred[None], gt[None]
        mask = None if mask is None else np.asarray(mask)[None]
    scores = []
    for z in range(gt.shape[0]):
        cells_gt = ndimage.label(~gt[z] if mask is None else ~gt[z] & mask[z])[0]
        if not cells_gt.any():
            continue
        scores.append(foreground_restricted_scores(ndimage.label(~pred[z])[0], cells_gt))
    return tuple(float(v) for v in np.mean(scores, axis=0)) if scores else (1.0, 1.0)  # type: ignore[return-value]


def error_map(pred: np.ndarray, gt: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Boolean (z, y, x) map of erroneous voxels: foreground disagreement, or for neurons the voxels
    whose gt id is not the majority gt of their pred segment (merge) or vice versa (split)."""
    if task != "neuron":
        return _binary(pred, threshold) != _binary(gt, 0.5)
    t = contingency_table(pred, gt, ignore_b=(0,))
    err = np.zeros(gt.shape, bool)
    for a, b, la, lb, ia, ib in ((pred, gt, t.labels_a, t.labels_b, t.rows, t.cols),
                                 (gt, pred, t.labels_b, t.labels_a, t.cols, t.rows)):
        if la.size == 0:
            break
        order = np.lexsort((-t.counts, ia))  # per label of a, its biggest overlap first
        first = np.unique(ia[order], return_index=True)[1]
        major = np.zeros(la.size, lb.dtype)
        major[ia[order][first]] = lb[ib[order][first]]
        pos = np.clip(np.searchsorted(la, a), 0, la.size - 1)
        err |= (la[pos] == a) & (major[pos] != b)
    return err & (gt != 0)


def save_worst_slices(path: Path, pred: np.ndarray, gt: np.ndarray, task: str, raw: np.ndarray | None = None,
                      n: int = 3, threshold: float = 0.5) -> list[int]:
    """PNG of the ``n`` z-slices with most error voxels: raw + gt contours, pred, errors. Returns the z's."""
    from ssl_em.utils.plotting import pyplot, save_figure

    plt = pyplot()
    from skimage.segmentation import find_boundaries


    err = error_map(pred, gt, task, threshold)
    per_z = err.reshape(err.shape[0], -1).sum(1)
    zs = [int(z) for z in np.argsort(-per_z, kind="stable")[:n]]
    aspect = gt.shape[1] / gt.shape[2]
    fig, axes = plt.subplots(len(zs), 3, figsize=(12, 4 * len(zs) * aspect + 0.6 * len(zs)), squeeze=False)
    rng = np.random.default_rng(0)
    for row, z in zip(axes, zs):
        base = raw[z] if raw is not None else np.zeros(gt.shape[1:])
        g = gt[z] if task == "neuron" else (gt[z] != 0).astype(np.uint8)
        p = pred[z] if task == "neuron" else _binary(pred[z], threshold).astype(np.uint8)
        row[0].imshow(base, cmap="gray")
        row[0].imshow(np.ma.masked_where(~find_boundaries(g), g), cmap="autumn", interpolation="nearest")
        row[0].set_title(f"z={z}: {'raw + ' if raw is not None else ''}gt contours")
        ids, inv = np.unique(p, return_inverse=True)
        colours = rng.random((ids.size, 3))
        colours[ids == 0] = 0
        row[1].imshow(base, cmap="gray")
        row[1].imshow(colours[inv.reshape(p.shape)], alpha=0.5)
        row[1].set_title("prediction")
        row[2].imshow(err[z], cmap="magma", interpolation="nearest")
        row[2].set_title(f"errors: {per_z[z]} voxels")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    return zs


def _read(spec: str, voxel_size: Sequence[float] | None):
    from ssl_em.data.volume import open_volume

    vol = open_volume(spec, voxel_size=voxel_size)
    if vol.ndim != 3:
        raise LabelError(f"{spec}: expected a (z, y, x) volume, got axes {vol.axes} and shape {vol.shape}")
    return np.asarray(vol[:, :, :]), vol


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="ssl-em evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--pred", required=True, help="prediction volume spec (labels or probabilities)")
    parser.add_argument("--gt", required=True, help="ground-truth volume spec")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out", help="folder for metrics.json and worst_slices.png")
    parser.add_argument("--raw", help="raw EM volume spec for the overlays")
    parser.add_argument("--mask", help="volume spec: voxels where it is 0 are ignored")
    parser.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                        help="nm; default: from the gt file's metadata")
    parser.add_argument("--threshold", type=float, default=0.5, help="for probability predictions")
    parser.add_argument("--synapse-distance-nm", type=float, default=100.0)
    parser.add_argument("--no-erl", action="store_true", help="skip expected run length (neurons)")
    args = parser.parse_args(argv)
    out = None
    if args.out:  # checked before any reading: a refused folder costs nothing
        from ssl_em.data.volume import spec_path
        from ssl_em.utils.io import claim_output_folder

        inputs = [spec_path(s) for s in (args.pred, args.gt, args.raw, args.mask) if s]
        out = claim_output_folder(args.out, [p for p in inputs if p is not None])

    gt, gt_vol = _read(args.gt, args.voxel_size)
    pred, _ = _read(args.pred, args.voxel_size)
    mask = _read(args.mask, args.voxel_size)[0] != 0 if args.mask else None
    vs = tuple(args.voxel_size) if args.voxel_size else tuple(gt_vol.voxel_size)
    result = evaluate(pred, gt, args.task, vs, mask, threshold=args.threshold,
                      synapse_distance_nm=args.synapse_distance_nm, erl=not args.no_erl)
    width = max(map(len, result))
    known = args.voxel_size is not None or gt_vol.voxel_size_known
    print(f"{args.task} | pred {args.pred} | gt {args.gt} | {gt.shape} | voxel {'x'.join(f'{v:g}' for v in vs)} nm"
          + ("" if known else " (not in the file: pass --voxel-size for physical ERL / distances)"))
    for name, value in result.items():
        print(f"  {name:<{width}}  {value:.6g}")
    if out is not None:
        from ssl_em.utils.io import atomic_write_text

        record = {"task": args.task, "pred": args.pred, "gt": args.gt, "voxel_size": list(vs),
                  "metrics": {k: (None if np.isnan(v) else v) for k, v in result.items()}}
        raw = _read(args.raw, args.voxel_size)[0] if args.raw else None
        if raw is not None and raw.shape != gt.shape:
            raise LabelError(f"{args.raw}: raw shape {raw.shape} differs from gt shape {gt.shape}")
        record["worst_z"] = save_worst_slices(out / "worst_slices.png", pred, gt, args.task, raw,
                                              threshold=args.threshold)
        atomic_write_text(out / "metrics.json", json.dumps(record, indent=2))
        print(f"wrote {out / 'metrics.json'} and {out / 'worst_slices.png'} (worst z: {record['worst_z']})")
    return 0

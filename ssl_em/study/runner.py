"""``Study``: pretrain once, sweep rates, fine-tune every method x fraction x seed, score, report."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.data.crops import Box
from ssl_em.errors import ConfigError, LabelError
from ssl_em.study.config import StudyConfig, _lrs, budget_units
from ssl_em.study.regions import Regions, _trim, label_sections, plan_regions
from ssl_em.study.report import write_reports
from ssl_em.study.train import Labelled, build_learner, finetune, predict, pretrain, score, val_score


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Study:
    """A label-efficiency study on one labelled volume; ``run()`` writes everything into ``out``.

    Args:
        raw, labels: the labelled volume and its labels (any volume spec or array, (z, y, x)).
        unlabeled: volumes for pretraining; None -> ``raw`` (its training region only).
        cfg: the configuration (its ``voxel_size`` is filled in from ``raw`` when unset);
        ``out``: output folder.
    """

    def __init__(self, raw: Any, labels: Any, unlabeled: Sequence[Any] | None, cfg: StudyConfig,
                 out: str | Path, log: Callable[[str], None] = print) -> None:
        from ssl_em.data.crops import Normalization, Region, as_volume, check_same_grid, voxel_size_of
        from ssl_em.data.volume import spec_path
        from ssl_em.utils.io import claim_output_folder

        # the labelled volume is read into memory once (it is the small annotated part); the
        # unlabelled volumes stay lazy
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.raw_vol = as_volume(raw, cfg.voxel_size, cfg.fill_missing)
        lab_vol = as_volume(labels, fill_missing=cfg.fill_missing)
        if tuple(self.raw_vol.shape) != tuple(lab_vol.shape) or len(self.raw_vol.shape) != 3:
            raise LabelError(f"labels shape {tuple(lab_vol.shape)} does not match raw shape "
                             f"{tuple(self.raw_vol.shape)} (both must be (z, y, x))")
        check_same_grid(lab_vol, self.raw_vol, cfg.voxel_size, "labels")
        inputs = [spec_path(v) for v in (raw, labels, *(unlabeled or ()))]
        claim_output_folder(self.out, [p for p in inputs if p is not None])
        cfg.voxel_size = voxel_size_of(self.raw_vol, cfg.voxel_size)
        self.regions = plan_regions(self.raw_vol.shape, cfg.patch_shape, cfg.eval_fraction, cfg.val_fraction)
        full = tuple(slice(0, n) for n in self.raw_vol.shape)
        raw_np = np.asarray(self.raw_vol[full])
        norm = Normalization().fit(Region(raw_np, self.regions.train))  # fitted where training sees data
        self.data = Labelled(norm(raw_np), np.asarray(lab_vol[full]), cfg.voxel_size, norm.to_dict())
        self.unlabeled = list(unlabeled) if unlabeled else [self.raw_vol]
        self.eval_box = _trim(self.regions.evaluation, cfg.max_eval_voxels)
        self.records: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.sections_shown: dict[tuple[str, float], np.ndarray] = {}  # mid eval section of seed 0
        self.pretraining: dict[str, Any] = {}

    # -- pieces
    def _pretraining_regions(self) -> list[Box | None]:
        """The labelled raw, where it is among the unlabelled volumes, only contributes its training
        region: the evaluation region is never seen, not even without labels."""
        from ssl_em.data.crops import as_volume, volume_name

        vols = [as_volume(v, self.cfg.voxel_size, self.cfg.fill_missing) for v in self.unlabeled]
        self.unlabeled = vols
        me = volume_name(self.raw_vol)
        return [self.regions.train if (v is self.raw_vol or volume_name(v) == me) else None for v in vols]

    def encoder(self) -> str:
        """The encoder to fine-tune: pretrained now (``cfg.pretrain_seconds``) or ``cfg.encoder`` as is."""
        cfg = self.cfg
        if cfg.encoder:
            import warnings

            from ssl_em.models.export import read_sidecar
            from ssl_em.models.pretrained import VoxelSizeWarning, check_voxel_size

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", VoxelSizeWarning)
                check_voxel_size(cfg.voxel_size, read_sidecar(cfg.encoder)["metadata"].get("voxel_size"),
                                 what="the labelled volume's")
            for w in caught:
                self.log(f"warning: {w.message}")
        if cfg.encoder and cfg.pretrain_seconds <= 0:
            self.pretraining = {"encoder": cfg.encoder, "seconds": 0}
            return cfg.encoder
        if cfg.pretrain_seconds <= 0:
            raise ConfigError("pretraining budget is 0 and no --encoder given: nothing to fine-tune from")
        start = time.perf_counter()
        regions = self._pretraining_regions()  # opens self.unlabeled
        enc = pretrain(self.unlabeled, regions, cfg, self.out / "pretrain", log=self.log)
        from ssl_em.models.export import read_sidecar

        sidecar = read_sidecar(enc)
        meta = sidecar["metadata"]
        self.pretraining = {"encoder": str(enc), "architecture": sidecar["architecture"], "method": meta["method"],
                            "steps": meta["steps"], "seconds": round(time.perf_counter() - start, 1),
                            "budget_seconds": cfg.pretrain_seconds, "data": meta["data"]}
        return str(enc)

    def _lrs(self, method: str) -> tuple[float, ...]:
        return _lrs(self.cfg, method)

    def sweep(self, method: str, fraction: float, encoder: str) -> float:
        """The rate of ``LR_GRID[method]`` scoring best on the validation part (ties: the middle one)."""
        cfg, regions = self.cfg, self.regions
        grid = self._lrs(method)
        if len(grid) == 1:
            return grid[0]
        sections = label_sections(self.data.raw.shape[0], fraction, 0)
        val = _trim(regions.val, cfg.max_val_voxels)
        val_raw, val_gt = self.data.raw[val], self.data.labels[val]
        mid = len(grid) // 2
        if self.cfg.task != "neuron" and not (val_gt[sections] > 0).any():
            # no foreground on the labelled validation sections: only the loss could rank the rates,
            # and it rewards whichever rate collapses to background fastest (measured: that choice
            # left every method at IoU ~0 with 2 labelled sections), so keep the grid's centre
            self.log(f"    sweep {method}: no foreground on the labelled validation sections, lr {grid[mid]:.1e}")
            return grid[mid]
        best, best_score = grid[mid], -math.inf
        for lr in [grid[mid], *grid[:mid], *grid[mid + 1:]]:
            learner = build_learner(method, cfg, encoder, seed=0)
            finetune(learner, self.data, regions.fit, sections, cfg, lr, cfg.seconds * cfg.sweep_share, seed=0)
            s = val_score(predict(learner.net, val_raw, cfg.patch_shape, cfg.precision), val_gt, sections,
                          learner.task, cfg.voxel_size)
            s = -math.inf if not math.isfinite(s) else s
            self.log(f"    sweep {method} lr {lr:.1e}: validation score {s:.3f}")
            if s > best_score:
                best, best_score = lr, s
        return best

    def _save(self) -> None:
        from ssl_em.utils.io import atomic_write_text

        doc = {"config": asdict(self.cfg), "pretraining": self.pretraining,
               "regions": {k: [[b.start, b.stop] for b in v] for k, v in asdict_regions(self.regions).items()},
               "evaluation_box": [[b.start, b.stop] for b in self.eval_box],
               "normalization": self.data.normalization, "runs": self.runs, "records": self.records}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "results.json", json.dumps(doc, indent=1) + "\n")

    # -- the whole study
    def run(self) -> list[dict[str, Any]]:
        cfg, data = self.cfg, self.data
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        enc = self.encoder()
        ev_raw, ev_gt = data.raw[self.eval_box], data.labels[self.eval_box]
        planned = cfg.seconds * budget_units(cfg)
        n_pairs, done = len(cfg.fractions) * len(cfg.methods), 0
        chosen: dict[str, float] = {}
        t_runs = time.perf_counter()
        for fraction in cfg.fractions:
            for method in cfg.methods:
                elapsed = time.perf_counter() - t_runs
                remaining = (elapsed / done * (n_pairs - done)) if done else planned
                self.log(f"[{done + 1}/{n_pairs}] {method} at {fraction:.0%} labels | elapsed "
                         f"{_fmt_time(time.perf_counter() - t0)}, ~{_fmt_time(remaining)} left")
                if cfg.sweep_every_fraction or method not in chosen:
                    chosen[method] = self.sweep(method, fraction, enc)
                lr = chosen[method]
                for seed in range(cfg.seeds):
                    self._one(method, fraction, seed, lr, enc, ev_raw, ev_gt)
                done += 1
        self._save()
        write_reports(self.out, self.records, cfg, self.pretraining, self.sections_shown, ev_raw, ev_gt)
        self.log(f"study done in {_fmt_time(time.perf_counter() - t0)}; results in {self.out}")
        return self.records

    def _one(self, method: str, fraction: float, seed: int, lr: float, enc: str, ev_raw: np.ndarray,
             ev_gt: np.ndarray) -> None:
        cfg = self.cfg
        sections = label_sections(self.data.raw.shape[0], fraction, seed)
        learner = build_learner(method, cfg, enc, seed=seed)
        t = time.perf_counter()
        steps = finetune(learner, self.data, self.regions.train, sections, cfg, lr, cfg.seconds, seed)
        seconds = time.perf_counter() - t
        probs = predict(learner.net, ev_raw, cfg.patch_shape, cfg.precision)
        metrics = score(probs, ev_gt, learner.task, cfg.voxel_size)
        for metric, value in metrics.items():
            self.records.append({"method": method, "fraction": fraction, "seed": seed, "metric": metric,
                                 "value": value})
        self.runs.append({"method": method, "fraction": fraction, "seed": seed, "lr": lr, "steps": steps,
                          "seconds": round(seconds, 1), "label_sections": sections.tolist(),
                          "trainable_params": sum(p.numel() for p in learner.parameters())})
        if seed == 0:
            z = ev_raw.shape[0] // 2
            self.sections_shown[(method, fraction)] = learner.task.postprocess(probs, cfg.voxel_size or (1, 1, 1))[z]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        self.log(f"    {method} seed {seed}: {steps} steps, lr {lr:.1e}, {len(sections)} labelled sections -> {shown}")
        self._save()


def asdict_regions(r: Regions) -> dict[str, Box]:
    return {"train": r.train, "evaluation": r.evaluation, "fit": r.fit, "val": r.val}

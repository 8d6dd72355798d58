"""``Study``: pretrain once, sweep rates, fine-tune every method x label regime x seed, score, report.

Every finished step of the study (pretraining, a rate sweep, a run) is appended to ``results.jsonl`` at
once; rerunning the same command skips what is there, so a killed study continues where it stopped.
A run whose loss goes non-finite is retried once at a third of its rate, then recorded as diverged.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ssl_em.data.volume import Box
from ssl_em.errors import ConfigError, LabelError
from ssl_em.study.ledger import RESULTS, Ledger
from ssl_em.study.config import ADAPTER, FINE_TUNING_ONLY, NOT_TRAINED, RECORDED_NAMES, Regime, StudyConfig, _lrs
from ssl_em.data.labels import paint_patches, sections_for_fraction
from ssl_em.study.regions import Regions, _trim, plan_regions
from ssl_em.study.report import shown_section, write_reports
from ssl_em.plan import batch_for, downsample, upsample
from ssl_em.study.train import Labelled, build_data, build_module, fine_tune, monitor_of, predict_probabilities, pretrain, score

TIMING = ("seconds", "precision_record")  # fields that differ between identical runs


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _volumes_of(meta: dict[str, Any]) -> list[str]:
    """The pretraining volumes an encoder's sidecar names: ``data.volumes`` (the export schema), or the plain
    list that study encoders saved before 2026-12-06 wrote."""
    data = meta.get("data")
    return list(data.get("volumes") or []) if isinstance(data, dict) else list(data or [])


class Study:
    """A label-efficiency study on one labelled volume; ``run()`` writes everything into ``out``.

    Args:
        raw, labels: the labelled volume and its labels (any volume spec or array, (z, y, x)).
        unlabeled: volumes for pretraining; None -> ``raw`` (its training region only).
        cfg: the configuration (its ``voxel_size`` is filled in from ``raw`` when unset);
        ``out``: output folder.
        reuse: ``results.jsonl`` files of other studies of the same labelled volume: their finished runs
            and sweeps that match this study's digest for the method (``scratch``, ``unet`` and ``rf`` do not
            depend on the encoder's weights, so a table of another encoder shares them) are copied into
            this study's ``results.jsonl`` instead of being redone.
        evaluation: ``(raw, labels)`` of a separate evaluation volume on the same grid (a dataset's own test
            volume): then the whole labelled volume trains and the scores come from all of that one (never a
            pretraining volume); None: a held-back part of the labelled volume.
    """

    def __init__(self, raw: Any, labels: Any, unlabeled: Sequence[Any] | None, cfg: StudyConfig,
                 out: str | Path, log: Callable[[str], None] = print, reuse: Sequence[str | Path] = (),
                 evaluation: tuple[Any, Any] | None = None) -> None:
        from ssl_em.data.crops import check_same_grid
        from ssl_em.data.normalize import Normalization
        from ssl_em.data.volume import Region, as_volume, volume_name, voxel_size_of
        from ssl_em.data.volume import spec_path
        from ssl_em.utils.io import claim_output_folder

        # the labelled volume is read into memory once (it is the small annotated part); the
        # unlabelled volumes stay lazy
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.raw_vol = as_volume(raw, cfg.voxel_size, cfg.fill_missing)
        self._labelled_name = f"the labelled volume {volume_name(self.raw_vol)}"
        lab_vol = as_volume(labels, fill_missing=cfg.fill_missing)
        _check_pair(self.raw_vol, lab_vol, self._labelled_name)
        check_same_grid(lab_vol, self.raw_vol, cfg.voxel_size, "labels")
        self.eval_vol = None
        if evaluation is not None:
            self.eval_vol, ev_lab_vol = (as_volume(v, cfg.voxel_size, cfg.fill_missing) for v in evaluation)
            name = volume_name(self.eval_vol)
            _check_pair(self.eval_vol, ev_lab_vol, f"the evaluation volume {name}")
            check_same_grid(self.eval_vol, self.raw_vol, cfg.voxel_size, "evaluation raw")
            check_same_grid(ev_lab_vol, self.raw_vol, cfg.voxel_size, "evaluation labels")
            if name in {volume_name(as_volume(v, cfg.voxel_size, cfg.fill_missing)) for v in unlabeled or ()}:
                raise ConfigError(f"{name} is both the evaluation volume and a pretraining volume: a score must "
                                  "come from data the encoder never saw")
        inputs = [spec_path(v) for v in (raw, labels, *(unlabeled or ()), *(evaluation or ()), cfg.encoder)]
        claim_output_folder(self.out, [p for p in inputs if p is not None])  # an encoder into out/pretrain
        cfg.voxel_size = voxel_size_of(self.raw_vol, cfg.voxel_size)
        raw_np, lab_np = np.asarray(self.raw_vol[full_of(self.raw_vol)]), np.asarray(lab_vol[full_of(lab_vol)])
        self.plan = self._plan(raw_np.shape)  # fills cfg.downsample, crop_shape, batch_size
        self.log(self.plan.describe())
        # everything trains at the working spacing; scores are computed on the original grid
        d = cfg.downsample
        raw_w, lab_w = downsample(raw_np, d), downsample(lab_np, d, labels=True)
        norm = Normalization().fit(Region(raw_w, self.regions.train))  # fitted where training sees data
        self.data = Labelled(norm(raw_w), lab_w, cfg.spacing, norm.to_dict())
        self.unlabeled = list(unlabeled) if unlabeled else [self.raw_vol]
        self.eval_box = _trim(self.regions.evaluation, cfg.max_eval_voxels // (d * d), at_least=cfg.crop_shape[2])
        self.eval_box_original = tuple(slice(b.start * (d if i else 1), b.stop * (d if i else 1))
                                       for i, b in enumerate(self.eval_box))
        if self.eval_vol is not None:
            raw_np, lab_np = np.asarray(self.eval_vol[full_of(self.eval_vol)]), np.asarray(ev_lab_vol[full_of(ev_lab_vol)])
            raw_w = downsample(raw_np, d)
        self.ev_raw = norm(raw_np[self.eval_box_original])  # original grid: overlays and scores
        self.ev_gt = lab_np[self.eval_box_original]
        self.ev_work = norm(raw_w[self.eval_box])  # the working grid: what the networks predict
        self.records: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.sections_shown: dict[tuple[str, str], np.ndarray] = {}  # (method, regime): shown eval section, seed 0
        self.pretraining: dict[str, Any] = {}
        self.layout_probe: dict[str, Any] | None = None
        self.step_records: list[dict[str, Any]] = []  # by fine-tuning step: cfg.eval_steps and the last
        self.precisions: dict[str, dict[str, Any]] = {}
        self.ledger = Ledger(self.out, self.digest, [Path(p) for p in reuse], log)
        self._digest_base: dict[str, Any] | None = None
        self._encoder_digest: dict[str, Any] = {}  # "weights" / "architecture" of cfg.encoder, read once
        self._unlabeled_digest: str | None = None
        self.deadline = math.inf

    def _plan(self, shape: Sequence[int]) -> Any:
        """The plan (``ssl_em.plan``) for this volume, with the fields the config sets; the in-plane crop
        shrinks (by the network stride) until training, validation and evaluation regions all hold it."""
        from ssl_em.plan import make_plan

        cfg = self.cfg
        enc_vs, sidecar = None, None
        if cfg.encoder:
            from ssl_em.models.weights_io import read_sidecar

            sidecar = read_sidecar(cfg.encoder)
            enc_vs = sidecar["metadata"].get("voxel_size")
        # the plain U-Net's 4 poolings in-plane; crops also divide by the encoder's patch (ViT patch, U-Net poolings)
        stride = (1, 16, 16)
        if any(m in ADAPTER for m in cfg.methods):
            patch = sidecar["patch_size"] if sidecar else _encoder_patch(cfg.arch, dict(cfg.encoder_kwargs))
            stride = tuple(math.lcm(a, int(b)) for a, b in zip(stride, patch))
        fixed = {k: v for k, v in (("crop_shape", cfg.crop_shape), ("batch_size", cfg.batch_size)) if v is not None}
        plan = make_plan(cfg.voxel_size or (1.0, 1.0, 1.0), cfg.task, shape, encoder_voxel_size=enc_vs, stride=stride,
                         steps=cfg.steps, downsample=cfg.downsample if cfg.voxel_size else (cfg.downsample or 1),
                         **fixed)
        work = (shape[0], shape[1] // plan.downsample, shape[2] // plan.downsample)
        depths = self._layout_depths(plan, work[0], "crop_shape" in fixed)
        # the regions must hold the deepest crop considered, so every candidate is scored on the same slabs
        crop = [max(depths), *plan.crop_shape[1:]]
        while True:
            try:
                where = f" at the working spacing (in-plane x1/{plan.downsample})" if plan.downsample > 1 else ""
                ev_shape = None
                if self.eval_vol is not None:
                    ev = self.eval_vol.shape
                    ev_shape = (ev[0], ev[1] // plan.downsample, ev[2] // plan.downsample)
                self.regions = plan_regions(work, crop, cfg.eval_slab, cfg.val_slab,
                                            what=self._labelled_name + where, evaluation_shape=ev_shape)
                break
            except ConfigError:
                if "crop_shape" in fixed or min(crop[1:]) <= 2 * stride[1]:
                    raise
                crop[1] = crop[2] = min(crop[1:]) - stride[1]
        from dataclasses import replace

        if crop[1] != plan.crop_shape[1]:
            reasons = {**plan.reasons, "crop": plan.reasons.get("crop", "") + f"; in-plane {crop[1]} to fit the "
                       f"study's regions of {tuple(work)}"}
            # the batch stays the planned one: a smaller crop then costs less per step (refilling the voxel
            # budget would multiply the phantom demo's step cost ~5x: 16 crops instead of 3)
            plan = replace(plan, crop_shape=(plan.crop_shape[0], *crop[1:]), reasons=reasons)
        # (crop, batch) per depth considered; the first is the plan's rule, a second one is probed in run()
        self.layout_candidates = [((d, *plan.crop_shape[1:]), plan.batch_size if d == plan.crop_shape[0] or
                                   "batch_size" in fixed else batch_for((d, *plan.crop_shape[1:])))
                                  for d in depths]
        crop_shape, batch = self.layout_candidates[0]
        if crop_shape != plan.crop_shape:
            plan = replace(plan, crop_shape=crop_shape, batch_size=batch, reasons={
                **plan.reasons, "layout": f"{'2-D' if crop_shape[0] == 1 else '3-D'} crops as asked (layout {cfg.layout})"})
        cfg.downsample, cfg.crop_shape, cfg.batch_size = plan.downsample, plan.crop_shape, plan.batch_size
        return plan

    def _layout_depths(self, plan: Any, depth_available: int, crop_fixed: bool) -> list[int]:
        """Crop depths to consider: the plan's rule first; with layout "auto" and z 2-5x coarser than x (where
        that rule is a guess) also the other of 2-D (one section) and 3-D (8 sections, within the volume)."""
        from ssl_em.study.config import PROBE_ANISOTROPY

        layout = "plan" if crop_fixed else self.cfg.layout
        planned = plan.crop_shape[0]
        three_d = planned if planned > 1 else min(8, depth_available)
        if layout == "2d":
            return [1]
        if layout == "3d":
            return [three_d]
        aniso = plan.spacing[0] / min(plan.spacing[1:])
        # a probe needs whole labelled sections to validate on (a fraction regime); painted patches alone keep the rule
        if layout == "auto" and PROBE_ANISOTROPY[0] <= aniso < PROBE_ANISOTROPY[1] and three_d > 1 and self.cfg.fractions:
            return [planned, 1 if planned > 1 else three_d]
        return [planned]

    def _choose_layout(self) -> None:
        """Train the plain U-Net briefly (``sweep_share`` of the steps, the grid's central rate) with each
        candidate crop on the largest label fraction's fit part, and keep the crop that scores best on the
        validation slab (within 0.02: the faster step), as nnU-Net picks between its 2-D and 3-D
        configurations by their validation scores. Recorded in ``results.json`` (``layout_probe``) and the plan."""
        from dataclasses import replace

        cfg = self.cfg
        if len(self.layout_candidates) < 2:  # a second candidate only where a fraction regime can validate it
            return
        mask = self.label_mask(Regime(fraction=max(cfg.fractions)), 0)
        if self._validation(mask) is None:
            self.log("layout probe: no foreground on the labelled validation sections; the plan's crop is kept")
            return
        grid = self._lrs("unet")
        steps = max(1, round(cfg.steps * cfg.sweep_share))
        sign = -1 if monitor_of(cfg.task, cfg.validation)[1] == "min" else 1
        tried = []
        for crop, batch in self.layout_candidates:
            cfg.crop_shape, cfg.batch_size = crop, batch
            _, info, _ = self._train("unet", 0, grid[len(grid) // 2], steps, None, self.regions.fit, mask,
                                     f"layout probe {'x'.join(map(str, crop))}")
            score = info.get("val_score") if info["status"] == "ok" else None
            tried.append({"crop_shape": list(crop), "batch_size": batch, "steps": steps,
                          "val_score": None if score is None else sign * score,
                          "ms_per_step": round(1000 * info.get("seconds", math.nan) / max(1, info.get("steps", 1)), 1)})
            self.log(f"layout probe {crop} batch {batch}: validation {tried[-1]['val_score']}, "
                     f"{tried[-1]['ms_per_step']} ms/step")
        scored = [t for t in tried if t["val_score"] is not None]
        best = max(scored, key=lambda t: t["val_score"]) if scored else tried[0]
        close = [t for t in scored if t["val_score"] >= best["val_score"] - 0.02]
        chosen = min(close, key=lambda t: t["ms_per_step"]) if close else best
        cfg.crop_shape, cfg.batch_size = tuple(chosen["crop_shape"]), chosen["batch_size"]
        self.layout_probe = {"tried": tried, "chosen": chosen["crop_shape"]}
        why = ", ".join(f"{'2-D' if t['crop_shape'][0] == 1 else '3-D'} {t['val_score']}" for t in tried)
        self.plan = replace(self.plan, crop_shape=cfg.crop_shape, batch_size=cfg.batch_size, reasons={
            **self.plan.reasons, "layout": f"{'2-D' if cfg.crop_shape[0] == 1 else '3-D'} by a {steps}-step probe "
            f"of both on the validation slab ({why}{'; within 0.02: the faster' if len(close) > 1 else ''})"})
        self.log(self.plan.describe())

    # -- the log of finished work ---------------------------------------------------------------
    def digest(self, method: str | None = None) -> str:
        """What a finished line of ``method`` (None: pretraining) must match to be reused: the configuration,
        the regions, the labelled volume's contents, and of the encoder what the method depends on: its
        weights for the methods that start from them, its architecture for ``scratch`` / ``lora_random``,
        nothing for ``unet`` and ``rf``; for the pretraining not the settings only fine-tuning reads
        (``FINE_TUNING_ONLY``: more steps or another rate keep it); where the study pretrains, for the pretraining and the methods that
        start from it, a fingerprint of the unlabelled volumes. Not the encoder's path, nor what no single
        run depends on (a line's key names its method, regime and seed): the lists of methods, seeds and
        painted-patch regimes, and the wall-clock guard; so a table grows by a seed, a method or a regime
        without redoing what it holds."""
        if self._digest_base is None:
            from ssl_em.adapters import get_task

            skip = ("max_minutes", "methods", "seeds", "patches", "encoder", "layout")  # layout: crop_shape carries it
            if not get_task(self.cfg.task).calibrates:  # a setting without effect keeps older records valid
                skip += ("calibrate",)
            if self.cfg.ema_decay is None:  # likewise a setting added after records were written, left unset
                skip += ("ema_decay",)
            if self.cfg.validation == "crops":  # the validation records were made with before it was a setting
                skip += ("validation",)
            cfg = {RECORDED_NAMES.get(k, k): v for k, v in asdict(self.cfg).items() if k not in skip}
            regions = {k: [[b.start, b.stop] for b in v] for k, v in asdict_regions(self.regions).items()}
            data = hashlib.blake2b(digest_size=8)
            for array in (self.data.raw, self.data.labels, *((self.ev_raw, self.ev_gt) if self.eval_vol is not None
                                                             else ())):
                data.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
            self._digest_base = {"config": cfg, "regions": regions, "shape": list(self.data.raw.shape),
                                 "data": data.hexdigest()}
        part = None  # pretraining continued from cfg.encoder, and pretrained methods: its weights
        if self.cfg.encoder and (method is None or method in ADAPTER):
            part = "weights" if method is None or ADAPTER[method][1] else "architecture"
        if part == "weights" and part not in self._encoder_digest:
            self._encoder_digest[part] = _weights_digest(self.cfg.encoder)
        elif part == "architecture" and part not in self._encoder_digest:
            from ssl_em.models.weights_io import read_sidecar

            sidecar = read_sidecar(self.cfg.encoder)
            self._encoder_digest[part] = [sidecar["architecture"], sidecar.get("kwargs")]
        what = {**self._digest_base, "encoder": self._encoder_digest.get(part) if part else None}
        if method is None:  # the pretraining reads none of the fine-tuning settings: a longer table keeps it
            fine_tuning_only = {RECORDED_NAMES.get(k, k) for k in FINE_TUNING_ONLY}
            what["config"] = {k: v for k, v in what["config"].items() if k not in fine_tuning_only}
        if self.cfg.pretrain_steps > 0 and (method is None or (method in ADAPTER and ADAPTER[method][1])):
            what["unlabeled"] = self._unlabeled_fingerprint()  # what this study pretrains on
        return hashlib.blake2b(json.dumps(what, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()

    def _unlabeled_fingerprint(self) -> str:
        """Shape, dtype and 16 sampled 64 x 64 tiles of every pretraining volume: a volume changed in place
        or another one under the same name is a different pretraining, read in milliseconds, not in full."""
        if self._unlabeled_digest is None:
            from ssl_em.data.volume import as_volume

            h = hashlib.blake2b(digest_size=8)
            for v in self.unlabeled:
                vol = as_volume(v, self.cfg.voxel_size, self.cfg.fill_missing)
                shape = [int(n) for n in vol.shape]
                h.update(json.dumps([shape, str(vol.dtype)]).encode())
                for i in range(16):  # spread over z, y and x independently (coprime strides)
                    z, y, x = (i * k % 16 * max(0, n - t) // 15 for k, n, t in zip((1, 5, 11), shape, (1, 64, 64)))
                    h.update(np.ascontiguousarray(np.asarray(vol[z, y:y + 64, x:x + 64])).tobytes())
            self._unlabeled_digest = h.hexdigest()
        return self._unlabeled_digest

    # -- pieces ---------------------------------------------------------------------------------
    def _pretraining_regions(self) -> list[Box | None]:
        """The labelled raw, where it is among the unlabelled volumes, only contributes its training
        region: the evaluation region is never seen, not even without labels."""
        from ssl_em.data.volume import as_volume, volume_name

        vols = [as_volume(v, self.cfg.voxel_size, self.cfg.fill_missing) for v in self.unlabeled]
        self.unlabeled = vols
        me = volume_name(self.raw_vol)
        return [self.regions.train if (v is self.raw_vol or volume_name(v) == me) else None for v in vols]

    def encoder(self) -> str:
        """The encoder to fine-tune: pretrained now (``cfg.pretrain_steps``) or ``cfg.encoder`` as is."""
        cfg = self.cfg
        if cfg.encoder:
            import warnings

            from ssl_em.models.weights_io import read_sidecar
            from ssl_em.models.pretrained import VoxelSizeWarning, check_voxel_size

            sidecar = read_sidecar(cfg.encoder)
            meta = sidecar["metadata"]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", VoxelSizeWarning)
                check_voxel_size(cfg.spacing, meta.get("voxel_size"), what="the labelled volume's")
            for w in caught:
                self.log(f"warning: {w.message}")
        if cfg.encoder and cfg.pretrain_steps <= 0:  # record the encoder's own pretraining, done before this study
            self.pretraining = {"encoder": cfg.encoder, "architecture": sidecar["architecture"], "steps": 0,
                                **{f"encoder_{k}": meta[k] for k in ("method", "steps", "seconds") if k in meta},
                                "encoder_data": _volumes_of(meta)}
            return cfg.encoder
        if cfg.pretrain_steps <= 0:
            raise ConfigError("pretraining budget is 0 steps and no --encoder given: nothing to fine-tune from")
        key = ("pretraining",)
        if key in self.ledger.done and (self.out / "pretrain" / "encoder" / "encoder.json").exists():
            self.pretraining = self.ledger.done[key]["pretraining"]
            self.log(f"pretraining: done before ({self.pretraining['steps']} steps), reusing "
                     f"{self.pretraining['encoder']}")
            return self.pretraining["encoder"]
        regions = self._pretraining_regions()  # opens self.unlabeled
        enc = pretrain(self.unlabeled, regions, cfg, self.out / "pretrain", log=self.log)
        from ssl_em.models.weights_io import read_sidecar

        sidecar = read_sidecar(enc)
        meta = sidecar["metadata"]
        self.pretraining = {"encoder": str(enc), "architecture": sidecar["architecture"], "method": meta["method"],
                            "steps": meta["steps"], "seconds": meta["seconds"], "data": _volumes_of(meta)}
        self.ledger.append(key, {"pretraining": self.pretraining})
        return str(enc)

    def pretrain_only(self) -> str:
        """Pretrain (or resume the pretraining from its checkpoint) and stop: the encoder's folder. A table
        then starts from it with ``cfg.encoder``, so the long pretraining is run and kept once."""
        self.ledger.load()
        return self.encoder()

    def label_mask(self, regime: Regime, seed: int) -> np.ndarray:
        """The voxels a run may learn from (z, y, x) uint8 on the working grid: whole sections (fit and
        validation parts) for a fraction, painted patches in the fit part for ``patches``."""
        if regime.patches is not None:
            return paint_patches(self.data.labels, self.regions.fit, regime.patches, self.cfg.painted_size, seed)
        mask = np.zeros(self.data.labels.shape, np.uint8)
        mask[sections_for_fraction(self.data.raw.shape[0], regime.fraction, seed)] = 1
        return mask

    def _validation(self, mask: np.ndarray) -> Box | None:
        """The validation slab when its labelled voxels can rank weights (foreground there, or the
        neuron task whose loss ranks), else None: the run keeps its last weights (always so for painted
        patches, which leave the slab unlabelled)."""
        val = _trim(self.regions.val, self.cfg.max_val_voxels, at_least=self.cfg.crop_shape[2])
        labelled = mask[val] > 0
        if not labelled.any() or (self.cfg.task != "neuron" and not (self.data.labels[val][labelled] > 0).any()):
            return None
        return val

    def _precision(self, method: str, module: Any, dm: Any) -> tuple[str, dict[str, Any] | None]:
        """``cfg.precision``, or for ``"auto"`` this model's step timed in fp32 and bf16 (cached)."""
        if self.cfg.precision != "auto":
            from ssl_em.utils.precision import resolve_precision

            return resolve_precision(self.cfg.precision, self.cfg.device.split(":")[0]), None
        if method not in self.precisions:
            from ssl_em.utils.precision import describe_record, measure_datamodule_precision

            record = measure_datamodule_precision(module, dm, self.cfg.device.split(":")[0])
            self.log(f"    {method}: {describe_record(record)}")
            self.precisions[method] = record
        return self.precisions[method]["precision"], self.precisions[method]

    def _train(self, method: str, seed: int, lr: float, steps: int, enc: str, train: Box, mask: np.ndarray,
               name: str) -> tuple[Any, dict[str, Any], dict[int, dict[str, Any]]]:
        """Fine-tune ``method``; a non-finite loss is retried once at a third of the rate. Returns the
        module (best validation weights), the run's record (``status`` "ok" or "diverged") and the
        weights after each of ``cfg.eval_steps``."""
        if time.perf_counter() > self.deadline:  # the guard never cuts a run short: it starts no new one
            raise _GuardReached
        val = self._validation(mask)
        info: dict[str, Any] = {"lr": lr, "status": "diverged", "validated": val is not None}
        for attempt_lr in (lr, lr / 3):
            module = build_module(method, self.cfg, enc, seed, attempt_lr, steps)
            dm = build_data(self.data, train, val, mask, self.cfg, seed, steps)
            precision, record = self._precision(method, module, dm)
            work = self.out / "work" / name.replace(" ", "_")
            try:
                result = fine_tune(module, dm, self.cfg, steps, work, name, precision, validate=val is not None,
                                   slab=self._validation_slab(val, mask))
            except FloatingPointError as err:
                self.log(f"    {name}: diverged at lr {attempt_lr:.1e} ({err})")
                info.setdefault("diverged_at", []).append(attempt_lr)
                continue
            finally:
                shutil.rmtree(work, ignore_errors=True)
            info.update(status="ok", lr=attempt_lr, steps=result.steps, seconds=result.seconds,
                        best_step=result.best_step, val_score=result.val_score, precision=precision,
                        precision_record=record)
            return module, info, result.snapshots
        return None, info, {}

    def _labelled_slab(self, val: Box | None, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(raw, labels, labelled sections) of the validation slab ``val``: the sections are scored, the whole
        slab is predicted (their 3-D context); None without a validation slab."""
        if val is None:
            return None
        return self.data.raw[val], self.data.labels[val], np.flatnonzero(mask[val].any(axis=(1, 2)))

    def _validation_slab(self, val: Box | None, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The labelled slab for ``validation="slab"`` (tasks whose channel 0 is the foreground), else None."""
        from ssl_em.study.train import SLAB_TASKS

        if self.cfg.validation != "slab" or self.cfg.task not in SLAB_TASKS:
            return None
        return self._labelled_slab(val, mask)

    def _score_validation(self, module: Any, val: Box | None, mask: np.ndarray, precision: str) -> dict[str, float] | None:
        """The run's final weights scored on its labelled validation sections exactly as the evaluation region
        is scored (whole sections, the task's post-processing and metrics; on the working grid): the validation
        value that picks the weights is a soft Dice over a few crops, not comparable with the evaluation's."""
        slab = self._labelled_slab(val, mask)
        if slab is None:
            return None
        raw, labels, sections = slab
        probs = predict_probabilities(module, raw, self.cfg, precision)[:, sections]
        return score(probs, labels[sections], module.task, self.data.voxel_size)

    def _pixel_classifier(self, seed: int, mask: np.ndarray,
                          ev_raw: np.ndarray) -> tuple[Any, np.ndarray, dict[str, Any]]:
        """The ``rf`` baseline on the same labels (``mask`` in the fit part): the task, its
        probabilities on the evaluation region (foreground; other channels 0) and the run record. For
        neurons it classifies boundaries (label 0) and turns them into the task's affinities
        (:func:`~ssl_em.predict.instances.boundary_affinities`), as ilastik's boundary-based workflows do."""
        from ssl_em.adapters import get_task
        from ssl_em.baselines import PixelClassifier

        cfg = self.cfg
        task = get_task(cfg.task, **cfg.task_kwargs)
        fit = self.regions.fit
        raw, labels, fit_mask = self.data.raw[fit], self.data.labels[fit], mask[fit]
        if time.perf_counter() > self.deadline:
            raise _GuardReached
        start = time.perf_counter()
        val = self._validation(mask)  # held-out labels when there are some, else the forest's out-of-bag pixels
        from_oob = val is None and cfg.calibrate and task.calibrates_from_samples
        try:
            target = labels == 0 if cfg.task == "neuron" else labels > 0  # neurons: their boundaries
            clf = PixelClassifier(seed=seed, keep_out_of_bag=from_oob).fit(raw, target, fit_mask)
        except LabelError as err:  # e.g. labelled sections without foreground in the fit part
            self.log(f"    rf: {err}")
            return task, None, {"lr": 0.0, "status": "no_training_labels", "validated": False, "steps": 0}

        def predict(raw: np.ndarray) -> np.ndarray:
            if cfg.task == "neuron":
                from ssl_em.predict.instances import boundary_affinities

                return boundary_affinities(clf.predict(raw), task.offsets)
            probs = np.zeros((task.num_outputs, *raw.shape), np.float32)
            probs[0] = clf.predict(raw)
            return probs

        info = {"lr": 0.0, "status": "ok", "validated": False, "steps": 0, "trees": clf.n_trees,
                "features": 1 + 8 * len(clf.sigmas)}
        oob = clf.out_of_bag() if from_oob else None
        info.update(self._calibrate(task, predict, mask, val, oob))
        info["seconds"] = round(time.perf_counter() - start, 1)
        return task, predict(ev_raw), info

    def _calibrate(self, task: Any, predict: Callable[[np.ndarray], np.ndarray], mask: np.ndarray,
                   val: Box | None, samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
        """``task.calibrate`` on the run's own labels: predictions (``predict`` of working-grid raw) on the
        validation slab ``val`` when the run has one, else on the fit part (or the given labelled
        ``samples``), scored on its labelled voxels; ``{"postprocess": settings}`` for the record ({}
        without calibration)."""
        if not (self.cfg.calibrate and task.calibrates):
            return {}
        box = val if val is not None else self.regions.fit
        probs = predict(np.asarray(self.data.raw[box])) if samples is None else None
        settings = task.calibrate(probs, np.asarray(self.data.labels[box]), mask[box], self.data.voxel_size,
                                  samples=samples)
        source = "the validation slab" if val is not None else "its out-of-bag pixels" if samples else "its labels"
        self.log(f"    post-processing from {source}: "
                 + (", ".join(f"{k} {v:g}" for k, v in settings.items()) or "no foreground there, defaults kept"))
        return {"postprocess": settings}

    def _lrs(self, method: str) -> tuple[float, ...]:
        return _lrs(self.cfg, method)

    def sweep(self, method: str, regime: Regime, encoder: str) -> float:
        """The rate of the method's grid whose run (``sweep_share`` of the steps, on the fit part) scores
        best on the validation slab (ties and no usable validation: the grid's centre). Painted patches
        leave nothing to validate on: they take the rate swept at the smallest fraction."""
        cfg = self.cfg
        grid = self._lrs(method)
        mid = len(grid) // 2
        if len(grid) == 1:
            return grid[0]
        if regime.patches is not None:
            if not cfg.fractions:
                return grid[mid]
            regime = Regime(fraction=cfg.fractions[0])
        key = ("sweep", method, regime.name if cfg.sweep_every_fraction else None)
        if key in self.ledger.done:
            return self.ledger.done[key]["lr"]
        mask = self.label_mask(regime, 0)
        if self._validation(mask) is None:
            # no foreground on the labelled validation sections: nothing can rank the rates, and the
            # loss alone would reward the rate that collapses to background fastest
            self.log(f"    sweep {method}: no foreground on the labelled validation sections, lr {grid[mid]:.1e}")
            return self.ledger.append(key, {"lr": grid[mid], "scores": {}})["lr"]
        steps = max(1, round(cfg.steps * cfg.sweep_share))
        sign = -1 if monitor_of(cfg.task)[1] == "min" else 1
        scores: dict[str, float] = {}
        for lr in [grid[mid], *grid[:mid], *grid[mid + 1:]]:
            _, info, _ = self._train(method, 0, lr, steps, encoder, self.regions.fit, mask,
                                  f"sweep {method} lr {lr:.1e}")
            value = info.get("val_score")
            scores[f"{lr:g}"] = -math.inf if info["status"] != "ok" or value is None else sign * value
            self.log(f"    sweep {method} lr {lr:.1e}: validation {scores[f'{lr:g}']:.3f}")
        best = max(grid, key=lambda lr: (scores[f"{lr:g}"], lr == grid[mid]))
        return self.ledger.append(key, {"lr": best, "scores": scores})["lr"]

    def _save(self) -> None:
        from ssl_em.data.volume import volume_name
        from ssl_em.utils.io import atomic_write_text

        doc = {"config": asdict(self.cfg), "pretraining": self.pretraining,
               "regions": {k: [[b.start, b.stop] for b in v] for k, v in asdict_regions(self.regions).items()},
               "evaluation_box": [[b.start, b.stop] for b in self.eval_box_original],
               "evaluation_volume": volume_name(self.eval_vol if self.eval_vol is not None else self.raw_vol),
               "plan": self.plan.to_dict(), "layout_probe": self.layout_probe,
               "normalization": self.data.normalization, "precision": self.precisions, "runs": self.runs,
               "records": self.records, "step_records": self.step_records}
        atomic_write_text(self.out / "results.json", json.dumps(doc, indent=1, default=float) + "\n")

    @staticmethod
    def _regime_fields(regime: Regime) -> dict[str, Any]:
        return {"regime": regime.name, "fraction": regime.fraction, "patches": regime.patches}

    # -- the whole study ------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.deadline = t0 + 60 * cfg.max_minutes if cfg.max_minutes is not None else math.inf
        self._choose_layout()  # before anything is keyed by the configuration (crop and batch are part of it)
        self.ledger.load()
        if self.ledger.done:
            self.log(f"{len(self.ledger.done)} finished step(s) found in {self.out / RESULTS}: skipping them")
        # baselines without an encoder (unet, rf) need no pretraining
        enc = self.encoder() if any(m in ADAPTER for m in cfg.methods) else None
        ev_raw = self.ev_work  # the working grid; scores on the original one (self.ev_gt)
        n_pairs, pair = len(cfg.regimes) * len(cfg.methods), 0
        chosen: dict[str, float] = {}
        stopped = False
        try:
            for regime in cfg.regimes:
                for method in cfg.methods:
                    pair += 1
                    self.log(f"[{pair}/{n_pairs}] {method} on {regime.name} | elapsed "
                             f"{_fmt_time(time.perf_counter() - t0)}")
                    if cfg.sweep_every_fraction or method not in chosen:
                        chosen[method] = self.sweep(method, regime, enc)
                    for seed in range(cfg.seeds):
                        self._one(method, regime, seed, chosen[method], enc, ev_raw)
        except _GuardReached:
            stopped = True
        shutil.rmtree(self.out / "work", ignore_errors=True)
        if stopped:
            self.log(f"stopped at the {cfg.max_minutes} min guard: rerun the same command to continue")
        self._save()
        write_reports(self.out, self.records, cfg, self.pretraining, self.sections_shown, self.ev_raw, self.ev_gt,
                      self.step_records)
        self.log(f"study done in {_fmt_time(time.perf_counter() - t0)}; results in {self.out}")
        return self.records

    def _one(self, method: str, regime: Regime, seed: int, lr: float, enc: str, ev_raw: np.ndarray) -> None:
        """One run: train on the working grid, predict ``ev_raw`` (the evaluation region there),
        resample the probabilities back and score them on the original grid."""
        cfg = self.cfg
        key = ("run", method, regime.name, seed)
        shown = self.out / "sections" / f"{method}_{regime.name.replace(' ', '_').replace('%', 'pc')}.npy"
        if key not in self.ledger.done:
            mask = self.label_mask(regime, seed)
            name = f"{method} {regime.name} seed {seed}"
            task, probs = None, None
            if method == "rf":
                task, probs, info = self._pixel_classifier(seed, mask, ev_raw)
            else:
                module, info, snapshots = self._train(method, seed, lr, cfg.steps, enc, self.regions.fit, mask, name)
                if module is not None:
                    task, val = module.task, self._validation(mask)
                    info.update(self._calibrate(task, lambda raw: predict_probabilities(module, raw, cfg, info["precision"]),
                                                mask, val))
                    info["val_slab"] = self._score_validation(module, val, mask, info["precision"])
                    probs = predict_probabilities(module, ev_raw, cfg, info["precision"])
                    info["trainable_params"] = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
                    from ssl_em.adapters import get_task

                    at_steps = {}
                    for step, state in sorted(snapshots.items()):  # the same run stopped earlier, its own
                        module.load_state_dict(state)  # post-processing chosen as the final weights' was
                        early_task = get_task(cfg.task, **cfg.task_kwargs)
                        self._calibrate(early_task, lambda raw: predict_probabilities(module, raw, cfg, info["precision"]),
                                        mask, val)
                        early = upsample(predict_probabilities(module, ev_raw, cfg, info["precision"]), self.ev_gt.shape)
                        at_steps[str(step)] = score(early, self.ev_gt, early_task, cfg.voxel_size)
                    if at_steps:
                        info["at_steps"] = at_steps
            metrics: dict[str, float] = {}
            if probs is not None:
                probs = upsample(probs, self.ev_gt.shape)
                metrics = score(probs, self.ev_gt, task, cfg.voxel_size)
                if seed == 0:
                    seg = task.postprocess(probs, cfg.voxel_size or (1, 1, 1))[shown_section(self.ev_gt)]
                    shown.parent.mkdir(exist_ok=True)
                    np.save(shown, seg)
            d = cfg.downsample or 1
            fit_mask = mask[self.regions.fit] > 0
            entry = {"method": method, **self._regime_fields(regime), "seed": seed,
                     "label_sections": np.flatnonzero(fit_mask.any(axis=(1, 2))).tolist(),
                     "labelled_voxels": int(fit_mask.sum()) * d * d,  # on the original grid
                     "metrics": metrics, **info}
            self.ledger.append(key, entry)
            text = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or info["status"]
            if info.get("val_slab"):
                text += " (validation slab: " + ", ".join(f"{k} {v:.3f}" for k, v in info["val_slab"].items()) + ")"
            self.log(f"    {name}: {info.get('steps', 0)} steps, lr {info['lr']:.1e}, best step {info.get('best_step')}"
                     f", {entry['labelled_voxels']} labelled voxels on {len(entry['label_sections'])} sections -> {text}")
        entry = self.ledger.done[key]
        self.runs.append({k: v for k, v in entry.items() if k not in ("key", "digest", "metrics")})
        for metric, value in entry["metrics"].items():
            self.records.append({"method": method, **self._regime_fields(regime), "seed": seed,
                                 "labelled_voxels": entry["labelled_voxels"], "metric": metric, "value": value})
        finals = {str(entry.get("steps") or cfg.steps): entry["metrics"]} if method not in NOT_TRAINED else {}
        for step, metrics in {**entry.get("at_steps", {}), **finals}.items():
            self.step_records += [{"method": method, "regime": regime.name, "seed": seed, "step": int(step),
                                   "metric": metric, "value": value} for metric, value in metrics.items()]
        if seed == 0 and shown.exists() and entry["metrics"]:  # not a file an older, different run left
            self.sections_shown[(method, regime.name)] = np.load(shown)
        self._save()


def _check_pair(raw: Any, labels: Any, what: str) -> None:
    """One-line LabelError naming ``what`` unless ``labels`` has ``raw``'s 3-D (z, y, x) shape."""
    if tuple(raw.shape) != tuple(labels.shape) or len(raw.shape) != 3:
        raise LabelError(f"{what}: labels shape {tuple(labels.shape)} does not match raw shape {tuple(raw.shape)} "
                         "(both must be (z, y, x))")


def full_of(vol: Any) -> Box:
    return tuple(slice(0, int(n)) for n in vol.shape)


class _GuardReached(Exception):
    """``max_minutes`` passed: no new run starts (finished ones are in results.jsonl)."""


def _weights_digest(encoder: str) -> str:
    """The sha256 of an exported encoder's weights (recorded in its sidecar at export)."""
    from ssl_em.models.weights_io import read_verified
    from ssl_em.utils.io import sha256_file

    record, _, weights = read_verified(encoder)
    return record.get("weights_sha256") or sha256_file(weights)


def _encoder_patch(arch: str, kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """(z, y, x) voxels the encoder's input sides must be multiples of (built on the meta device: no weights)."""
    import torch

    from ssl_em.models import create_encoder

    with torch.device("meta"):
        return tuple(create_encoder(arch, **kwargs).patch_size)


def asdict_regions(r: Regions) -> dict[str, Box]:
    return {"train": r.train, "evaluation": r.evaluation, "fit": r.fit, "val": r.val}

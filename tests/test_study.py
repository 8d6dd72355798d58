"""The label-efficiency engine: disjoint regions, reproducible sparse labels, an end-to-end tiny study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssl_em.data.labels import check_disjoint, sections_for_fraction
from ssl_em.errors import ConfigError, LabelError
from ssl_em.study import (
    METRICS,
    Study,
    StudyConfig,
    budget_units,
    headline,
    markdown_table,
    plan_regions,
)

REPO = Path(__file__).resolve().parents[1]


def _span(box, axis=1):
    return box[axis].start, box[axis].stop


def test_regions_are_disjoint_with_a_half_patch_gap():
    shape, patch = (16, 256, 128), (8, 64, 64)
    r = plan_regions(shape, patch)
    (t0, t1), (e0, e1) = _span(r.train), _span(r.evaluation)
    assert t0 == 0 and e1 == 256 and e0 - t1 >= patch[1] // 2  # gap of at least half a patch
    assert _span(r.fit)[1] == _span(r.val)[0] and _span(r.val)[1] == t1  # fit | val tile the training region
    for box in (r.train, r.evaluation, r.fit, r.val):
        assert box[0] == slice(0, 16) and box[2] == slice(0, 128)  # in-plane split: every z-section everywhere
        assert box[1].stop - box[1].start >= patch[1]
    check_disjoint(r.train, r.evaluation)
    with pytest.raises(ConfigError, match="overlap"):
        check_disjoint(r.train, (slice(0, 16), slice(t1 - 1, 256), slice(0, 128)))


def test_regions_refuse_a_volume_too_small():
    with pytest.raises(ConfigError, match="eval_slab=0.3 cannot split its 150 voxels along y"):
        plan_regions((16, 150, 128), (8, 64, 64))
    with pytest.raises(ConfigError, match=r"shape \(4, 256, 128\), read as \(z, y, x\), is smaller than the smallest "
                       r"crop \(8, 64, 64\) \(z 4 < 8\)"):
        plan_regions((4, 256, 128), (8, 64, 64))


def test_label_fractions_keep_at_least_one_section_reproducibly():
    assert len(sections_for_fraction(20, 0.01, seed=0)) == 1
    assert len(sections_for_fraction(20, 0.25, seed=0)) == 5
    assert list(sections_for_fraction(20, 1.0, seed=3)) == list(range(20))
    np.testing.assert_array_equal(sections_for_fraction(40, 0.1, seed=7), sections_for_fraction(40, 0.1, seed=7))
    draws = {tuple(sections_for_fraction(40, 0.1, seed=s)) for s in range(5)}
    assert len(draws) > 1  # seeds draw different sections


def test_config_rejects_unknown_methods_and_fractions():
    with pytest.raises(ConfigError, match="unknown methods"):
        StudyConfig(methods=("lora", "magic"))
    with pytest.raises(ConfigError, match="fractions"):
        StudyConfig(fractions=(0.0,))
    cfg = StudyConfig(methods=("lora", "scratch"), fractions=(0.1, 1.0), seeds=2, lrs={"lora": (1e-3,)})
    assert budget_units(cfg) == pytest.approx(2 * 2 * 2 + 2 * 3 * cfg.sweep_share)  # scratch sweeps 3 rates twice
    patches_only = StudyConfig(methods=("full", "scratch"), fractions=(), patches=(4,), seeds=2)
    assert budget_units(patches_only) == 2 * 2  # nothing to validate a rate on: no sweep
    with pytest.raises(ConfigError, match="steps 0"):
        StudyConfig(steps=0)
    for bad in ({"full": (-1e-3,)}, {"full": ()}, {"magic": (1e-3,)}):
        with pytest.raises(ConfigError, match="lrs"):
            StudyConfig(lrs=bad)


def test_tables_and_headline_from_records():
    recs = [{"method": m, "fraction": f, "seed": s, "metric": "iou", "value": v + 0.01 * s}
            for m, v in (("lora", 0.5), ("scratch", 0.2), ("lora_random", 0.3)) for f in (0.05, 1.0) for s in (0, 1)]
    table = markdown_table(recs, "iou")
    assert "| lora | 0.505 ± 0.005 | 0.505 ± 0.005 |" in table and "| 5% sections | 100% sections |" in table
    line = headline(recs, "mito")
    assert line.startswith("lora vs best of scratch/lora_random (lora_random) on 5% sections: +0.200 IoU"), line
    assert line.endswith("(0.505 ± 0.005 vs 0.305 ± 0.005)"), line
    # painted patches are scarcer than sections: first column, and the headline's regime
    recs += [{"method": m, "regime": "4 patches", "fraction": None, "patches": 4, "labelled_voxels": 4 * 256 ** 2,
              "seed": 0, "metric": "iou", "value": v} for m, v in (("lora", 0.4), ("scratch", 0.1))]
    for r in recs[:-2]:
        r["labelled_voxels"] = int(r["fraction"] * 20 * 1024 ** 2)
    assert "| method | 4 patches | 5% sections | 100% sections |" in markdown_table(recs, "iou")
    assert headline(recs, "mito").startswith("lora vs best of scratch/lora_random (scratch) on 4 patches: +0.300 IoU")
    # what users pick instead is a control too; the best pretrained method speaks for pretraining
    recs += [{"method": m, "regime": "4 patches", "fraction": None, "patches": 4, "labelled_voxels": 4 * 256 ** 2,
              "seed": 0, "metric": "iou", "value": v} for m, v in (("unet", 0.5), ("rf", 0.2), ("full", 0.45))]
    assert headline(recs, "mito") == ("full (best of lora/full) vs best of scratch/lora_random/unet/rf (unet) on "
                                      "4 patches: -0.050 IoU (0.450 ± 0.000 vs 0.500 ± 0.000)")


def _assert_dice_matches_iou(records: list[dict]) -> None:
    """Each run's Dice is 2 IoU / (1 + IoU) of the same segmentation: the records hold that run's own
    scores, each under its own name (a value in [0, 1] alone cannot tell)."""
    runs: dict[tuple, dict[str, float]] = {}
    for r in records:
        runs.setdefault((r["method"], r["regime"], r["seed"]), {})[r["metric"]] = r["value"]
    assert runs
    for key, m in runs.items():
        assert 0 <= m["iou"] <= 1 and m["dice"] == pytest.approx(2 * m["iou"] / (1 + m["iou"]), abs=1e-6), (key, m)


def test_tiny_study_end_to_end(tmp_path):
    from ssl_em.data.phantom import make_phantom

    target, pool = make_phantom((8, 160, 64), seed=2), make_phantom((8, 64, 64), seed=1)
    np.savez(tmp_path / "target.npz", raw=target.raw, mito=target.mito)
    np.savez(tmp_path / "pool.npz", raw=pool.raw)
    raw, labels = f"{tmp_path / 'target.npz'}:raw", f"{tmp_path / 'target.npz'}:mito"
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("lora", "scratch"), fractions=(0.25,),
                      steps=12, pretrain_steps=6, val_every=4, crop_shape=(8, 32, 32), batch_size=2, voxel_size=target.voxel_size,
                      lrs={"lora": (3e-3, 1e-2), "scratch": (1e-3,)}, sweep_share=0.5, precision="32")
    study = Study(raw, labels, [f"{tmp_path / 'pool.npz'}:raw", raw], cfg, tmp_path / "out")
    # the labelled raw is pretraining data only through its training region
    assert study._pretraining_regions() == [None, study.regions.train]
    from ssl_em.adapters.finetune import FineTuning

    steps_taken = []  # every fine-tuning step of the study is a FineTuning training step under a Trainer
    original = FineTuning.training_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FineTuning, "training_step", lambda self, b, i: steps_taken.append(i) or original(self, b, i))
        records = study.run()
    assert len(steps_taken) == 2 * 6 + 2 * 12  # the lora sweep (2 rates x 6 steps), then a 12-step run per method
    import ssl_em.study.train as study_train

    assert not {"train_for", "finetune", "predict"} & set(vars(study_train))  # no second loop left
    tmp_path = tmp_path / "out"
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["records"] == records
    assert {(r["method"], r["regime"], r["seed"]) for r in records} == {("lora", "25% sections", 0),
                                                                         ("scratch", "25% sections", 0)}
    assert {r["metric"] for r in records} == set(METRICS["mito"])
    assert all(set(r) == {"method", "regime", "fraction", "patches", "seed", "labelled_voxels", "metric", "value"}
               for r in records)
    assert {r["labelled_voxels"] for r in records} == {2 * int(np.prod([b.stop - b.start for b in study.regions.fit[1:]]))}
    _assert_dice_matches_iou(records)
    assert [run["label_sections"] for run in doc["runs"]] == [sections_for_fraction(8, 0.25, 0).tolist()] * 2
    assert doc["runs"][0]["lr"] in (3e-3, 1e-2) and doc["pretraining"]["steps"] == 6
    assert all(run["steps"] == 12 and run["status"] == "ok" for run in doc["runs"])
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["key"][0] for line in lines] == ["pretraining", "sweep", "run", "run"]
    assert len(doc["pretraining"]["data"]) == 2
    assert "| lora |" in (tmp_path / "results.md").read_text()
    for png in ("label_efficiency.png", "overlays.png", "pretrain/loss.png", "pretrain/reconstruction.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "pretrain" / "encoder" / "encoder.safetensors").exists()


def test_labelled_sampler_moves_crops_onto_rare_labelled_foreground():
    from ssl_em.data.labels import SliceMask
    from ssl_em.data.samplers import LabelledSliceSampler

    labels = np.zeros((8, 128, 128), np.uint8)
    labels[:, 100:110, 20:30] = 1  # one small object; sections 2 and 5 are labelled
    mask = SliceMask(labels.shape, [2, 5])
    rng = np.random.default_rng(0)
    sampler = LabelledSliceSampler(p_foreground=1.0, max_tries=50)
    for _ in range(10):
        box = sampler(labels.shape, (4, 32, 32), rng, labels=labels, mask=mask)
        m = mask[box]
        assert m.any() and labels[box][m].any()  # a labelled section, with foreground on it
    plain = LabelledSliceSampler(max_tries=50)  # without: most crops hold background only
    hits = [labels[b][mask[b]].any() for b in (plain(labels.shape, (4, 32, 32), rng, labels=labels, mask=mask)
                                                 for _ in range(20))]
    assert sum(hits) < 10


def test_sweep_keeps_the_grid_centre_when_validation_sections_hold_no_foreground(tmp_path):
    """The loss alone would pick the rate that collapses to background fastest (measured: every
    method then stayed at IoU ~0 with two labelled phantom sections), so no rate is trained."""
    raw = np.random.default_rng(0).integers(0, 255, (8, 160, 64), dtype=np.uint8)
    labels = np.zeros(raw.shape, np.uint8)  # empty validation part: nothing for a metric to rank
    labels[:, :40, :20] = 1  # foreground only far from the validation slab
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("scratch",), fractions=(0.25,),
                      steps=4, pretrain_steps=2, crop_shape=(8, 32, 32), batch_size=2, voxel_size=(40.0, 8.0, 8.0),
                      lrs={"scratch": (1e-3, 3e-3, 1e-2)})
    study = Study(raw, labels, [raw], cfg, tmp_path / "out")
    assert not labels[study.regions.val].any()
    from ssl_em.study.config import Regime

    assert study.sweep("scratch", Regime(fraction=0.25), "unused: no rate is trained") == 3e-3


def test_painted_patches_hold_foreground_on_distinct_sections():
    from ssl_em.data.labels import paint_patches

    labels = np.zeros((10, 300, 400), np.uint8)
    labels[2:9, 250:260, 350:360] = 1  # rare foreground, far from where a uniform patch would land
    region = (slice(0, 10), slice(0, 280), slice(0, 400))
    for seed in range(3):
        mask = paint_patches(labels, region, 4, 128, seed)
        zs = np.flatnonzero(mask.any(axis=(1, 2)))
        assert len(zs) == 4 and set(zs) <= set(range(2, 9))  # distinct sections, each with foreground
        for z in zs:
            ys, xs = np.nonzero(mask[z])
            assert np.ptp(ys) + 1 == 128 and np.ptp(xs) + 1 == 128 and ys.max() < 280  # one square, inside the region
            assert (labels[z][mask[z] > 0]).any()
    clipped = paint_patches(labels, region, 1, 512, 0)
    assert clipped.sum() == 280 * 400  # a patch larger than the region is clipped to it
    with pytest.raises(ConfigError, match="8 painted patches need 8 sections"):
        paint_patches(labels, region, 8, 128, 0)
    # painted around an object: a patch holds a blob, not a corner of one clipped by a random square
    blobs = np.zeros((4, 1000, 1000), np.uint8)
    for i, (y, x) in enumerate(np.random.default_rng(0).integers(40, 940, size=(12, 2))):
        blobs[i % 4, y:y + 20, x:x + 20] = 1
    everywhere = (slice(0, 4), slice(0, 1000), slice(0, 1000))
    for seed in range(10):
        mask = paint_patches(blobs, everywhere, 2, 64, seed)
        assert (blobs[mask > 0] > 0).sum() >= 2 * 100, seed  # at least a quarter blob per patch


def test_a_patch_regime_trains_only_on_its_patches(tmp_path):
    """The data module and rf get the painted mask and nothing else; no validation (a painter has no
    labelled slab), so the run keeps its last weights; records name the regime and its voxels."""
    from ssl_em.data.phantom import make_phantom
    import ssl_em.study.runner as runner

    target = make_phantom((8, 160, 96), seed=2)
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("scratch", "rf"), fractions=(), patches=(2,),
                      painted_size=40, steps=4, crop_shape=(2, 32, 32), batch_size=2, voxel_size=target.voxel_size,
                      lrs={"scratch": (1e-3,)}, precision="32", pretrain_steps=2)
    study = Study(target.raw, target.mito, [target.raw], cfg, tmp_path / "out")
    seen = []
    build = runner.build_data
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "build_data", lambda data, train, val, mask, *a: seen.append((val, mask)) or
                   build(data, train, val, mask, *a))
        records = study.run()
    painted = study.label_mask(cfg.regimes[0], 0)
    assert len(seen) == 1 and seen[0][0] is None and np.array_equal(seen[0][1], painted)
    assert painted.sum() == 2 * 40 * 40 and not painted[study.regions.val].any() and not painted[study.regions.evaluation].any()
    dm = build(study.data, study.regions.fit, None, painted, cfg, 0, 4)
    dm.setup("fit")
    for batch in dm.train_dataloader():  # every crop holds painted voxels, and only those are supervised
        assert (batch["mask"].flatten(1) > 0).any(1).all()
        assert int((batch["mask"] > 0).sum()) <= 2 * 40 * 40 * batch["mask"].shape[0]
    assert {r["regime"] for r in records} == {"2 patches"} and {r["labelled_voxels"] for r in records} == {3200}
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [run["validated"] for run in doc["runs"]] == [False, False]
    assert "| method | 2 patches |" in (tmp_path / "out" / "results.md").read_text()


def test_membrane_study_from_a_given_encoder_reports_voxel_size_mismatch(tmp_path):
    """Membranes are a study task too (ISBI-style binary labels); an encoder pretrained at another
    voxel size is used as given, and the log says by how much the scales differ."""
    import ssl_em
    from ssl_em.data.phantom import make_phantom

    target = make_phantom((8, 160, 64), seed=2)
    enc = ssl_em.save_encoder(ssl_em.create_encoder("unet3d_test"), tmp_path / "enc",
                              {"voxel_size": [50.0, 4.0, 4.0], "method": "spark",
                               "data": {"volumes": ["stack2.zarr/raw", "isbi.h5:raw"]}})
    cfg = StudyConfig(task="membrane", architecture="unet3d_test", encoder=str(enc), pretrain_steps=0,
                      adapter_kwargs={"train_decoder": True}, methods=("lora", "scratch"), fractions=(0.25,),
                      steps=8, val_every=4, crop_shape=(8, 32, 32), batch_size=2, precision="32",
                      voxel_size=target.voxel_size, lrs={"lora": (1e-2,), "scratch": (3e-3,)})
    lines: list[str] = []
    records = Study(target.raw, target.membrane, None, cfg, tmp_path / "out", log=lines.append).run()
    assert {r["metric"] for r in records} == set(METRICS["membrane"])
    _assert_dice_matches_iou(records)
    warning = next(line for line in lines if "VoxelSize" in line or "voxel size" in line)
    assert "(40, 8, 8) nm differs" in warning and "(50, 4, 4)" in warning
    # its own record, in the sidecar schema export-encoder and the study's pretraining both write
    assert "pretrained before the study: spark, ? steps in ? s on stack2.zarr/raw, isbi.h5:raw." in (
        tmp_path / "out" / "results.md").read_text()
    from ssl_em.study.train import build_module

    module = build_module("lora", cfg, str(enc), seed=0, lr=1e-2, steps=8)  # adapter_kwargs reach add_adapter
    assert "encoder.decoder" in " ".join(module.model.spec["modules_to_save"])


def test_device_choice_and_clear_errors():
    import torch

    from ssl_em.utils.precision import resolve_device

    visible = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == visible and resolve_device("cpu") == "cpu"
    assert StudyConfig(device="auto").device == visible  # results.json records the device used
    with pytest.raises(ConfigError, match="not one of auto, cpu, cuda"):
        StudyConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            resolve_device("cuda:0")


def _small_study(tmp_path, methods=("lora", "scratch"), lrs=None, **kw):
    from ssl_em.data.phantom import make_phantom

    target = make_phantom((8, 160, 64), seed=2)
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=methods, fractions=(0.25,), steps=8,
                      pretrain_steps=4, val_every=4, crop_shape=(8, 32, 32), batch_size=2, voxel_size=target.voxel_size,
                      lrs=lrs or {"lora": (6e-3,), "scratch": (1.5e-3,)}, precision="32", **kw)
    return lambda out, log=print: Study(target.raw, target.mito, None, cfg, tmp_path / out, log=log)


def _lines(path):
    """results.jsonl without what differs between identical runs (wall clock)."""
    from ssl_em.study.runner import TIMING

    lines = [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]
    for line in lines:
        for key in TIMING:
            line.pop(key, None)
        line.get("pretraining", {}).pop("seconds", None)
        line["pretraining"] = {k: v for k, v in line.get("pretraining", {}).items() if k != "encoder"}
    return lines


def test_same_seed_same_records_and_a_killed_study_continues_where_it_stopped(tmp_path):
    """Budgets are steps: two runs of the same study give identical records. A study killed after its
    first run, rerun, skips what it finished and ends with the lines of one never killed."""
    from ssl_em.study import runner

    study = _small_study(tmp_path, device="cpu")  # exact equality is a promise of one device's kernels
    records = study("a").run()
    assert study("b").run() == records
    calls = []
    original = runner.Study._train

    def killed_after_one(self, *args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the second run is killed
        calls.append(args)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.Study, "_train", killed_after_one)
        with pytest.raises(KeyboardInterrupt):
            study("c").run()
    assert [line["key"][0] for line in _lines(tmp_path / "c")] == ["pretraining", "run"]
    logged: list[str] = []
    assert study("c", logged.append).run() == records
    assert any("2 finished step(s) found" in line for line in logged)
    assert _lines(tmp_path / "c") == _lines(tmp_path / "a")


def test_a_diverging_run_is_retried_then_recorded_and_the_study_goes_on(tmp_path):
    logged: list[str] = []
    records = _small_study(tmp_path, lrs={"lora": (6e-3,), "scratch": (1e30,)})("out", logged.append).run()
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    scratch = next(run for run in doc["runs"] if run["method"] == "scratch")
    assert scratch["status"] == "diverged" and scratch["diverged_at"] == [1e30, 1e30 / 3]
    assert sum("diverged at lr" in line for line in logged) == 2
    assert {r["method"] for r in records} == {"lora"}  # the study went on; lora was scored


def test_the_wall_clock_guard_starts_no_run_and_never_cuts_one_short(tmp_path):
    logged: list[str] = []
    study = _small_study(tmp_path, max_minutes=1e-6)
    assert study("out", logged.append).run() == []  # past the guard once pretraining is done
    assert any("stopped at the" in line for line in logged)
    assert [line["key"][0] for line in _lines(tmp_path / "out")] == ["pretraining"]  # no cut-short run saved


def test_study_pretrains_with_a_two_view_objective(tmp_path):
    """``pretrain_method`` picks the objective (the project measured SparK + SimCLR best): two-view ones get
    two crops of one place, the exported encoder records the objective and the study fine-tunes from it."""
    from ssl_em.data.phantom import make_phantom

    with pytest.raises(ConfigError, match="pretrain_method 'magic'"):
        StudyConfig(pretrain_method="magic")
    target, pool = make_phantom((8, 160, 64), seed=2), make_phantom((8, 64, 64), seed=1)
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("lora",), fractions=(0.25,), steps=2,
                      pretrain_steps=3, pretrain_method="spark_simclr", crop_shape=(8, 32, 32), batch_size=2,
                      voxel_size=target.voxel_size, lrs={"lora": (3e-3,)}, precision="32")
    from ssl_em.adapters.finetune import FineTuning

    losses = []
    original = FineTuning.training_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FineTuning, "training_step", lambda self, b, i: losses.append(i) or original(self, b, i))
        Study(target.raw, target.mito, [pool.raw], cfg, tmp_path / "out").run()
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["pretraining"]["method"] == "spark_simclr" and doc["pretraining"]["steps"] == 3
    sidecar = json.loads((tmp_path / "out" / "pretrain" / "encoder" / "encoder.json").read_text())
    assert sidecar["metadata"]["method"] == "spark_simclr" and len(losses) == 2
    assert (tmp_path / "out" / "pretrain" / "reconstruction.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kill_at", [2, 5])  # before and after half the budget: Lightning treats them apart
def test_study_pretraining_resumes_after_a_kill(tmp_path, kill_at):
    """A long pretraining killed part-way continues from its last checkpoint when rerun: the steps and
    the loss curve add up to the budget, the checkpoints go once the encoder is exported, and it ends
    with the weights of a pretraining never killed (it restarted its crops at index 0 before)."""
    import torch
    from safetensors.torch import load_file

    from ssl_em.data.phantom import make_phantom
    from ssl_em.study.train import Progress, pretrain

    pool = make_phantom((8, 64, 64), seed=1)
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("lora",), pretrain_steps=6,
                      crop_shape=(8, 32, 32), batch_size=2, voxel_size=pool.voxel_size, precision="32")
    original = Progress.on_train_batch_end

    def killed(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == kill_at:
            raise RuntimeError("killed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Progress, "on_train_batch_end", killed)
        with pytest.raises(RuntimeError, match="killed"):
            pretrain([pool.raw], [None], cfg, tmp_path / "pre")
    assert (tmp_path / "pre" / "ckpt" / "last.ckpt").is_file()
    # the kill came before that step's checkpoint: the last one holds the step before, and as many losses
    done = kill_at - 1
    assert len(json.loads((tmp_path / "pre" / "ckpt" / "losses.json").read_text())["losses"]) == done
    lines: list[str] = []
    enc = pretrain([pool.raw], [None], cfg, tmp_path / "pre", log=lines.append)
    assert any("resuming" in line and f"step {done}" in line for line in lines)
    meta = json.loads((enc / "encoder.json").read_text())["metadata"]
    assert meta["steps"] == 6 and not (tmp_path / "pre" / "ckpt").exists()
    whole = pretrain([pool.raw], [None], cfg, tmp_path / "whole", log=lambda _: None)
    resumed, uninterrupted = load_file(enc / "encoder.safetensors"), load_file(whole / "encoder.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch, z_stride", [("unet2d_small", 1), ("unet3d_tiny", 2)])
def test_plan_crops_divide_by_the_encoders_patch(tmp_path, arch, z_stride):
    """Thin ssTEM crops as deep as the encoder's poolings need: one section for the in-plane-only U-Net,
    two for the one whose last pooling halves z; in-plane a multiple of both networks' 16."""
    from ssl_em.data.phantom import make_phantom

    ph = make_phantom((12, 192, 192), seed=0)
    cfg = StudyConfig(architecture=arch, methods=("lora", "unet"), fractions=(1.0,), voxel_size=(40.0, 8.0, 8.0),
                      downsample=1)
    study = Study(ph.raw, ph.mito, None, cfg, tmp_path / "out", log=lambda _: None)
    z, y, x = study.cfg.crop_shape
    assert z == z_stride and y % 16 == 0 and x % 16 == 0, study.cfg.crop_shape


def test_summary_lines_name_the_winner_and_whether_pretraining_paid_beyond_the_spread(tmp_path):
    from ssl_em.study import summary_lines

    def rec(method, seed, value):
        return {"method": method, "regime": "4 patches", "seed": seed, "metric": "iou", "value": value}

    close = [rec("lora", 0, 0.50), rec("lora", 1, 0.40), rec("scratch", 0, 0.42), rec("scratch", 1, 0.40),
             rec("rf", 0, 0.30), rec("rf", 1, 0.30)]
    lines = summary_lines(close, "mito", tmp_path)
    assert lines[0].startswith("winner on 4 patches: lora, IoU 0.450 ± ")
    assert lines[1].startswith("pretraining is ahead, but within the seed spread: lora 0.450")
    clear = [rec("lora", 0, 0.70), rec("lora", 1, 0.71), *close[2:]]
    assert summary_lines(clear, "mito", tmp_path)[1].startswith("pretraining pays here, beyond the seed spread")
    worse = [rec("lora", 0, 0.10), rec("lora", 1, 0.12), *close[2:]]
    assert summary_lines(worse, "mito", tmp_path)[1].startswith("pretraining does not pay here: lora 0.110")


def test_runs_are_also_scored_after_the_eval_steps(tmp_path):
    """``eval_steps`` scores the same run's weights after N optimiser steps (copies taken then, not the
    end's): the steps table and figure come from them, rf (no steps) only has its end."""
    import torch
    from lightning.pytorch import Callback

    import ssl_em.study.train as study_train
    from ssl_em.data.phantom import make_phantom

    target = make_phantom((8, 160, 96), seed=2)
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("scratch", "rf"), fractions=(), patches=(2,),
                      painted_size=40, steps=4, eval_steps=(3, 1, 9), crop_shape=(2, 32, 32), batch_size=2,
                      voxel_size=target.voxel_size, lrs={"scratch": (1e-3,)}, precision="32", pretrain_steps=2)
    assert cfg.eval_steps == (1, 3, 9)
    study = Study(target.raw, target.mito, [target.raw], cfg, tmp_path / "out")
    after_step = {}  # the first weight tensor after every optimiser step, as the run went

    class Watch(Callback):
        def on_train_batch_end(self, trainer, module, *args):
            after_step[trainer.global_step] = next(iter(module.state_dict().values())).detach().clone()

    fine_tune, taken = study_train.fine_tune, {}

    def watched_fit(module, *args, **kwargs):
        module.configure_callbacks = lambda: [Watch()]
        result = fine_tune(module, *args, **kwargs)
        taken.update(result.snapshots)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ssl_em.study.runner.fine_tune", watched_fit)
        study.run()
    assert sorted(taken) == [1, 3]  # 9 is past the run's end
    first = next(iter(taken[1]))
    for step in (1, 3):
        assert torch.equal(taken[step][first], after_step[step])
    assert not torch.equal(taken[1][first], taken[3][first]) and not torch.equal(taken[3][first], after_step[4])
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    scratch_run = next(r for r in doc["runs"] if r["method"] == "scratch")
    assert sorted(scratch_run["at_steps"]) == ["1", "3"] and set(scratch_run["at_steps"]["1"]) == set(METRICS["mito"])
    steps = {(r["method"], r["step"]) for r in doc["step_records"]}
    assert steps == {("scratch", 1), ("scratch", 3), ("scratch", 4)}  # rf trains no steps
    end = {r["metric"]: r["value"] for r in doc["step_records"] if r["step"] == 4}
    assert end == {r["metric"]: r["value"] for r in doc["records"] if r["method"] == "scratch"}
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| regime | method | 1 | 3 | 4 |" in text and "| 2 patches | scratch |" in text
    assert (tmp_path / "out" / "steps.png").read_bytes()[:4] == b"\x89PNG"


def _last_weight(module_or_state):
    """The last floating-point parameter (the head's bias or weight) of a module or a state dict."""
    state = module_or_state if isinstance(module_or_state, dict) else module_or_state.state_dict()
    return [v for v in state.values() if v.is_floating_point()][-1].detach().clone()


def test_an_ema_run_is_scored_with_the_moving_average_of_its_weights(tmp_path):
    """With ``ema_decay`` the weights a run ends with (and its ``eval_steps`` snapshots) are the exponential
    moving average of the weights after each optimiser step, and the records are another study's."""
    import torch
    from lightning.pytorch import Callback

    import ssl_em.study.train as study_train
    from ssl_em.data.phantom import make_phantom

    target = make_phantom((8, 160, 96), seed=2)
    decay = 0.6
    cfg = StudyConfig(task="mito", architecture="unet3d_test", methods=("scratch",), fractions=(), patches=(2,),
                      painted_size=40, steps=4, eval_steps=(2,), crop_shape=(2, 32, 32), batch_size=2,
                      voxel_size=target.voxel_size, lrs={"scratch": (1e-2,)}, precision="32", pretrain_steps=2,
                      ema_decay=decay)
    study = Study(target.raw, target.mito, [target.raw], cfg, tmp_path / "out")
    plain = Study(target.raw, target.mito, [target.raw], StudyConfig(**{**cfg.__dict__, "ema_decay": None}),
                  tmp_path / "plain")
    assert study.digest("scratch") != plain.digest("scratch")
    after_step, ended = {}, {}

    class Watch(Callback):
        def on_train_batch_end(self, trainer, module, *args):
            after_step[trainer.global_step] = _last_weight(module)

    fine_tune, taken = study_train.fine_tune, {}

    def watched_fit(module, *args, **kwargs):
        module.configure_callbacks = lambda: [Watch()]
        result = fine_tune(module, *args, **kwargs)
        taken.update(result.snapshots)
        ended["weights"] = _last_weight(module)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ssl_em.study.runner.fine_tune", watched_fit)
        study.run()
    average = {1: after_step[1]}
    for step in (2, 3, 4):
        average[step] = decay * average[step - 1] + (1 - decay) * after_step[step]
    assert not torch.allclose(after_step[4], average[4], atol=1e-6)  # the average is not the last weights
    torch.testing.assert_close(ended["weights"], average[4])
    torch.testing.assert_close(_last_weight(taken[2]), average[2])


def test_finished_runs_are_reused_only_for_the_same_data_and_encoder_weights(tmp_path):
    """A table grows by a seed or a method without redoing its runs, but a labelled volume changed in place
    or other weights saved under the same encoder path are never reported as the old numbers (the runs
    that do not start from those weights, scratch and rf, stay valid)."""
    import shutil
    from dataclasses import replace
    from ssl_em.data.phantom import make_phantom
    from ssl_em.models import create_encoder, save_encoder

    target = make_phantom((8, 160, 96), seed=2)
    path = tmp_path / "target.npz"
    np.savez(path, raw=target.raw, mito=target.mito)
    encoder = tmp_path / "encoder"
    save_encoder(create_encoder("unet3d_test"), encoder)

    def study(seeds=1, methods=("scratch",)):
        cfg = StudyConfig(task="mito", encoder=str(encoder), pretrain_steps=0, methods=methods, fractions=(),
                          patches=(2,), painted_size=40, steps=2, seeds=seeds, crop_shape=(2, 32, 32), batch_size=2,
                          voxel_size=target.voxel_size, lrs={"scratch": (1e-3,), "full": (1e-3,)}, precision="32")
        return Study(f"{path}:raw", f"{path}:mito", None, cfg, tmp_path / "out", log=lambda _: None)

    first = study()
    first.run()
    first_full = first.digest("full")  # read now: the weights change below
    grown = study(seeds=2, methods=("scratch", "full"))
    assert grown.digest("scratch") == first.digest("scratch")
    grown.run()
    keys = [tuple(json.loads(line)["key"]) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert keys == [("run", "scratch", "2 patches", 0), ("run", "scratch", "2 patches", 1),
                    ("run", "full", "2 patches", 0), ("run", "full", "2 patches", 1)]  # seed 0 of scratch not redone
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    save_encoder(create_encoder("unet3d_test"), encoder)  # other weights, same path
    other_weights = study()
    assert other_weights.digest("full") != first_full  # the pretrained runs are redone ...
    assert other_weights.digest("scratch") == first.digest("scratch")  # ... scratch (same architecture) is not
    assert other_weights.digest("rf") == first.digest("rf")
    # another encoder's table reuses the first table's scratch runs instead of training them again
    cfg = replace(other_weights.cfg, seeds=2, methods=("scratch",))
    logged: list[str] = []
    shared = Study(f"{path}:raw", f"{path}:mito", None, cfg, tmp_path / "other_table", log=logged.append,
                   reuse=[tmp_path / "out" / "results.jsonl"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Study, "_train", lambda *a, **k: pytest.fail("a reusable run was trained again"))
        records = shared.run()
    assert {(r["method"], r["seed"]) for r in records} == {("scratch", 0), ("scratch", 1)}
    assert sum("reused from" in line for line in logged) == 2
    assert len((tmp_path / "other_table" / "results.jsonl").read_text().splitlines()) == 2  # copied in
    moved = tmp_path / "moved"
    shutil.copytree(encoder, moved)  # the same weights elsewhere: nothing to redo
    cfg = replace(other_weights.cfg, encoder=str(moved))
    assert Study(f"{path}:raw", f"{path}:mito", None, cfg, tmp_path / "out2").digest("full") == other_weights.digest("full")
    raw = target.raw.copy()
    raw[0, :4, :4] = 0
    np.savez(path, raw=raw, mito=target.mito)  # the volume changed in place
    changed = study()
    assert changed.digest("rf") != first.digest("rf") and changed.digest("full") != other_weights.digest("full")


def test_a_pretraining_volume_changed_in_place_redoes_the_pretraining_and_what_starts_from_it(tmp_path):
    """The resume key fingerprints the unlabelled volumes a study pretrains on (shape, dtype, sampled
    tiles): another volume saved under the same name is another pretraining; scratch and rf stay. Longer
    fine-tuning (or another rate) redoes the runs but keeps the pretraining, which reads neither."""
    from ssl_em.data.phantom import make_phantom

    target, pool = make_phantom((8, 160, 96), seed=2), make_phantom((8, 96, 96), seed=1)
    np.savez(tmp_path / "target.npz", raw=target.raw, mito=target.mito)
    np.save(tmp_path / "pool.npy", pool.raw)

    def study(pretrain_steps=4, steps=2):
        cfg = StudyConfig(task="mito", architecture="unet3d_test", pretrain_steps=pretrain_steps,
                          methods=("full", "scratch", "rf"), fractions=(0.25,), steps=steps, crop_shape=(2, 32, 32),
                          batch_size=2, voxel_size=target.voxel_size, precision="32")
        return Study(f"{tmp_path / 'target.npz'}:raw", f"{tmp_path / 'target.npz'}:mito", [str(tmp_path / "pool.npy")],
                     cfg, tmp_path / "out", log=lambda _: None)

    first = study()
    before = {m: first.digest(m) for m in (None, "full", "scratch", "rf")}
    assert {m: study().digest(m) for m in before} == before  # unchanged volume: the same key
    longer = study(steps=6)
    assert longer.digest(None) == before[None] and longer.digest("full") != before["full"]
    assert study(pretrain_steps=6).digest(None) != before[None]
    changed = pool.raw.copy()
    changed[5, 40:60, 30:50] //= 2  # a small edit, away from any tile's corner
    np.save(tmp_path / "pool.npy", changed)
    after = study()
    assert after.digest(None) != before[None] and after.digest("full") != before["full"]
    assert after.digest("scratch") == before["scratch"] and after.digest("rf") == before["rf"]



def test_an_encoders_pretraining_volumes_read_from_either_sidecar_schema():
    """Study encoders saved before the sidecar had one schema list their volumes as a plain list."""
    from ssl_em.study.runner import _volumes_of

    assert _volumes_of({"data": {"volumes": ["a.zarr", "b.h5:raw"]}}) == ["a.zarr", "b.h5:raw"]
    assert _volumes_of({"data": ["a.zarr (in-plane x1/2)"]}) == ["a.zarr (in-plane x1/2)"]
    assert _volumes_of({}) == []


def test_a_separate_evaluation_volume_scores_neurons_and_the_boundary_forest(tmp_path):
    """A dataset's own test volume (gala's raw_test / neuron_test): the whole labelled volume trains, the
    scores come from all of the other one, and ``rf`` reaches neurons through boundary affinities."""
    from ssl_em.data.phantom import make_phantom

    train, test = make_phantom((8, 64, 96), seed=3), make_phantom((8, 48, 80), seed=4)
    np.savez(tmp_path / "neurons.npz", raw=train.raw, ids=train.neurons, raw_test=test.raw, ids_test=test.neurons)
    spec = f"{tmp_path / 'neurons.npz'}"
    cfg = StudyConfig(task="neuron", architecture="unet3d_test", methods=("rf",), fractions=(1.0,), steps=2,
                      crop_shape=(8, 32, 32), voxel_size=(20.0, 20.0, 20.0), precision="32")
    study = Study(f"{spec}:raw", f"{spec}:ids", None, cfg, tmp_path / "out",
                  evaluation=(f"{spec}:raw_test", f"{spec}:ids_test"))
    assert study.regions.train == (slice(0, 8), slice(0, 64), slice(0, 96))  # all of it trains
    assert study.regions.evaluation == (slice(0, 8), slice(0, 48), slice(0, 80))  # all of the other one scores
    np.testing.assert_array_equal(study.ev_gt, test.neurons)
    (record,) = [r for r in study.run() if r["metric"] == "voi"]
    # the forest's boundaries find cells: far better than one segment for the volume (VOI = H(gt))
    ids, counts = np.unique(test.neurons[test.neurons > 0], return_counts=True)
    one_segment = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
    assert record["value"] < 0.5 * one_segment
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["evaluation_volume"].endswith("neurons.npz:raw_test")
    with pytest.raises(ConfigError, match="both the evaluation volume and a pretraining volume"):
        Study(f"{spec}:raw", f"{spec}:ids", [f"{spec}:raw_test"], cfg, tmp_path / "out2",
              evaluation=(f"{spec}:raw_test", f"{spec}:ids_test"))
    # a misshaped pair is a one-line error naming the volume, before anything is written
    for pair, named in (((f"{spec}:raw", f"{spec}:ids_test"), None), ((f"{spec}:raw_test", f"{spec}:ids"), "evaluation")):
        with pytest.raises(LabelError, match=r"labels shape \(8, (48, 80|64, 96)\) does not match raw shape") as err:
            Study(*pair, None, cfg, tmp_path / "out3") if named is None else \
                Study(f"{spec}:raw", f"{spec}:ids", None, cfg, tmp_path / "out3", evaluation=pair)
        assert "neurons.npz" in str(err.value) and "\n" not in str(err.value)
        assert (named or "labelled") in str(err.value) and not (tmp_path / "out3").exists()


def test_synapse_runs_choose_their_post_processing_on_their_own_labels(tmp_path):
    """Every synapse run (network and forest) calibrates threshold and minimum cleft size on its painted
    patches and records them (the weights scored after ``eval_steps`` choose their own); turning calibration off is another study (no stale record reused), while
    for tasks without calibration the setting leaves their records valid."""
    from ssl_em.adapters.tasks import SynapseTask
    from ssl_em.data.phantom import make_phantom

    target = make_phantom((8, 160, 96), seed=2)
    kwargs = dict(task="synapse", architecture="unet3d_test", methods=("scratch", "rf"), fractions=(), patches=(2,),
                  painted_size=48, steps=4, eval_steps=(2,), crop_shape=(2, 32, 32), batch_size=2,
                  voxel_size=target.voxel_size, lrs={"scratch": (1e-3,)}, precision="32", pretrain_steps=2)
    logged: list[str] = []
    study = Study(target.raw, target.labels("synapse"), [target.raw], StudyConfig(**kwargs), tmp_path / "out",
                  log=logged.append)
    study.run()
    assert sum("post-processing from" in line for line in logged) == 3  # scratch after 2 and 4 steps, rf
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["scratch", "rf"]
    for r in runs:
        settings = r["postprocess"]
        assert settings["threshold"] in SynapseTask.THRESHOLDS and settings["min_volume_nm3"] > 0
        assert 0 <= settings["labelled_iou"] <= 1
    off = Study(target.raw, target.labels("synapse"), [target.raw], StudyConfig(**kwargs, calibrate=False), tmp_path / "out")
    assert off.digest("rf") != study.digest("rf") and list(off.ledger.load()) == [("pretraining",)]  # runs redone
    mito = {**kwargs, "task": "mito"}
    a = Study(target.raw, target.mito, [target.raw], StudyConfig(**mito), tmp_path / "m")
    b = Study(target.raw, target.mito, [target.raw], StudyConfig(**mito, calibrate=False), tmp_path / "m")
    assert a.digest("rf") == b.digest("rf")


def test_a_committed_table_still_resumes_after_a_setting_was_renamed(vnc_path, tmp_path, capsys):
    """``StudyConfig.painted_size``, ``crop_shape`` and ``val_slab`` were ``patch_size``, ``patch_shape`` and
    ``val_fraction`` when the VNC synapse table was recorded: the digest reads renamed settings by their recorded
    name (``RECORDED_NAMES``), so rerunning the table's command finds all 45 finished runs and trains nothing."""
    import importlib.util
    import shutil

    records = REPO / "benchmarks/results/vnc_synapse_label_efficiency/cnn"
    out = tmp_path / "table"
    shutil.copytree(records, out / "cnn")
    (out / "cnn" / ".ssl_em_output").touch()  # the marker of a folder ssl-em wrote (not committed with records)
    spec = importlib.util.spec_from_file_location("label_efficiency", REPO / "benchmarks/label_efficiency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--raw", f"{vnc_path}:raw", "--labels", f"{vnc_path}:synapse", "--task", "synapse",
                     "--encoder", "auto", "--fractions", "1.0", "--patches", "1,4", "--seeds", "5", "--steps", "300",
                     "--batch-size", "8", "--methods", "full,scratch,rf", "--lrs", '{"full": [0.001], "scratch": [0.001]}',
                     "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "45 finished step(s) found" in printed and "post-processing from" not in printed


def test_where_z_is_only_3_to_4x_coarser_the_study_probes_2d_and_3d_crops_and_keeps_the_better(tmp_path, vnc_path):
    """VNC made less anisotropic (in-plane x1/3: 50 x 13.8 x 13.8 nm, z 3.6x coarser): the plan's rule alone
    (2-D from 4x) takes 3-D crops; layout "auto" trains the plain U-Net briefly on both and keeps the crop that
    validates better, recording both, and every later run trains with it. Outside 2-5x nothing is probed."""
    from ssl_em.plan import downsample

    with np.load(vnc_path) as d:
        raw, mito = d["raw"][:12, 256:832, 256:832], d["mito"][:12, 256:832, 256:832]
    np.savez(tmp_path / "vnc14.npz", raw=downsample(raw, 3).astype(np.uint8), mito=downsample(mito, 3, labels=True))
    spec = str(tmp_path / "vnc14.npz")

    def study(layout: str, out: str, voxel=(50.0, 13.8, 13.8)) -> Study:
        cfg = StudyConfig(task="mito", methods=("unet",), fractions=(1.0,), steps=8, sweep_share=0.5, val_every=2,
                          lrs={"unet": (2e-3,)}, precision="32", voxel_size=voxel, layout=layout)
        return Study(f"{spec}:raw", f"{spec}:mito", None, cfg, tmp_path / out, log=lambda _: None)

    rule = study("plan", "rule")
    assert rule.cfg.crop_shape[0] == 8 and len(rule.layout_candidates) == 1  # the rule's 3-D crop, no probe

    auto = study("auto", "auto")
    assert [c[0][0] for c in auto.layout_candidates] == [8, 1]
    assert auto.regions == rule.regions  # both candidates are scored on the rule's slabs
    auto.run()
    doc = json.loads((tmp_path / "auto" / "results.json").read_text())
    tried = doc["layout_probe"]["tried"]
    assert [t["crop_shape"][0] for t in tried] == [8, 1] and all(t["steps"] == 4 for t in tried)
    assert all(isinstance(t["val_score"], float) and t["ms_per_step"] > 0 for t in tried)
    best = max(t["val_score"] for t in tried)
    close = [t for t in tried if t["val_score"] >= best - 0.02]
    assert doc["layout_probe"]["chosen"] == min(close, key=lambda t: t["ms_per_step"])["crop_shape"]
    assert list(auto.cfg.crop_shape) == doc["plan"]["crop_shape"] == doc["layout_probe"]["chosen"]
    assert "probe" in doc["plan"]["reasons"]["layout"] and doc["runs"][0]["status"] == "ok"
    # the run's weights are also scored on the validation sections as the evaluation region is: like with like
    assert set(doc["runs"][0]["val_slab"]) == {"iou", "dice", "ap50"}

    at_5x = study("auto", "five", voxel=(69.0, 13.8, 13.8))  # z 5x coarser: the rule's measured side, no probe
    assert len(at_5x.layout_candidates) == 1 and at_5x.cfg.crop_shape[0] == 1


def test_slab_validation_ranks_runs_by_the_whole_validation_slab(tmp_path):
    """validation "slab": every validation predicts the labelled validation sections as the evaluation is and the
    best weights are those of the best soft Dice over them; the default ("crops") keeps older records' digests."""
    from ssl_em.data.phantom import make_phantom

    target = make_phantom((8, 160, 64), seed=2)
    np.savez(tmp_path / "t.npz", raw=target.raw, mito=target.mito)
    spec = str(tmp_path / "t.npz")

    def study(validation: str, out: str) -> Study:
        cfg = StudyConfig(task="mito", methods=("unet",), fractions=(1.0,), steps=8, val_every=2, crop_shape=(8, 32, 32),
                          batch_size=2, voxel_size=target.voxel_size, lrs={"unet": (1e-3,)}, precision="32",
                          validation=validation)
        return Study(f"{spec}:raw", f"{spec}:mito", None, cfg, tmp_path / out, log=lambda _: None)

    crops, slab = study("crops", "a"), study("slab", "b")
    assert crops.digest("unet") != slab.digest("unet")
    assert "validation" not in crops._digest_base["config"] and slab._digest_base["config"]["validation"] == "slab"
    seen = []
    from ssl_em.study import train as study_train

    original = study_train.SlabValidation.on_validation_epoch_end
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_train.SlabValidation, "on_validation_epoch_end",
                   lambda self, trainer, module: seen.append(self.raw.shape) or original(self, trainer, module))
        slab.run()
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    val = slab._validation(slab.label_mask(study_train_regime(), 0))
    assert len(seen) == 4 and all(s == tuple(b.stop - b.start for b in val) for s in seen)  # every 2 of 8 steps
    assert 0.0 <= doc["runs"][0]["val_score"] <= 1.0 and doc["runs"][0]["best_step"] in (2, 4, 6, 8)


def study_train_regime():
    from ssl_em.study.config import Regime

    return Regime(fraction=1.0)

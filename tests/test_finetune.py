"""Fine-tuning user path through the real CLI: ``ssl-em fit`` a LoRA recipe on two labelled phantom
sections -> a deployable folder -> ``ssl-em predict --model FOLDER`` (+ instances, overlay PNG, ROI);
bad training inputs give one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import ssl_em
from ssl_em.adapters.io import load_finetuned
from ssl_em.adapters.finetune import FineTuning
from ssl_em.adapters.peft_adapters import base_weights_sha256
from ssl_em.cli import main as cli_main
from ssl_em.data.phantom import make_phantom

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes/finetune/mito_lora.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]",
         "--trainer.enable_checkpointing", "false", "--precision", "32", "--data.init_args.num_workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A random-weights unet3d_test exported as the 'pretrained' base, then 40 LoRA steps through the CLI
    on the phantom with labels on 2 z-sections (foreground-centred 8x32x32 crops, no augmentation)."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    base = ssl_em.save_encoder(ssl_em.create_encoder("unet3d_test"), root / "base", {"method": "test"})
    rc = cli_main(["fit", "--config", RECIPE, *QUIET, "--trainer.max_steps", "40", "--trainer.limit_val_batches", "0",
                   "--trainer.default_root_dir", str(root / "run"),
                   "--model.init_args.encoder", "unet3d_test", "--model.init_args.pretrained", str(base),
                   "--model.init_args.lr", "0.02", "--model.init_args.warmup_steps", "2",
                   "--model.init_args.export_dir", str(root / "model"),
                   "--data.init_args.crop_shape", "[8, 32, 32]", "--data.init_args.phantom_shape", "[24, 96, 96]",
                   "--data.init_args.batch_size", "2", "--data.init_args.val_samples", "2",
                   "--data.init_args.sampler", "foreground", "--data.init_args.augment", "false"])
    assert rc == 0
    return root


def _best_iou(prob: np.ndarray, truth: np.ndarray) -> float:
    """IoU at the best threshold: how well the probabilities separate mitochondria, calibration aside
    (40 steps on 2 sections leave the probabilities low)."""
    ious = [((prob > t) & truth).sum() / max(((prob > t) | truth).sum(), 1) for t in np.linspace(0.05, 0.95, 19)]
    return float(max(ious))


def test_lora_fit_raises_mito_iou_on_held_out_sections(trained):
    ft = load_finetuned(trained / "model")
    held_out = make_phantom((16, 96, 96), seed=11)  # another phantom: sections never seen in training
    truth = held_out.mito > 0
    x = torch.from_numpy(ft.normalization(held_out.raw))[None, None]
    L.seed_everything(0)  # the CLI's seed: the same untrained LoRA + head as at step 0
    untrained = FineTuning(task="mito", encoder="unet3d_test", pretrained=str(trained / "base")).eval()
    with torch.no_grad():
        after = torch.sigmoid(ft.model(x))[0, 0].numpy()
        before = torch.sigmoid(untrained(x))[0, 0].numpy()
    iou_after, iou_before = _best_iou(after, truth), _best_iou(before, truth)
    assert iou_after > iou_before + 0.05, f"held-out mito IoU {iou_after:.3f} after vs {iou_before:.3f} before"
    assert ft.task.name == "mito" and ft.voxel_size == (40.0, 8.0, 8.0)


def test_lora_leaves_the_base_unchanged_and_the_folder_references_it(trained):
    info = json.loads((trained / "model" / "adapter.json").read_text())
    assert Path(info["base"]["name_or_path"]) == (trained / "base").resolve()
    assert not (trained / "model" / "encoder.safetensors").exists()  # pretrained base: referenced, not copied
    assert info["metadata"]["normalization"]["mode"] == "percentile"
    ft = load_finetuned(trained / "model", merge=False)
    assert base_weights_sha256(ft.model) == info["base"]["sha256"]
    base = ssl_em.load_encoder(trained / "base")
    trained_in_full = info["adapter"]["modules_to_save"]  # the recipe trains the U-Net's decoder path
    assert any(m.startswith("encoder.decoder") for m in trained_in_full)
    frozen = {n: v for n, v in base.state_dict().items()
              if not any(("encoder." + n).startswith(m + ".") for m in trained_in_full)}
    assert frozen and any(n.startswith("stages.") and "conv" in n for n in frozen)
    for name, value in frozen.items():  # the frozen weights, read back through the adapter
        layer = ft.model.base_model.get_submodule("encoder." + name.rsplit(".", 1)[0])
        own = getattr(getattr(layer, "base_layer", layer), name.rsplit(".", 1)[1])
        torch.testing.assert_close(own, value, rtol=0, atol=0)


def test_exported_lora_folder_is_a_small_fraction_of_the_base(tmp_path):
    base = ssl_em.save_encoder(ssl_em.create_encoder("unet3d_tiny"), tmp_path / "base")
    module = FineTuning(task="mito", encoder="unet3d_tiny", pretrained=str(base), adapter_kwargs={"r": 4})
    out = module.export(tmp_path / "model")
    size = (out / "adapter.safetensors").stat().st_size
    assert size < 0.15 * (base / "encoder.safetensors").stat().st_size


def _perturb(module: FineTuning) -> FineTuning:
    """Trained-looking weights: LoRA B starts at 0, which would hide a missing adapter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    module.data_description = {"normalization": {"mode": "fixed", "low": 20.0, "high": 230.0},
                               "voxel_size": [40.0, 8.0, 8.0]}
    return module.eval()


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_random_init_export_is_self_contained(tmp_path, adapter):
    module = _perturb(FineTuning(task="mito", encoder="unet3d_test", adapter=adapter))
    module.export(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "moved")  # nothing may point outside the folder
    ft = load_finetuned(tmp_path / "moved")
    x = torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ft.model(x), module(x), atol=1e-5, rtol=1e-4)


def test_predict_cli_reproduces_the_in_memory_model(tmp_path, capsys):
    module = _perturb(FineTuning(task="mito", encoder="unet3d_test", adapter="lora"))
    module.export(tmp_path / "model")
    raw = make_phantom((16, 64, 64), seed=3).raw
    np.save(tmp_path / "raw.npy", raw)
    roi = (slice(4, 12), slice(0, 48), slice(16, 64))
    # one block = the whole ROI, no overlap: the CLI's output is exactly one forward of the crop
    rc = cli_main(["predict", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "raw.npy"),
                   "--output", str(tmp_path / "out.zarr"), "--roi", "4:12,:48,16:", "--block", "8,48,48",
                   "--overlap", "0", "--instances", "--png", "--no-progress", "--precision", "32"])
    assert rc == 0, capsys.readouterr().err
    import zarr

    got = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...]
    x = torch.from_numpy((raw[roi].astype(np.float32) - 20) / 210)[None, None]
    expected = module.predict_probabilities(x)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    instances = zarr.open_array(str(tmp_path / "out_instances.zarr"), mode="r")[...]
    assert instances.shape == (8, 48, 48) and instances.dtype == np.uint32
    assert (tmp_path / "out.png").stat().st_size > 0


def test_predict_cli_instances_are_blockwise_with_global_ids(tmp_path, capsys):
    """Synaptic clefts are connected components: across a 2 x 2 x 2 block grid the CLI's stitched
    ids must give exactly the whole volume's components of the same probabilities."""
    import zarr

    from ssl_em.utils.labels import connected_components

    torch.manual_seed(2)  # the init too (seeds 2-4 give 97-1017 objects here, 0 and 1 one): not the order of tests
    module = _perturb(FineTuning(task="synapse", encoder="unet3d_test", adapter="full"))
    with torch.no_grad():  # a bias that puts the threshold inside the output's range: many objects
        module.model.base_model.head.conv.bias.fill_(0.0)
    module.export(tmp_path / "model")
    np.save(tmp_path / "raw.npy", make_phantom((16, 64, 64), seed=3).raw)
    rc = cli_main(["predict", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "raw.npy"),
                   "--output", str(tmp_path / "p.zarr"), "--block", "8,32,32", "--overlap", "0,8,8",
                   "--instances", "--no-progress", "--precision", "32"])
    assert rc == 0, capsys.readouterr().err
    probs = zarr.open_array(str(tmp_path / "p.zarr"), mode="r")[...]
    got = zarr.open_array(str(tmp_path / "p_instances.zarr"), mode="r")[...]
    expected = connected_components(probs[0] > 0.5, 26)
    assert expected.max() > 3, "the test needs several objects"
    pairs = np.unique(np.stack([got.ravel(), expected.ravel()]), axis=1)
    assert ((pairs[0] == 0) == (pairs[1] == 0)).all()  # same foreground
    assert len(pairs[0]) == len(np.unique(got)) == len(np.unique(expected))  # one-to-one ids
    assert "instance(s)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    ph = make_phantom((24, 64, 64), seed=0)
    labels = ph.mito.astype(np.int32)
    np.save(d / "raw.npy", ph.raw)
    np.save(d / "labels.npy", labels)
    np.save(d / "labels_small.npy", labels[:, :32])
    np.save(d / "labels_empty.npy", np.zeros_like(labels))
    negative = labels.copy()
    negative[0, 0, 0] = -3
    np.save(d / "labels_negative.npy", negative)
    nan = ph.raw.astype(np.float32)
    nan[3, 4, 5] = np.nan
    np.save(d / "raw_nan.npy", nan)
    return d


@pytest.mark.parametrize("raw, labels, message", [
    ("raw.npy", "labels_small.npy", "does not match raw"),
    ("raw.npy", "labels_empty.npy", "no labelled foreground"),
    ("raw.npy", "labels_negative.npy", "negative value -3"),
    ("raw_nan.npy", "labels.npy", "NaN"),
])
def test_bad_training_inputs_give_one_line_errors(bad_inputs, tmp_path, capsys, raw, labels, message):
    rc = cli_main(["fit", "--config", RECIPE, *QUIET, "--trainer.fast_dev_run", "1",
                   "--trainer.default_root_dir", str(tmp_path), "--model.init_args.encoder", "unet3d_test",
                   "--data.init_args.raw", str(bad_inputs / raw), "--data.init_args.labels", str(bad_inputs / labels),
                   "--data.init_args.crop_shape", "[8, 32, 32]"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssl-em fit: error:")]
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("adapter, checkpointed", [("lora", True), ("full", False), ("frozen", False)])
def test_peft_adapters_checkpoint_activations_by_default(adapter, checkpointed):
    """A frozen conv still saves its input for backward: LoRA only saves memory with checkpointing."""
    module = FineTuning(task="mito", encoder="unet3d_test", adapter=adapter)
    stages = [m for m in module.model.modules() if hasattr(m, "grad_checkpointing")]
    assert stages and all(m.grad_checkpointing == checkpointed for m in stages)
    forced = FineTuning(task="mito", encoder="unet3d_test", adapter=adapter, grad_checkpointing=False)
    assert not any(m.grad_checkpointing for m in forced.model.modules() if hasattr(m, "grad_checkpointing"))


def test_validation_soft_dice_ranks_runs_that_predict_no_foreground_yet():
    """A short sweep's runs all have IoU 0 before any voxel crosses 0.5; the soft Dice the study monitors
    still tells the run that moved towards the foreground from one that did not, and is ~Dice once sure."""
    module = FineTuning(task="mito", encoder="unet3d_test", adapter="full")
    labels = np.zeros((1, 1, 2, 16, 16), dtype=np.int64)
    labels[..., 4:10, 4:10] = 1
    batch = {"raw": torch.zeros(1, 1, 2, 16, 16), "label": torch.from_numpy(labels)}

    def logged(fg_logit: float, bg_logit: float) -> dict[str, float]:
        logits = torch.full((1, module.task.num_outputs, 2, 16, 16), bg_logit)
        logits[:, 0][torch.from_numpy(labels[:, 0] > 0)] = fg_logit
        values: dict[str, float] = {}
        module.forward = lambda x: logits  # type: ignore[method-assign]
        module.log = lambda name, value, **kw: values.__setitem__(name, float(value))  # type: ignore[method-assign]
        module.validation_step(batch, 0)
        return values

    timid, bolder, sure = logged(-4.0, -6.0), logged(-1.0, -6.0), logged(6.0, -6.0)
    assert timid["val/iou"] == bolder["val/iou"] == 0.0
    assert bolder["val/soft_dice"] > 3 * timid["val/soft_dice"] > 0
    assert sure["val/iou"] == 1.0 and sure["val/soft_dice"] > 0.99


def test_a_recipe_task_takes_the_data_voxel_size_for_its_boundaries():
    """``ssl-em fit`` builds the task from the recipe, without a voxel size: it takes the data's, so
    mitochondrion boundaries follow the data's anisotropy (per section for the 40 x 8 x 8 nm phantom)."""
    import lightning as L

    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.data.datamodule import EMDataModule

    module = FineTuning(task="mito", encoder="unet3d_test", adapter="full", export_on_fit_end=False)
    assert module.task.voxel_size is None
    data = EMDataModule(task="mito", crop_shape=(8, 32, 32), batch_size=2, phantom_shape=(16, 96, 96),
                        samples_per_epoch=2, val_fraction=0, num_workers=0)
    L.Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").fit(module, datamodule=data)
    assert module.task.voxel_size == [40.0, 8.0, 8.0]


def test_cli_fine_tuning_chooses_the_synapse_post_processing_and_the_folder_carries_it(tmp_path, capsys):
    """``ssl-em fit`` of the synapse recipe (a few steps from random init on the phantom): when fitting ends
    the task chooses threshold and minimum cleft size on the labelled validation sections, and the
    exported folder's task is rebuilt with them; ``calibrate_on_fit_end false`` keeps the defaults."""
    from ssl_em.adapters.tasks import SynapseTask

    def fit(out: Path, *extra: str) -> int:
        return cli_main(["fit", "--config", str(REPO / "recipes/finetune/synapse_lora.yaml"), *QUIET,
                         "--trainer.max_steps", "6", "--trainer.limit_val_batches", "0",
                         "--trainer.default_root_dir", str(out / "run"), "--model.init_args.encoder", "unet3d_test",
                         "--model.init_args.pretrained", "null", "--model.init_args.adapter", "full",
                         "--model.init_args.export_dir", str(out / "model"),
                         "--data.init_args.crop_shape", "[8, 32, 32]", "--data.init_args.phantom_shape", "[24, 96, 96]",
                         "--data.init_args.batch_size", "2", "--data.init_args.samples_per_epoch", "12", *extra])

    assert fit(tmp_path / "a") == 0
    assert "post-processing chosen on the labels: threshold" in capsys.readouterr().out
    chosen = load_finetuned(tmp_path / "a" / "model").task
    kwargs = load_finetuned(tmp_path / "a" / "model").info["metadata"]["task_kwargs"]
    assert kwargs["threshold"] == chosen.threshold and chosen.threshold in SynapseTask.THRESHOLDS
    assert kwargs["min_volume_nm3"] == chosen.min_volume_nm3 > 0
    assert fit(tmp_path / "b", "--model.init_args.calibrate_on_fit_end", "false") == 0
    assert "post-processing chosen" not in capsys.readouterr().out
    default = load_finetuned(tmp_path / "b" / "model").task
    assert (default.threshold, default.min_volume_nm3) == (SynapseTask().threshold, SynapseTask().min_volume_nm3)


def test_training_targets_are_made_in_the_dataloader_workers():
    """Fine-tuning hands its task's ``crop_targets`` to the data module: batches from a worker process
    carry the affinities (neurons of the phantom, augmented crops) the training step used to compute
    itself from the labels, value for value, and the step receives them without labels."""
    from ssl_em.data.datamodule import EMDataModule

    def data(workers: int) -> EMDataModule:
        return EMDataModule(task="neuron", crop_shape=(8, 32, 32), batch_size=2, phantom_shape=(16, 96, 96),
                            samples_per_epoch=4, val_fraction=0, num_workers=workers)

    module = FineTuning(task="neuron", encoder="unet3d_test", adapter="full", export_on_fit_end=False,
                        calibrate_on_fit_end=False)
    seen: list[set[str]] = []

    class Keys(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(set(batch))

    workers = data(1)
    L.Trainer(fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", callbacks=[Keys()]).fit(module, datamodule=workers)
    assert seen == [{"raw", "target", "target_mask"}]
    assert workers.label_transform is not None
    in_workers = next(iter(workers.train_dataloader()))

    in_step = data(0)
    in_step.setup("fit")
    plain = next(iter(in_step.train_dataloader()))  # same seed: the same crops, labels not yet targets
    target, mask = module.task.batch_targets(plain["label"].numpy(), plain["mask"].numpy())
    assert torch.equal(in_workers["raw"], plain["raw"])
    assert in_workers["target"].shape == (2, module.task.num_outputs, 8, 32, 32)
    assert 0 < float(in_workers["target"].mean()) < 1
    np.testing.assert_array_equal(in_workers["target"].numpy(), target)
    np.testing.assert_array_equal(in_workers["target_mask"].numpy(), mask)


def test_a_step_with_a_non_finite_gradient_is_skipped_and_training_goes_on():
    """oneDNN's bf16 weight gradient can return a few NaNs on some CPUs (benchmarks/bf16_conv_nan.py): such a
    step is skipped instead of turning every weight NaN through AdamW; the other steps still train."""
    from ssl_em.data.datamodule import EMDataModule

    torch.manual_seed(0)
    module = FineTuning(task="mito", encoder="unet3d_test", adapter="full", export_on_fit_end=False)
    data = EMDataModule(task="mito", crop_shape=(8, 32, 32), batch_size=2, phantom_shape=(16, 96, 96),
                        samples_per_epoch=4, val_fraction=0, num_workers=0)
    weight = next(p for n, p in module.named_parameters() if n.endswith("conv1.weight"))
    calls = []

    def poison_second_step(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad.index_fill(0, torch.tensor([0]), float("nan")) if len(calls) == 2 else grad

    weight.register_hook(poison_second_step)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    snapshots = []

    class AfterStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            snapshots.append(weight.detach().clone())

    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", callbacks=[AfterStep()])
    trainer.fit(module, datamodule=data)
    assert len(calls) == 4 and module.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert torch.equal(snapshots[1], snapshots[0])  # the poisoned step changed nothing
    assert not torch.equal(snapshots[2], snapshots[1]) and not torch.equal(snapshots[0], before[next(
        n for n, p in module.named_parameters() if p is weight)])

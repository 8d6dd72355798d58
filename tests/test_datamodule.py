"""EMDataModule: batches from file specs, disjoint validation, sparse labels, checkpoint record."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from ssl_em.data.datamodule import EMDataModule
from ssl_em.errors import ConfigError

pytest.importorskip("ssl_em.data.volume", reason="ssl_em.data.volume (open_volume) is not written yet")


@pytest.fixture(scope="module")
def npy_specs(tmp_path_factory, vnc_path):
    """Real VNC raw/mito (20, 96, 96) saved as .npy specs."""
    out = tmp_path_factory.mktemp("vnc")
    with np.load(vnc_path) as d:
        np.save(out / "raw.npy", d["raw"][:, 300:396, 300:396])
        np.save(out / "mito.npy", d["mito"][:, 300:396, 300:396])
    return str(out / "raw.npy"), str(out / "mito.npy")


def _dm(**kw):
    base = dict(crop_shape=(4, 32, 32), batch_size=2, samples_per_epoch=4, val_samples=2, voxel_size=(50, 4.6, 4.6))
    return EMDataModule(**{**base, **kw})


def test_supervised_batches_and_disjoint_validation(npy_specs):
    raw, mito = npy_specs
    dm = _dm(raw=raw, labels=mito, val_fraction=0.25)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["raw"].shape == batch["label"].shape == batch["mask"].shape == (2, 1, 4, 32, 32)
    assert batch["raw"].dtype == torch.float32 and batch["label"].dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    assert val["raw"].shape == (2, 1, 4, 32, 32)
    train_z = dm.train_set.sources[0].raw.offset[0], dm.train_set.sources[0].raw.shape[0]
    val_z = dm.val_set.sources[0].raw.offset[0], dm.val_set.sources[0].raw.shape[0]
    assert train_z == (0, 15) and val_z == (15, 5)  # last quarter of the 20 sections, disjoint
    d = dm.describe()
    assert d["voxel_size"] == [50.0, 4.6, 4.6] and d["normalization"]["mode"] == "percentile"
    assert 0 <= d["normalization"]["low"] < d["normalization"]["high"] <= 255
    assert dm.normalization.fitted and dm.voxel_size == (50.0, 4.6, 4.6)


def test_n_label_sections_keep_few_training_sections(npy_specs):
    raw, mito = npy_specs
    dm = _dm(raw=raw, labels=mito, n_label_sections=2, val_fraction=0.25)
    dm.setup("fit")
    mask = dm.train_set.sources[0].mask
    per_slice = np.asarray(mask[(slice(0, 15), slice(0, 96), slice(0, 96))]).any(axis=(1, 2))
    assert per_slice.sum() == 2
    for i in range(4):  # every training crop holds a supervised section
        assert dm.train_set[i]["mask"].sum() > 0
    assert dm.val_set[0]["mask"].min() == 1  # validation stays densely labelled


def test_the_old_name_label_slices_still_chooses_the_same_sections_with_a_deprecation(npy_specs):
    raw, mito = npy_specs
    with pytest.warns(DeprecationWarning, match="n_label_sections"):
        old = _dm(raw=raw, labels=mito, label_slices=2, val_fraction=0.25)
    new = _dm(raw=raw, labels=mito, n_label_sections=2, val_fraction=0.25)
    old.setup("fit"), new.setup("fit")
    box = (slice(0, 15), slice(0, 96), slice(0, 96))
    np.testing.assert_array_equal(np.asarray(old.train_set.sources[0].mask[box]),
                                  np.asarray(new.train_set.sources[0].mask[box]))
    assert old.hparams.n_label_sections == 2 and "label_slices" not in old.hparams


def test_the_crops_old_name_patch_shape_still_sets_the_crop_with_a_deprecation(npy_specs):
    """Recipes, scripts and checkpoints written before the rename still give the same crops."""
    import ssl_em

    raw, mito = npy_specs
    with pytest.warns(DeprecationWarning, match="crop_shape"):
        old = _dm(raw=raw, labels=mito, patch_shape=(2, 48, 40))
    old.setup("fit")
    assert old.crop_shape == (2, 48, 40) and old.hparams.crop_shape == (2, 48, 40) and "patch_shape" not in old.hparams
    assert tuple(old.train_set[0]["raw"].shape[-3:]) == (2, 48, 40)
    assert old.describe()["crop_shape"] == [2, 48, 40]
    with pytest.warns(DeprecationWarning, match="crop_shape"):
        net = ssl_em.create_encoder("unet_small", spacing=(8, 8, 8), patch_shape=(32, 64, 64))
    same = ssl_em.create_encoder("unet_small", spacing=(8, 8, 8), crop_shape=(32, 64, 64))
    assert net.encoder_config == same.encoder_config and net.pools_zyx == same.pools_zyx
    assert net.pools_zyx != ssl_em.create_encoder("unet_small").pools_zyx  # the crop was read: 3-D, not in-plane


def test_two_views_with_persistent_workers(npy_specs):
    raw, _ = npy_specs
    dm = _dm(unlabeled=[raw, raw], two_views=True, num_workers=2)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    batch = next(iter(loader))
    assert batch["view1"].shape == batch["view2"].shape == (2, 1, 4, 32, 32)
    assert batch["overlap1"].shape == (2, 3, 2)
    assert len(dm.describe()["normalizations"]) == 2
    del batch, loader  # stop the persistent workers here rather than in a later test
    gc.collect()


def test_state_dict_restores_normalization(npy_specs):
    raw, _ = npy_specs
    dm = _dm(raw=raw, augment=False)
    dm.setup("fit")
    state = dm.state_dict()
    restored = {**state, "normalizations": [{**state["normalization"], "low": 0.0, "high": 255.0}]}
    for set_up_first in (False, True):  # Lightning restores after setup(): both orders must work
        again = _dm(raw=raw, augment=False)
        if set_up_first:
            again.setup("fit")
        again.load_state_dict(restored)
        again.setup("fit")
        assert (again.normalization.low, again.normalization.high) == (0.0, 255.0)
        assert again.train_set.sources[0].norm.high == 255.0


def test_config_errors():
    with pytest.raises(ConfigError, match="without raw"):
        EMDataModule(labels="x.npy")
    with pytest.raises(ConfigError, match="val_fraction"):
        EMDataModule(val_fraction=1.5)
    with pytest.raises(ConfigError, match="mode"):
        EMDataModule(normalization="zscore")


def test_lightning_fit_sees_new_crops_each_epoch(npy_specs, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 1, 1)
            self.first: list[torch.Tensor] = []

        def training_step(self, batch, i):
            if i == 0:
                self.first.append(batch["raw"].clone())
            return self.conv(batch["raw"]).mean()

        def validation_step(self, batch, i):
            return self.conv(batch["raw"]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    raw, mito = npy_specs
    dm, model = _dm(raw=raw, labels=mito, val_fraction=0.25), Probe()
    trainer = L.Trainer(max_epochs=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    assert len(model.first) == 2 and not torch.equal(model.first[0], model.first[1])
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # the datamodule's record travels in the checkpoint
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["EMDataModule"]["voxel_size"] == [50.0, 4.6, 4.6]
    assert ckpt["EMDataModule"]["normalization"] == dm.normalization.to_dict()


def test_phantom_default():
    pytest.importorskip("ssl_em.data.phantom", reason="ssl_em.data.phantom (make_phantom) is not written yet")
    dm = EMDataModule(phantom_shape=(16, 64, 64), crop_shape=(4, 32, 32), batch_size=2, samples_per_epoch=2,
                      task="mito")
    batch = next(iter(dm.train_dataloader()))
    assert batch["raw"].shape == (2, 1, 4, 32, 32) and "label" in batch
    assert dm.describe()["voxel_size"] is not None


def test_z_section_positives_through_the_datamodule():
    """min_view_shift of a patch depth along z: views share no section, in training and validation
    (the validation slab is made deep enough for the two views)."""
    dm = EMDataModule(two_views=True, crop_shape=(4, 32, 32), min_view_shift=(4, 0, 0), max_view_shift=(6, 4, 4),
                      phantom_shape=(24, 64, 64), batch_size=2, samples_per_epoch=4, val_samples=2, augment=False)
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert batch["view1"].shape == (2, 1, 4, 32, 32)
        assert batch["overlap1"][:, 0].tolist() == [[0, 4], [0, 4]]
        assert not torch.equal(batch["view1"], batch["view2"])


def test_label_sections_outside_the_volume_are_a_one_line_error():
    from ssl_em.data.phantom import make_phantom

    ph = make_phantom((8, 64, 64), seed=2)
    for sections in ([8], [-1], []):
        dm = EMDataModule(raw=ph.raw, labels=ph.mito, task="mito", crop_shape=(4, 32, 32), batch_size=2,
                          samples_per_epoch=2, val_fraction=0, label_sections=sections)
        with pytest.raises(ConfigError, match="label_sections .* must be z indices in 0..7"):
            dm.setup("fit")


def test_calibration_region_is_the_labelled_validation_part_else_the_training_labels(npy_specs):
    """Where a task chooses its post-processing after fine-tuning: the validation sections (labelled in
    full), normalised as training crops are; without validation, the training part with only the sections
    the user labelled marked; cut in y and x to the voxel budget; None for unlabelled data."""
    raw, mito = npy_specs
    dm = _dm(raw=raw, labels=mito, task="mito", val_fraction=0.2)
    assert dm.calibration_region() is None  # before setup
    dm.setup("fit")
    image, labels, mask = dm.calibration_region()
    assert image.shape == labels.shape == mask.shape == (4, 96, 96) and image.dtype == np.float32
    np.testing.assert_array_equal(labels, np.load(mito)[16:])
    np.testing.assert_allclose(image, dm.normalization(np.load(raw)[16:]), atol=1e-6)
    assert mask.all()
    image, labels, mask = dm.calibration_region(max_voxels=4 * 40 * 40)
    assert image.shape == (4, 40, 40)  # at least a crop's side (32), centred
    np.testing.assert_array_equal(labels, np.load(mito)[16:, 28:68, 28:68])
    few = _dm(raw=raw, labels=mito, task="mito", val_fraction=0, label_sections=[3, 11])
    few.setup("fit")
    image, labels, mask = few.calibration_region()
    assert image.shape == (20, 96, 96) and np.flatnonzero(mask.any(axis=(1, 2))).tolist() == [3, 11]
    unlabelled = _dm(raw=raw, val_fraction=0.2)
    unlabelled.setup("fit")
    assert unlabelled.calibration_region() is None

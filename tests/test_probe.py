"""Frozen-feature linear probe: feature sampling, label-carrying features, CLI, callback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ssl_em
from ssl_em.errors import ConfigError
from ssl_em.pretrain.probe import load_labelled, run_probe, sample_features
from ssl_em.pretrain.validate import main


class VoxelEncoder(nn.Module):
    """Feature of every voxel = its intensity (and its square): patch (1, 1, 1), the contract's minimum."""

    patch_size = (1, 1, 1)
    embed_dim = 2

    def grid_size(self, shape):
        return tuple(shape[-3:])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.square()], 1).flatten(2).transpose(1, 2)


def test_sample_features_reads_each_voxel_across_tiles() -> None:
    rng = np.random.default_rng(1)
    raw = rng.random((6, 20, 24)).astype(np.float32)
    pts = np.stack([rng.integers(0, n, 200) for n in raw.shape], 1)
    feats = sample_features(VoxelEncoder(), raw, pts, tile=(4, 8, 16))  # ragged tiles, the last shifted back
    assert torch.allclose(feats[:, 0], torch.from_numpy(raw[tuple(pts.T)]), atol=1e-6)
    vit = ssl_em.create_encoder("vit3d_test_patch4")
    assert sample_features(vit, raw[:4, :16, :16], pts[:5] % 4).shape == (5, 32)


def test_probe_separates_features_that_carry_the_label() -> None:
    rng = np.random.default_rng(2)
    labels = np.zeros((12, 32, 32), np.uint32)
    labels[:, 8:20, 10:22] = 7
    raw = (labels > 0) * 1.0 + 0.15 * rng.standard_normal(labels.shape)
    good = run_probe(VoxelEncoder(), raw, labels, n_train=3000, n_test=3000, normalize=False)
    assert good.ap > 0.95 and good.iou > 0.8 and good.feature == "tokens"
    noise = run_probe(VoxelEncoder(), rng.standard_normal(labels.shape), labels, n_train=3000, n_test=3000)
    assert noise.ap < good.chance_ap + 0.1  # no signal -> about chance
    with pytest.raises(ConfigError):
        run_probe(VoxelEncoder(), raw, np.zeros_like(labels))


def test_validate_cli_random_and_exported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["--phantom-shape", "24", "64", "64", "--samples", "2000", "--tile", "8", "32", "32"]
    out = tmp_path / "probe.json"
    png = tmp_path / "probe.png"
    assert main(["--encoder", "unet3d_test", *common, "--json", str(out), "--png", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    record = json.loads(out.read_text())
    assert record["weights"] == "random init, seed 0" and record["task"] == "mito"
    # random features still carry intensity: AP 1.3-2.0x chance over init seeds 0-3 (0.186 vs 0.128 at 0)
    assert 0 < record["chance_ap"] < record["ap"] <= 1 and record["n_train"] == 2000
    assert main(["--encoder", "unet3d_test", *common, "--json", str(out)]) == 0  # the baseline is reproducible
    assert json.loads(out.read_text())["ap"] == record["ap"]
    from ssl_em.models.weights_io import save_encoder

    save_encoder(ssl_em.create_encoder("unet3d_test"), tmp_path / "enc")
    raw, mito = load_labelled(phantom_shape=(24, 64, 64))
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "mito.npy", mito)
    assert main(["--encoder", str(tmp_path / "enc"), "--raw", str(tmp_path / "raw.npy"), "--labels",
                 str(tmp_path / "mito.npy"), "--feature", "dense", *common]) == 0
    assert "pretrained" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="without labels"):
        main(["--encoder", "unet3d_test", "--raw", str(tmp_path / "raw.npy")])


def test_probe_and_collapse_callbacks_in_training(tmp_path: Path) -> None:
    import lightning as L

    from ssl_em.data.datamodule import EMDataModule
    from ssl_em.pretrain.callbacks import CollapseMonitor
    from ssl_em.pretrain.module import Pretraining
    from ssl_em.pretrain.probe import ProbeCallback

    probe = ProbeCallback(every_n_steps=2, phantom_shape=(24, 64, 64), n_train=1000, n_test=1000, max_iter=20)
    collapse = CollapseMonitor(every_n_steps=1)
    model = Pretraining(encoder="unet3d_test", method="simclr", method_kwargs={"hidden_dim": 16, "out_dim": 8},
                        warmup_steps=1)
    data = EMDataModule(two_views=True, crop_shape=(8, 32, 32), batch_size=2, phantom_shape=(16, 64, 64),
                        samples_per_epoch=4, val_fraction=0)
    trainer = L.Trainer(max_steps=3, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="log"),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe, collapse], default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert [step for step, _ in probe.history] == [0, 2, 3]  # the untrained baseline, every 2 steps, the end
    rows = (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [r.split(",") for r in rows[1:]]
    probed = [int(r[header.index("step")]) for r in logged if r[header.index("probe/ap")]]
    assert probed == [0, 2, 3]
    assert {"probe/ap", "probe/iou", "collapse/std", "collapse/effective_rank"} <= set(trainer.callback_metrics)

"""Encoders shipped inside the package: offline load by name, timm pretrained=True, card, integrity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ssl_em
from ssl_em.errors import CheckpointError, ConfigError
from ssl_em.models.pretrained import (VoxelSizeWarning, check_voxel_size, list_pretrained, model_card,
                                      pretrained_dir)

SHIPPED = list_pretrained()
REPO = Path(__file__).resolve().parent.parent


def test_at_least_one_encoder_ships_and_fits_in_the_package():
    assert SHIPPED, "no encoder under ssl_em/weights"
    for name in SHIPPED:
        weights = pretrained_dir(name) / "encoder.safetensors"
        assert weights.stat().st_size <= 25 * 2**20, f"{name} weights exceed 25 MB"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_way_to_load_by_name_gives_the_file_s_features(name, tmp_path):
    import timm

    arch, tag = name.split(".", 1)
    copy = tmp_path / "copy"
    shutil.copytree(pretrained_dir(name), copy)
    from_file = ssl_em.load_encoder(copy)
    x = torch.rand(1, 1, *[2 * p for p in from_file.patch_size])
    with torch.no_grad():
        reference = from_file.forward_features(x)
        for model in (ssl_em.load_encoder(name), timm.create_model(name, pretrained=True),
                      timm.create_model(arch, pretrained=True), ssl_em.create_encoder(name, pretrained=True)):
            assert torch.equal(model.eval().forward_features(x), reference)
        random = timm.create_model(arch).eval().forward_features(x)
    assert not torch.allclose(random, reference), "pretrained=False must stay a random init"
    assert from_file.pretrained_metadata["metadata"]["voxel_size"], "the sidecar must say the voxel size"
    assert name in timm.list_pretrained(f"{arch}*")


def test_architecture_without_shipped_weights_refuses_pretrained():
    import timm

    unshipped = next(a for a in ssl_em.list_encoders("unet3d*") if not list_pretrained(f"{a}.*"))
    with pytest.raises(ConfigError, match="no shipped weights"):
        timm.create_model(unshipped, pretrained=True)


@pytest.mark.parametrize("name", SHIPPED[:1])
def test_corrupted_or_mismatched_weights_give_one_line_errors(name, tmp_path):
    copy = tmp_path / "enc"
    shutil.copytree(pretrained_dir(name), copy)
    data = bytearray((copy / "encoder.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last tensor
    (copy / "encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256") as err:
        ssl_em.load_encoder(copy)
    assert "\n" not in str(err.value)
    # weights of another shape under the same name: overriding the architecture cannot load them
    arch = name.split(".", 1)[0]
    widths = ssl_em.load_encoder(name).encoder_config["kwargs"]["widths"]
    with pytest.raises(CheckpointError, match="shape") as err:
        ssl_em.create_encoder(name, pretrained=True, widths=[2 * w for w in widths])
    assert "\n" not in str(err.value) and arch


@pytest.mark.parametrize("name", SHIPPED)
def test_model_card_lists_every_training_volume_and_its_licence(name, capsys):
    record = json.loads((pretrained_dir(name) / "encoder.json").read_text())
    card = model_card(name)
    volumes = record["metadata"]["data"]["volumes"]
    assert volumes
    for volume in volumes:
        stem = volume.split("/")[-1].split(":")[0]
        assert stem in card, f"the card does not list training volume {stem}"
    for section in ("Licence", "Voxel size", "Recipe", "Measured"):
        assert section.lower() in card.lower(), f"card lacks a {section} section"
    assert (pretrained_dir(name) / "loss.png").is_file()
    from ssl_em.cli import main

    assert main(["models", "--info", name]) == 0
    assert "Licence" in capsys.readouterr().out


def test_voxel_size_mismatch_is_reported_with_the_numbers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_voxel_size((50, 4.6, 4.6), (50, 4.6, 4.6)) is None
        assert check_voxel_size((45, 5, 5), (50, 4.6, 4.6)) is None  # within 25 %
        assert check_voxel_size(None, (50, 4.6, 4.6)) is None
    with pytest.warns(VoxelSizeWarning, match=r"\(8, 8, 8\) nm differs .*\(50, 4.6, 4.6\)"):
        zoom = check_voxel_size((8, 8, 8), (50, 4.6, 4.6))
    assert zoom == pytest.approx((8 / 50, 8 / 4.6, 8 / 4.6))


def test_a_bare_architecture_name_never_loads_shipped_weights(tmp_path, monkeypatch):
    """``unet_small`` means the architecture (random init in probes and studies); only the tagged
    name ``unet_small.spark_vnc_isbi`` loads the shipped weights."""
    monkeypatch.setenv("SSL_EM_ENCODERS", str(tmp_path))
    arch = SHIPPED[0].split(".", 1)[0]
    with pytest.raises(CheckpointError, match="no encoder folder"):
        ssl_em.load_encoder(arch)


def test_timm_knows_the_encoders_after_a_package_probed_for_timm_first():
    """``import ssl_em`` registers the encoders when timm is imported; peft imports transformers, which
    probes for timm with ``importlib.util.find_spec`` without importing it. The hook left at that probe,
    so after ``import ssl_em.adapters`` timm did not know ``unet_small``."""
    code = ("import importlib.util, ssl_em; assert importlib.util.find_spec('timm') is not None;"
            "import timm; enc = timm.create_model('unet_small', pretrained=True);"
            "print(enc.pretrained_metadata['metadata']['steps'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "5400"

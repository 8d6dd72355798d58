"""Encoder export: safetensors + JSON round trip, checkpoint extraction, and every refusal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from ssl_em.errors import CheckpointError
from ssl_em.models import create_encoder, load_encoder, save_encoder
from ssl_em.pretrain.export_encoder import export_from_checkpoint, main as export_main
from ssl_em.models.vit3d import VisionTransformer3D

X = torch.randn(1, 1, 4, 32, 48)


@pytest.fixture
def model() -> VisionTransformer3D:
    torch.manual_seed(0)
    return create_encoder("vit3d_test_patch2x16", pos_embed="learned", img_size=(4, 32, 32)).eval()


@pytest.fixture
def exported(model, tmp_path) -> Path:
    return save_encoder(model, tmp_path / "enc", {"voxel_size": [50, 4.6, 4.6], "method": "mae", "steps": 3})


def test_round_trip_gives_identical_features(model, exported):
    for path in (exported, exported / "encoder.safetensors", exported / "encoder.json", str(exported)):
        loaded = load_encoder(path)
        assert not loaded.training
        torch.testing.assert_close(loaded.forward_features(X), model.forward_features(X), rtol=0, atol=0)
    meta = loaded.pretrained_metadata
    assert meta["architecture"] == "vit3d_test_patch2x16" and meta["patch_size"] == [2, 16, 16]
    assert meta["embed_dim"] == 32 and meta["format_version"] == 1 and meta["library_version"]
    assert meta["metadata"] == {"voxel_size": [50, 4.6, 4.6], "method": "mae", "steps": 3}
    assert loaded.encoder_config == model.encoder_config


def test_load_by_name_from_encoder_home(exported, monkeypatch):
    monkeypatch.setenv("SSL_EM_ENCODERS", str(exported.parent))
    assert load_encoder("enc").embed_dim == 32
    with pytest.raises(CheckpointError, match="no encoder folder 'nope'"):
        load_encoder("nope")


def _edit_sidecar(folder: Path, **changes) -> None:
    record = json.loads((folder / "encoder.json").read_text())
    record.update(changes)
    (folder / "encoder.json").write_text(json.dumps(record))


def test_missing_sidecar(exported):
    (exported / "encoder.json").unlink()
    with pytest.raises(CheckpointError, match="missing sidecar"):
        load_encoder(exported)


def test_unknown_architecture(exported):
    _edit_sidecar(exported, architecture="vit3d_huge_patch1")
    with pytest.raises(CheckpointError, match="unknown architecture 'vit3d_huge_patch1'"):
        load_encoder(exported)


def test_shape_mismatch_names_the_tensor(exported):
    record = json.loads((exported / "encoder.json").read_text())
    _edit_sidecar(exported, kwargs={**record["kwargs"], "patch_size": [2, 8, 8]})
    # the first mismatching tensor, in state-dict order, is the learned position table
    with pytest.raises(CheckpointError, match=r"tensor 'pos_embed' has shape \(1, 32, 2, 2, 2\), "
                                              r"the model expects \(1, 32, 2, 4, 4\)"):
        load_encoder(exported)


def test_missing_tensors_strict_and_not(model, tmp_path):
    from safetensors.torch import save_file

    out = save_encoder(model, tmp_path / "e")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "norm.bias"}
    save_file(state, str(out / "encoder.safetensors"))
    _edit_sidecar(out, weights_sha256=None)
    with pytest.raises(CheckpointError, match=r"missing tensors \['norm.bias'\]"):
        load_encoder(out)
    assert load_encoder(out, strict=False).embed_dim == 32


def test_refuses_pickles(model, tmp_path, exported):
    pt = tmp_path / "encoder.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(CheckpointError, match="pickle checkpoint.*ssl-em export-encoder"):
        load_encoder(pt)
    # a pickle renamed to .safetensors is still refused, before any parsing
    (exported / "encoder.safetensors").write_bytes(pt.read_bytes())
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        load_encoder(exported)


def test_corrupt_weights(exported):
    (exported / "encoder.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_encoder(exported)
    _edit_sidecar(exported, weights_sha256=None)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_encoder(exported)


def test_bad_sidecars(exported):
    _edit_sidecar(exported, format_version=99)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_encoder(exported)
    (exported / "encoder.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_encoder(exported)


def test_save_needs_a_registered_architecture(tmp_path):
    with pytest.raises(CheckpointError, match="registered architecture"):
        save_encoder(VisionTransformer3D(depth=1, embed_dim=32, num_heads=2), tmp_path)
    with pytest.raises(CheckpointError, match="JSON"):
        save_encoder(create_encoder("vit3d_test_patch2x16"), tmp_path, {"voxel_size": torch.ones(3)})


def _lightning_ckpt(model: torch.nn.Module, path: Path, prefixes=("model.encoder.",), **hparams) -> Path:
    state = {p + k: v for p in prefixes for k, v in model.state_dict().items()}
    state["model.decoder_embed.weight"] = torch.zeros(4, 4)
    hp = {"encoder_config": model.encoder_config, "voxel_size": [50.0, 4.6, 4.6], "method": "mae", **hparams}
    torch.save({"state_dict": state, "hyper_parameters": hp, "global_step": 120, "epoch": 2}, path)
    return path


def test_export_from_lightning_checkpoint(model, tmp_path, capsys):
    ckpt = _lightning_ckpt(model, tmp_path / "last.ckpt", normalization={"mean": 0.5})
    assert export_main([str(ckpt), str(tmp_path / "out")]) == 0
    assert "120" in capsys.readouterr().out
    loaded = load_encoder(tmp_path / "out")
    torch.testing.assert_close(loaded.forward_features(X), model.forward_features(X), rtol=0, atol=0)
    meta = loaded.pretrained_metadata["metadata"]
    assert meta["voxel_size"] == [50.0, 4.6, 4.6] and meta["steps"] == 120 and meta["normalization"] == {"mean": 0.5}


def test_export_prefix_ambiguity(model, tmp_path):
    ckpt = _lightning_ckpt(model, tmp_path / "c.ckpt", prefixes=("student.", "teacher."))
    with pytest.raises(CheckpointError, match="several prefixes"):
        export_from_checkpoint(ckpt, tmp_path / "o")
    export_from_checkpoint(ckpt, tmp_path / "o", prefix="teacher.")
    assert (tmp_path / "o" / "encoder.json").is_file()


def test_export_refuses_unsafe_or_incomplete_checkpoints(model, tmp_path):
    bad = tmp_path / "bad.ckpt"  # any non-allowlisted object (here a Namespace) fails weights_only loading
    torch.save({"state_dict": {}, "hyper_parameters": {"args": argparse.Namespace(lr=1.0)}}, bad)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        export_from_checkpoint(bad, tmp_path / "o")
    no_hp = tmp_path / "nohp.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {}}, no_hp)
    with pytest.raises(CheckpointError, match="encoder_config"):
        export_from_checkpoint(no_hp, tmp_path / "o")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_from_checkpoint(tmp_path / "missing.ckpt", tmp_path / "o")

"""Safetensors training checkpoints: exact round trip of model + optimizer state, pickles refused."""

import pickle

import pytest
import torch

from ssl_em.errors import CheckpointError
from ssl_em.utils.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_keeps_tensors_types_and_int_keys(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ckpt = {
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 3}}}},
        "hyper_parameters": {"patch": (2, 16, 16), "name": "x", "ratio": 0.75, "none": None},
        "global_step": 7,
    }
    path = tmp_path / "last.ckpt"
    save_checkpoint(ckpt, path)
    back = load_checkpoint(path)
    assert back["global_step"] == 7
    assert back["hyper_parameters"]["patch"] == (2, 16, 16)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(back["state_dict"][k], v)
    state = back["optimizer_states"][0]["state"]
    assert set(state) == set(opt.state_dict()["state"])  # int keys survive
    assert all(isinstance(k, int) for k in state)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer_states"][0])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_pickle_and_garbage_are_refused(tmp_path):
    pkl = tmp_path / "model.ckpt"
    pkl.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not an ssl-em safetensors checkpoint"):
        load_checkpoint(pkl)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_unsupported_object_names_its_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint\.hyper_parameters\.fn"):
        save_checkpoint({"hyper_parameters": {"fn": object()}}, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()

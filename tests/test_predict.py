"""Blockwise prediction: exact tiling, blending, masks, bounded reads, resume (also after SIGKILL),
the dask backend and the CLI."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.predict import predict_volume

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"), pytest.mark.usefixtures("one_torch_thread")]
FP32 = {"precision": "32", "progress": False}  # bf16 autocast would blur exact comparisons


def conv_net(c_in: int = 1, c_out: int = 2, seed: int = 0) -> nn.Module:
    """Two 3x3x3 convs: receptive-field radius 2 voxels per axis."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(c_in, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, c_out, 3, padding=1)).eval()


def pointwise_net(c_in: int = 1, c_out: int = 2) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(c_in, c_out, 1)).eval()


def whole(model: nn.Module, raw: np.ndarray) -> np.ndarray:
    """One forward over the whole volume: the reference blockwise prediction must match."""
    x = torch.from_numpy(raw.astype(np.float32) / 255)
    x = x[None, None] if x.ndim == 3 else x[None]
    with torch.inference_mode():
        return model(x)[0].numpy()


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    # odd shape: no axis is a multiple of the blocks used below
    return np.random.default_rng(0).integers(0, 256, (13, 37, 41), dtype=np.uint8)


def count_calls(model: nn.Module) -> list[int]:
    """Count forward calls with a hook (a wrapper would change the model's fingerprint)."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


class RecordingSource:
    """An array-like that records every box read, to prove no read exceeds one region."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, key):
        out = self.data[key]
        self.reads.append(out.size)
        return out


def test_conv_net_blockwise_equals_whole_volume(raw, tmp_path):
    model = conv_net()
    out = predict_volume(model, raw, tmp_path / "p.zarr", (5, 16, 16), (4, 4, 4), **FP32)
    assert out.shape == (2, *raw.shape) and out.chunks == (2, 5, 16, 16)
    # halo 2 = receptive-field radius: identical everywhere, volume borders included
    np.testing.assert_allclose(out[:], whole(model, raw), atol=1e-5)


def test_test_time_mirroring_averages_the_mirrored_outputs(raw, tmp_path):
    """flips=(1, 2): each output is the mean of the four y/x mirrorings, mirrored back. A net that reads
    its left neighbour in x and the one above in y becomes, averaged, the mean of both neighbours."""
    from ssl_em.predict.blockwise import tta_axes

    model = nn.Conv3d(1, 1, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0, 1, 1, 0] = 1.0  # x - 1
        model.weight[0, 0, 1, 0, 1] = 2.0  # 2 * (y - 1)
    out = predict_volume(model, raw, tmp_path / "p.zarr", (5, 16, 16), (4, 4, 4), flips=(2, 1), **FP32)[0]
    x = raw.astype(np.float32) / 255
    inner = (slice(None), slice(1, -1), slice(1, -1))
    expected = 0.5 * (x[:, 1:-1, :-2] + x[:, 1:-1, 2:]) + (x[:, :-2, 1:-1] + x[:, 2:, 1:-1])
    np.testing.assert_allclose(out[inner], expected, atol=1e-5)
    plain = predict_volume(model, raw, tmp_path / "q.zarr", (5, 16, 16), (4, 4, 4), **FP32)[0]
    assert np.abs(plain[inner] - expected).max() > 0.1  # without flips: the one-sided net
    assert tta_axes((1, 128, 128)) == (1, 2) and tta_axes((8, 64, 64)) == (0, 1, 2)
    with pytest.raises(ConfigError, match="flips"):
        predict_volume(model, raw, tmp_path / "r.zarr", (5, 16, 16), (4, 4, 4), flips=(3,), **FP32)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_pointwise_exact_with_blended_windows(raw, tmp_path, blend):
    model = pointwise_net()
    out = predict_volume(model, raw, tmp_path / "p.zarr", (5, 16, 16), (2, 6, 6), window_shape=(4, 12, 12),
                         blend=blend, batch_size=3, **FP32)
    np.testing.assert_allclose(out[:], whole(model, raw), atol=1e-5)


def test_gaussian_blending_beats_constant_at_window_seams(raw, tmp_path):
    model, ref = conv_net(), whole(conv_net(), raw)
    err = {}
    for blend in ("gaussian", "constant"):
        out = predict_volume(model, raw, tmp_path / f"{blend}.zarr", (8, 24, 24), (4, 8, 8),
                             window_shape=(6, 16, 16), blend=blend, **FP32)[:]
        err[blend] = np.abs(out - ref).mean() / np.abs(ref).mean()
    # windows smaller than the region see zero padding at their edges; Gaussian weights damp that
    assert err["gaussian"] < err["constant"] and err["gaussian"] < 0.2, err


def test_volume_smaller_than_window_is_reflect_padded(tmp_path):
    small = np.random.default_rng(1).integers(0, 256, (3, 10, 7), dtype=np.uint8)
    model = pointwise_net()
    out = predict_volume(model, small, tmp_path / "p.zarr", (4, 16, 16), (2, 4, 4), **FP32)
    np.testing.assert_allclose(out[:], whole(model, small), atol=1e-5)


def test_reads_are_bounded_by_one_region(raw, tmp_path):
    src = RecordingSource(raw)
    predict_volume(pointwise_net(), src, tmp_path / "p.zarr", (4, 16, 16), (2, 4, 4), out_channels=2, **FP32)
    n_blocks = 4 * 3 * 3
    assert len(src.reads) == n_blocks and max(src.reads) <= 6 * 20 * 20 < raw.size


def test_mask_skips_empty_blocks(raw, tmp_path):
    mask = np.zeros((13, 37, 41), bool)
    mask[0, 0, 0] = True  # only block (0, 0, 0) holds mask voxels
    model = pointwise_net()
    calls = count_calls(model)
    out = predict_volume(model, raw, tmp_path / "p.zarr", (5, 16, 16), (2, 4, 4), mask=mask, out_channels=2,
                         **FP32)[:]
    assert len(calls) == 1
    np.testing.assert_allclose(out[:, :5, :16, :16], whole(pointwise_net(), raw)[:, :5, :16, :16], atol=1e-5)
    assert not out[:, 5:].any() and not out[:, :, 16:].any()


def test_coarse_mask(tmp_path):
    raw = np.random.default_rng(2).integers(0, 256, (8, 32, 32), dtype=np.uint8)
    mask = np.zeros((4, 16, 16), np.uint8)  # half resolution
    mask[3, 15, 15] = 1  # -> source voxels (6:8, 30:32, 30:32): the last block only
    model = pointwise_net()
    calls = count_calls(model)
    out = predict_volume(model, raw, tmp_path / "p.zarr", (4, 16, 16), (0, 0, 0), mask=mask, out_channels=2,
                         **FP32)[:]
    assert len(calls) == 1 and out[:, 4:, 16:, 16:].any() and not out[:, :4].any()


def test_multichannel_input_uint8_output_and_sigmoid(tmp_path):
    raw = np.random.default_rng(3).integers(0, 256, (2, 6, 20, 20), dtype=np.uint8)  # (c, z, y, x)
    model = pointwise_net(c_in=2, c_out=3)
    out = predict_volume(model, raw, tmp_path / "p.zarr", (4, 8, 8), (2, 4, 4), activation="sigmoid",
                         out_dtype="uint8", **FP32)
    expected = np.rint(255 / (1 + np.exp(-whole(model, raw))))
    assert out.dtype == np.uint8 and out.shape == (3, 6, 20, 20)
    assert np.abs(out[:].astype(int) - expected).max() <= 1


def test_ome_zarr_output_carries_voxel_size(raw, tmp_path):
    class WithVoxelSize(RecordingSource):
        voxel_size = (40.0, 8.0, 8.0)

    import zarr

    predict_volume(pointwise_net(), WithVoxelSize(raw), tmp_path / "p.ome.zarr", (5, 16, 16), (2, 4, 4), **FP32)
    ms = zarr.open_group(str(tmp_path / "p.ome.zarr"), mode="r").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 40.0, 8.0, 8.0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert zarr.open_array(str(tmp_path / "p.ome.zarr" / "0"), mode="r").shape == (2, *raw.shape)


@pytest.mark.skipif(importlib.util.find_spec("ssl_em.data.volume") is None, reason="ssl_em.data.volume not yet written")
def test_volume_specs_for_input_and_mask(raw, tmp_path):
    import zarr

    zarr.create_array(str(tmp_path / "raw.zarr"), data=raw, chunks=(4, 16, 16), attributes={"resolution": [40, 8, 8]})
    mask = np.zeros(raw.shape, np.uint8)
    mask[6, 20, 20] = 1  # only block (1, 1, 1)
    np.save(tmp_path / "mask.npy", mask)
    model = pointwise_net()
    calls = count_calls(model)
    out = predict_volume(model, str(tmp_path / "raw.zarr"), tmp_path / "p.ome.zarr", (5, 16, 16), (2, 4, 4),
                         mask=str(tmp_path / "mask.npy"), normalization={"mode": "range"}, out_channels=2, **FP32)
    assert len(calls) == 1
    core = (slice(None), slice(5, 10), slice(16, 32), slice(16, 32))
    np.testing.assert_allclose(out[core], whole(model, raw)[core], atol=1e-5)
    ms = zarr.open_group(str(tmp_path / "p.ome.zarr"), mode="r").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 40.0, 8.0, 8.0]
    # the result reopens as a volume spec (level 0 of the OME-Zarr image)
    from ssl_em.data.volume import open_volume

    vol = open_volume(str(tmp_path / "p.ome.zarr"))
    assert vol.shape == (2, *raw.shape) and vol.voxel_size == (40.0, 8.0, 8.0)


def test_resume_skips_done_blocks_and_refuses_other_settings(raw, tmp_path):
    dst, kw = tmp_path / "p.zarr", dict(block_shape=(5, 16, 16), overlap=(4, 4, 4), out_channels=2, **FP32)
    first = predict_volume(pointwise_net(), raw, dst, **kw)[:]
    model = pointwise_net()
    calls = count_calls(model)
    again = predict_volume(model, raw, dst, **kw)[:]
    assert not calls and np.array_equal(first, again)
    with pytest.raises(ConfigError, match="overlap"):
        predict_volume(pointwise_net(), raw, dst, **{**kw, "overlap": (4, 6, 6)})
    with pytest.raises(ConfigError, match="model"):
        predict_volume(conv_net(c_out=2), raw, dst, **kw)
    out = predict_volume(conv_net(c_out=2), raw, dst, overwrite=True, **kw)
    np.testing.assert_allclose(out[:], whole(conv_net(c_out=2), raw)[:], atol=1e-5)
    model = conv_net(c_out=2)
    calls = count_calls(model)
    predict_volume(model, raw, dst, resume=False, **kw)
    assert len(calls) == 3 * 3 * 3


def test_bad_arguments(raw, tmp_path):
    with pytest.raises(ConfigError, match="window"):
        predict_volume(pointwise_net(), raw, tmp_path / "a.zarr", (4, 8, 8), (2, 2, 2), window_shape=(8, 8, 8))
    with pytest.raises(ConfigError, match="dense model"):
        predict_volume(nn.Conv3d(1, 1, 3), raw, tmp_path / "b.zarr", (4, 8, 8), (2, 2, 2), **FP32)


SCRIPT = """
import sys, time
import numpy as np, torch
from ssl_em.predict import predict_volume

torch.set_num_threads(1)
torch.manual_seed(0)  # the same weights as the test's conv_net()
model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3, padding=1))
model.register_forward_pre_hook(lambda *_: time.sleep(0.3))  # slow enough to be killed midway
predict_volume(model, np.load(sys.argv[1], mmap_mode="r"), sys.argv[2], (4, 16, 16), (2, 4, 4), out_channels=2,
               precision="32", progress=False)
"""


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    raw = np.random.default_rng(4).integers(0, 256, (12, 32, 32), dtype=np.uint8)  # 3 x 2 x 2 = 12 blocks
    np.save(tmp_path / "raw.npy", raw)
    (tmp_path / "run.py").write_text(SCRIPT)
    dst = tmp_path / "run.zarr"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "raw.npy"), str(dst)],
                            stdout=subprocess.DEVNULL)
    done_dir = dst / ".ssl_em_done"
    deadline = time.time() + 120
    while not (done_dir.is_dir() and len(os.listdir(done_dir)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "prediction ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(os.listdir(done_dir))
    assert 3 <= n_done < 12

    # resume here with the same settings (a hook counts calls without changing the model's hash)
    kw = dict(block_shape=(4, 16, 16), overlap=(2, 4, 4), out_channels=2, **FP32)
    model = conv_net()
    calls = count_calls(model)
    resumed = predict_volume(model, np.load(tmp_path / "raw.npy", mmap_mode="r"), dst, **kw)[:]
    assert len(calls) == 12 - n_done  # only the unfinished blocks were predicted
    reference = predict_volume(conv_net(), raw, tmp_path / "ref.zarr", **kw)[:]
    assert np.array_equal(resumed, reference)


def test_dask_backend_equals_local(raw, tmp_path):
    distributed = pytest.importorskip("distributed")
    model = conv_net()
    local = predict_volume(model, raw, tmp_path / "local.zarr", (5, 16, 16), (4, 4, 4), **FP32)[:]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        out = predict_volume(model, raw, tmp_path / "dask.zarr", (5, 16, 16), (4, 4, 4), backend="dask",
                             scheduler=client, batch_size=2, **FP32)
        np.testing.assert_allclose(out[:], local, atol=1e-6)
    assert len(os.listdir(tmp_path / "dask.zarr" / ".ssl_em_done")) == 3 * 3 * 3


def test_dask_worker_process_by_address(raw, tmp_path):
    """A separate worker process (reached by scheduler address) gets a TorchScript model as bytes.

    One worker only: each worker process imports torch, which is slow on a busy 2-core machine.
    """
    distributed = pytest.importorskip("distributed")
    scripted = torch.jit.script(conv_net())
    local = predict_volume(scripted, raw, tmp_path / "local.zarr", (5, 16, 16), (4, 4, 4), **FP32)[:]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        out = predict_volume(scripted, raw, tmp_path / "procs.zarr", (5, 16, 16), (4, 4, 4), backend="dask",
                             scheduler=cluster.scheduler_address, **FP32)
        np.testing.assert_allclose(out[:], local, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("ssl_em.data.volume") is None, reason="ssl_em.data.volume not yet written")
def test_cli_torchscript_model_npy_input_png(tmp_path):
    from ssl_em.predict.cli import main

    raw = np.random.default_rng(5).integers(0, 256, (6, 24, 24), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    torch.jit.save(torch.jit.script(pointwise_net()), str(tmp_path / "m.pt"))
    rc = main(["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "raw.npy"), "--output",
               str(tmp_path / "out.zarr"), "--block", "4,16,16", "--overlap", "2,4,4", "--png",
               "--precision", "32", "--no-progress"])
    assert rc == 0 and (tmp_path / "out.png").stat().st_size > 0
    import zarr

    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[:],
                               whole(pointwise_net(), raw), atol=1e-5)


def test_cli_python_factory_model(tmp_path, monkeypatch):
    from ssl_em.predict.cli import load_model

    (tmp_path / "my_models.py").write_text("import torch\ndef make():\n    return torch.nn.Conv3d(1, 2, 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_model("my_models:make"), nn.Conv3d)
    with pytest.raises(ConfigError):
        load_model(str(tmp_path / "missing.pt"))

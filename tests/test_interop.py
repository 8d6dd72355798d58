"""What ssl-em writes opens in the tools people use: a BioImage.IO model package passes bioimageio.core's
own test (the model runs on its test tensor and reproduces the output), and OME-Zarr from ``ssl-em
convert`` and ``ssl-em predict`` reads back through ome-zarr-py with the same axes, units, scales and
pyramid levels."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from ssl_em.cli import main as cli_main
from ssl_em.data.phantom import make_phantom


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """A fine-tuned model folder (LoRA on unet3d_test, mito) after a few real optimiser steps."""
    import torch

    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.adapters.io import save_finetuned

    torch.manual_seed(0)
    module = FineTuning(task="mito", encoder="unet3d_test", adapter="lora", lr=1e-2)
    ph = make_phantom((8, 64, 64), seed=1)
    x = torch.from_numpy(ph.raw.astype(np.float32) / 255)[None, None, :, :32, :32]
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = module.model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.data_description = {"normalization": {"mode": "percentile", "low": 30.0, "high": 220.0, "clip": True,
                                                 "percentiles": [1.0, 99.0]},
                               "voxel_size": [40.0, 8.0, 8.0], "crop_shape": [8, 32, 32]}
    return save_finetuned(module, tmp_path_factory.mktemp("ft") / "mito_lora")


def test_bioimageio_package_passes_the_zoo_test(finetuned, tmp_path, capsys):
    pytest.importorskip("bioimageio.core", reason="the optional extra ssl-em[bioimageio] is not installed")
    from bioimageio.core import load_model_description, test_model

    out = tmp_path / "mito.zip"
    assert cli_main(["export-bioimageio", str(finetuned), str(out), "--license", "CC-BY-4.0",
                     "--author", "A. Tester"]) == 0
    assert "bioimageio.core test: passed" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        descr = load_model_description(str(out))
        summary = test_model(str(out), weight_format="pytorch_state_dict")
    assert summary.status == "passed"
    assert {"pytorch_state_dict", "torchscript"} <= {k for k, v in descr.weights.model_dump().items() if v}
    ins, outs = descr.inputs[0], descr.outputs[0]
    assert [str(a.id) for a in ins.axes] == ["batch", "channel", "z", "y", "x"]
    assert [a.scale for a in ins.axes[2:]] == [40.0, 8.0, 8.0] and all(a.unit == "nanometer" for a in ins.axes[2:])
    assert [a.halo for a in outs.axes[2:]] == [2, 8, 8]
    scale = [step for step in ins.preprocessing if step.id == "scale_linear"]
    assert len(scale) == 1 and scale[0].kwargs.gain == pytest.approx(1 / 190)
    assert scale[0].kwargs.offset == pytest.approx(-30 / 190) and "clip" in [step.id for step in ins.preprocessing]
    assert "sigmoid" in [step.id for step in outs.postprocessing] and str(descr.license) == "CC-BY-4.0"
    # never replaces a file, and says what is missing
    assert cli_main(["export-bioimageio", str(finetuned), str(out), "--license", "CC-BY-4.0", "--author", "A"]) == 2
    assert cli_main(["export-bioimageio", str(finetuned), str(tmp_path / "b.zip"), "--license", "CC-BY-4.0"]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--author" in err and not (tmp_path / "b.zip").exists()


def test_ome_zarr_written_by_convert_and_predict_reads_back_in_ome_zarr_py(tmp_path):
    pytest.importorskip("ome_zarr", reason="ome-zarr is not installed")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    ph = make_phantom((16, 128, 128), seed=2)
    np.save(tmp_path / "raw.npy", ph.raw)
    assert cli_main(["convert", str(tmp_path / "raw.npy"), str(tmp_path / "raw.ome.zarr"), "--voxel-size", "40,8,8",
                     "--chunks", "8,32,32", "--levels", "3", "--no-progress"]) == 0
    assert cli_main(["predict", "--model", "torch.nn:Identity", "--input", str(tmp_path / "raw.ome.zarr"),
                     "--output", str(tmp_path / "p.ome.zarr"), "--no-progress"]) == 0

    def read(name: str):
        node = next(iter(Reader(parse_url(str(tmp_path / name)))()))
        scales = [[t["scale"] for t in level if t["type"] == "scale"][0]
                  for level in node.metadata["coordinateTransformations"]]
        return node.metadata["axes"], scales, node.data

    axes, scales, levels = read("raw.ome.zarr")
    assert [a["name"] for a in axes] == ["z", "y", "x"] and all(a["unit"] == "nanometer" for a in axes)
    assert scales == [[40.0, 8.0, 8.0], [40.0, 16.0, 16.0], [40.0, 32.0, 32.0]]
    assert [tuple(a.shape) for a in levels] == [(16, 128, 128), (16, 64, 64), (16, 32, 32)]
    np.testing.assert_array_equal(np.asarray(levels[0]), ph.raw)

    axes, scales, levels = read("p.ome.zarr")
    assert [(a["name"], a["type"]) for a in axes] == [("c", "channel"), ("z", "space"), ("y", "space"),
                                                       ("x", "space")]
    assert scales == [[1.0, 40.0, 8.0, 8.0]] and tuple(levels[0].shape) == (1, 16, 128, 128)
    np.testing.assert_allclose(np.asarray(levels[0])[0], ph.raw / 255.0, atol=1e-6)


def test_the_package_licence_follows_the_base_encoders_training_data():
    from ssl_em.adapters.bioimageio import package_license
    from ssl_em.errors import ConfigError

    shipped = {"base": {"name_or_path": "unet_small.spark_vnc_isbi"}, "metadata": {}}
    assert package_license(shipped, None) == "CC-BY-NC-SA-3.0"  # the VNC training data's share-alike licence
    assert package_license(shipped, "CC-BY-NC-SA-3.0") == "CC-BY-NC-SA-3.0"
    with pytest.raises(ConfigError, match="share-alike term requires CC-BY-NC-SA-3.0"):
        package_license(shipped, "MIT")
    own = {"base": {"name_or_path": "encoder.safetensors"}, "metadata": {"base_in_folder": True}}
    assert package_license(own, "CC-BY-4.0") == "CC-BY-4.0"
    with pytest.raises(ConfigError, match="--license SPDX is required"):
        package_license(own, None)

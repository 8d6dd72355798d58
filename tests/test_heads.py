"""Segmentation heads: shapes back at voxel resolution for anisotropic patches, head selection."""

from __future__ import annotations

import math

import pytest
import torch

import ssl_em
import ssl_em.models.unet3d  # noqa: F401  (registers the U-Net variants)
from ssl_em.adapters.heads import (
    DenseHead, LinearHead3D, SegmentationModel, UNETRDecoder3D, build_segmentation_model, stage_factors,
)
from ssl_em.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("patch", [(2, 16, 16), (1, 8, 8), (4, 4, 4), (2, 8, 8)])
def test_stage_factors_multiply_to_patch(patch):
    factors = stage_factors(patch)
    assert tuple(math.prod(f[a] for f in factors) for a in range(3)) == patch
    assert len(factors) == max(1, max(int(math.log2(p)) for p in patch))
    if patch[0] < patch[1]:  # the short axis upsamples at the coarse end
        assert factors[-1][0] == 1


@pytest.mark.parametrize("patch,shape", [((2, 16, 16), (4, 32, 48)), ((2, 8, 8), (6, 16, 24)), ((1, 4, 4), (3, 8, 12))])
def test_unetr_output_matches_input_for_anisotropic_patches(patch, shape):
    enc = ssl_em.create_encoder("vit3d_test_patch2x16", patch_size=patch)
    model = build_segmentation_model(enc, "unetr", out_channels=3, decoder_channels=4)
    x = torch.randn(1, 1, *shape)
    y = model(x)
    assert y.shape == (1, 3, *shape)
    y.mean().backward()
    assert model.head.raw.conv1.weight.grad is not None  # the raw-input path is used


def test_unetr_feature_indices_and_channels():
    enc = ssl_em.create_encoder("vit3d_test_patch2x16", depth=4)
    head = UNETRDecoder3D(enc, 2, decoder_channels=8)
    assert head.feature_indices == [0, 1, 2, 3]  # 4 upsampling stages for 16-voxel patches, depth 4
    assert head.channels == [64, 64, 32, 16, 8]
    head = UNETRDecoder3D(enc, 2, feature_indices=[-1], decoder_channels=[8, 8, 8, 8, 8], raw_skip=False)
    assert head.feature_indices == [3] and head.raw is None
    y = SegmentationModel(enc, head)(torch.randn(1, 1, 2, 16, 16))
    assert y.shape == (1, 2, 2, 16, 16)
    with pytest.raises(ConfigError, match="feature_indices"):
        UNETRDecoder3D(enc, 2, feature_indices=[0, 1, 2, 3, 3])
    with pytest.raises(ConfigError, match="decoder_channels"):
        UNETRDecoder3D(enc, 2, decoder_channels=[8, 8])


def test_linear_and_dense_heads():
    vit = ssl_em.create_encoder("vit3d_test_patch2x16")
    lin = build_segmentation_model(vit, "linear", out_channels=2)
    assert isinstance(lin.head, LinearHead3D)
    assert lin(torch.randn(1, 1, 4, 32, 32)).shape == (1, 2, 4, 32, 32)
    unet = ssl_em.create_encoder("unet3d_test")
    dense = build_segmentation_model(unet, "auto", out_channels=3)
    assert isinstance(dense.head, DenseHead)
    assert dense(torch.randn(1, 1, 4, 16, 16)).shape == (1, 3, 4, 16, 16)
    assert isinstance(build_segmentation_model(vit, "auto", 1).head, UNETRDecoder3D)


def test_head_holds_no_encoder_weights():
    enc = ssl_em.create_encoder("vit3d_test_patch2x16")
    model = build_segmentation_model(enc, "unetr", 1, decoder_channels=4)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    assert not enc_ids & {id(p) for p in model.head.parameters()}
    assert [n for n, _ in model.named_children()] == ["encoder", "head"]


def test_bad_head_choices():
    unet = ssl_em.create_encoder("unet3d_tiny")  # pyramid features: not on one token grid
    with pytest.raises(ConfigError, match="token grid"):
        build_segmentation_model(unet, "unetr", 1, decoder_channels=4)(torch.randn(1, 1, 2, 16, 16))
    with pytest.raises(ConfigError, match="forward_dense"):
        build_segmentation_model(ssl_em.create_encoder("vit3d_test_patch2x16"), "dense", 1)
    with pytest.raises(ConfigError, match="unknown head"):
        build_segmentation_model(unet, "mlp", 1)

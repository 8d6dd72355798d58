"""3-D ViT encoder: shapes, position embedding, intermediates, registry, checkpointing, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import ssl_em.models
from ssl_em.errors import ConfigError
from ssl_em.models import create_encoder, list_encoders
from ssl_em.models.layers import sincos_pos_embed_3d
from ssl_em.models.registry import main as models_main
from ssl_em.models.vit3d import VisionTransformer3D


@pytest.fixture
def vit() -> VisionTransformer3D:
    torch.manual_seed(0)
    return create_encoder("vit3d_test_patch2x16")


def test_odd_anisotropic_crop_shapes(vit):
    x = torch.randn(2, 1, 6, 48, 80)  # grid (3, 3, 5)
    assert vit.grid_size(x.shape) == (3, 3, 5)
    assert vit.forward_features(x).shape == (2, 45, 32)
    assert vit(x).shape == (2, 32)
    assert vit.forward_head(vit.forward_features(x), pre_logits=True).shape == (2, 32)
    assert vit.embed_dim == vit.num_features == 32 and vit.patch_size == (2, 16, 16)


def test_isotropic_patch_and_classifier_head():
    model = create_encoder("vit3d_test_patch4", num_classes=3, global_pool="max")
    assert model(torch.randn(1, 1, 8, 12, 16)).shape == (1, 3)
    tokens_model = create_encoder("vit3d_test_patch4", num_classes=3, global_pool="")
    assert tokens_model(torch.randn(1, 1, 8, 12, 16)).shape == (1, 2 * 3 * 4, 3)


def test_forward_intermediates_formats(vit):
    x = torch.randn(2, 1, 4, 32, 48)  # grid (2, 2, 3)
    final, inter = vit.forward_intermediates(x)
    assert final.shape == (2, 12, 32) and [t.shape for t in inter] == [(2, 32, 2, 2, 3)] * 2
    torch.testing.assert_close(final, vit.forward_features(x))
    nlc = vit.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
    assert len(nlc) == 1 and nlc[0].shape == (2, 12, 32)
    # NCDHW is the NLC tokens laid out on the (z, y, x) grid
    ncdhw = vit.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    torch.testing.assert_close(ncdhw[:, :, 1, 0, 2], nlc[0][:, 1 * 6 + 0 * 3 + 2])
    normed = vit.forward_intermediates(x, indices=[1], norm=True, output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(normed, final)
    with pytest.raises(ConfigError, match="output_fmt"):
        vit.forward_intermediates(x, output_fmt="NCHW")


def test_sincos_table_extends_to_larger_grids():
    small, large = sincos_pos_embed_3d((2, 3, 5), 32), sincos_pos_embed_3d((4, 6, 8), 32)
    assert small.shape == (30, 32) and large.shape == (192, 32)
    # the same position (z, y, x) gets the same vector whatever the crop size
    torch.testing.assert_close(small.reshape(2, 3, 5, 32), large.reshape(4, 6, 8, 32)[:2, :3, :5])
    assert len({tuple(v.tolist()) for v in large}) == 192  # every position distinct
    with pytest.raises(ConfigError, match="even"):
        sincos_pos_embed_3d((2, 2, 2), 33)


def test_learned_pos_embed_resamples_to_other_grids():
    model = create_encoder("vit3d_test_patch2x16", img_size=(4, 32, 32), pos_embed="learned")
    assert model.pos_embed.shape == (1, 32, 2, 2, 2)
    assert model.pos_embed_for((3, 5, 4)).shape == (1, 60, 32)
    # at its own grid the table is used as is, and it starts from the sin-cos table
    torch.testing.assert_close(model.pos_embed_for((2, 2, 2))[0], sincos_pos_embed_3d((2, 2, 2), 32))
    assert model(torch.randn(1, 1, 6, 80, 64)).shape == (1, 32)
    assert "pos_embed" in model.no_weight_decay()


def test_timm_registry_and_list():
    model = timm.create_model("vit3d_small_patch2x16", depth=1)
    assert isinstance(model, VisionTransformer3D) and model.embed_dim == 384
    assert model.encoder_config == {
        "architecture": "vit3d_small_patch2x16",
        "kwargs": {"patch_size": [2, 16, 16], "embed_dim": 384, "depth": 1, "num_heads": 6},
    }
    names = list_encoders()
    assert "vit3d_tiny_patch8" in names and "vit_small_patch16_224" not in names
    assert list_encoders("vit3d_test*") == ["vit3d_test_patch2x16", "vit3d_test_patch4"]
    assert ssl_em.create_encoder is create_encoder  # lazy top-level export


def test_registry_errors():
    with pytest.raises(ConfigError, match="did you mean vit3d_small_patch2x16"):
        create_encoder("vit3d_smal_patch2x16")
    with pytest.raises(ConfigError, match="does not take argument.*embed_dims"):
        create_encoder("vit3d_test_patch2x16", embed_dims=64)
    with pytest.raises(ConfigError, match="no shipped weights"):
        timm.create_model("vit3d_test_patch2x16", pretrained=True)


def test_models_cli(capsys):
    assert models_main(["vit3d_test*"]) == 0
    out = capsys.readouterr().out
    assert "vit3d_test_patch2x16" in out and "2x16x16" in out and "vit3d_tiny" not in out
    assert models_main(["--info", "vit3d_tiny_patch8"]) == 0
    assert '"embed_dim": 192' in capsys.readouterr().out


def test_lora_target_names_and_fused_attention(vit):
    names = {n for n, _ in vit.named_modules()}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"} <= names
    assert vit.blocks[0].attn.fused_attn  # scaled_dot_product_attention


def test_grad_checkpointing_same_outputs_and_grads(vit):
    x = torch.randn(2, 1, 4, 32, 32)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        vit.zero_grad()
        out = vit.forward_features(x)
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in vit.parameters()]

    ref_out, ref_grads = run()
    vit.set_grad_checkpointing(True)
    out, grads = run()
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 1, 15, 128, 128), r"crop \(15, 128, 128\) is not divisible by patch \(2, 16, 16\) along z"),
        ((1, 1, 16, 128, 120), "along x"),
        ((1, 3, 4, 32, 32), "3 channels but the encoder expects in_chans=1"),
        ((1, 4, 32, 32), "5-D"),
    ],
)
def test_bad_inputs_are_one_line_config_errors(vit, shape, message):
    with pytest.raises(ConfigError, match=message) as info:
        vit(torch.randn(*shape))
    assert "\n" not in str(info.value)


def test_bad_configs():
    with pytest.raises(ConfigError, match="num_heads"):
        VisionTransformer3D(embed_dim=30, num_heads=4, depth=1)
    with pytest.raises(ConfigError, match="img_size"):
        VisionTransformer3D(img_size=(9, 128, 128), depth=1)
    with pytest.raises(ConfigError, match="pos_embed"):
        VisionTransformer3D(pos_embed="rope", depth=1)
    with pytest.raises(ConfigError, match="patch_size"):
        VisionTransformer3D(patch_size=(16, 16), depth=1)


def test_sizes_given_as_one_number_or_three_and_only_whole_voxels():
    from ssl_em.errors import ConfigError
    from ssl_em.utils.shapes import to_triple

    assert to_triple(8, "patch_size") == (8, 8, 8) and to_triple([2, 16, 16], "patch_size") == (2, 16, 16)
    assert to_triple(np.array([1, 2, 3]), "block") == (1, 2, 3)
    assert to_triple((40, 8.5, 8.5), "voxel size", float, positive=True) == (40.0, 8.5, 8.5)
    for bad, match in ((2.5, "whole numbers"), ((2, 16), "one number or three"), ("a,b", "one number or three")):
        with pytest.raises(ConfigError, match=match):
            to_triple(bad, "patch_size")
    with pytest.raises(ConfigError, match="positive"):
        to_triple((0, 8, 8), "phantom shape", int, positive=True)

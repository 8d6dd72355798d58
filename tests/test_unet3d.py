"""ResidualUNet3D: the encoder contract, anisotropy, masking semantics, export, LoRA targeting."""

from __future__ import annotations

import pytest
import torch

import ssl_em.models.unet3d as unet3d  # registers the variants even before models/__init__ imports it
from ssl_em.errors import ConfigError
from ssl_em.models.unet3d import MaskedGroupNorm, ResidualUNet3D


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("name", "crop", "patch"),
    [("unet3d_tiny", (8, 48, 80), (2, 8, 8)), ("unet3d_test", (3, 10, 14), (1, 2, 2)),
     ("unet3d_test_iso", (4, 6, 10), (2, 2, 2))],
)
def test_contract_shapes(name, crop, patch):
    import timm

    torch.manual_seed(0)
    m = timm.create_model(name).eval()
    assert m.patch_size == patch and m.encoder_config["architecture"] == name
    x = torch.randn(2, 1, *crop)[: 1 if name == "unet3d_tiny" else 2]
    b = x.shape[0]
    grid = m.grid_size(x.shape)
    assert grid == tuple(c // p for c, p in zip(crop, patch))
    feats = m.forward_intermediates(x)
    assert len(feats) == len(m.widths) and feats[-1].shape == (b, m.embed_dim, *grid)
    for f, w, s in zip(feats, m.widths, m.stage_strides):
        assert f.shape == (b, w, *(c // k for c, k in zip(crop, s)))
    assert m.forward_features(x).shape == (b, grid[0] * grid[1] * grid[2], m.embed_dim)
    assert m.forward_dense(x).shape == (b, m.dense_dim, *crop)
    assert torch.equal(m(x), m.forward_dense(x))  # no head: forward is the dense output
    last2 = m.forward_intermediates(x, indices=2, output_fmt="NLC")
    assert [t.shape for t in last2] == [f.flatten(2).transpose(1, 2).shape for f in feats[-2:]]
    assert torch.equal(m.forward_intermediates(x, indices=[-1])[0], feats[-1])


def test_anisotropic_levels_pool_in_plane_first():
    m = ResidualUNet3D(widths=(4, 4, 4, 4), anisotropic_levels=2)
    assert m.pools == [(1, 2, 2), (1, 2, 2), (2, 2, 2)] and m.patch_size == (2, 8, 8)
    for blocks in ([s.blocks[0] for s in m.stages], [s.blocks[0] for s in m.decoder]):
        k = [(b.conv1.kernel_size, b.conv2.kernel_size) for b in blocks]
        assert k == [((1, 3, 3),) * 2, ((1, 3, 3),) * 2, ((3, 3, 3),) * 2, ((3, 3, 3),) * 2][:len(blocks)]
    assert ResidualUNet3D(widths=(4, 4, 4), anisotropic_levels=0).patch_size == (4, 4, 4)


def test_unet2d_small_is_the_plain_unet_shape_in_plane_only():
    """The encoder for single-section crops: every pooling and kernel in-plane, the baseline's 5 levels
    and widths (a pretrained network of the size of the one it is compared with)."""
    import timm

    m = timm.create_model("unet2d_small")
    assert m.pools == [(1, 2, 2)] * 4 and m.patch_size == (1, 16, 16)
    assert {b.conv1.kernel_size for s in (*m.stages, *m.decoder) for b in s.blocks} == {(1, 3, 3)}
    plain = _n_params(timm.create_model("unet_small"))
    assert 0.8 * plain < _n_params(m) < 1.1 * plain
    assert m(torch.randn(2, 1, 1, 32, 32)).shape == (2, 16, 1, 32, 32)
    with pytest.raises(ConfigError, match="divisible"):
        m(torch.randn(1, 1, 1, 24, 24))


def test_sizes_and_head():
    import timm

    assert 250_000 < _n_params(timm.create_model("unet3d_tiny")) < 350_000
    m = timm.create_model("unet3d_test", out_channels=3)
    assert m(torch.randn(1, 1, 2, 8, 8)).shape == (1, 3, 2, 8, 8)


def test_create_by_name_and_listed():
    import timm

    import ssl_em
    from ssl_em.models.registry import list_encoders

    names = list_encoders("unet3d*")
    for n in ("unet3d_test", "unet3d_tiny", "unet3d_tiny_iso", "unet3d_small", "unet3d_base", "unet3d_base_iso"):
        assert n in names
    a = ssl_em.create_encoder("unet3d_test", widths=(4, 8, 8), anisotropic_levels=2)
    b = timm.create_model("unet3d_test", widths=(4, 8, 8), anisotropic_levels=2)
    assert a.patch_size == b.patch_size == (1, 4, 4)
    assert a.encoder_config["kwargs"]["widths"] == [4, 8, 8]


@pytest.mark.parametrize(
    "kwargs",
    [dict(anisotropic_levels=3), dict(widths=()), dict(blocks_per_stage=(1, 1, 1)), dict(norm="batch"),
     dict(act="nope"), dict(not_an_arg=1)],
)
def test_bad_config(kwargs):
    import timm

    with pytest.raises(ConfigError):
        timm.create_model("unet3d_test", **kwargs)


def test_bad_input():
    import timm

    m = timm.create_model("unet3d_tiny")
    with pytest.raises(ConfigError, match=r"not divisible.*along y"):
        m(torch.zeros(1, 1, 8, 44, 80))
    with pytest.raises(ConfigError, match="along z"):
        m.grid_size((7, 48, 80))
    with pytest.raises(ConfigError, match="expects"):
        m(torch.zeros(1, 2, 8, 48, 80))
    with pytest.raises(ConfigError):
        m.forward_intermediates(torch.zeros(1, 1, 2, 8, 8), indices=9)


def test_masked_group_norm_matches_reference():
    torch.manual_seed(0)
    n = MaskedGroupNorm(2, 6)
    torch.nn.init.normal_(n.weight)
    torch.nn.init.normal_(n.bias)
    x = torch.randn(2, 6, 3, 5, 5) * 3 + 1
    m = (torch.rand(2, 1, 3, 5, 5) > 0.5).float()
    y = n(x, m)
    for b in range(2):
        for g in range(2):
            sl = slice(3 * g, 3 * g + 3)
            vis = x[b, sl][:, m[b, 0] > 0]
            ref = (x[b, sl] - vis.mean()) / torch.sqrt(vis.var(unbiased=False) + n.eps)
            ref = ref * n.weight[sl, None, None, None] + n.bias[sl, None, None, None]
            torch.testing.assert_close(y[b, sl], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n(x, torch.ones_like(m)), n(x), atol=1e-5, rtol=1e-5)


def test_masked_encoder_sees_only_visible_voxels():
    """Changing masked input voxels moves no encoder feature at any stage, and masked features are zero."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("unet3d_test", widths=(4, 8, 8), anisotropic_levels=1)  # patch (2, 4, 4)
    x = torch.randn(2, 1, 4, 16, 16)
    visible = (torch.rand(2, 1, 2, 4, 4) > 0.5).float()
    full = torch.nn.functional.interpolate(visible, size=x.shape[-3:], mode="nearest")
    y = x + 10 * torch.randn_like(x) * (1 - full)  # only masked voxels change
    fa, fb = m.forward_encoder(x, visible), m.forward_encoder(y, visible)
    for a, b in zip(fa, fb):
        assert torch.equal(a, b)
        vm = torch.nn.functional.interpolate(visible, size=a.shape[-3:], mode="nearest")
        assert a.mul(1 - vm).abs().max() == 0 and a.mul(vm).abs().max() > 0
    # without the mask the same change does move the features: the test is not vacuous
    assert not torch.equal(m.forward_encoder(x)[-1], m.forward_encoder(y)[-1])


def test_grad_checkpointing_equivalence():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("unet3d_test", widths=(4, 8, 8), anisotropic_levels=1)
    x = torch.randn(1, 1, 4, 16, 16)
    visible = (torch.rand(1, 1, 2, 4, 4) > 0.5).float()

    def grads():
        m.zero_grad()
        (m.forward_decoder(m.forward_encoder(x, visible)).square().mean() + m(x).mean()).backward()
        return [p.grad.clone() for p in m.parameters()]

    g0 = grads()
    m.set_grad_checkpointing(True)
    g1 = grads()
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_export_round_trip(tmp_path):
    import ssl_em.models as export
    import timm

    torch.manual_seed(0)
    m = timm.create_model("unet3d_test_iso", widths=(4, 8, 8), out_channels=2).eval()
    export.save_encoder(m, tmp_path / "enc", {"voxel_size": [8, 8, 8]})
    r = export.load_encoder(tmp_path / "enc")
    assert isinstance(r, ResidualUNet3D) and r.encoder_config == m.encoder_config
    x = torch.randn(1, 1, 4, 8, 8)
    assert torch.equal(r(x), m(x))


def test_lora_targets_convs_by_name():
    peft = pytest.importorskip("peft")
    import timm

    m = timm.create_model("unet3d_test")
    lora = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["conv1", "conv2"]), m)
    n_lora = sum(1 for n, _ in lora.named_modules() if n.endswith("conv1") or n.endswith("conv2"))
    assert n_lora == 2 * (len(m.stages) + len(m.decoder))
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    assert lora(torch.randn(1, 1, 2, 8, 8)).shape == (1, 4, 2, 8, 8)


def test_module_exports():
    assert {"ResidualUNet3D", "MaskedGroupNorm", "unet3d_tiny"} <= set(unet3d.__all__)


def test_channels_last_3d_matches_contiguous():
    """channels_last_3d (~10 % less CPU time for SparK pretraining here) computes the same function."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("unet3d_test", widths=(4, 8, 8), anisotropic_levels=1)
    x = torch.randn(2, 1, 4, 16, 16)
    visible = (torch.rand(2, 1, 2, 4, 4) > 0.5).float()
    ref = m.forward_decoder(m.forward_encoder(x, visible))
    m = m.to(memory_format=torch.channels_last_3d)
    out = m.forward_decoder(m.forward_encoder(x.contiguous(memory_format=torch.channels_last_3d), visible))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

"""3-D MAE: masking counts, visible-only encoder, masked-only loss, tube masking, targets, learning, bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.models import create_encoder
from ssl_em.pretrain.mae import DEFAULT_TARGET, MaskedAutoencoder3D
from ssl_em.pretrain.targets import gaussian_blur_3d


def make_mae(**kw) -> MaskedAutoencoder3D:
    torch.manual_seed(0)
    kw = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, **kw}
    return MaskedAutoencoder3D(create_encoder("vit3d_test_patch2x16"), **kw)


def test_shapes_and_visible_count():
    mae = make_mae(mask_ratio=0.6)
    x = torch.randn(2, 1, 6, 48, 80)  # N = 3 * 3 * 5 = 45 patches of 2*16*16 voxels
    loss, pred, mask = mae(x)
    assert loss.ndim == 0 and pred.shape == (2, 45, 512) and mask.shape == (2, 45)
    assert mask.sum(1).tolist() == [45 - round(45 * 0.4)] * 2  # 18 visible, 27 masked


def test_encoder_sees_only_visible_tokens():
    mae = make_mae(mask_ratio=0.75)
    seen: list[int] = []
    mae.encoder.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    mae(torch.randn(1, 1, 4, 64, 64))  # N = 2 * 4 * 4 = 32
    assert seen == [8]


def test_loss_counts_masked_patches_only():
    mae = make_mae()
    x = torch.randn(1, 1, 4, 64, 64)
    _, pred, mask = mae(x)
    patches = mae.patchify(x)
    visible, hidden = int(mask[0].argmin()), int(mask[0].argmax())
    ref = mae.forward_loss(x, pred, mask)
    changed = patches.clone()
    changed[0, visible] += 5.0
    torch.testing.assert_close(mae.forward_loss(mae.unpatchify(changed, (2, 4, 4)), pred, mask), ref)
    changed[0, hidden] += 5.0
    assert mae.forward_loss(mae.unpatchify(changed, (2, 4, 4)), pred, mask) > ref


def test_tube_masking_hides_whole_z_tubes():
    mae = make_mae(masking="tube", mask_ratio=0.75)
    _, _, mask = mae(torch.randn(3, 1, 8, 64, 64))  # grid (4, 4, 4)
    m = mask.reshape(3, 4, 4, 4)  # (B, d, h, w)
    assert torch.equal(m, m[:, :1].expand_as(m))  # constant along z
    assert (1 - m[:, 0]).sum((1, 2)).tolist() == [4.0] * 3  # round(16 * 0.25) visible tubes


def test_patchify_roundtrip_and_reconstruct_pastes_visible():
    mae = make_mae()
    x = torch.randn(2, 1, 4, 32, 48)
    p = mae.patchify(x)
    assert p.shape == (2, 2 * 2 * 3, 512)
    torch.testing.assert_close(p[0, 1].reshape(2, 16, 16), x[0, 0, :2, :16, 16:32])  # token 1 = (z0, y0, x1)
    torch.testing.assert_close(mae.unpatchify(p, (2, 2, 3)), x)
    recon, mask_vol = mae.reconstruct(x)
    assert recon.shape == x.shape and mask_vol.shape == (2, 1, 4, 32, 48)
    visible = mask_vol == 0
    torch.testing.assert_close(recon[visible], x[visible])
    assert 0 < mask_vol.mean() < 1


@pytest.mark.parametrize("target", ["raw", "normalized", "lowpass"])
def test_targets(target):
    mae = make_mae(target=target)
    x = torch.randn(1, 1, 4, 32, 32)  # grid (2, 2, 2)
    t = mae.target_patches(x)
    assert t.shape == (1, 8, 512)
    if target == "normalized":
        torch.testing.assert_close(t.mean(-1), torch.zeros(1, 8), atol=1e-5, rtol=0)
    if target == "lowpass":
        assert t.var() < mae.patchify(x).var() * 0.5  # smoothing removes most white noise
    assert DEFAULT_TARGET in ("raw", "normalized", "lowpass")


def test_gaussian_blur_is_anisotropy_aware():
    ramp_z = torch.arange(8.0).reshape(1, 1, 8, 1, 1).expand(1, 1, 8, 16, 16).contiguous()
    # blurring only in-plane leaves a volume that varies only along z untouched
    torch.testing.assert_close(gaussian_blur_3d(ramp_z, (0.0, 2.0, 2.0)), ramp_z)
    assert not torch.allclose(gaussian_blur_3d(ramp_z, (1.0, 0.0, 0.0)), ramp_z)  # edges replicate-padded
    const = torch.full((1, 2, 4, 8, 8), 3.0)
    torch.testing.assert_close(gaussian_blur_3d(const, (1.0, 1.5, 1.5)), const)


def test_bf16_autocast_step_on_cpu():
    mae = make_mae()
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = mae(torch.randn(2, 1, 4, 32, 32))
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)


def test_loss_falls_on_real_em(vnc_crop, one_torch_thread):
    raw = torch.from_numpy(vnc_crop["raw"].astype(np.float32))  # (8, 128, 128) at 50 x 4.6 x 4.6 nm
    x = F.avg_pool3d(((raw - raw.mean()) / raw.std())[None, None], (1, 2, 2))  # 9.2 nm in-plane: (1, 1, 8, 64, 64)
    torch.manual_seed(0)
    mae = MaskedAutoencoder3D(create_encoder("vit3d_test_patch2x16", patch_size=(2, 8, 8)), decoder_dim=32,
                              decoder_depth=1, decoder_heads=2, target="raw")
    opt = torch.optim.AdamW(mae.parameters(), lr=5e-3)
    losses = []
    for _ in range(25):
        loss, _, _ = mae(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # z-scored input: predicting the mean scores ~1; the model must get below both that and its start.
    # Measured over init seeds 0-5 (fp32): last 0.906-0.925, last/first 0.757-0.804 (a 0.8 bound failed at seed 1)
    assert np.mean(losses[-5:]) < 0.95 and np.mean(losses[-5:]) < 0.88 * np.mean(losses[:3]), losses


def test_bad_configs():
    enc = create_encoder("vit3d_test_patch2x16")
    for kw, msg in [({"mask_ratio": 1.0}, "mask_ratio"), ({"masking": "block"}, "masking"),
                    ({"target": "hog"}, "target"), ({"decoder_dim": 30, "decoder_heads": 4}, "decoder_dim"),
                    ({"lowpass_sigma": (1.0, 2.0)}, "lowpass_sigma")]:
        with pytest.raises(ConfigError, match=msg):
            MaskedAutoencoder3D(enc, **kw)
    with pytest.raises(ConfigError, match="token encoder"):
        MaskedAutoencoder3D(nn.Conv3d(1, 8, 3))

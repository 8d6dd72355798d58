"""SparK masked image modelling and denoising on the residual U-Net."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ssl_em.models.unet3d  # noqa: F401  (registers the unet3d variants)
from ssl_em.errors import ConfigError
from ssl_em.pretrain.spark import Denoising3D, SparKMasked3D, masked_mse
from ssl_em.pretrain.targets import gaussian_blur_3d


def _unet(**kw):
    import timm

    return timm.create_model("unet3d_test", **{"widths": (4, 8, 8), "anisotropic_levels": 2, **kw})  # (1, 4, 4)


def test_forward_shapes_and_mask_ratio():
    torch.manual_seed(0)
    s = SparKMasked3D(_unet(), mask_ratio=0.75, mask_unit=(2, 8, 8))
    x = torch.randn(2, 1, 4, 32, 32)
    loss, pred, mask = s(x)
    assert pred.shape == x.shape and mask.shape == (2, 1, 4, 32, 32) and loss.ndim == 0
    units = mask[:, 0, ::2, ::8, ::8].flatten(1)  # one value per mask unit
    assert torch.equal(units.sum(1), torch.full((2,), 24.0))  # exactly 75 % of 2*4*4 units per sample
    assert torch.equal(torch.nn.functional.interpolate(units.reshape(2, 1, 2, 4, 4), size=(4, 32, 32)), mask)


def test_loss_only_over_masked_voxels():
    torch.manual_seed(0)
    s = SparKMasked3D(_unet())
    x = torch.randn(1, 1, 4, 16, 16)
    visible = (torch.rand(1, 1, 4, 4, 4) > 0.5).float()
    pred = s.forward_pred(x, visible).detach().requires_grad_(True)
    mask = 1 - torch.nn.functional.interpolate(visible, size=x.shape[-3:])
    masked_mse(pred, s.make_target(x), mask).backward()
    assert pred.grad[mask.bool()].abs().min() > 0 and pred.grad[~mask.bool()].abs().max() == 0
    loss, pred, m = s(x, visible)
    assert torch.equal(m, mask)
    torch.testing.assert_close(loss, ((pred - x) ** 2 * mask).sum() / mask.sum())


def test_masked_voxels_hidden_from_encoder():
    """Only masked voxels change -> prediction (a function of visible voxels and tokens) is identical."""
    torch.manual_seed(0)
    s = SparKMasked3D(_unet(), mask_unit=(2, 4, 4))
    x = torch.randn(2, 1, 4, 16, 16)
    visible = s.random_visible(x)
    mask = 1 - torch.nn.functional.interpolate(visible, size=x.shape[-3:])
    y = x + 3 * torch.randn_like(x) * mask
    assert torch.equal(s.forward_pred(x, visible), s.forward_pred(y, visible))
    for a, b in zip(s.encoder.forward_encoder(x, visible), s.encoder.forward_encoder(y, visible)):
        assert torch.equal(a, b)


def test_mask_tokens_are_trained():
    s = SparKMasked3D(_unet())
    loss, _, _ = s(torch.randn(1, 1, 4, 16, 16))
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in s.mask_tokens)
    assert all(float(t.detach().abs().sum()) == 0 for t in s.mask_tokens)  # zero-initialised


@pytest.mark.parametrize("target", ["raw", "normalized", "lowpass"])
def test_targets(target):
    s = SparKMasked3D(_unet(), mask_unit=(2, 8, 8), target=target)
    x = torch.randn(1, 1, 4, 16, 16) * 2 + 3
    t = s.make_target(x)
    assert t.shape == x.shape
    if target == "raw":
        assert torch.equal(t, x)
    elif target == "normalized":
        units = t.reshape(1, 1, 2, 2, 2, 8, 2, 8)
        means = units.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(8, -1).mean(1)
        assert means.abs().max() < 1e-5
    else:
        assert t.std() < x.std() and torch.allclose(t.mean(), x.mean(), atol=0.1)


def test_gaussian_lowpass_keeps_constants_and_only_blurs_in_plane():
    x = torch.full((1, 1, 3, 9, 9), 2.0)
    torch.testing.assert_close(gaussian_blur_3d(x, (0, 1.5, 1.5)), x)
    z = torch.zeros(1, 1, 3, 9, 9)
    z[0, 0, 1, 4, 4] = 1
    b = gaussian_blur_3d(z, (0, 1, 1))
    assert b[0, 0, 0].abs().max() == 0 and b[0, 0, 1, 4, 3] > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(mask_ratio=1.0), "mask_ratio"), (dict(target="hog"), "target"), (dict(mask_unit=(1, 6, 6)), "multiple"),
     (dict(lowpass_sigma=(1, 1)), "lowpass_sigma")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SparKMasked3D(_unet(), **kwargs)


def test_crop_not_divisible_by_mask_unit():
    s = SparKMasked3D(_unet(), mask_unit=(2, 8, 8))
    with pytest.raises(ConfigError, match="mask_unit"):
        s(torch.zeros(1, 1, 4, 12, 16))
    with pytest.raises(ConfigError, match="not divisible"):
        s(torch.zeros(1, 1, 4, 10, 16))


def test_reconstruct_panels(tmp_path):
    s = SparKMasked3D(_unet()).eval()
    x = torch.randn(1, 1, 4, 16, 16)
    panel = s.reconstruct(x)
    assert list(panel)[0] == "input" and all(v.shape == x.shape for v in panel.values())
    mask = (panel["masked input"] == 0) & (x != 0)
    assert torch.equal(panel["visible + prediction"][~mask], x[~mask])
    panels = pytest.importorskip("ssl_em.pretrain.panels")
    assert panels.save_reconstruction_panel(panel, tmp_path / "p.png").stat().st_size > 0


def test_loss_falls_on_real_em(vnc_crop):
    """40 steps on a real ssTEM crop: the masked loss leaves the predict-the-mean level. Measured over
    init seeds 0-5 (fp32): last/first 0.48-0.74, last 0.54-0.73 of the mean's loss (20 steps left
    0.64-0.85 and 0.72-0.87, too close to the bounds for every seed and CPU)."""
    torch.manual_seed(0)
    raw = vnc_crop["raw"][:4, :64, :64].astype(np.float32)
    x = torch.from_numpy((raw - raw.mean()) / raw.std())[None, None]
    s = SparKMasked3D(_unet(), mask_unit=(2, 8, 8), target="raw")  # 3 k parameters
    opt = torch.optim.AdamW(s.parameters(), lr=3e-3)
    ratios = []
    for _ in range(40):
        loss, _, mask = s(x)
        baseline = masked_mse(torch.zeros_like(x) + (x * mask).sum() / mask.sum(), x, mask)  # predict the mean
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append(loss.item() / baseline.item())
    assert np.mean(ratios[-6:]) < 0.85 * np.mean(ratios[:3]) and np.mean(ratios[-6:]) < 0.9


@pytest.mark.parametrize("mode", ["blindspot", "gaussian"])
def test_denoising(mode):
    torch.manual_seed(0)
    d = Denoising3D(_unet(), mode=mode, ratio=0.05, radius=2, sigma=0.5)
    x = torch.randn(2, 1, 4, 16, 16)
    noisy, mask = d.corrupt(x)
    if mode == "blindspot":
        changed = (noisy != x).float()
        assert changed.sum() > 0 and (changed * (1 - mask)).sum() == 0  # only blind spots change
        assert 0.02 < mask.mean() < 0.1
        # every replacement value comes from the same sample and section
        for b, _, z, y, xx in mask.nonzero().tolist()[:20]:
            assert (x[b, 0, z] == noisy[b, 0, z, y, xx]).any()
    else:
        assert mask.min() == 1 and 0.4 < (noisy - x).std() < 0.6
    loss, pred, m = d(x)
    assert pred.shape == x.shape and m.shape == (2, 1, 4, 16, 16) and torch.isfinite(loss)
    loss.backward()
    assert set(d.reconstruct(x)) == {"input", "corrupted", "prediction"}


def test_denoising_bad_config():
    with pytest.raises(ConfigError):
        Denoising3D(_unet(), mode="n2n")
    with pytest.raises(ConfigError):
        Denoising3D(_unet(), ratio=0)

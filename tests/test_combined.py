"""Masked modelling + SimCLR: the loss is its two terms, pooled features see visible input only, it learns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ssl_em
from ssl_em.errors import ConfigError
from ssl_em.pretrain.combined import MAESimCLR3D, SparKSimCLR3D
from ssl_em.pretrain.losses import nt_xent_loss
from ssl_em.pretrain.mae import MaskedAutoencoder3D
from ssl_em.pretrain.spark import SparKMasked3D


def _objective(kind: str, weight: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mae":
        enc = ssl_em.create_encoder("vit3d_test_patch4", img_size=(8, 32, 32))
        return MAESimCLR3D(enc, contrastive_weight=weight, hidden_dim=32, out_dim=16, decoder_dim=32, decoder_depth=1)
    return SparKSimCLR3D(ssl_em.create_encoder("unet3d_test"), contrastive_weight=weight, hidden_dim=32, out_dim=16)


@pytest.mark.parametrize("kind", ["mae", "spark"])
def test_loss_is_reconstruction_plus_weighted_nt_xent(kind: str) -> None:
    obj = _objective(kind).eval()
    v1, v2 = torch.randn(2, 1, 8, 32, 32), torch.randn(2, 1, 8, 32, 32)
    torch.manual_seed(5)
    loss, h1, h2 = obj(v1, v2)
    # the reconstruction term is the masked objective's own loss on both views with the same masks
    torch.manual_seed(5)
    base = MaskedAutoencoder3D.forward if kind == "mae" else SparKMasked3D.forward
    reconstruction = base(obj, torch.cat([v1, v2]))[0]
    torch.testing.assert_close(obj.last_terms["reconstruction"], reconstruction.detach())
    z1, z2 = obj.contrast.head(torch.cat([h1, h2])).chunk(2)
    torch.testing.assert_close(obj.last_terms["contrastive"], nt_xent_loss(z1, z2, 0.1).detach())
    torch.testing.assert_close(loss, reconstruction + 0.5 * obj.last_terms["contrastive"])
    assert h1.shape == h2.shape == (2, obj.encoder.embed_dim)


@pytest.mark.parametrize("kind", ["mae", "spark"])
def test_pooled_features_see_only_visible_input(kind: str) -> None:
    obj = _objective(kind).eval()
    x = torch.randn(4, 1, 8, 32, 32)
    torch.manual_seed(3)
    if kind == "mae":  # the masks forward() will draw with this seed
        _, mask, _, grid = obj.forward_encoder(x)
        hidden = obj.unpatchify(mask[..., None].expand(-1, -1, obj.patchify(x).shape[-1]), grid).bool()
    else:
        hidden = torch.nn.functional.interpolate(1 - obj.random_visible(x), size=x.shape[-3:]).bool()
    changed = torch.where(hidden, torch.randn_like(x) * 5, x)
    torch.manual_seed(3)
    _, h1, h2 = obj(x[:2], x[2:])
    torch.manual_seed(3)
    _, g1, g2 = obj(changed[:2], changed[2:])
    torch.testing.assert_close(torch.cat([h1, h2]), torch.cat([g1, g2]))
    assert hidden.float().mean() > 0.4  # the test changed a large part of the input


def test_spark_simclr_learns_on_the_phantom(tmp_path: Path) -> None:
    """Both terms fall over 40 steps (mean of the last 5 over the first 5). Measured over init seeds 0-9
    (torch 2.14.1, AVX2 kernels): reconstruction 0.11-0.50, contrastive 0.57-0.80 (at 80 steps 0.55-0.82:
    the contrastive term plateaus early at batch 8), so the bounds 0.8 and 0.9 hold for every seed, not
    only for the one fixed here."""
    from ssl_em.data.datamodule import EMDataModule
    from ssl_em.pretrain.module import Pretraining

    torch.manual_seed(0)
    module = Pretraining(encoder="unet3d_test", method="spark_simclr",
                         method_kwargs={"hidden_dim": 32, "out_dim": 16, "contrastive_weight": 0.5})
    data = EMDataModule(two_views=True, crop_shape=(8, 32, 32), batch_size=8, phantom_shape=(16, 96, 96),
                        samples_per_epoch=40 * 8, val_fraction=0, seed=0)
    opt = torch.optim.AdamW(module.objective.parameters(), lr=2e-3)
    terms = []
    for batch in data.train_dataloader():
        loss = module.objective(batch["view1"], batch["view2"], batch["overlap1"], batch["overlap2"])[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        terms.append({k: float(v) for k, v in module.objective.last_terms.items()})
    first, last = terms[:5], terms[-5:]
    for name, bound in (("reconstruction", 0.8), ("contrastive", 0.9)):
        before, after = (sum(t[name] for t in part) / 5 for part in (first, last))
        assert after < bound * before, (name, before, after)
    png = module.write_panel(batch["view1"][:1], tmp_path / "panel.png")  # panels as for SparK alone
    assert png.stat().st_size > 1000


def test_bad_weight_or_temperature() -> None:
    with pytest.raises(ConfigError, match="contrastive_weight"):
        SparKSimCLR3D(ssl_em.create_encoder("unet3d_test"), contrastive_weight=-1)
    with pytest.raises(ConfigError, match="temperature"):
        SparKSimCLR3D(ssl_em.create_encoder("unet3d_test"), temperature=0)

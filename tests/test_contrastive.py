"""SimCLR / DINO building blocks against slow reference formulas, a short phantom run, recipes via the CLI."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import ssl_em
from ssl_em.errors import ConfigError
from ssl_em.pretrain.callbacks import CollapseMonitor, effective_rank, normalized_std
from ssl_em.pretrain.contrastive import DINO3D, SimCLR3D, cosine_schedule, momentum_update
from ssl_em.pretrain.features import feature_map, pool_features, region_weights
from ssl_em.pretrain.heads import DINOHead
from ssl_em.pretrain.losses import DINOLoss, nt_xent_loss

REPO = Path(__file__).resolve().parents[1]
TWO_VIEW_METHODS = ("simclr", "dino", "mae_simclr", "spark_simclr")
RECIPES = sorted(p for p in (REPO / "recipes" / "pretrain").glob("*.yaml") if p.name.startswith(TWO_VIEW_METHODS))


def _nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR eq. (1), one anchor at a time."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2]).double()]
    n, b, total = len(z), len(z1), 0.0
    for i in range(n):
        j = (i + b) % n
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n


def test_nt_xent_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.1, 0.5):
        assert nt_xent_loss(z1, z2, t).item() == pytest.approx(_nt_xent_reference(z1, z2, t), rel=1e-5)
    # identical views score far better than random pairs
    assert nt_xent_loss(z1, z1, 0.1) < nt_xent_loss(z1, z2, 0.1)
    with pytest.raises(ConfigError):
        nt_xent_loss(z1[:1], z2[:1])


def test_dino_loss_matches_reference_and_centres() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    loss = DINOLoss(6, student_temp=0.1, center_momentum=0.9)
    loss.center.normal_(generator=g)
    center = loss.center.clone()
    ref = 0.0
    for i in range(2):
        for j in range(2):
            if i != j:
                p_t = F.softmax((t[i] - center) / 0.04, dim=-1)
                ref += -(p_t * F.log_softmax(s[j] / 0.1, dim=-1)).sum(-1).mean().item()
    assert loss(s, t, 0.04).item() == pytest.approx(ref / 2, rel=1e-5)
    assert torch.allclose(loss.center, 0.9 * center + 0.1 * t.reshape(-1, 6).mean(0, keepdim=True))


def test_momentum_update_and_schedule() -> None:
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    bn_s, bn_t = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    bn_s.running_mean.fill_(3.0)
    before = [p.clone() for p in teacher.parameters()]
    momentum_update(teacher, student, 0.9)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    momentum_update(bn_t, bn_s, 0.5)
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)  # buffers are copied, not averaged
    assert cosine_schedule(0.0, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_schedule(0.5, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(2.0, 0.996, 1.0) == pytest.approx(1.0)


def test_region_pooling_uses_the_overlap() -> None:
    fmap = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 1, 2, 4, 4)  # cells of 4 x 8 x 8 voxels
    box = torch.tensor([[[0, 4], [8, 32], [0, 16]]])  # z cell 0, y cells 1-3, x cells 0-1
    w = region_weights(box, (8, 32, 32), (2, 4, 4))
    assert w.sum() == 6
    assert pool_features(fmap, box, (8, 32, 32)).item() == pytest.approx(fmap[0, 0, 0, 1:4, 0:2].mean().item())
    thin = torch.tensor([[[1, 2], [9, 10], [30, 31]]])  # thinner than a cell: the cell holding its centre
    assert pool_features(fmap, thin, (8, 32, 32)).item() == fmap[0, 0, 0, 1, 3].item()
    assert pool_features(fmap).item() == pytest.approx(fmap.mean().item())


@pytest.mark.parametrize("name,feature", [("vit3d_test_patch4", "auto"), ("unet3d_test", "bottleneck"),
                                          ("unet3d_test", "dense")])
def test_feature_map_shapes(name: str, feature: str) -> None:
    enc = ssl_em.create_encoder(name)
    x = torch.randn(2, 1, 8, 32, 32)
    fmap = feature_map(enc, x, feature)
    if feature == "dense":
        assert fmap.shape == (2, enc.dense_dim, 8, 32, 32)
    else:
        assert fmap.shape == (2, enc.embed_dim, *enc.grid_size(x.shape))


def _phantom_views(n: int, seed: int) -> dict[str, torch.Tensor]:
    from ssl_em.data.crops import TwoViewDataset
    from ssl_em.data.phantom import make_phantom

    ds = TwoViewDataset([make_phantom((16, 96, 96), seed=3).raw], (8, 32, 32), samples_per_epoch=n, seed=seed)
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_simclr_positives_beat_negatives_after_training() -> None:
    """12 steps on 8 crops, scored on crops never seen. Measured over init seeds 0-7 (torch 2.14.1, AVX2
    kernels): the positive-minus-negative margin rose by 0.26-0.57 to 0.04-0.36, the held-out NT-Xent fell
    to 0.41-0.77 of its start; the bounds below (> 0, +0.15, < 0.85) hold for every seed, not just this one."""
    torch.manual_seed(1)
    objective = SimCLR3D(ssl_em.create_encoder("unet3d_test"), hidden_dim=32, out_dim=16, temperature=0.2)
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    train, test = _phantom_views(8, seed=0), _phantom_views(8, seed=99)  # test crops never seen in training

    @torch.no_grad()
    def held_out() -> tuple[float, float]:
        """(positive minus negative cosine similarity, NT-Xent) on the test crops, batch-statistics BN."""
        h = objective.embed(objective.encoder, torch.cat([test["view1"], test["view2"]]),
                            torch.cat([test["overlap1"], test["overlap2"]]))
        z1, z2 = F.normalize(objective.head(h), dim=1).chunk(2)
        sim = z1 @ z2.T  # (8, 8): diagonal = positive pairs
        margin = sim.diag().mean() - sim[~torch.eye(8, dtype=torch.bool)].mean()
        return float(margin), float(nt_xent_loss(z1, z2, 0.2))

    margin0, loss0 = held_out()
    for _ in range(12):
        loss, h1, h2 = objective(train["view1"], train["view2"], train["overlap1"], train["overlap2"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert h1.shape == (8, objective.feature_dim) and h2.shape == h1.shape
    margin, held_loss = held_out()
    assert margin > 0.0 and margin > margin0 + 0.15  # positives now score above negatives
    assert held_loss < 0.85 * loss0


def test_dino_teacher_is_frozen_and_follows_student() -> None:
    torch.manual_seed(0)
    objective = DINO3D(ssl_em.create_encoder("vit3d_test_patch4"), out_dim=64, hidden_dim=32, bottleneck_dim=16,
                       momentum=0.5, momentum_end=1.0)
    objective.train()
    assert not objective.teacher_backbone.training and not any(p.requires_grad for p in objective.teacher_backbone.parameters())
    views = torch.randn(2, 1, 8, 32, 32), torch.randn(2, 1, 8, 32, 32)
    loss, h1, _ = objective(*views)
    loss.backward()
    assert objective.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert h1.shape == (2, 32)
    before = objective.teacher_backbone.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        objective.encoder.blocks[0].attn.qkv.weight.add_(1.0)
    assert objective.update_teacher(0.0) == pytest.approx(0.5)
    assert torch.allclose(objective.teacher_backbone.blocks[0].attn.qkv.weight,
                          0.5 * before + 0.5 * objective.encoder.blocks[0].attn.qkv.weight)
    assert objective.update_teacher(1.0) == pytest.approx(1.0) and float(objective.progress) == 1.0
    head = DINOHead(8, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    assert head(torch.randn(3, 8)).shape == (3, 10)
    with pytest.raises(ConfigError, match="B>=2"):  # batch standardisation needs two or more rows
        head(torch.randn(1, 8))
    plain = DINOHead(8, out_dim=10, hidden_dim=8, bottleneck_dim=4, standardize_input=False)
    assert plain(torch.randn(1, 8)).shape == (1, 10)


def test_collapse_statistics_and_warning() -> None:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 16, generator=g)
    assert normalized_std(spread) == pytest.approx(1.0, abs=0.1)
    assert normalized_std(torch.ones(64, 16)) == pytest.approx(0.0, abs=1e-6)
    assert effective_rank(torch.ones(64, 16)) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.eye(16)) == pytest.approx(16.0, rel=1e-4)
    logged: dict[str, float] = {}
    module = SimpleNamespace(last_embeddings=torch.ones(8, 16) + 1e-4 * torch.randn(8, 16, generator=g),
                             log_dict=lambda d, **kw: logged.update(d))
    trainer = SimpleNamespace(global_step=10, is_global_zero=True)
    monitor = CollapseMonitor(every_n_steps=10)
    with pytest.warns(UserWarning, match="collapse"):
        monitor.on_train_batch_end(trainer, module, None, {}, 0)
    assert logged["collapse/std"] < 0.05
    module.last_embeddings = spread[:8]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.on_train_batch_end(trainer, module, None, {}, 0)  # warns once only
    # features that start close together are not a collapse until they shrink to under half of that
    close = torch.nn.functional.normalize(torch.randn(16), dim=0) + 0.01 * torch.randn(256, 16, generator=g)
    monitor = CollapseMonitor(every_n_steps=10, window=256)
    module.last_embeddings = close
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.on_train_batch_end(trainer, module, None, {}, 0)
    assert monitor.last["collapse/std"] < 0.05 and monitor.last["collapse/effective_rank"] > 1.5
    module.last_embeddings = close[:1] + 0.2 * (close - close[:1])  # the spread shrinks five-fold
    monitor.buffer.clear()
    with pytest.warns(UserWarning, match="half its first value"):
        monitor.on_train_batch_end(trainer, module, None, {}, 0)


def test_export_takes_the_student_encoder(tmp_path: Path) -> None:
    from ssl_em.pretrain.export_encoder import export_from_checkpoint
    from ssl_em.pretrain.module import Pretraining

    module = Pretraining(encoder="vit3d_test_patch4", method="dino",
                         method_kwargs={"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8})
    with torch.no_grad():
        module.objective.encoder.blocks[0].attn.qkv.weight.fill_(0.25)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    enc = ssl_em.load_encoder(export_from_checkpoint(ckpt, tmp_path / "enc"))
    assert torch.all(enc.blocks[0].attn.qkv.weight == 0.25)
    teacher = ssl_em.load_encoder(export_from_checkpoint(ckpt, tmp_path / "teacher", prefix="objective.teacher_backbone."))
    assert not torch.all(teacher.blocks[0].attn.qkv.weight == 0.25)


def test_two_view_method_needs_two_view_data() -> None:
    from ssl_em.pretrain.module import Pretraining

    module = Pretraining(encoder="unet3d_test", method="simclr", method_kwargs={"hidden_dim": 8, "out_dim": 8})
    with pytest.raises(ConfigError, match="two_views"):
        module.training_step({"raw": torch.randn(2, 1, 8, 32, 32)}, 0)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_fast_dev_run(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_em.fit import build_cli

    monkeypatch.chdir(tmp_path)
    vit = "vit3d" in recipe.stem
    encoder = ["--model.init_args.encoder", "vit3d_test_patch4", "--model.init_args.encoder_kwargs",
               "{img_size: [8, 32, 32]}"] if vit else ["--model.init_args.encoder", "unet3d_test"]
    cli = build_cli([
        "fit", "--config", str(recipe), "--trainer.fast_dev_run", "2", "--trainer.default_root_dir", str(tmp_path),
        *encoder, "--model.init_args.method_kwargs.hidden_dim", "16",
        "--data.init_args.num_workers", "0", "--data.init_args.phantom_shape", "[16, 64, 64]",
        "--data.init_args.crop_shape", "[8, 32, 32]", "--data.init_args.batch_size", "2",
    ])
    assert cli.model.two_views
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))


def test_simclr_trains_every_encoder_weight_and_its_loss_falls_on_fresh_crops() -> None:
    """100 SimCLR steps through the data module, every batch new crops of a phantom: every encoder and
    head weight gets a gradient, and NT-Xent falls well below log(2B - 1), where features that do not
    tell crops apart leave it. Measured over seeds 0-5 on two sets of CPU kernels (AVX2, and
    ``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41``): first 10 steps 2.52-3.23, last 10
    1.60-2.07, a fall of at least 0.81. Whether 100 steps also lift a frozen-feature probe above
    random init is the benchmark's question (``benchmarks/contrastive_vs_mae.py``): AP over the same
    12 runs ranged 0.08-0.32 against 0.07-0.11, with 2 of 12 runs below their random init."""
    from ssl_em.data.datamodule import EMDataModule
    from ssl_em.pretrain.module import build_objective

    torch.manual_seed(0)
    encoder = ssl_em.create_encoder("unet3d_tiny")
    objective = build_objective("simclr", encoder, hidden_dim=256, out_dim=128, temperature=0.1).train()
    data = EMDataModule(two_views=True, crop_shape=(8, 32, 32), batch_size=8, phantom_shape=(16, 96, 96),
                        samples_per_epoch=100 * 8, val_fraction=0, seed=0)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for step, batch in enumerate(data.train_dataloader()):
        loss = objective(batch["view1"], batch["view2"], batch["overlap1"], batch["overlap2"])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            # SimCLR pools the bottleneck: the down path and the head learn, the up path (ups, decoder) not
            up_path = ("encoder.ups.", "encoder.decoder.")
            silent = [n for n, p in objective.named_parameters()
                      if not n.startswith(up_path) and not (p.grad is not None and p.grad.abs().sum() > 0)]
            assert not silent, silent
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 3.0)
        opt.step()
        losses.append(float(loss))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < math.log(2 * 8 - 1) - 0.4 and last < first - 0.4, (first, last)


def test_dino_leaves_the_uniform_teacher() -> None:
    """100 DINO steps of a test ViT on one phantom: the loss falls below log K. Without the head's batch
    standardisation the teacher is uniform and the loss sits at log K to three decimals. Measured over
    seeds 0-9 (fp32, the same on AVX2 and SSE4.1 kernels): 0.16-1.47 below log K. A frozen-feature probe
    after these 100 steps beat the same init in 8 of 10 seeds (AP ratio 0.92-1.41): the benchmark's
    question (``benchmarks/contrastive_vs_mae.py``), not a verdict a test can give on every CPU."""
    from ssl_em.data.datamodule import EMDataModule

    torch.manual_seed(0)
    encoder = ssl_em.create_encoder("vit3d_test_patch4", img_size=(8, 32, 32))
    k = 1024
    objective = DINO3D(encoder, out_dim=k, hidden_dim=256, bottleneck_dim=64, momentum=0.99).train()
    data = EMDataModule(two_views=True, crop_shape=(8, 32, 32), batch_size=8, phantom_shape=(16, 96, 96),
                        samples_per_epoch=100 * 8, val_fraction=0, seed=0)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    losses = []
    for step, batch in enumerate(data.train_dataloader()):
        loss = objective(batch["view1"], batch["view2"], batch["overlap1"], batch["overlap2"])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        objective.update_teacher(step / 99)
        losses.append(float(loss))
    assert sum(losses[-20:]) / 20 < math.log(k) - 0.05, losses[-20:]

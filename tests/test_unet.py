"""The plain U-Net as ssl-em's CNN encoder family: contract, plan layout, masked BatchNorm (SparK), dense
inpainting, one implementation for pretrained and from-scratch runs, the encoder's learning-rate scale."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ssl_em.models  # noqa: F401  (registers the encoders in timm)
from ssl_em.errors import ConfigError
from ssl_em.models.unet import MaskedBatchNorm3d, UNet


def test_unet_small_is_the_plain_unet_under_the_encoder_contract() -> None:
    import timm

    m = timm.create_model("unet_small").eval()
    assert isinstance(m, UNet) and m.patch_size == (1, 16, 16) and m.embed_dim == 256 and m.dense_dim == 16
    assert 1.8e6 < sum(p.numel() for p in m.parameters()) < 2.0e6  # the plain U-Net users train, ~1.9 M
    kinds = {type(x).__name__ for x in m.modules()}
    assert {"MaskedBatchNorm3d", "MaxPool3d", "ConvTranspose3d"} <= kinds and "GroupNorm" not in kinds
    x = torch.randn(2, 1, 1, 64, 64)
    feats = m.forward_intermediates(x)
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128, 256] and feats[-1].shape[-2:] == (4, 4)
    assert m.forward_features(x).shape == (2, 16, 256) and m(x).shape == (2, 16, 1, 64, 64)
    assert m.forward_intermediates(x, indices=2, output_fmt="NLC")[-1].shape == (2, 16, 256)
    # decoder concatenates skips (twice the channels into each decoder block), convs named for peft
    assert m.decoder[0].conv1.in_channels == 32 and all(hasattr(s, "conv1") and hasattr(s, "conv2") for s in m.stages)
    with pytest.raises(ConfigError, match="divisible"):
        m(torch.randn(1, 1, 1, 40, 40))


def test_the_plan_shapes_it_in_plane_for_sections_and_3d_for_isotropic_voxels(tmp_path) -> None:
    from ssl_em.models import create_encoder, load_encoder, save_encoder

    iso = create_encoder("unet_small", spacing=(8.0, 8.0, 8.0), crop_shape=(32, 64, 64))
    assert iso.patch_size == (16, 16, 16) and iso.stages[0].conv1.kernel_size == (3, 3, 3)
    sbem = create_encoder("unet_small", spacing=(40.0, 11.8, 11.8), crop_shape=(8, 112, 112))  # z 3.4x coarser
    assert sbem.pools_zyx[0] == (1, 2, 2) and (2, 2, 2) in sbem.pools_zyx  # z pooled once in-plane is coarse enough
    # the saved encoder records the layout itself: it rebuilds the same network on any later crop
    kw = sbem.encoder_config["kwargs"]
    assert "spacing" not in kw and kw["pools"] == [list(p) for p in sbem.pools_zyx]
    save_encoder(sbem, tmp_path / "enc")
    back = load_encoder(tmp_path / "enc")
    assert back.pools_zyx == sbem.pools_zyx
    x = torch.randn(1, 1, 8, 32, 32)
    torch.testing.assert_close(back(x), sbem.eval()(x))
    with pytest.raises(ConfigError, match="pools"):
        UNet(widths=(4, 8), pools=[(1, 3, 3)], kernels=[(1, 3, 3)] * 2)


def test_masked_batchnorm_takes_statistics_over_visible_voxels_only() -> None:
    torch.manual_seed(0)
    bn = MaskedBatchNorm3d(3).train()
    x = torch.randn(2, 3, 1, 8, 8) * 2 + 1
    mask = (torch.rand(2, 1, 1, 8, 8) > 0.5).float()
    y = bn(x, mask)
    visible = x.permute(1, 0, 2, 3, 4)[:, mask[:, 0].bool()]  # (C, n visible)
    ref = (visible - visible.mean(1, keepdim=True)) / (visible.var(1, unbiased=False, keepdim=True) + bn.eps).sqrt()
    torch.testing.assert_close(y.permute(1, 0, 2, 3, 4)[:, mask[:, 0].bool()], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, 0.1 * visible.mean(1))
    # what the masked voxels hold does not change the visible outputs
    y2 = MaskedBatchNorm3d(3).train()(x + 50 * (1 - mask), mask)
    torch.testing.assert_close(y2 * mask, y * mask)
    torch.testing.assert_close(MaskedBatchNorm3d(3).train()(x), torch.nn.BatchNorm3d(3).train()(x))  # no mask


@pytest.mark.parametrize("relu", [False, True])
def test_masked_batchnorm_gradients_equal_batchnorm_over_the_gathered_visible_voxels(relu: bool) -> None:
    # the fused backward against autograd through plain BatchNorm on only the visible voxels (float64)
    torch.manual_seed(1)
    x = (torch.randn(3, 4, 2, 6, 6, dtype=torch.float64) * 3 + 2).requires_grad_()
    mask = (torch.rand(3, 1, 2, 6, 6) > 0.6).double()
    bn = MaskedBatchNorm3d(4).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    upstream = torch.randn(3, 4, 2, 6, 6, dtype=torch.float64)
    out = bn(x, mask, relu=relu)
    (out * upstream).sum().backward()
    ours = (x.grad.clone(), bn.weight.grad.clone(), bn.bias.grad.clone())
    assert (out * (1 - mask)).abs().max() == 0  # masked voxels are zero

    x.grad, ref_bn = None, torch.nn.BatchNorm3d(4).double().train()
    ref_bn.load_state_dict({k: v for k, v in bn.state_dict().items() if "running" not in k and "batches" not in k},
                           strict=False)
    keep = mask[:, 0].bool()  # (B, D, H, W)
    visible = x.permute(1, 0, 2, 3, 4)[:, keep]  # (C, n)
    ref = ref_bn(visible.t()[:, :, None, None, None])[:, :, 0, 0, 0].t()
    ref = torch.relu(ref) if relu else ref
    (ref * upstream.permute(1, 0, 2, 3, 4)[:, keep]).sum().backward()
    torch.testing.assert_close(out.permute(1, 0, 2, 3, 4)[:, keep], ref)
    for got, want in zip(ours, (x.grad, ref_bn.weight.grad, ref_bn.bias.grad)):
        torch.testing.assert_close(got, want)
    assert (ours[0] * (1 - mask)).abs().max() == 0  # nothing flows back into masked voxels
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def test_spark_hides_masked_units_from_the_unet_and_inpainting_runs_it_densely() -> None:
    from ssl_em.pretrain.spark import MaskedInpainting3D, SparKMasked3D

    torch.manual_seed(0)
    x = torch.randn(4, 1, 1, 32, 32)
    spark = SparKMasked3D(ssl_em.models.create_encoder("unet_test", widths=(4, 8, 8)), mask_ratio=0.5).train()
    visible = spark.random_visible(x)
    hidden = 1 - torch.nn.functional.interpolate(visible, size=x.shape[-3:])
    y = x + 5 * torch.randn_like(x) * hidden
    assert torch.equal(spark.forward_pred(x, visible), spark.forward_pred(y, visible))
    inpaint = MaskedInpainting3D(ssl_em.models.create_encoder("unet_test", widths=(4, 8, 8)), mask_ratio=0.5).train()
    assert inpaint.mask_tokens is None and not inpaint.sparse
    torch.testing.assert_close(inpaint.forward_pred(x, visible), inpaint.forward_pred(y, visible))  # zeroed input
    seen = []
    hook = inpaint.encoder.stages[0].conv1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    loss, pred, mask = inpaint(x, visible)
    hook.remove()
    assert torch.equal(seen[0], x * (1 - hidden)) and torch.equal(mask, hidden)
    torch.testing.assert_close(loss, ((pred - x) ** 2 * mask).sum() / mask.sum())


def test_unet_and_scratch_are_one_network(tmp_path) -> None:
    """The ``unet`` control and ``scratch`` (the study's U-Net encoder from random init) build the same
    modules from the same seed: one U-Net implementation in the project."""
    from ssl_em.models import create_encoder, save_encoder
    from ssl_em.study.config import StudyConfig
    from ssl_em.study.train import build_module, planned_encoder_kwargs

    cfg = StudyConfig(architecture="unet_small", methods=("scratch", "unet"), fractions=(1.0,),
                      voxel_size=(50.0, 9.2, 9.2), crop_shape=(1, 64, 64), batch_size=2, precision="32")
    enc = create_encoder("unet_small", **planned_encoder_kwargs(cfg))
    save_encoder(enc, tmp_path / "enc")
    a, b = build_module("unet", cfg, None, 3, 1e-3, 10), build_module("scratch", cfg, tmp_path / "enc", 3, 1e-3, 10)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((tmp_path / "enc" / "encoder.json").read_text())["architecture"] == "unet_small"


def test_the_encoder_path_trains_at_a_lower_rate_when_asked() -> None:
    from ssl_em.adapters.finetune import FineTuning

    m = FineTuning(task="mito", encoder="unet_test", adapter="full", encoder_lr_scale=0.25, lr=1e-3,
                   export_on_fit_end=False)
    slow = {id(p) for p in m.encoder_path_parameters()}
    names = [n for n, p in m.model.named_parameters() if id(p) in slow]
    assert names and all(".stages." in n for n in names)  # not the decoder path, not the head
    m._trainer = SimpleNamespace(estimated_stepping_batches=10, gradient_clip_val=None)  # what the optimiser reads
    groups = m.configure_optimizers()["optimizer"].param_groups
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 2.5e-4])  # peaks; the warm-up scales both
    assert {id(p) for p in groups[1]["params"]} == slow
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        FineTuning(task="mito", encoder="unet_test", encoder_lr_scale=0)


def test_lora_on_the_unet_trains_its_batchnorms_and_decoder_in_full() -> None:
    from ssl_em.adapters.finetune import FineTuning

    m = FineTuning(task="mito", encoder="unet_test", adapter="lora", adapter_kwargs={"train_decoder": True},
                   export_on_fit_end=False)
    trainable = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and ".stages." in n for n in trainable)
    assert any(".stages.0.bn1" in n for n in trainable) and any(".decoder.0.conv1" in n for n in trainable)
    assert not any(".stages.0.conv1.base_layer" in n for n in trainable)  # the pretrained conv stays frozen


def test_the_study_pretrains_and_fine_tunes_the_unet_family(tmp_path) -> None:
    from ssl_em.data.phantom import make_phantom
    from ssl_em.study import Study, StudyConfig

    target, pool = make_phantom((4, 160, 64), seed=2), make_phantom((4, 64, 64), seed=1)
    cfg = StudyConfig(task="mito", architecture="unet_test", methods=("full", "scratch"), fractions=(0.5,), steps=3,
                      pretrain_steps=3, pretrain_method="inpaint", crop_shape=(1, 32, 32), batch_size=2,
                      voxel_size=(50.0, 9.2, 9.2), lrs={"full": (1e-3,), "scratch": (1e-3,)}, precision="32",
                      encoder_lr_scale=0.5)
    Study(target.raw, target.mito, [pool.raw], cfg, tmp_path / "out").run()
    sidecar = json.loads((tmp_path / "out" / "pretrain" / "encoder" / "encoder.json").read_text())
    assert sidecar["architecture"] == "unet_test" and sidecar["metadata"]["method"] == "inpaint"
    assert sidecar["kwargs"]["pools"] == [[1, 2, 2]]  # shaped by the plan's 2-D crops
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["method"] for r in doc["records"]} == {"full", "scratch"}
    assert all(np.isfinite(r["value"]) for r in doc["records"])


def test_channels_last_unet_gradients_keep_their_parameters_layout(tmp_path) -> None:
    """The plain U-Net keeps channels-last weights (oneDNN runs it ~20 % faster); every gradient of SparK's and the
    fine-tuning model's parameters comes back in its parameter's strides, which DDP's gradient buckets need (a
    mismatch costs a copy per step and a warning)."""
    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.pretrain.spark import SparKMasked3D

    torch.manual_seed(0)
    enc = ssl_em.models.create_encoder("unet_test", widths=(4, 8, 8))
    assert enc.stages[0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    spark = SparKMasked3D(enc, mask_ratio=0.5)
    spark(torch.randn(2, 1, 1, 32, 32))[0].backward()
    tuned = FineTuning(task="mito", encoder="unet_test", adapter="full", export_on_fit_end=False)
    tuned.model(torch.randn(2, 1, 1, 32, 32)).sum().backward()
    for model in (spark, tuned.model):  # strides of size-1 dims vary with oneDNN's kernel choice: not compared
        mismatched = [n for n, p in model.named_parameters() if p.grad is not None and
                      [st for st, n_ in zip(p.grad.stride(), p.shape) if n_ > 1] != [st for st, n_ in zip(p.stride(), p.shape) if n_ > 1]]
        assert not mismatched, mismatched
    # the 1x1x1 output convs take the channels-last strides of the maps they read (DDP's buckets follow them)
    head = next(m for n, m in tuned.model.named_modules() if n.endswith("head.conv"))
    for conv in (spark.pred, head):  # (O, C, 1, 1, 1): channels-last strides are (C, 1, C, C, C), contiguous ones (C, 1, 1, 1, 1)
        assert conv.weight.stride()[2:] == (conv.weight.shape[1],) * 3
    # saved as safetensors (contiguous) and loaded back into the channels-last weights unchanged
    from ssl_em.models.weights_io import load_encoder_weights, save_encoder

    save_encoder(enc, tmp_path / "enc")
    back = load_encoder_weights(ssl_em.models.create_encoder("unet_test", widths=(4, 8, 8)), tmp_path / "enc")
    assert back.stages[0].conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    for (name, a), b in zip(enc.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name

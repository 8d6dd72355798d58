"""peft adapters on ssl-em encoders: what is wrapped, what trains, checkpoints, merging, real EM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ssl_em
import ssl_em.models.unet3d  # noqa: F401  (registers the U-Net variants)
from ssl_em.adapters import (
    ADAPTER_METHODS, add_adapter, base_weights_sha256, build_segmentation_model, count_trainable, get_task, load_adapter,
    merge_adapter, save_adapter,
)
from ssl_em.errors import CheckpointError, ConfigError

VIT = "vit3d_test_patch2x16"
X_SHAPE = (1, 1, 2, 32, 32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int = 0, head: str = "linear", encoder: str = VIT, **kw):
    torch.manual_seed(seed)
    enc = ssl_em.create_encoder(encoder, **kw)
    extra = {"decoder_channels": 4} if head == "unetr" else {}
    return build_segmentation_model(enc, head, out_channels=2, **extra)


def _train(model, steps: int = 2, lr: float = 0.05, seed: int = 0, shape=X_SHAPE) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        x = torch.randn(shape, generator=g)
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _wrapped(model) -> list[str]:
    return sorted(n for n, m in model.base_model.named_modules() if hasattr(m, "base_layer"))


def test_lora_wraps_exactly_the_named_targets():
    model = add_adapter(_model(), "lora", r=2)
    expected = sorted(f"encoder.blocks.{b}.{t}" for b in range(2)
                      for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert _wrapped(model) == expected == sorted(model.spec["targets"])  # not patch_embed.proj, not the head
    trainable = {n.split(".lora_")[0] for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert trainable == {*expected, "head.conv.weight", "head.conv.bias"}

    regex = add_adapter(_model(), "lora", targets=[r"encoder\.blocks\.1\..*(qkv|fc2)"])
    assert _wrapped(regex) == ["encoder.blocks.1.attn.qkv", "encoder.blocks.1.mlp.fc2"]
    plain = add_adapter(_model(), "lora", targets=["fc1"])
    assert _wrapped(plain) == ["encoder.blocks.0.mlp.fc1", "encoder.blocks.1.mlp.fc1"]


def test_unet_defaults_to_its_convs():
    base = _model(head="dense", encoder="unet3d_test")
    convs = sorted(n for n, m in base.encoder.named_modules()
                   if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1))  # 1x1x1: peft cannot merge
    model = add_adapter(base, "lora", r=2)
    assert _wrapped(model) == [f"encoder.{n}" for n in convs] and convs
    _train(model, 1, shape=(1, 1, 4, 16, 16))
    x = torch.randn(1, 1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(merge_adapter(model)(x), model(x), rtol=1e-4, atol=1e-4)
    shortcut = add_adapter(_model(head="dense", encoder="unet3d_test"), "lora", targets=["shortcut"])
    with pytest.raises(ConfigError, match="cannot merge"):
        merge_adapter(shortcut)
    with pytest.raises(ConfigError, match="wraps only Linear"):
        add_adapter(_model(head="dense", encoder="unet3d_test"), "loha")


def test_unet_train_decoder_adapts_the_encoder_path_and_trains_the_decoder(tmp_path):
    base = _model(head="dense", encoder="unet3d_test")
    model = add_adapter(base, "lora", r=2, train_decoder=True)
    wrapped = _wrapped(model)
    assert wrapped and all(n.startswith("encoder.stages.") for n in wrapped)
    trainable = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    decoder = {n for n, _ in base.named_parameters() if n.startswith(("encoder.decoder.", "encoder.ups."))}
    assert decoder and decoder <= trainable  # the decoder path trains in full
    stage_norms = {n for n in trainable if n.startswith("encoder.stages.") and ".norm" in n}
    assert stage_norms, "the encoder path's norms train too"
    assert not any(n.endswith("base_layer.weight") for n in trainable)  # adapted convs stay frozen
    _train(model, 2, shape=(1, 1, 4, 16, 16))
    out = save_adapter(model, tmp_path / "a", "unet3d_test")
    loaded = load_adapter(_model(head="dense", encoder="unet3d_test"), out)
    x = torch.randn(1, 1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ConfigError, match="train_decoder needs an encoder with a decoder path"):
        add_adapter(_model(), "lora", train_decoder=True)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_each_method_trains_adapter_only_and_merges(method):
    model = add_adapter(_model(), method, r=2)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    base_sha = model.base_sha256
    _train(model, 2)
    after = model.base_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("head.") for k in changed)
    if method == "full":
        assert any(k.startswith("encoder.") for k in changed)
    else:  # the base is untouched: only adapter tensors and the head moved
        prefix = model.adapter_prefix or "<none>"
        assert all(k.startswith("head.") or prefix in k for k in changed)
        assert base_weights_sha256(model) == base_sha
        assert (method == "frozen") != any(prefix in k for k in changed)
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_adapter(model)
        assert not any(hasattr(m, "base_layer") for m in merged.modules())
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-4, atol=1e-4)


def test_count_trainable():
    base_total = count_trainable(_model())[1]
    trainable, total = count_trainable(add_adapter(_model(), "frozen"))
    assert total == base_total and trainable == 32 * 2 + 2  # the 1x1x1 conv head only
    assert count_trainable(add_adapter(_model(), "full")) == (base_total, base_total)
    lora_trainable, lora_total = count_trainable(add_adapter(_model(), "lora", r=2))
    assert trainable < lora_trainable < lora_total < base_total * 1.2


def test_adapter_checkpoint_roundtrip_and_size(tmp_path):
    model = add_adapter(_model(), "lora", r=2)
    _train(model, 2)
    out = save_adapter(model, tmp_path / "mito-lora", VIT, {"task": "mito", "voxel_size": [50, 4.6, 4.6]})
    weights, sidecar = out / "adapter.safetensors", out / "adapter.json"
    info = json.loads(sidecar.read_text())
    assert info["base"]["name_or_path"] == VIT and info["base"]["architecture"] == VIT
    assert info["base"]["sha256"] == model.base_sha256 and info["metadata"]["task"] == "mito"
    base = _model()
    base_bytes = sum(p.numel() * p.element_size() for p in base.encoder.parameters())
    assert weights.stat().st_size < 0.1 * base_bytes  # adapter + linear head only

    loaded = load_adapter(_model(), out)  # same seed: the same base weights
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_onto_a_different_base_is_refused(tmp_path):
    out = save_adapter(add_adapter(_model(0), "lora", r=2), tmp_path / "a", VIT)
    with pytest.raises(CheckpointError, match=rf"trained on base {VIT} \(sha256 \w+\) but the given model is "
                                               rf"{VIT} with base sha256 \w+") as err:
        load_adapter(_model(1), out)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        load_adapter(_model(0), tmp_path)
    torch.manual_seed(0)
    three = build_segmentation_model(ssl_em.create_encoder(VIT), "linear", out_channels=3)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_adapter(three, out)


def test_base_weights_loaded_after_injection_are_caught(tmp_path):
    model = add_adapter(_model(0), "lora", r=2)
    with torch.no_grad():  # e.g. a pretrained checkpoint copied in after add_adapter
        model.base_model.encoder.blocks[0].attn.qkv.base_layer.weight.add_(1)
    with pytest.raises(CheckpointError, match="load pretrained weights before add_adapter"):
        save_adapter(model, tmp_path / "a", VIT)


def test_bad_adapter_arguments():
    with pytest.raises(ConfigError, match="unknown adapter method"):
        add_adapter(_model(), "prefix")
    with pytest.raises(ConfigError, match="match no module"):
        add_adapter(_model(), "lora", targets=["query"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        add_adapter(_model(), "lora", modules_to_save=("decoder",))
    with pytest.raises(ConfigError, match="already has an adapter"):
        add_adapter(add_adapter(_model(), "lora"), "lora")


def test_lora_on_two_labelled_slices_of_real_em_raises_mito_ap(vnc_crop):
    """30 LoRA steps on two labelled sections lift the held-out average precision of the logits well
    above the untrained model and chance. Measured over init seeds 0-5 (fp32): AP 0.024-0.043 untrained
    (chance 0.037) -> 0.076-0.191 trained, at least 2.1x the larger of the two. IoU at logit 0 was
    asserted before and failed at other seeds (0.045 vs 0.037): 30 steps leave the logits uncalibrated."""
    from sklearn.metrics import average_precision_score

    raw, mito = vnc_crop["raw"], vnc_crop["mito"]  # (8, 128, 128); mitochondria in sections 0-2
    x = torch.from_numpy(((raw - raw.mean()) / raw.std()).astype(np.float32))[None, None]
    task = get_task("mito", voxel_size=(50, 4.6, 4.6))
    mask = np.zeros(mito.shape, np.float32)
    mask[1:3] = 1  # two labelled sections; the other six are held out
    target, tmask = (torch.from_numpy(a)[None] for a in task.make_targets(mito, mask))
    held_out = [0, 3, 4, 5, 6, 7]
    truth = mito[held_out] > 0
    model = add_adapter(_model(0, head="unetr"), "lora", r=4)

    def ap() -> float:
        with torch.no_grad():
            logits = model(x)[0, 0].numpy()[held_out]
        return average_precision_score(truth.ravel(), logits.ravel())

    untrained = ap()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        y0, x0 = torch.randint(0, 65, (2,), generator=g).tolist()
        box = (slice(None), slice(None), slice(0, 4), slice(y0, y0 + 64), slice(x0, x0 + 64))
        loss = task.loss(model(x[box]), target[box], tmask[box])
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = ap()
    assert trained > 1.5 * max(untrained, truth.mean()), (untrained, trained, truth.mean())


def test_load_segmentation_model_rebuilds_everything_from_the_sidecars(tmp_path):
    from ssl_em.adapters import load_segmentation_model

    torch.manual_seed(0)
    ssl_em.save_encoder(ssl_em.create_encoder(VIT), tmp_path / "encoder", {"voxel_size": [50, 4.6, 4.6]})
    base = build_segmentation_model(ssl_em.load_encoder(tmp_path / "encoder"), "unetr", 2, decoder_channels=4)
    model = add_adapter(base, "dora", r=2)
    _train(model, 1)
    save_adapter(model, tmp_path / "adapter", tmp_path / "encoder", {"task": "mito"})
    rebuilt = load_segmentation_model(tmp_path / "adapter").eval()
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))

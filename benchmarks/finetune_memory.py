"""Peak memory of one fine-tuning step (forward + backward + AdamW step): LoRA vs full vs frozen.

Same encoder, head, crop and batch for every method, in one run. Two measures:

* ``accounted`` (any device, deterministic): parameter bytes + gradient bytes (trainable only) +
  AdamW state bytes (after the step) + bytes of the tensors autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``; storages counted once, parameters excluded).
  That is the memory a step holds at the start of backward, where training peaks; recomputation
  inside gradient checkpointing (one block at a time) is not included.
* ``cuda peak`` (CUDA only): ``torch.cuda.max_memory_allocated`` over a step, after a warm-up step
  has created the optimizer state.

Both gradient-checkpointing settings are measured; the headline compares each method at
``FineTuning``'s default (checkpointing on for peft adapters, off for full fine-tuning).

    python benchmarks/finetune_memory.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
from typing import Any

import torch

import ssl_em
from ssl_em.adapters import add_adapter, build_segmentation_model, count_trainable, get_task
from ssl_em.adapters.finetune import default_grad_checkpointing
from ssl_em.errors import ArgumentParser, run_main

MiB = 2**20


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _build(encoder: str, method: str, patch: tuple[int, int, int], grad_ckpt: bool, rank: int,
           device: torch.device) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    kwargs = {"img_size": list(patch)} if encoder.startswith("vit") else {}
    net = ssl_em.create_encoder(encoder, **kwargs)
    if grad_ckpt:
        net.set_grad_checkpointing(True)
    task = get_task("mito")
    # "lora_decoder": LoRA on a U-Net's encoder path, its decoder path trained in full (the study's
    # and the recipes' U-Net setting, add_adapter(train_decoder=True))
    extra = {"train_decoder": True} if method == "lora_decoder" else {}
    model = add_adapter(build_segmentation_model(net, "auto", out_channels=task.num_outputs),
                        method="lora" if method == "lora_decoder" else method, r=rank, alpha=2 * rank, **extra)
    return model.to(device), task


def _step(model, task, opt, x, target) -> dict[str, int]:
    """One training step; returns the saved-activation bytes of its forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:  # weights are counted as parameters already
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = task.loss(model(x).float(), target)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # keep .grad allocated: it is part of the step's footprint
    return {"activations": sum(seen.values())}


def measure(encoder: str, method: str, patch: tuple[int, int, int], batch: int, grad_ckpt: bool, rank: int,
            device: torch.device) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, task = _build(encoder, method, patch, grad_ckpt, rank, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((batch, 1, *patch), generator=g).to(device)
    target = (torch.rand((batch, task.num_outputs, *patch), generator=g) > 0.9).float().to(device)
    _step(model, task, opt, x, target)  # warm-up: creates the optimizer state
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    act = _step(model, task, opt, x, target)["activations"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    n_train, n_total = count_trainable(model)
    params = _nbytes(model.parameters())
    grads = _nbytes(p.grad for p in trainable if p.grad is not None)
    state = _nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    out = {"encoder": encoder, "method": method, "trainable": n_train, "total": n_total, "params": params,
           "grads": grads, "optimizer": state, "activations": act,
           "accounted": params + grads + state + act, "cuda_peak": peak}
    del model, opt, x, target
    return out


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny encoders, small crop (< 1 min on CPU)")
    p.add_argument("--encoders", nargs="+", default=None)
    p.add_renamed("--crop", "--patch", type=int, nargs=3, default=None, help="training crop z y x")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--methods", nargs="+", default=["lora", "lora_decoder", "frozen", "full"],
                   help="add_adapter methods, plus lora_decoder (U-Nets only)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    encoders = args.encoders or (["vit3d_tiny_patch2x16", "unet3d_tiny"] if args.quick
                                 else ["vit3d_small_patch2x16", "unet3d_small"])
    patch = tuple(args.crop or ((8, 32, 32) if args.quick else (16, 128, 128)))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    config = {"encoders": encoders, "patch": patch, "batch": args.batch, "lora_rank": args.rank,
              "methods": args.methods, "grad_checkpointing": [False, True],
              "optimizer": "AdamW", "precision": "fp32", "device": str(device), "torch": torch.__version__}
    print("config:", json.dumps(config))
    head = f"{'encoder':<24}{'method':<13}{'ckpt':<6}{'trainable':>12}{'params':>9}{'grads':>9}{'adamw':>9}" \
           f"{'activ.':>10}{'total MiB':>11}{'cuda MiB':>10}"
    print(head)
    results = []
    for encoder in encoders:
        for ckpt in config["grad_checkpointing"]:
            for method in args.methods:
                if method == "lora_decoder" and not encoder.startswith("unet3d"):
                    continue
                r = measure(encoder, method, patch, args.batch, ckpt, args.rank, device)
                r["grad_checkpointing"] = ckpt
                results.append(r)
                cuda = "-" if r["cuda_peak"] is None else f"{r['cuda_peak'] / MiB:.1f}"
                print(f"{encoder:<24}{method:<13}{'yes' if ckpt else 'no':<6}{r['trainable']:>12,}"
                      f"{r['params'] / MiB:>9.1f}{r['grads'] / MiB:>9.1f}{r['optimizer'] / MiB:>9.1f}"
                      f"{r['activations'] / MiB:>10.1f}{r['accounted'] / MiB:>11.1f}{cuda:>10}", flush=True)
    key = "cuda_peak" if device.type == "cuda" else "accounted"
    ratios = []
    for encoder in encoders:
        by = {(r["method"], r["grad_checkpointing"]): r for r in results if r["encoder"] == encoder}
        for ckpt in config["grad_checkpointing"]:
            if ("full", ckpt) in by and ("lora", ckpt) in by:
                print(f"full / LoRA ({key}) {encoder}, both ckpt={'yes' if ckpt else 'no'}: "
                      f"{by['full', ckpt][key] / by['lora', ckpt][key]:.2f}x")
        # what a user gets without touching the flag: FineTuning's default per method
        full, lora = by.get(("full", default_grad_checkpointing("full"))), by.get(("lora", default_grad_checkpointing("lora")))
        decoder = by.get(("lora_decoder", default_grad_checkpointing("lora")))
        if full and decoder:
            print(f"full / LoRA with trained decoder ({key}) {encoder}, FineTuning defaults: "
                  f"{full[key] / decoder[key]:.2f}x ({full[key] / MiB:.1f} vs {decoder[key] / MiB:.1f} MiB)")
        if full and lora:
            ratios.append((encoder, full[key] / lora[key]))
            print(f"full / LoRA ({key}) {encoder}, FineTuning defaults: {ratios[-1][1]:.2f}x "
                  f"({full[key] / MiB:.1f} vs {lora[key] / MiB:.1f} MiB)")
    if ratios:
        encoder, ratio = min(ratios, key=lambda t: t[1])  # the least favourable encoder
        print(f"headline: full fine-tuning needs {ratio:.2f}x the step memory of LoRA with FineTuning's defaults "
              f"(worst of {', '.join(e for e, _ in ratios)}: {encoder}; {key}, crop {patch}, batch {args.batch})")


if __name__ == "__main__":
    raise SystemExit(run_main("finetune_memory.py", main))

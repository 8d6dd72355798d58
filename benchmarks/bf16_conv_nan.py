"""How often oneDNN's bf16 weight gradient of a 3-D convolution comes back non-finite on this CPU.

Seen on a 2-core AMD EPYC with AVX-512 BF16 (torch 2.14.1, oneDNN 3.12): the weight gradient of
``unet_small``'s deep-level convolutions in the isotropic layout (256 -> 128 channels, 3 x 3 x 3, on a
2 x 12 x 16 map, batch 2) holds NaNs in 3 % (1 thread) to 20 % (2 threads) of calls, never in fp32,
while inputs, weights and output gradients are finite (benchmarks/results/bf16_conv_nan/). Training with bf16 autocast then
turns every weight NaN through AdamW within a few steps; ssl-em's training modules skip such a step
(``ssl_em.utils.optim.SkipNonFiniteGradients``). This script counts the bad calls for each setting, on
fresh random inputs every call, so a later torch or another CPU can be checked in one command.

    python benchmarks/bf16_conv_nan.py [--quick] [--calls N]
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from ssl_em.errors import ArgumentParser, run_main

SHAPE = (2, 12, 16)  # the deep-level map of a 16 x 96 x 128 crop after three 2 x 2 x 2 poolings
CHANNELS = (256, 128)  # decoder level 3 (concatenated skip + upsampled) -> 128


def bad_calls(dtype: torch.dtype, threads: int, calls: int, seed: int = 0) -> int:
    """Calls (of ``calls``) whose weight or input gradient holds a non-finite value."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    cin, cout = CHANNELS
    bad = 0
    for _ in range(calls):
        x = torch.randn(2, cin, *SHAPE, generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(cout, cin, 3, 3, 3, generator=gen) * 0.05).to(dtype).requires_grad_()
        y = F.conv3d(x, w, padding=1)
        y.backward(torch.randn(y.shape, generator=gen).to(dtype))
        bad += not (torch.isfinite(w.grad).all() and torch.isfinite(x.grad).all())
    return bad


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 calls per setting (< 1 min)")
    p.add_argument("--calls", type=int, default=400)
    args = p.parse_args(argv)
    calls = 100 if args.quick else args.calls
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; conv3d "
          f"{CHANNELS[0]} -> {CHANNELS[1]} channels, 3x3x3, map {SHAPE}, batch 2; {calls} calls per setting")
    counts = {}
    for name, dtype, threads in (("fp32, 2 threads", torch.float32, 2), ("bf16, 1 thread", torch.bfloat16, 1),
                                 ("bf16, 2 threads", torch.bfloat16, 2)):
        counts[name] = bad_calls(dtype, threads, calls)
        print(f"{name:16s}: {counts[name]} of {calls} calls with a non-finite gradient")
    print("non-finite gradient calls: " + ", ".join(f"{k} {v}/{calls}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main("bf16_conv_nan.py", main))

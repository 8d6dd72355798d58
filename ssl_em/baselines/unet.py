"""The plain U-Net a user trains from scratch instead of ssl-em (the study's ``unet`` baseline).

Ronneberger et al.'s U-Net as people write it (and as the external reference that set the project's
target was written): two conv-BatchNorm-ReLU per level, max-pooling, transposed-conv upsampling,
concatenated skips, width doubling from 16, four poolings. Poolings and kernels follow the plan's
spacing and crop (:func:`layout`, nnU-Net's rule): in-plane only while z is coarser, and a 2-D network
on the 2-D crops the plan picks for strongly anisotropic voxels.

Why not MONAI's ``UNet`` (the baseline before): on VNC mitochondria at 9.2 nm, all labels, the plan's
2-D crops, 150 steps, its residual, strided-conv, instance-norm design still predicted nothing (IoU
0.000) where this one reached 0.269, and 0.705 after the study's 600 steps (``benchmarks/unet_baseline.py``,
README).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssl_em.errors import ConfigError


def _block(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Sequential:
    pad = tuple(k // 2 for k in kernel)
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, padding=pad, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, kernel, padding=pad, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


def layout(spacing: Sequence[float], patch_shape: Sequence[int], levels: int = 4) -> tuple[list, list]:
    """nnU-Net's rule for the poolings and kernels of ``levels`` levels on crops of ``patch_shape`` (z, y, x)
    at ``spacing`` (nm): an axis is pooled while its spacing is within 2x of the finest (among axes of
    more than one voxel) and it still has 2 or more voxels; it gets a 3-wide kernel under the same spacing rule when it has more than one
    voxel. Returns (kernels per level, pools per level boundary)."""
    sp, size = [float(v) for v in spacing], [int(n) for n in patch_shape]
    kernels, pools = [], []
    for level in range(levels + 1):
        finest = min(s for s, n in zip(sp, size) if n > 1) if max(size) > 1 else min(sp)  # a 1-voxel axis is no axis
        kernels.append(tuple(3 if s <= 2 * finest and n > 1 else 1 for s, n in zip(sp, size)))
        if level == levels:
            break
        pool = tuple(2 if s <= 2 * finest and n >= 2 and n % 2 == 0 else 1 for s, n in zip(sp, size))
        pools.append(pool)
        sp = [s * p for s, p in zip(sp, pool)]
        size = [n // p for n, p in zip(size, pool)]
    return kernels, pools


class PlainUNet(nn.Module):
    """(B, 1, D, H, W) -> logits (B, ``out_channels``, D, H, W).

    Args:
        out_channels: the task's outputs.
        spacing, patch_shape: the plan's working spacing (z, y, x nm) and crop (:func:`layout`).
        widths: channels per level, shallow to deep (``len(widths) - 1`` poolings).
    """

    def __init__(self, out_channels: int, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 patch_shape: Sequence[int] = (1, 128, 128), widths: Sequence[int] = (16, 32, 64, 128, 256)) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1 or out_channels < 1:
            raise ConfigError(f"unet widths {widths} need two or more positive channel counts")
        n = len(widths)
        kernels, self.pools_zyx = layout(spacing, patch_shape, n - 1)
        self.encoder = nn.ModuleList(_block(1 if i == 0 else widths[i - 1], widths[i], kernels[i]) for i in range(n))
        self.pools = nn.ModuleList(nn.MaxPool3d(p) for p in self.pools_zyx)
        self.ups = nn.ModuleList(nn.ConvTranspose3d(widths[i + 1], widths[i], p, p) for i, p in enumerate(self.pools_zyx))
        self.decoder = nn.ModuleList(_block(2 * widths[i], widths[i], kernels[i]) for i in range(n - 1))
        self.head = nn.Conv3d(widths[0], out_channels, 1)
    @property
    def stride(self) -> tuple[int, int, int]:
        """Total downsampling (z, y, x): crop sides must be multiples of it."""
        s = [1, 1, 1]
        for p in self.pools_zyx:
            s = [a * b for a, b in zip(s, p)]
        return tuple(s)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = [n for n, s in zip(x.shape[2:], self.stride) if n % s]
        if bad:
            raise ConfigError(f"unet input {tuple(x.shape[2:])} (z, y, x) must be a multiple of its stride {self.stride}")
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else self.pools[i - 1](x))
            skips.append(x)
        for i in reversed(range(len(self.ups))):
            x = self.decoder[i](torch.cat([skips[i], self.ups[i](x)], 1))
        return self.head(x)

"""The only layers that are 3-D specific: patch embedding and 3-D sin-cos position embedding.

Everything else (attention, MLP, transformer block) is timm's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ssl_em.errors import ConfigError
from ssl_em.utils.shapes import Triple


def pointwise_conv3d(in_channels: int, out_channels: int) -> nn.Conv3d:
    """A 1x1x1 output convolution with channels-last strides (the same memory for a 1x1x1 kernel): they match the
    channels-last gradients a channels-last U-Net sends it, so DDP's gradient buckets take them without a copy."""
    return nn.Conv3d(int(in_channels), int(out_channels), 1).to(memory_format=torch.channels_last_3d)


def check_divisible(shape: Sequence[int], patch: Triple, what: str = "crop") -> Triple:
    """Return the token grid ``shape // patch`` or raise a one-line ConfigError naming the axis."""
    shape = tuple(int(s) for s in shape[-3:])
    for axis, size, p in zip("zyx", shape, patch):
        if size % p or size == 0:
            raise ConfigError(f"{what} {shape} is not divisible by patch {tuple(patch)} along {axis}")
    return tuple(s // p for s, p in zip(shape, patch))  # type: ignore[return-value]


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, 1, d, h, w) 0/1 mask to ``size``; exact for integer ratios."""
    if tuple(mask.shape[-3:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="nearest")


class UNetContract:
    """The encoder contract shared by ssl-em's U-Nets, from their ``forward_encoder`` (stage outputs,
    shallow to deep) and ``forward_decoder``; they set ``encoder_config``, ``patch_size`` and ``head``."""

    @property
    def architecture(self) -> str:
        return self.encoder_config["architecture"]

    def grid_size(self, input_shape: Sequence[int]) -> Triple:
        """Bottleneck grid (d, h, w) for an input whose last three dims are (D, H, W)."""
        return check_divisible(input_shape, self.patch_size, what=f"{self.architecture} crop")

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> decoder features (B, C_dense, D, H, W) at full resolution."""
        return self.forward_decoder(self.forward_encoder(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> bottleneck tokens (B, d*h*w, embed_dim), (z, y, x) raster order."""
        return self.forward_encoder(x)[-1].flatten(2).transpose(1, 2)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              output_fmt: str = "NCDHW") -> list[torch.Tensor]:
        """Encoder stage outputs: all (None), the last ``indices`` (int) or those listed (negatives allowed).
        ``output_fmt`` "NCDHW" -> (B, C_i, d_i, h_i, w_i); "NLC" -> (B, d_i*h_i*w_i, C_i)."""
        feats = self.forward_encoder(x)
        n = len(feats)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int):
            take = list(range(n - indices, n))
        else:
            take = [i % n for i in indices]
        if not take or min(take) < 0 or (isinstance(indices, int) and not 0 < indices <= n):
            raise ConfigError(f"{self.architecture} has {n} stages; indices={indices} is out of range")
        if output_fmt not in ("NCDHW", "NLC"):
            raise ConfigError(f"output_fmt={output_fmt!r} is not supported; use 'NCDHW' or 'NLC'")
        out = [feats[i] for i in take]
        return out if output_fmt == "NCDHW" else [f.flatten(2).transpose(1, 2) for f in out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features (no head) or head logits (B, out_channels, D, H, W)."""
        y = self.forward_dense(x)
        return y if self.head is None else self.head(y)


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3-D patches -> tokens: a Conv3d with kernel = stride = patch.

    ``(B, C, D, H, W) -> (B, N, embed_dim)`` with ``N = (D/pz)(H/py)(W/px)`` in (z, y, x) raster order.
    """

    def __init__(self, patch_size: Triple, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, d, h, w)
        return rearrange(x, "b c d h w -> b (d h w) c")


def _axis_pairs(dim: int) -> Triple:
    """Split ``dim // 2`` sin/cos frequency pairs over (z, y, x).

    Equal thirds where possible; any remainder goes to y and x, because anisotropic EM has far
    fewer z positions than in-plane ones, so z needs the fewest frequencies.
    """
    pairs = dim // 2
    pz = pairs // 3
    py = (pairs - pz + 1) // 2
    return pz, py, pairs - pz - py


@functools.lru_cache(maxsize=64)
def _sincos_cached(grid: Triple, dim: int, temperature: float, device: str) -> torch.Tensor:
    parts = []
    for n_pos, n_pairs in zip(grid, _axis_pairs(dim)):
        omega = 1.0 / temperature ** (torch.arange(n_pairs, dtype=torch.float64, device="cpu") / max(n_pairs, 1))
        out = torch.arange(n_pos, dtype=torch.float64, device="cpu")[:, None] * omega[None]  # (n_pos, n_pairs)
        parts.append(torch.cat([out.sin(), out.cos()], dim=1))  # (n_pos, 2 * n_pairs)
    ez, ey, ex = parts
    d, h, w = grid
    emb = torch.cat(  # every token gets [z-part, y-part, x-part]: (d, h, w, dim)
        [
            ez[:, None, None].expand(d, h, w, -1),
            ey[None, :, None].expand(d, h, w, -1),
            ex[None, None, :].expand(d, h, w, -1),
        ],
        dim=-1,
    )
    return rearrange(emb, "d h w c -> (d h w) c").float().to(device)  # (N, dim)


def sincos_pos_embed_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Fixed 3-D sin-cos position embedding ``(d*h*w, dim)`` for a token grid (z, y, x).

    Positions are integer token indices, so a larger crop simply extends the table: a model
    pretrained on one crop size runs unchanged on others. Cached per (grid, dim, device); treat
    the result as read-only.
    """
    if dim % 2:
        raise ConfigError(f"embed dim {dim} must be even for the sin-cos position embedding")
    return _sincos_cached(tuple(int(g) for g in grid), int(dim), float(temperature), str(torch.device(device)))

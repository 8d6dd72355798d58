"""3-D Vision Transformer for EM volumes: timm's ``Block`` on 3-D patch tokens.

No class token: the consumers are dense (segmentation decoders, probes on every patch) and MAE,
where a cls token only complicates masking and unpatchify; a pooled feature comes from
``global_pool`` over the patch tokens instead.

Position embedding is a fixed 3-D sin-cos table computed for whatever grid the input gives
(``"sincos"``, default), so fine-tuning at other crop sizes needs no interpolation; ``"learned"``
starts from the same table and is resampled trilinearly to other grids; ``"none"`` adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer, get_norm_layer
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_em.errors import ConfigError
from ssl_em.models.layers import PatchEmbed3D, check_divisible, sincos_pos_embed_3d
from ssl_em.models.pretrained import timm_default_cfgs
from ssl_em.models.registry import build_encoder, register_encoder
from ssl_em.utils.shapes import Triple, to_triple

__all__ = ["VisionTransformer3D"]


class VisionTransformer3D(nn.Module):
    """ViT encoder on (B, C, D, H, W) volumes with anisotropic 3-D patches (z, y, x).

    Args:
        img_size: default crop (z, y, x) in voxels; only the ``"learned"`` position table depends on it.
        patch_size: patch (z, y, x) in voxels; every input's spatial dims must be multiples of it.
        norm_layer / act_layer: timm layer names (``"layernorm"``, ``"gelu"``) so the config stays JSON.
        global_pool: ``"avg"``, ``"max"`` or ``""`` (no pooling: ``forward_head`` maps every token).
        num_classes: 0 for a pure encoder (``forward`` returns pooled features of size ``embed_dim``).
        pos_embed: ``"sincos"`` (fixed), ``"learned"`` or ``"none"``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = (16, 128, 128),
        patch_size: int | Sequence[int] = (2, 16, 16),
        in_chans: int = 1,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer: str | type[nn.Module] | None = None,
        act_layer: str | type[nn.Module] | None = None,
        global_pool: str = "avg",
        num_classes: int = 0,
        pos_embed: str = "sincos",
    ) -> None:
        super().__init__()
        self.patch_size: Triple = to_triple(patch_size, "patch_size")
        self.img_size: Triple = to_triple(img_size, "img_size")
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if global_pool not in ("avg", "max", ""):
            raise ConfigError(f"global_pool {global_pool!r} is not one of 'avg', 'max', ''")
        if pos_embed not in ("sincos", "learned", "none"):
            raise ConfigError(f"pos_embed {pos_embed!r} is not one of 'sincos', 'learned', 'none'")
        if pos_embed != "none" and embed_dim % 2:
            raise ConfigError(f"embed_dim {embed_dim} must be even for a {pos_embed} position embedding")
        default_grid = check_divisible(self.img_size, self.patch_size, "img_size")

        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = False
        # Set by the registry (``{"architecture": name, "kwargs": {...}}``) so export can rebuild the model.
        self.encoder_config: dict[str, Any] = {"architecture": None, "kwargs": {}}

        norm = get_norm_layer(norm_layer) or get_norm_layer("layernorm")  # timm LayerNorm, eps 1e-6
        act = get_act_layer(act_layer) or nn.GELU
        self.patch_embed = PatchEmbed3D(self.patch_size, in_chans, embed_dim)
        if pos_embed == "learned":  # (1, C, d, h, w) so it can be resampled trilinearly to other grids
            table = sincos_pos_embed_3d(default_grid, embed_dim).T.reshape(1, embed_dim, *default_grid)
            self.pos_embed = nn.Parameter(table.clone())
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  norm_layer=norm, act_layer=act)
            for i in range(depth)
        )
        self.norm = norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)
        w = self.patch_embed.proj.weight  # MAE: init the patch projection like a Linear on flat patches
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # ---- shapes and checks ---------------------------------------------------------------
    def grid_size(self, input_shape: Sequence[int]) -> Triple:
        """Token grid (d, h, w) for an input whose last three dims are (D, H, W) voxels."""
        return check_divisible(input_shape, self.patch_size)

    def _check_input(self, x: torch.Tensor) -> Triple:
        if x.ndim != 5:
            raise ConfigError(f"expected a 5-D (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ConfigError(f"input has {x.shape[1]} channels but the encoder expects in_chans={self.in_chans}")
        return self.grid_size(x.shape)

    def pos_embed_for(self, grid: Triple, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Position table ``(1, d*h*w, C)`` for a token grid, or None for ``pos_embed="none"``."""
        if self.pos_embed_type == "none":
            return None
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed_3d(grid, self.embed_dim, device=device)[None]
        table = self.pos_embed
        if tuple(table.shape[2:]) != tuple(grid):
            table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)  # (1, C, d, h, w) -> (1, N, C)

    # ---- token-level API (used by MAE: the encoder sees only visible tokens) -------------------
    def patchify_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Triple]:
        """``(B, C, D, H, W) -> (tokens (B, N, embed_dim) with position added, grid (d, h, w))``."""
        grid = self._check_input(x)
        tokens = self.patch_embed(x)  # (B, N, C)
        pos = self.pos_embed_for(grid, x.device)
        if pos is not None:
            tokens = tokens + pos.to(tokens.dtype)
        return tokens, grid

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer blocks + final norm on any token subset: ``(B, L, C) -> (B, L, C)``."""
        for blk in self.blocks:
            tokens = self._run_block(blk, tokens)
        return self.norm(tokens)

    # ---- timm-style forward API -----------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W) -> (B, N, embed_dim)`` normed patch tokens in (z, y, x) raster order."""
        return self.forward_tokens(self.patchify_embed(x)[0])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        output_fmt: str = "NCDHW",
        norm: bool = False,
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of selected blocks, as in timm.

        Args:
            indices: None = every block, int n = the last n, sequence = those block indices (negative ok).
            output_fmt: ``"NCDHW"`` -> each ``(B, C, d, h, w)``; ``"NLC"`` -> each ``(B, N, C)``.
            norm: apply the final norm to each intermediate.
            intermediates_only: return only the list; else ``(final normed tokens (B, N, C), list)``.
        """
        if output_fmt not in ("NCDHW", "NLC"):
            raise ConfigError(f"output_fmt {output_fmt!r} is not one of 'NCDHW', 'NLC'")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, (d, h, w) = self.patchify_embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early or intermediates_only else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCDHW":  # (B, N, C) -> (B, C, d, h, w)
            intermediates = [y.transpose(1, 2).reshape(y.shape[0], -1, d, h, w) for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool tokens ``(B, N, C) -> (B, C)`` (unless ``global_pool=""``), then the classifier head."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        elif self.global_pool == "max":
            x = x.amax(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- timm conveniences ------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (``use_reentrant=False``): less memory, ~30% more time."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} if self.pos_embed_type == "learned" else set()


def init_weights(m: nn.Module) -> None:
    """MAE's init: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --- registered variants ----------------------------------------------------------------------
def _create_vit3d(variant: str, pretrained: bool = False, defaults: dict[str, Any] | None = None,
                  **kwargs: Any) -> nn.Module:
    """timm's variant helper signature; ``defaults`` (the variant's) are merged under ``kwargs`` (the user's)."""
    return build_encoder(VisionTransformer3D, variant, dict(defaults or {}), pretrained, **kwargs)


# shipped weights as timm pretrained configs: timm.create_model("name.tag", pretrained=True) resolves them
default_cfgs = timm_default_cfgs()
_TEST = dict(embed_dim=32, depth=2, num_heads=2)
_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)


@register_encoder
def vit3d_test_patch2x16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Test-size ViT (embed 32, depth 2): for unit tests and smoke runs only."""
    return _create_vit3d("vit3d_test_patch2x16", pretrained, defaults=dict(patch_size=(2, 16, 16), **_TEST), **kwargs)


@register_encoder
def vit3d_test_patch4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Test-size ViT with small isotropic (4, 4, 4) patches."""
    return _create_vit3d("vit3d_test_patch4", pretrained,
                         defaults=dict(img_size=(16, 32, 32), patch_size=4, **_TEST), **kwargs)


@register_encoder
def vit3d_tiny_patch2x8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-Ti, (2, 8, 8) patches: fine in-plane tokens for thin anisotropic ssTEM structures."""
    return _create_vit3d("vit3d_tiny_patch2x8", pretrained, defaults=dict(patch_size=(2, 8, 8), **_TINY), **kwargs)


@register_encoder
def vit3d_tiny_patch2x16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-Ti (5.5M), (2, 16, 16) patches: anisotropic ssTEM (~40-50 nm sections, 4-8 nm pixels)."""
    return _create_vit3d("vit3d_tiny_patch2x16", pretrained, defaults=dict(patch_size=(2, 16, 16), **_TINY), **kwargs)


@register_encoder
def vit3d_tiny_patch4x16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-Ti, (4, 16, 16) patches: mildly anisotropic data (e.g. 30 nm sections at 8 nm)."""
    return _create_vit3d("vit3d_tiny_patch4x16", pretrained,
                         defaults=dict(img_size=(32, 128, 128), patch_size=(4, 16, 16), **_TINY), **kwargs)


@register_encoder
def vit3d_tiny_patch8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-Ti, isotropic (8, 8, 8) patches: FIB-SEM."""
    return _create_vit3d("vit3d_tiny_patch8", pretrained,
                         defaults=dict(img_size=(64, 64, 64), patch_size=8, **_TINY), **kwargs)


@register_encoder
def vit3d_small_patch2x16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-S (22M), (2, 16, 16) patches."""
    return _create_vit3d("vit3d_small_patch2x16", pretrained, defaults=dict(patch_size=(2, 16, 16), **_SMALL), **kwargs)


@register_encoder
def vit3d_small_patch4x16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-S, (4, 16, 16) patches."""
    return _create_vit3d("vit3d_small_patch4x16", pretrained,
                         defaults=dict(img_size=(32, 128, 128), patch_size=(4, 16, 16), **_SMALL), **kwargs)


@register_encoder
def vit3d_small_patch8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-S, isotropic (8, 8, 8) patches: FIB-SEM."""
    return _create_vit3d("vit3d_small_patch8", pretrained,
                         defaults=dict(img_size=(64, 64, 64), patch_size=8, **_SMALL), **kwargs)


@register_encoder
def vit3d_base_patch2x16(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-B (86M), (2, 16, 16) patches."""
    return _create_vit3d("vit3d_base_patch2x16", pretrained, defaults=dict(patch_size=(2, 16, 16), **_BASE), **kwargs)


@register_encoder
def vit3d_base_patch8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-B, isotropic (8, 8, 8) patches: FIB-SEM."""
    return _create_vit3d("vit3d_base_patch8", pretrained,
                         defaults=dict(img_size=(64, 64, 64), patch_size=8, **_BASE), **kwargs)

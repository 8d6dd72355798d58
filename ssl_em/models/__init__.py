"""Encoders: 3-D ViT (and other registered families), built by name, exported as safetensors + JSON.

Importing this package registers every ssl-em encoder in timm's registry, so
``timm.create_model("vit3d_small_patch2x16")`` works afterwards.
"""

from ssl_em.models import unet as unet  # noqa: F401  (model modules: importing registers their variants)
from ssl_em.models import unet3d as unet3d  # noqa: F401
from ssl_em.models import vit3d as vit3d  # noqa: F401
from ssl_em.models.registry import load_encoder as load_encoder
from ssl_em.models.weights_io import save_encoder as save_encoder
from ssl_em.models.registry import create_encoder as create_encoder
from ssl_em.models.registry import list_encoders as list_encoders
from ssl_em.models.registry import register_encoder as register_encoder

__all__ = ["create_encoder", "list_encoders", "load_encoder", "register_encoder", "save_encoder"]

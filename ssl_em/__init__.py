"""ssl-em: self-supervised 3D representation learning and few-label adaptation for brain EM.

Heavy dependencies (torch, timm, zarr) load on first use so ``import ssl_em`` stays fast.
Importing :mod:`ssl_em.models` registers the encoders in timm's registry; accessing any
encoder entry point below does that.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ssl_em._version import __version__ as __version__

# public name -> module that defines it (loaded lazily)
_LAZY = {
    "open_volume": "ssl_em.data.volume",
    "Volume": "ssl_em.data.volume",
    "make_phantom": "ssl_em.data.phantom",
    "create_encoder": "ssl_em.models",
    "list_encoders": "ssl_em.models",
    "load_encoder": "ssl_em.models",
    "save_encoder": "ssl_em.models",
    "predict_volume": "ssl_em.predict",
    "SslEmError": "ssl_em.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from ssl_em.data.phantom import make_phantom as make_phantom
    from ssl_em.data.volume import Volume as Volume
    from ssl_em.data.volume import open_volume as open_volume
    from ssl_em.errors import SslEmError as SslEmError
    from ssl_em.models import create_encoder as create_encoder
    from ssl_em.models import list_encoders as list_encoders
    from ssl_em.models import load_encoder as load_encoder
    from ssl_em.models import save_encoder as save_encoder
    from ssl_em.predict import predict_volume as predict_volume


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ssl_em' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", *_LAZY]

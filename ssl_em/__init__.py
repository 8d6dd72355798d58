"""ssl-em: self-supervised 3D representation learning and few-label adaptation for brain EM.

Heavy dependencies (torch, timm, zarr) load on first use so ``import ssl_em`` stays fast. The
encoders still reach timm's registry: ``import ssl_em; timm.create_model("vit3d_tiny_patch2x16")``
works because :mod:`ssl_em.models` is imported as soon as timm is (right away if it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
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


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Import hook: once ``timm`` has finished importing, import ssl_em.models (registers encoders).

    It stays on ``sys.meta_path`` until timm is really executed: packages probe for timm with
    ``importlib.util.find_spec`` without importing it (transformers, through peft, does), and a hook
    that left at the first probe never saw the import."""

    _finding = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" or self._finding:
            return None
        self._finding = True  # the lookup below asks the meta path again, this hook included
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        hook = self

        def exec_then_register(module):
            exec_module(module)
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
            importlib.import_module("ssl_em.models")

        spec.loader.exec_module = exec_then_register
        return spec


if "timm" in sys.modules:
    importlib.import_module("ssl_em.models")
elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())


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

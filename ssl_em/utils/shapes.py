"""(z, y, x) triples: the one alias and the one converter for settings given as one number or three."""

from __future__ import annotations

from typing import Any

import numpy as np

from ssl_em.errors import ConfigError

Triple = tuple[int, int, int]


def to_triple(value: Any, name: str = "value", cast: type = int, positive: bool = False) -> tuple:
    """``8 -> (8, 8, 8)``; three values (a list from JSON, a tuple, an array) -> a tuple of ``cast``;
    anything else, or (``positive``) a value <= 0, is a ConfigError naming ``name``."""
    given = tuple(value) if np.ndim(value) else (value,) * 3
    try:
        values = tuple(cast(v) for v in given)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {value!r}: expected one number or three (z, y, x)") from None
    if len(values) != 3:
        raise ConfigError(f"{name} {value!r}: expected one number or three (z, y, x)")
    if cast is int and any(float(v) != int(v) for v in given):
        raise ConfigError(f"{name} {value!r}: expected whole numbers of voxels (z, y, x)")
    if positive and not all(v > 0 for v in values):
        raise ConfigError(f"{name} {value!r}: expected positive numbers (z, y, x)")
    return values

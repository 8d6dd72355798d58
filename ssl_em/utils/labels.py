"""Label-array helpers shared by metrics, tasks and prediction: connected components, sequential
relabelling, removal of small objects. numpy in, numpy out; label 0 is background."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssl_em.errors import ConfigError

__all__ = ["connected_components", "relabel_sequential", "remove_small_objects"]


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in order of their old ids (0 stays 0), as uint32 (uint64 if needed)."""
    labels = np.asarray(labels)
    ids, inverse = np.unique(labels, return_inverse=True)
    start = 0 if ids.size and ids[0] == 0 else 1
    n = ids.size - 1 + start
    dtype = np.uint32 if n < 2**32 else np.uint64
    return (inverse.reshape(labels.shape) + start).astype(dtype, copy=False)

def connected_components(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Connected components (cc3d) of a binary mask, or of each label of an integer label map.

    ``connectivity``: 6, 18 or 26 in 3-D; 4 or 8 in 2-D. Returns uint32 ids 1..n, 0 = background.
    """
    import cc3d

    mask = np.asarray(mask)
    allowed = {3: (6, 18, 26), 2: (4, 8)}.get(mask.ndim)
    if allowed is None or connectivity not in allowed:
        raise ConfigError(f"connectivity {connectivity} is not valid for a {mask.ndim}-D array (use {allowed})")
    if mask.dtype == bool:
        mask = mask.view(np.uint8)
    return cc3d.connected_components(mask, connectivity=connectivity, out_dtype=np.uint32)

def remove_small_objects(
    labels: np.ndarray, min_volume_nm3: float, voxel_size: Sequence[float] = (1.0, 1.0, 1.0)
) -> np.ndarray:
    """Labels with every id of physical volume below ``min_volume_nm3`` set to 0 (ids kept)."""
    labels = np.asarray(labels)
    min_voxels = min_volume_nm3 / float(np.prod(voxel_size))
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    ids = ids.copy()
    ids[counts < min_voxels] = 0
    return ids[inverse].reshape(labels.shape)

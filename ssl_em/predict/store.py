"""Where blockwise results go: output stores created, resumed or refused, and finished blocks marked.

:func:`create_output_array` is ssl-em's one writer of an empty result store, for predictions
(c, z, y, x) and instance labels (z, y, x): a plain zarr v3 array, or for a ``*.ome.zarr`` name an
OME-Zarr 0.5 image group holding it as ``0`` (axes, nanometre scale). :func:`prepare_output` reopens
a run with identical settings (its blocks' markers say what is done) and refuses an output that is,
holds or sits in an input, or that ssl-em did not write.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssl_em.errors import ConfigError
from ssl_em.utils.io import check_output, writer_attrs

BlockId = tuple[int, int, int]
DONE_DIR = ".ssl_em_done"  # one empty marker file per finished block, inside the output array's folder
ATTR_KEY = "ssl_em_predict"


def array_folder(dst: Path) -> Path:
    """The folder of the result array inside ``dst`` (``0`` of an OME-Zarr image)."""
    return dst / "0" if dst.name.endswith(".ome.zarr") else dst


def create_output_array(folder: Path, name: str, shape: Sequence[int], chunks: Sequence[int], dtype: str,
                        attrs: dict, voxel_size: Sequence[float] | None) -> Path:
    """Create an empty (c, z, y, x) or (z, y, x) array, filled with 0, in ``folder``: zarr v3, or an
    OME-Zarr 0.5 image (array ``0``) when ``name`` ends in ``.ome.zarr``. Returns the array's folder."""
    import zarr

    spatial = ["z", "y", "x"]
    dims = ["c", *spatial] if len(shape) == 4 else spatial
    kw = dict(shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0, dimension_names=dims,
              attributes=attrs)
    if not name.endswith(".ome.zarr"):
        zarr.create_array(str(folder), overwrite=True, **kw)
        return folder
    axes = [{"name": "c", "type": "channel"}] if len(shape) == 4 else []
    axes += [{"name": a, "type": "space", **({"unit": "nanometer"} if voxel_size else {})} for a in spatial]
    scale = [1.0] * (len(shape) - 3) + [float(v) for v in (voxel_size or (1.0, 1.0, 1.0))]
    root = zarr.open_group(str(folder), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": name.removesuffix(".ome.zarr"), "axes": axes,
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }]}
    root.create_array("0", **kw)
    return folder / "0"


def mark_done(array_dir: str | Path, idx: BlockId) -> None:
    """Mark block ``idx`` finished; called after its chunk is written."""
    (Path(array_dir) / DONE_DIR / ".".join(map(str, idx))).touch()  # atomic; a killed write leaves none


def prepare_output(dst: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, params: dict,
                   voxel_size: Any, resume: bool, overwrite: bool, inputs: list[Path]) -> tuple[Path, set[BlockId]]:
    """Create or reopen the output; return its array folder and the blocks already done. An output that
    is, holds or sits in an input, or that ssl-em did not write, is refused whatever the flags."""
    import zarr

    check_output(dst, inputs, overwrite=True, writer="ssl_em.predict")  # resumed, or replaced with overwrite

    digest = hashlib.blake2b(json.dumps(params, sort_keys=True).encode(), digest_size=16).hexdigest()
    arr_dir = array_folder(dst)
    same = False
    if dst.exists():
        try:
            stored = zarr.open_array(str(arr_dir), mode="r").attrs.get(ATTR_KEY, {})
        except Exception:  # not a zarr array at all
            stored = {}
        same = stored.get("hash") == digest
        if not same and not overwrite:
            changed = sorted(k for k in params if stored.get("params", {}).get(k) != params[k])
            what = f"settings differ ({', '.join(changed)})" if stored else "it is not an ssl-em prediction"
            raise ConfigError(f"output {dst} exists and {what}; pass overwrite=True (--overwrite) to replace it")
    # start over (no stale chunks survive) when the settings changed or resuming is off; the same settings resume
    if dst.exists() and (not same or not resume):
        shutil.rmtree(dst)
    if not dst.exists():
        attrs = {ATTR_KEY: {"hash": digest, "params": params}, **writer_attrs("ssl_em.predict", sparse=True)}
        arr_dir = create_output_array(dst, dst.name, shape, chunks, dtype, attrs, voxel_size)
    done_dir = arr_dir / DONE_DIR
    done_dir.mkdir(exist_ok=True)
    done = {tuple(int(v) for v in p.name.split(".")) for p in done_dir.iterdir() if p.name.count(".") == 2}
    return arr_dir, done  # type: ignore[return-value]

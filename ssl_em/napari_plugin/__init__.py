"""napari plugin (npe2): open any volume ssl-em reads, paint a few labels, fine-tune the shipped encoder, look, correct.

``napari.yaml`` declares a reader (every volume spec ssl-em opens, lazily, OME-Zarr pyramids as multiscale
dask arrays, voxel size as the layer scale), sample data (the phantom) and the fine-tuning widget. The
logic lives in :mod:`ssl_em.napari_plugin.session` (no GUI: tested headless), the widget only wires it to
layers. Needs the optional extra ``ssl-em[napari]``.
"""

import sys
from pathlib import Path


def _keep_triton_out_after_mesa_llvm() -> None:
    """Mesa's OpenGL (software llvmpipe, and AMD's radeonsi) maps its own LLVM into napari's process;
    importing triton (torch.compile's GPU compiler, pulled in by ``torch._dynamo`` when torchvision or timm
    load) into that process afterwards segfaults it (reproduced under Xvfb). The plugin never compiles, so
    where LLVM is mapped and triton is not loaded yet, triton is made unimportable: torch then runs
    without it instead of taking napari down."""
    if "triton" in sys.modules:
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: no Mesa LLVM clash known
        return
    if "libLLVM" in maps:
        sys.modules["triton"] = None  # type: ignore[assignment]


_keep_triton_out_after_mesa_llvm()

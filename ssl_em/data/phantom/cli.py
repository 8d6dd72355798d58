"""``ssl-em phantom OUT``."""

from __future__ import annotations

import argparse

from ssl_em.data.phantom.build import make_phantom
from ssl_em.data.phantom.files import save_phantom
from ssl_em.errors import ArgumentParser


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 64,256,256") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 40,8,8") from None


def main(argv: list[str] | None = None) -> int:
    """``ssl-em phantom OUT``: write a phantom (zarr group, or npz if OUT ends in .npz) and a preview PNG."""
    ap = ArgumentParser(prog="ssl-em phantom", description="Write the synthetic ssTEM neuropil phantom "
                                 "(raw + neurons, membrane, mito, synapse, vesicles) and OUT-stem_preview.png.")
    ap.add_argument("out", help="output: DIR.zarr (zarr v3 group) or FILE.npz")
    ap.add_argument("--shape", type=_ints, default=(64, 256, 256), help="z,y,x voxels (default 64,256,256)")
    ap.add_argument("--voxel-size", type=_floats, default=(40.0, 8.0, 8.0), help="z,y,x nm (default 40,8,8)")
    ap.add_argument("--seed", type=int, default=0, help="tissue and noise seed (default 0)")
    ap.add_argument("--missing-section-rate", type=float, default=0.0,
                    help="probability that a section's raw is blank or noise (labels intact)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if an earlier ssl-em phantom wrote it")
    args = ap.parse_args(argv)
    from ssl_em.utils.io import check_output

    check_output(args.out, [], overwrite=args.overwrite, writer="ssl_em.data.phantom")  # before generating
    ph = make_phantom(args.shape, args.voxel_size, args.seed, missing_section_rate=args.missing_section_rate,
                      progress=True)
    preview = save_phantom(ph, args.out, overwrite=args.overwrite)
    n = ph.raw.size
    print(f"wrote {args.out}: {'x'.join(map(str, ph.shape))} voxels at {'x'.join(f'{v:g}' for v in ph.voxel_size)} nm; "
          f"{int(ph.neurons.max())} neurons, {int(ph.mito.max())} mitochondria ({(ph.mito > 0).sum() / n:.1%}), "
          f"{len(ph.partners)} synapses ({(ph.synapse > 0).sum() / n:.2%}); preview {preview}")
    return 0

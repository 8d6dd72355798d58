"""``ssl-em`` command line: each subcommand lives beside the code it drives.

Every subcommand is ``main(argv: list[str]) -> int`` in its module, imported only when used so
``ssl-em --help`` is instant. Any failure prints one line (:func:`ssl_em.errors.run_main`); ``--debug``
shows the traceback.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ssl_em.demo", "pretrain then few-label fine-tune on the phantom (or --data), with baselines"),
    "fit": ("ssl_em.fit", "train from a YAML recipe (LightningCLI): pretraining or fine-tuning"),
    "phantom": ("ssl_em.data.phantom", "write the synthetic EM phantom (raw + ground truth) and a preview PNG"),
    "convert": ("ssl_em.data.convert", "convert any volume spec to OME-Zarr with a multiscale pyramid"),
    "info": ("ssl_em.data.volume", "print shape, dtype, voxel size and chunks of a volume spec"),
    "download": ("ssl_em.datasets", "download a registered public EM dataset, verify it, convert to OME-Zarr"),
    "models": ("ssl_em.models.registry", "list registered encoders (or --info NAME)"),
    "export-encoder": ("ssl_em.pretrain.export_encoder", "export an encoder from a training checkpoint to safetensors + JSON"),
    "export-bioimageio": ("ssl_em.adapters.bioimageio", "package a fine-tuned model for the BioImage Model Zoo (spec 0.5)"),
    "validate": ("ssl_em.pretrain.validate", "frozen-feature linear probe of an encoder on a labelled volume (AP, IoU)"),
    "predict": ("ssl_em.predict.cli", "blockwise prediction of a volume with a trained model"),
    "evaluate": ("ssl_em.metrics.evaluate", "score a segmentation against ground truth (IoU, VOI, ARAND, ...)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ssl-em <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'ssl-em <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``ssl-em [--debug] <command> ...``: a user error is one line on stderr and exit code 2 (``--debug``,
    anywhere on the line, or ``SSL_EM_DEBUG=1`` prints the traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from ssl_em.errors import debug_requested, run_main

    debug, rest = debug_requested(argv)
    if not rest or rest[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if rest[0] == "--version":
        from ssl_em._version import __version__

        print(f"ssl-em {__version__}")
        return 0
    name, args = rest[0], rest[1:]
    if name not in COMMANDS:
        print(f"ssl-em: error: unknown command {name!r}; one of {', '.join(COMMANDS)} (see 'ssl-em --help')",
              file=sys.stderr)
        return 2

    def command(command_argv: list[str]) -> int | None:
        return importlib.import_module(COMMANDS[name][0]).main(command_argv)

    return run_main(f"ssl-em {name}", command, args + (["--debug"] if debug else []))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

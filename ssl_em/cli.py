"""``ssl-em`` command line: each subcommand lives beside the code it drives.

Every subcommand is ``main(argv: list[str]) -> int`` in its module, imported only when used so
``ssl-em --help`` is instant. Library errors (:class:`ssl_em.errors.SslEmError`) print one line.
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
    "validate": ("ssl_em.pretrain.probe", "frozen-feature linear probe of an encoder on a labelled volume (AP, IoU)"),
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] == "--version":
        from ssl_em import __version__

        print(f"ssl-em {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ssl-em: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from ssl_em.errors import SslEmError

    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except SslEmError as err:
        print(f"ssl-em {name}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"ssl-em {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

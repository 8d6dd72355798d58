"""``ssl-em fit --config recipes/<kind>/<name>.yaml [--config more.yaml] [--model.x ...]``.

A thin LightningCLI: the typed constructors of the LightningModule and the data module are the
config, recipes are YAML with ``class_path``/``init_args``. What this adds to LightningCLI:

* ``precision: auto`` (the default) -> a few steps of this model on this device timed in fp32 and bf16
  (bf16 in a child process, where a crashing kernel costs nothing), the faster that stays finite
  (cached per machine, model and crop; ``ssl_em.utils.precision``);
* checkpoints are safetensors (:class:`SafetensorsCheckpointIO`), with a
  ``last.ckpt`` so ``--ckpt_path last`` resumes an interrupted run;
* ``--data`` accepts volume specs directly: ``ssl-em fit --config r.yaml --data a.zarr b.h5:/raw``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from ssl_em.errors import ConfigError
from ssl_em.utils.checkpoint import SafetensorsCheckpointIO, load_checkpoint
from ssl_em.utils.precision import lightning_precision


def _device_type(accelerator: Any) -> str:
    import torch

    name = str(accelerator or "auto")
    if name in {"auto", "gpu", "cuda"}:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _find_last_checkpoint(config: Any) -> str | None:
    """``--ckpt_path last``: the newest ``last*.ckpt`` of this output folder (``trainer.default_root_dir``,
    else the working directory) or of a ModelCheckpoint ``dirpath``. Lightning looks only in the new
    run's own logger version folder, so after a kill it found nothing and started over. None (a new
    run, as Lightning does) when there is none yet."""
    roots = [Path(config.trainer.get("default_root_dir") or ".")]
    found = _checkpoints_below(roots[0])  # Lightning's <root>/.../checkpoints/last*.ckpt
    for callback in config.trainer.get("callbacks") or []:
        dirpath = (callback.get("init_args") or {}).get("dirpath") if hasattr(callback, "get") else None
        if dirpath and Path(dirpath).is_dir():
            roots.append(Path(dirpath))
            found += [p for p in Path(dirpath).glob("last*.ckpt") if p.is_file()]
    if not found:
        print(f"ssl-em fit: no last.ckpt under {', '.join(map(str, roots))}: starting a new run", file=sys.stderr)
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime_ns)
    print(f"ssl-em fit: resuming from {newest}", file=sys.stderr)
    return str(newest)


def _checkpoints_below(root: Path, depth: int = 4) -> list[Path]:
    """``last*.ckpt`` files in ``checkpoints`` folders at most ``depth`` folders below ``root`` (Lightning's
    layout: root/lightning_logs/version_N/checkpoints), not walking into volumes (.zarr, .n5) or hidden folders."""
    import os

    found = []
    for folder, dirs, files in os.walk(root):
        level = len(Path(folder).relative_to(root).parts)
        skip = level >= depth
        dirs[:] = [d for d in dirs if not skip and not d.startswith(".") and not d.endswith((".zarr", ".n5"))]
        if Path(folder).name == "checkpoints":
            found += [Path(folder) / f for f in files if f.startswith("last") and f.endswith(".ckpt")]
    return found


class SslEmCLI(LightningCLI):
    def _measured_precision(self) -> str | None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand != "fit" or str(config.get("precision", "auto")).lower() != "auto":
            return None
        return _measured_precision_of(self.model, self.datamodule, _device_type(config.trainer.accelerator))

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--precision", default="auto",
            help="auto (bf16-mixed only where native, else 32-true), 32 or bf16; overrides trainer.precision",
        )
        # values that must agree are set once: the data's task is the model's, the method decides two views
        parser.link_arguments("data.init_args.task", "model.init_args.task", apply_on="parse")
        parser.link_arguments("model.init_args.method", "data.init_args.two_views", compute_fn=_needs_two_views,
                              apply_on="parse")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        config.trainer.precision = lightning_precision(config.precision, _device_type(config.trainer.accelerator))

    def _parse_ckpt_path(self) -> None:
        """Restore the model's hyper-parameters from ``--ckpt_path`` (LightningCLI does it with torch.load;
        these checkpoints are safetensors)."""
        if not self.config.get("subcommand"):
            return
        if self.config[self.config.subcommand].get("ckpt_path") == "last":
            self.config[self.config.subcommand].ckpt_path = _find_last_checkpoint(self.config[self.config.subcommand])
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(load_checkpoint(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if "_class_path" not in hparams:
            return
        model = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)

    def instantiate_trainer(self, **kwargs: Any):
        measured = self._measured_precision()
        if measured is not None:
            kwargs["precision"] = measured
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(SafetensorsCheckpointIO())
        return super().instantiate_trainer(plugins=plugins, **kwargs)


def _needs_two_views(method: str) -> bool:
    from ssl_em.pretrain.module import needs_two_views

    return needs_two_views(method)


def _measured_precision_of(model: Any, datamodule: Any, device_type: str) -> str | None:
    """Lightning precision for ``precision: auto``, timed on one batch (None: nothing to time)."""
    from ssl_em.utils.precision import describe_record, lightning_precision, measure_datamodule_precision

    if not hasattr(model, "training_loss") or datamodule is None or not hasattr(datamodule, "train_dataloader"):
        return None
    record = measure_datamodule_precision(model, datamodule, device_type)
    print(f"ssl-em fit: {describe_record(record)}", file=sys.stderr)
    return lightning_precision(record["precision"], device_type)


def _expand_data_shortcut(argv: list[str]) -> list[str]:
    """``--data SPEC [SPEC ...]`` -> ``--data.init_args.unlabeled '[SPEC, ...]'`` (pretraining data)."""
    if "--data" not in argv:
        return argv
    i = argv.index("--data")
    specs = []
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        specs.append(argv[j])
        j += 1
    if not specs or (len(specs) == 1 and (specs[0].endswith((".yaml", ".yml")) or "class_path" in specs[0])):
        return argv  # LightningCLI's own --data CONFIG form
    quoted = ", ".join(f'"{s}"' for s in specs)
    return [*argv[:i], "--data.init_args.unlabeled", f"[{quoted}]", *argv[j:]]


def _check_config_files(argv: list[str]) -> None:
    """A recipe that is not valid YAML is named with the line at fault (jsonargparse's message names
    neither the file nor the setting)."""
    import yaml

    for flag, value in zip(argv, argv[1:]):
        if flag == "--config" and Path(value).is_file():
            try:
                yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"{value}:{where}: not valid YAML ({problem})") from None


def build_cli(argv: list[str], run: bool = True) -> SslEmCLI:
    import warnings

    # `ssl-em fit ...` passes its own argv on purpose; Lightning warns when sys.argv holds arguments too
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = _expand_data_shortcut(list(argv))
    _check_config_files(args)
    subcommands = {"fit", "validate", "test", "predict"}
    if run and (not args or args[0] not in subcommands):  # run=False parses and instantiates only
        args = ["fit", *args]
    return SslEmCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # a mistake in the command line or config raises (one line from ssl_em.errors.run_main), no usage dump
        parser_kwargs={"prog": "ssl-em fit", "exit_on_error": False},
    )


def training_failure(trainer: Any) -> str | None:
    """Why a ``trainer.fit`` that returned did not train, or None (Lightning returns normally when the
    training data gave no batch)."""
    from lightning.pytorch.trainer.states import TrainerStatus

    if trainer.state.status != TrainerStatus.FINISHED:
        return f"training ended as {trainer.state.status.value}, not finished"
    if trainer.global_step == 0 and trainer.max_steps != 0:
        return "no optimizer step was taken: the training data gave no batch (check --data and samples_per_epoch)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; 1, with one line on stderr, when a ``fit`` run diverged or did not train, else 0."""
    try:
        cli = build_cli(list(sys.argv[1:] if argv is None else argv))
    except FloatingPointError as err:  # the training steps raise it on a non-finite loss
        print(f"ssl-em fit: error: {err}: lower the learning rate, or train with --precision 32", file=sys.stderr)
        return 1
    problem = training_failure(cli.trainer) if cli.subcommand == "fit" else None
    if problem:
        print(f"ssl-em fit: error: {problem}", file=sys.stderr)
        return 1
    return 0

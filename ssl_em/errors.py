"""Errors users see: one line that names the file or setting, the problem, and what to do.

Library code raises the :class:`SslEmError` subclasses below. Entry points (``ssl-em <command>`` and the
benchmarks users run) go through :func:`run_main`, which prints any failure as one line, the library's
own or one raised deep inside jsonargparse, a DataLoader worker, torch, zarr, h5py or the file system,
and exits 2 for a user error; ``--debug`` (or ``SSL_EM_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import traceback
import zipfile
from collections.abc import Callable, Sequence
from typing import Any


class SslEmError(Exception):
    """Base class; the CLI prints ``ssl-em: error: <message>`` and exits 2 instead of a traceback."""


class VolumeError(SslEmError, ValueError):
    """A volume spec, file or its metadata cannot be used."""


class ConfigError(SslEmError, ValueError):
    """A model, data or training configuration is inconsistent (e.g. patch does not divide crop)."""


class CheckpointError(SslEmError, ValueError):
    """A weight file or its sidecar is missing, corrupt, mismatched or unsafe."""


class LabelError(SslEmError, ValueError):
    """Labels are empty, misshaped, NaN or hold values outside the task's set."""


USER_ERROR, INTERNAL_ERROR = 2, 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a :class:`ConfigError` (one line, exit 2), not usage text and exit."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message} (see '{self.prog} --help')")

    def add_renamed(self, new: str, old: str, **kwargs: Any) -> None:
        """Option ``new``, with ``old`` kept as a hidden alias that says it was renamed: scripts written
        for the old name keep working (one name per meaning: ``--crop`` is the training crop,
        ``--painted-size`` a painted square's side, ``patch_size`` an encoder's token stride)."""
        dest = kwargs.pop("dest", new.lstrip("-").replace("-", "_"))
        self.add_argument(new, dest=dest, **kwargs)

        class Renamed(argparse.Action):
            def __call__(self, parser, namespace, values, option_string=None):
                print(f"{parser.prog}: {old} is now {new}; the old name will go in a later release", file=sys.stderr)
                setattr(namespace, dest, values)

        self.add_argument(old, dest=dest, action=Renamed, help=argparse.SUPPRESS,
                          **{k: v for k, v in kwargs.items() if k in ("type", "nargs", "metavar")})


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    """ConfigError naming ``name`` unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    try:
        ok = float(value) >= 0 if allow_zero else float(value) > 0
        ok = ok and float(value) != float("inf")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{name}={value!r} must be a number {'>= 0' if allow_zero else '> 0'}")


def check_fraction(value: float, name: str, *, allow_zero: bool = False, allow_one: bool = False) -> None:
    """ConfigError naming ``name`` unless ``value`` lies in (0, 1), with its ends where allowed."""
    try:
        v = float(value)
        ok = (v >= 0 if allow_zero else v > 0) and (v <= 1 if allow_one else v < 1)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        lo, hi = "[0" if allow_zero else "(0", "1]" if allow_one else "1)"
        raise ConfigError(f"{name}={value!r} must lie in {lo}, {hi}")


def _chain(err: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _clean(text: str) -> str:
    """One line from an error's text: a DataLoader worker's re-raised error carries the worker's whole
    traceback, whose last line is the original ``module.Class: message``."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if any(line.startswith("Original Traceback") for line in lines):
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and "." in head and " " not in head else last
    return lines[0]


def _os_message(err: OSError) -> str | None:
    where = err.filename or "the output"
    if err.errno == errno.ENOSPC:
        return f"no space left on the device writing {where}: free space or write elsewhere"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "is on a read-only file system" if err.errno == errno.EROFS else "is not writable (permission denied)"
        return f"{where} {what}: choose a folder you can write to"
    if err.errno == errno.ENOENT:
        return f"{where} does not exist"
    if err.errno == errno.EEXIST:
        return f"{where} already exists and is in the way (a file where a folder is needed?): choose another path"
    if err.errno == errno.EISDIR:
        return f"{where} is a folder where a file was expected"
    if err.errno == errno.ENOTDIR:
        return f"{where} is a file where a folder was expected"
    return None


def _argument_message(errors: list[argparse.ArgumentError]) -> str:
    """jsonargparse nests its errors: the outermost names the setting (``Parser key "trainer.max_steps":``),
    the innermost says what is wrong; one line from both."""
    def lines(err: argparse.ArgumentError) -> list[str]:
        return [line.strip() for line in str(err).splitlines() if line.strip()]

    key, detail = None, []
    m = re.match(r'^Parser key "([^"]+)":\s*(.*)$', (lines(errors[0]) or [""])[0])
    if m:
        key = m.group(1)
    for err in (errors[-1], errors[0]):  # the innermost detail, else the outermost's
        found = lines(err)
        if found:
            inner = re.match(r'^Parser key "[^"]+":\s*(.*)$', found[0])
            found = ([inner.group(1)] if inner and inner.group(1) else []) + found[1:] if inner else found
        detail = [line for line in found if not line.startswith(("Given value", "Subtypes:", "Errors:"))]
        if detail:
            break
    text = " ".join(detail[:2]) or "invalid value"
    return f"setting {key}: {text}" if key else text


def describe_error(err: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for ``err``: 2 for what the user can fix, 1 for a defect in ssl-em."""
    chain = _chain(err)
    for e in chain:  # ssl-em's own message, wherever a wrapper (jsonargparse, torch's worker) put it
        if isinstance(e, SslEmError):
            return _clean(str(e)), USER_ERROR
    for e in chain:
        if isinstance(e, OSError) and (message := _os_message(e)):
            return message, USER_ERROR
        if isinstance(e, (zipfile.BadZipFile, EOFError)):
            return f"a file is truncated or not the archive it claims to be ({_clean(str(e)) or type(e).__name__})", \
                USER_ERROR
        if isinstance(e, MemoryError):
            return "out of memory: use a smaller batch, crop or block size", USER_ERROR
        if isinstance(e, argparse.ArgumentError):
            return _argument_message([x for x in chain if isinstance(x, argparse.ArgumentError)]), USER_ERROR
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            return "out of GPU memory: use a smaller batch, crop or block size", USER_ERROR
    text = _clean(str(err)) or type(err).__name__
    return f"internal error ({type(err).__name__}: {text}); rerun with --debug and report it", INTERNAL_ERROR


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(``--debug`` given or ``SSL_EM_DEBUG=1``, argv without ``--debug``)."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) != len(argv) or os.environ.get("SSL_EM_DEBUG", "") not in ("", "0"), rest


def run_main(name: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's ``main(argv)``; any failure is one line on stderr (exit 2 for a user error, 1
    for a defect), unless ``--debug`` asks for the traceback."""
    debug, args = debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(main(args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:  # argparse's --help (0) or a library that exits: keep the code
        return err.code if isinstance(err.code, int) else USER_ERROR
    except Exception as err:  # noqa: BLE001 - every failure becomes one line
        if debug:
            traceback.print_exc()
        message, code = describe_error(err)
        print(f"{name}: error: {message}", file=sys.stderr)
        if argv is None and not debug:  # a process of its own (a console script), about to exit
            _quiet_teardown()
        return code


def _quiet_teardown() -> None:
    """After the one line, what is torn down on the way out repeats the failure: zarr's event loop logs
    each pending chunk read ("Task was destroyed but it is pending!") and DataLoader workers' and
    async writers' finalizers print "Exception ignored" tracebacks (a corrupt chunk read in a worker:
    ~130 lines). Those say nothing the line did not. Process-wide, so only for a command's own process."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda unraisable: None

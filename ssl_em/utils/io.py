"""Atomic writes (readers never see a half-written result) and output checks (no output destroys an input
or a folder ssl-em did not write)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``target``, else delete it.

    The temporary lives in the target's folder so the final ``os.replace`` is atomic
    (same filesystem). An existing ``target`` is replaced only after the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if is_dir and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove_until_gone(tmp)
        raise


def _remove_until_gone(tmp: Path, patience_s: float = 2.0) -> None:
    """Delete a failed write's temporary. zarr writes chunks concurrently: when one write fails (a full
    disk), the others still in flight land after a first ``rmtree``, and the partial copy would hold the
    space the user has to free; so delete until nothing comes back."""
    deadline, absent = time.monotonic() + patience_s, 0
    while time.monotonic() < deadline:
        if os.path.lexists(tmp):
            absent = 0
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        else:
            absent += 1
            if absent == 2:  # gone, and still gone 50 ms later
                return
        time.sleep(0.05)


def _remove_stale_temporaries(target: Path) -> None:
    """Delete what an earlier, killed write to ``target`` left: ``.{name}.{pid}.*.tmp`` siblings whose
    process is gone (a live pid is another writer at work and is left alone)."""
    prefix = f".{target.name}."
    for tmp in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- outputs that may not destroy anything -----------------------------------------------------------
WRITER_KEY = "ssl_em"  # attribute every ssl-em store carries: {"writer": module, "version": ...}
_LEGACY_KEYS = ("ssl_em_predict",)  # predictions written before WRITER_KEY


def writer_attrs(writer: str, sparse: bool = False) -> dict:
    """The attribute that marks a store as ssl-em's own (so ``--overwrite`` may replace it); ``sparse``
    stores leave chunks out on purpose (read as the fill value, not as a missing-chunk error)."""
    from ssl_em._version import __version__

    return {WRITER_KEY: {"writer": writer, "version": __version__, **({"absent_chunks": "fill"} if sparse else {})}}


def _zarr_attrs(folder: Path) -> dict:
    import json

    for name, pick in ((".zattrs", lambda d: d), ("zarr.json", lambda d: d.get("attributes", {}))):
        try:
            return pick(json.loads((folder / name).read_text()))
        except (OSError, ValueError, AttributeError):
            continue
    return {}


def store_writer(path: str | os.PathLike) -> str | None:
    """The ssl-em module that wrote the zarr store at ``path`` (or its OME-Zarr array ``0``), else None."""
    path = Path(path)
    for folder in (path, path / "0"):
        attrs = _zarr_attrs(folder)
        if isinstance(attrs.get(WRITER_KEY), dict):
            return str(attrs[WRITER_KEY].get("writer"))
        if any(k in attrs for k in _LEGACY_KEYS):
            return "ssl_em.predict"
        ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales") or [{}]
        legacy = str(((ms[0] or {}).get("metadata") or {}).get("writer", ""))
        if legacy.startswith("ssl_em"):
            return legacy
    return None


def written_by_ssl_em(path: str | os.PathLike) -> bool:
    """True for a zarr store (or OME-Zarr image with array ``0``) whose attributes mark it as ssl-em's."""
    return store_writer(path) is not None


def _overlap(out: Path, given: str | os.PathLike) -> str | None:
    """How the resolved output ``out`` overlaps an input: "is", "sits inside", "contains", or None."""
    inp = Path(given).resolve()
    if out == inp:
        return "is"
    if inp in out.parents:
        return "sits inside"
    return "contains" if out in inp.parents else None


OUTPUT_MARKER = ".ssl_em_output"  # in every results folder ssl-em made (the study, the demo)


def claim_output_folder(folder: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Make ``folder`` a results folder ssl-em may write into: new, empty, or claimed before (its marker
    file); a folder with other content, or one that is, holds or sits inside an input, is a ConfigError."""
    from ssl_em.errors import ConfigError

    out = Path(folder)
    marker = out / OUTPUT_MARKER
    for given in inputs:
        if _overlap(out.resolve(), given):
            raise ConfigError(f"output folder {folder} overlaps the input {given}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {folder} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()) and not marker.exists():
        raise ConfigError(f"output folder {folder} already holds files ssl-em did not write: choose a new or "
                          "empty folder (ssl-em writes results.md, results.json and PNGs there)")
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return out


def check_output(dst: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, overwrite: bool,
                 writer: str | None = None) -> None:
    """Refuse (one-line ConfigError) an output that is, contains or sits inside an input; one that exists
    and ``writer`` (the ssl-em module about to write; None: any ssl-em module) did not write (never
    replaced, not even with ``overwrite``: a converted volume is not a prediction's to replace); and
    one it wrote when ``overwrite`` is False. Callers that resume their own output check it first."""
    from ssl_em.errors import ConfigError

    out = Path(dst).resolve()
    for given in inputs:
        how = _overlap(out, given)
        if how:
            raise ConfigError(f"output {dst} {how} the input {given}: choose an output outside every input")
    if not out.exists():
        return
    found = store_writer(out)
    if found is None:
        raise ConfigError(f"output {dst} exists and was not written by ssl-em, so it is never replaced "
                          "(not even with --overwrite): remove it yourself or choose another output")
    if writer is not None and found != writer:
        raise ConfigError(f"output {dst} was written by {found}, not by {writer}, so it is not replaced "
                          "(not even with --overwrite): remove it yourself or choose another output")
    if not overwrite:
        raise ConfigError(f"output {dst} exists; pass --overwrite (overwrite=True) to replace it")

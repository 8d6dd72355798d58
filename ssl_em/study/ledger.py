"""The study's record of finished work: ``results.jsonl``, one line per finished step (pretraining, a rate
sweep, a run), each keyed by what it is and stamped with the digest of what it depends on, so a rerun of the
same command reuses what matches and redoes the rest."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssl_em.errors import ConfigError

RESULTS = "results.jsonl"


def method_of(key: Sequence[Any]) -> str | None:
    """The method a results.jsonl key belongs to: ("run" | "sweep", method, ...); pretraining has none."""
    return key[1] if len(key) > 1 else None


class Ledger:
    """``results.jsonl`` in ``out``: ``digest(method)`` says what a line of that method must carry to count
    as done (``Study.digest``); ``reuse``: other studies' results.jsonl whose matching runs are copied in."""

    def __init__(self, out: Path, digest: Callable[[str | None], str], reuse: Sequence[Path] = (),
                 log: Callable[[str], Any] = print) -> None:
        self.path, self.digest, self.reuse, self.log = Path(out) / RESULTS, digest, list(reuse), log
        self.done: dict[tuple, dict[str, Any]] = {}

    def load(self) -> dict[tuple, dict[str, Any]]:
        """Read the finished steps (this study's, then runs reused from ``reuse``) into ``done``."""
        self.done = dict(self.matching(self.path))
        for other in self.reuse:  # another study's runs this one would repeat exactly: copied, not redone
            if not other.is_file():
                raise ConfigError(f"--reuse {other}: no such results.jsonl")
            for key, entry in self.matching(other):
                if key[0] in ("run", "sweep") and key not in self.done:
                    self.append(key, {k: v for k, v in entry.items() if k not in ("key", "digest")})
                    self.log(f"reused from {other}: {' '.join(map(str, key[1:]))}")
        return self.done

    def matching(self, path: Path) -> list[tuple[tuple, dict[str, Any]]]:
        """(key, entry) of the lines of a results.jsonl whose digest matches this study's for their method."""
        found = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                key = tuple(entry.get("key") or ())
                if key and entry.get("digest") == self.digest(method_of(key)):
                    found.append((key, entry))
        return found

    def append(self, key: tuple, entry: dict[str, Any]) -> dict[str, Any]:
        """Record a finished step at once (flushed and synced: a kill right after loses nothing)."""
        entry = {"key": list(key), "digest": self.digest(method_of(key)), **entry}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = entry
        return entry

"""The record of unreadable files a run passed over: one entry per file, with the reason.

Written beside a run's outputs as `skipped.jsonl`, one JSON line per file:
``{"name": "<path or id>", "index": <record index>, "reason": "<why it was skipped>"}``.
"""

from __future__ import annotations

import json

from reducio_jax.storage.paths import Path, PathLike, as_path, write_text

SKIPPED_FILE = "skipped.jsonl"


class SkipReport:
    """Distinct skipped files (first reason kept) and how often a skip happened."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}  # name -> {"name", "index", "reason"}
        self.events = 0  # skips counted each time (a file met twice counts twice)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, name: str, index: int, reason: str) -> bool:
        """Records one skip; True the first time `name` is seen."""
        self.events += 1
        if name in self.entries:
            return False
        self.entries[name] = {"name": name, "index": int(index), "reason": reason}
        return True

    def indices(self) -> set[int]:
        return {e["index"] for e in self.entries.values()}

    def write(self, path: PathLike) -> Path:
        """Writes (replaces) the jsonl file atomically; returns its path."""
        return write_text(path, "".join(json.dumps(e) + "\n" for e in self.entries.values()))

    def load(self, path: PathLike) -> None:
        """Adds the entries of an existing file (a resumed run keeps its earlier skips)."""
        path = as_path(path)
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                self.entries.setdefault(entry["name"], entry)


__all__ = ["SKIPPED_FILE", "SkipReport"]

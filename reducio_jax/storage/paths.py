"""Every path a user gives: a local path or a URL (`gs://bucket/...`), as one type.

The type is `etils.epath.Path`, the one Orbax uses: local paths go through `os`, `gs://` URLs
through `gcsfs` (fsspec), so `/`, `exists()`, `iterdir()`, `open()`, `mkdir()` mean the same on
both. `as_path` is the one way in: it expands `~` and makes local paths absolute, and leaves a
URL a URL (epath's own `absolute()` would turn `gs://b/x` into the local folder `./gs:/b/x`).

An object store has no rename and no partial objects: an object appears whole when its upload
ends. So a file that must never be seen half-written (a report, a video, a JSON record) is
written through `staged(path)`: into a local temporary file, then moved into place in one step
(`os.replace` on a local disk, one upload to a bucket), and dropped if the writer fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike
Path = epath.Path
_SCHEME = "://"

# gcsfs logs a warning per call when it cannot tell a bucket's type (no cloud credentials,
# e.g. against a local emulator; the call then proceeds with the plain GCS file system), and a
# traceback per request that ran out of retries (the exception then reaches the caller, whose
# one `error:` line reports it).
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def is_remote(path: PathLike) -> bool:
    """True for a URL (`gs://...`, any `scheme://`), False for a local path."""
    return _SCHEME in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """A user's path as an `epath.Path`: a URL as is, a local path with `~` expanded, absolute."""
    text = os.fspath(path)
    if not text:
        raise ValueError("empty path")
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def make_dirs(path: PathLike) -> epath.Path:
    """Creates a local folder (and its parents). In a bucket there are no folders to create,
    only the bucket to check: it must exist (a missing bucket is never created; gcsfs's
    `mkdir` would create it), else `FileNotFoundError` naming the URL."""
    path = as_path(path)
    if is_remote(path):
        check_bucket(path)
    else:
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_bucket(path: PathLike) -> None:
    """`FileNotFoundError` (one line, naming `path`) unless the bucket of a URL exists."""
    text = os.fspath(path)
    scheme, rest = text.split(_SCHEME, 1)
    bucket = f"{scheme}{_SCHEME}{rest.split('/', 1)[0]}"
    if not epath.Path(bucket).exists():
        raise FileNotFoundError(
            f"{text}: bucket {bucket} does not exist (or these credentials cannot see it)"
        )


def kvstore(path: PathLike) -> dict[str, Any] | str:
    """TensorStore's key-value store of a folder: its `gcs` driver for a bucket URL, else the
    `file` driver."""
    path = as_path(path)
    if is_remote(path):
        return os.fspath(path).rstrip("/") + "/"
    return {"driver": "file", "path": os.fspath(path)}


def rmtree(path: PathLike, *, missing_ok: bool = True) -> None:
    """Deletes a folder and everything in it (local or in a bucket)."""
    path = as_path(path)
    if not path.exists():
        if missing_ok:
            return
        raise FileNotFoundError(f"{path} does not exist")
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=missing_ok)
    else:
        path.rmtree()


def files_under(folder: PathLike) -> Iterator[epath.Path]:
    """Every file below `folder`, at any depth (epath has no recursive glob: it walks; in a
    bucket its walk names folders without the `gs://`, so each is rebuilt from `folder`)."""
    root = as_path(folder)
    base = _without_scheme(root)
    for directory, _, files in root.walk():
        relative = _without_scheme(directory)[len(base) :].strip("/")
        here = root / relative if relative else root
        for name in files:
            yield here / name


def _without_scheme(path: PathLike) -> str:
    return os.fspath(path).split(_SCHEME, 1)[-1].rstrip("/")


def copytree(source: PathLike, out: PathLike) -> None:
    """Copies a folder's files (local or in a bucket, either way) into `out`."""
    source, out = as_path(source), as_path(out)
    base = len(os.fspath(source))
    for file in files_under(source):
        target = out / os.fspath(file)[base:].lstrip("/")
        make_dirs(target.parent)
        file.copy(target, overwrite=True)


@contextlib.contextmanager
def staged(path: PathLike, suffix: str = "") -> Iterator[pathlib.Path]:
    """A local file to write `path` through: it is moved into place when the block ends (one
    `os.replace`, or one upload to a bucket) and deleted if the block raises, or if the user
    interrupted the process meanwhile (`note_interrupt`: a Ctrl-C that Python lost, raised in
    a garbage-collection callback, still keeps the unfinished file out). `suffix` gives the
    temporary file an extension a writer may need (e.g. ".mp4" for PyAV)."""
    path = as_path(path)
    suffix = suffix or path.suffix
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="reducio-upload-") as folder:
            local = pathlib.Path(folder) / ("staged" + suffix)
            yield local
            _check_interrupt()
            upload(local, path)
        return
    make_dirs(path.parent)
    local = pathlib.Path(os.fspath(path.parent)) / f".{path.stem}.partial{suffix}"
    try:
        yield local
        _check_interrupt()
        os.replace(local, os.fspath(path))
    finally:
        local.unlink(missing_ok=True)


_INTERRUPTED = {"seen": False}


def note_interrupt() -> None:
    """Notes a SIGINT (the commands' handler, reducio_jax.cli): no staged file is moved into
    place after it."""
    _INTERRUPTED["seen"] = True


def clear_interrupt() -> None:
    """Forgets a noted SIGINT (a command has ended)."""
    _INTERRUPTED["seen"] = False


def _check_interrupt() -> None:
    if _INTERRUPTED["seen"]:
        raise KeyboardInterrupt


def upload(local: pathlib.Path, path: epath.Path) -> None:
    """One upload of a local file to `path` (the object appears only when it is complete)."""
    make_dirs(path.parent)
    path.write_bytes(local.read_bytes())


def mirror(local: PathLike, out: PathLike) -> None:
    """Uploads every file of the local folder `local` to the folder `out`, each in one upload."""
    out = as_path(out)
    for file in sorted(pathlib.Path(local).iterdir()):
        if file.is_file():
            upload(file, out / file.name)


def write_text(path: PathLike, text: str) -> epath.Path:
    """Writes (replaces) a text file atomically; returns its path."""
    with staged(path) as local:
        local.write_text(text)
    return as_path(path)


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
    """Writes (replaces) a binary file atomically; returns its path."""
    with staged(path) as local:
        local.write_bytes(data)
    return as_path(path)


def media_source(path: PathLike) -> str | IO[bytes]:
    """What `av.open` reads a video from: a local path as a string, a remote one as an open
    binary file object (read in ranges as PyAV seeks, never copied whole). Close it after use
    (`with av.open(...)` closes only the container)."""
    path = as_path(path)
    return path.open("rb") if is_remote(path) else os.fspath(path)


@contextlib.contextmanager
def open_media(path: PathLike) -> Iterator[str | IO[bytes]]:
    """`media_source` as a context: the remote file object is closed at the end."""
    source = media_source(path)
    try:
        yield source
    finally:
        if not isinstance(source, str):
            source.close()


class TextLog:
    """A text file grown line by line (metrics.jsonl): appended to on a local disk; in a bucket,
    where objects cannot be appended to, the whole text is uploaded again at each `flush`."""

    def __init__(self, path: PathLike):
        self.path = as_path(path)
        self.remote = is_remote(self.path)
        if self.remote:
            self.text = self.path.read_text() if self.path.exists() else ""
        else:
            self.file = open(os.fspath(self.path), "a")

    def write(self, text: str) -> None:
        if self.remote:
            self.text += text
        else:
            self.file.write(text)

    def flush(self) -> None:
        if self.remote:
            write_text(self.path, self.text)
        else:
            self.file.flush()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self.file.close()


__all__ = [
    "Path",
    "PathLike",
    "TextLog",
    "as_path",
    "copytree",
    "files_under",
    "is_remote",
    "check_bucket",
    "kvstore",
    "make_dirs",
    "media_source",
    "mirror",
    "open_media",
    "rmtree",
    "staged",
    "write_bytes",
    "write_text",
]

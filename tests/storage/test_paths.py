"""`reducio_jax.storage.paths`: a `gs://` URL never becomes a local path, and no module of the package
builds a local path type from a user's path (they all go through `paths.as_path`)."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

from reducio_jax.storage import paths

PACKAGE = pathlib.Path(paths.__file__).resolve().parents[1]
# Modules that may build local paths themselves, and why: configs are Python files imported
# from the local disk; the parity report imports a local checkout of the reference code; the
# hub's files are in huggingface_hub's local cache.
LOCAL_ONLY = {"config.py", "runs/parity.py", "storage/paths.py", "convert/hub.py"}
LOCAL_CALLS = {
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("os.path", "abspath"),
    ("os.path", "expanduser"), ("os.path", "realpath"), (None, "open"),
}  # fmt: skip


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                yield None, f.id, node.lineno
            elif isinstance(f, ast.Attribute):
                yield ast.unparse(f.value), f.attr, node.lineno


def test_no_module_builds_a_local_path_from_user_input():
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        name = str(file.relative_to(PACKAGE))
        if name in LOCAL_ONLY:
            continue
        tree = ast.parse(file.read_text())
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module == "pathlib" for a in n.names}  # fmt: skip
        for owner, attr, line in _calls(tree):
            if (owner, attr) in LOCAL_CALLS or (owner is None and attr in imported):
                offenders.append(f"{name}:{line} {owner + '.' if owner else ''}{attr}(...)")
    # reconstruct compares a local input and output by their real paths (after is_remote)
    offenders = [o for o in offenders if not (o.startswith("runs/reconstruct.py:") and "realpath" in o)]
    # programs/budget.py reads the kernel's /proc and /sys files (memory available), never user paths
    offenders = [o for o in offenders if not o.startswith("programs/budget.py:")]
    assert offenders == [], "use reducio_jax.storage.paths.as_path for user paths:\n" + "\n".join(offenders)


@pytest.mark.parametrize("url", ["gs://bucket/run", "gs://bucket/a/b.mp4", "gs://b/x/"])
def test_a_url_stays_a_url(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = paths.as_path(url)
    assert os.fspath(path) == url.rstrip("/") and paths.is_remote(path)
    assert os.fspath(path / "checkpoints") == url.rstrip("/") + "/checkpoints"
    assert paths.kvstore(url) == url.rstrip("/") + "/"


def test_local_paths_are_absolute_and_expanded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(paths.as_path("run")) == str(tmp_path / "run")
    assert os.fspath(paths.as_path("~/x")) == os.path.expanduser("~/x")
    assert paths.kvstore("s") == {"driver": "file", "path": str(tmp_path / "s")}


def test_staged_write_is_atomic_locally(tmp_path):
    target = tmp_path / "sub" / "report.json"
    paths.write_text(target, "old")
    with pytest.raises(RuntimeError), paths.staged(target) as local:
        local.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old"  # the failed write left the finished file alone
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no partial


def test_after_a_noted_interrupt_no_staged_file_is_moved_into_place(tmp_path):
    """A Ctrl-C that Python dropped (raised in a garbage-collection callback) was still noted
    by the commands' SIGINT handler: the output being written is not published."""
    target = tmp_path / "out.bin"
    paths.note_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt), paths.staged(target) as local:
            local.write_bytes(b"unfinished")
    finally:
        paths.clear_interrupt()
    assert list(tmp_path.iterdir()) == []  # neither the output nor its partial file
    with paths.staged(target) as local:
        local.write_bytes(b"done")
    assert target.read_bytes() == b"done"

"""Atomic writes and file hashes: the one home of "a crash leaves the old file or the new one, never half".

Every file hyper-prag writes for later reuse (store shards and sidecars, index folders, converted
models, LoRA files) goes through these helpers:

- :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: write a temp
  file in the same folder, ``fsync`` it, ``os.replace`` it onto the target, ``fsync`` the folder (so
  the rename itself survives a power cut).
- :func:`atomic_file`: the same for writers that want a file name (``safetensors.save_file``,
  ``faiss.write_index``): yields the temp path, commits it when the block ends without error.
- :func:`atomic_dir`: a folder built under a temp name beside the target, every file in it
  ``fsync``-ed, then renamed into place (replacing the old folder, or keeping it if another process
  got there first).
- :func:`sha256_file`: the sha256 of a file read in 1 MiB chunks (memory stays flat for GB files).

Temp names start with ``.`` and end with ``.tmp`` (folders: contain ``.tmp-``), so sweepers such as
the LoRA store's garbage collector recognise a write that died half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

CHUNK_BYTES = 1 << 20  # sha256 reads this much at a time


def sha256_file(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Returns the sha256 hex digest of a file, read in chunks.

    Args:
        path: the file.
        chunk_bytes: bytes read per call.

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: str | Path) -> None:
    """Flushes a folder's entries (renames, new files) to disk; a no-op where folders have no handle."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temp path beside ``path``; when the block ends without error it becomes ``path``.

    Args:
        path: the file to (re)place; its folder is created if missing.

    Yields:
        The temp path to write to. On an exception it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` so that a crash leaves either the old file or the whole new one.

    Args:
        path: the target file.
        data: its new content.

    Returns:
        ``path``.
    """
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """:func:`atomic_write_text` of ``obj`` as UTF-8 JSON (keys in their given order, newline at the end).

    Args:
        path: the target file.
        obj: anything ``json.dumps`` takes.
        indent: JSON indentation (``None``: one line).

    Returns:
        ``path``.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _fsync_tree(folder: Path) -> None:
    for sub, _, files in os.walk(folder):
        for name in files:
            _fsync_file(Path(sub) / name)
        fsync_dir(sub)


@contextmanager
def atomic_dir(path: str | Path, exists: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """Yields a temp folder beside ``path``; when the block ends without error it becomes ``path``.

    Args:
        path: the folder to create or replace.
        exists: what to do if ``path`` exists at commit time: ``"replace"`` it (old folder moved aside,
            new one renamed in, old one deleted), or ``"keep"`` it and discard ours (another process
            built the same thing first, e.g. a converted model).

    Yields:
        The temp folder to fill. On an exception it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists() and exists == "keep":
            return
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            if exists == "keep" and path.exists():  # lost a race to another process: theirs is as good
                return
            if old is not None and not path.exists():
                os.replace(old / path.name, path)  # put the old folder back
            raise
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""What the fault matrix (``benchmarks/fault_matrix.py``) damages and how it judges a row.

- Running the CLI in-process and reading what it served: :func:`cli`, :func:`served`, :func:`one_line_error`.
- Faults: bytes patched into files, a pickle that runs code, writes refused as on a read-only mount or a full
  disk (:func:`refusing_writes`, :func:`full_disk`), the per-document encoder's calls counted.
- Judging: store entries compared bit for bit (:func:`lost`) or up to float rounding (:func:`equal`), and one
  outcome per row (:func:`verdict`): handled (:data:`HANDLED`) or not (:data:`NOT_HANDLED`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

HANDLED = ("clear error", "repaired", "correct answer")  # the outcomes of a row that held
NOT_HANDLED = ("silent wrong", "lost", "code run", "unhandled")


class RunsCode:
    """A pickle payload that writes a marker file when unpickled (what a crafted checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def cli(*argv: str) -> tuple[int, str, str]:
    """Runs ``hyper-prag ARGV``; returns the exit code, stderr (argparse's exit and log warnings included), stdout."""
    from hyper_prag.cli import main

    err, out = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)  # log lines (warnings) go to stderr in a shell too
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        finally:
            logging.getLogger().removeHandler(handler)
    return code, err.getvalue().strip(), out.getvalue()


def served(out: str) -> list[str]:
    """What ``ask`` served: its answer, documents and LoRAs (stdout without the timing line)."""
    return [line for line in out.splitlines() if line.strip() and not line.strip().startswith("time:")]


def one_line_error(code: int, err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return code == 2 and bool(lines) and lines[-1].startswith(("error:", "hyper-prag")) and "Traceback" not in err


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def warnings_to(buffer: io.StringIO) -> Iterator[None]:
    """Collects WARNING records of the library (what a user sees on stderr) into ``buffer``."""
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)


@contextlib.contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def refusing_writes(under: Path, code: int) -> Iterator[None]:
    """Every file the store code opens for writing under ``under`` fails with ``code`` (EROFS: a read-only mount;
    the matrix may run as root, for whom a chmod'ed folder stays writable)."""
    import builtins

    import hyper_prag.io as hio
    import hyper_prag.store as hstore

    def guarded(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and any(c in mode for c in "wax+") \
                and Path(under).resolve() in Path(file).resolve().parents:
            raise OSError(code, os.strerror(code), str(file))
        return builtins.open(file, mode, *args, **kwargs)

    modules = (hio, hstore)
    for module in modules:  # a module global named open shadows the builtin for that module's code
        module.open = guarded
    try:
        yield
    finally:
        for module in modules:
            del module.open


@contextlib.contextmanager
def full_disk(under: Path) -> Iterator[None]:
    """Every flush of a file under ``under`` fails with ENOSPC (a write is flushed before it is renamed into place:
    where a full disk shows)."""
    import hyper_prag.io as hio

    flush = hio._fsync_file

    def full(path):
        if Path(under).resolve() in Path(path).resolve().parents:
            raise OSError(errno.ENOSPC, "No space left on device")
        flush(path)

    with patched(hio, "_fsync_file", full):
        yield


@contextlib.contextmanager
def counting_encodes() -> Iterator[list[int]]:
    """Counts calls of the per-document encoder (what "nothing was trained" is checked by)."""
    from hyper_prag.encoders.per_doc import PerDocEncoder

    calls = [0]
    encode = PerDocEncoder.encode

    def counted(self, documents):
        calls[0] += 1
        return encode(self, documents)

    with patched(PerDocEncoder, "encode", counted):
        yield calls


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the empty write lock) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "write.lock"} if folder.is_dir() else {}


def patch_bytes(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def first_tensor_offset(shard: Path) -> int:
    data = shard.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    first = min((v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"))
    return 8 + header_len + first


def difference(a: list | None, b: list | None) -> float:
    """The largest difference of two entries' tensors, relative to each tensor's largest value (inf: not comparable)."""
    if a is None or b is None or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max(float((x - y).abs().max() / y.abs().max().clamp(min=1e-30)) for x, y in zip(a, b))


def equal(a: list | None, b: list | None, rtol: float = 0.0) -> bool:
    """Two entries' tensors equal (``rtol`` 0: bit for bit; else within ``rtol`` of each tensor's largest value)."""
    import torch

    if rtol:
        return difference(a, b) <= rtol
    return a is not None and b is not None and len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


REENCODE_RTOL = 1e-4  # a document re-encoded in another chunk: the same LoRA up to float rounding (~1e-5 measured)


def lost(before: dict[str, list], after: dict[str, list]) -> str:
    """Good entries of ``before`` that are gone or changed in ``after`` (kept entries must be bit for bit the same)."""
    gone = [k for k, v in before.items() if not equal(after.get(k), v)]
    return "none" if not gone else f"{len(gone)} entries"


def verdict(success: str, ok: bool, *, wrong: bool = False, data_lost: str = "none", code_run: bool = False) -> str:
    """The row's outcome: ``success`` when every check held, else the worst thing that happened."""
    if code_run:
        return "code run"
    if data_lost != "none":
        return "lost"
    if wrong:
        return "silent wrong"
    return success if ok else "unhandled"

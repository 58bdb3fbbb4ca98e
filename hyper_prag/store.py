"""The LoRA store: content-addressed, sharded safetensors, verified on every read, safe for crashes and concurrent writers.

Key: :func:`store_key` = sha256 of (document text, base-model identity, LoRA spec, augmentation
settings, encoder identity and settings) in canonical JSON. Re-encoding an
unchanged document is a cache hit; anything that changes the LoRA changes the key. The storage dtype
is not part of the key: it is a property of the store folder, recorded per shard; a store keeps the
dtype it was first written in (:attr:`LoraStore.dtype`), so a re-encode never mixes precisions in it.

Layout of a store folder::

    shards/<uuid>.safetensors   many LoRAs: tensors "<key>/A/<module>" (L, r, d_in), "<key>/B/<module>" (L, d_out, r)
                                (int8 shards add "<key>/A_scale/<module>" (L, r, 1), "<key>/B_scale/<module>" (L, 1, r))
    shards/<uuid>.json          its sidecar: {"format", "sha256", "bytes", "dtype", "written_ns",
                                              "entries": {key: {"spec", "meta", "sha256"}}}
    write.lock                  empty; a writer holds an exclusive flock on it while it commits a shard

Every :meth:`LoraStore.put_many` writes one new, immutable shard (temp file, fsync, rename) and
only then its sidecar (same way). The manifest is the union of sidecars: a shard without a sidecar
is a write that died half-way and is ignored (and removed by :func:`gc_store`); two processes
never write the same file, so concurrent writers cannot corrupt each other. A write the disk refuses
(read-only folder, full disk) raises :class:`HyperPragError` saying what to do and leaves no partial file.

Integrity. A sidecar records the sha256 of its shard and, per entry, of that entry's tensors (names,
dtypes, shapes, bytes). Every read (:meth:`LoraStore.get`) hashes the bytes it is about to serve and
checks the weights are finite: a flipped bit, a truncated shard or NaNs raise :class:`HyperPragError`
naming the key, its document and the repair (``hyper-prag store verify --repair``, then ``encode``).
Per-entry hashes keep a read proportional to one LoRA (sha256 ≈ 2 GB/s: ≈ 0.4 ms for a bf16 SmolLM2
LoRA; ``benchmarks/store_verify_cost.py`` compares it with a generated token). :meth:`LoraStore.missing`
(what ``encode`` skips by) verifies the same way, so a damaged entry is encoded again; a verified entry
is trusted until its shard file changes (size, mtime, inode). Older sidecars without per-entry hashes
are checked by the whole-shard sha256 (once per shard and process) until ``verify --repair`` adds them.
An unusable sidecar (not JSON, not an object, no ``entries``) is skipped with a warning and listed by
:func:`verify_store`; the rest of the store stays readable.

Writers (e.g. the ranks of a distributed ``encode``) hold an exclusive ``flock`` on ``write.lock``
while they look for keys already stored (and verified) and commit their shard, so a key is written
once however writers race; ``put_many`` returns the keys it wrote. The kernel releases the lock when
a writer dies. Without ``flock`` (a warning says so) racing writers can both store a key. A key in
several sidecars (such a race, or a re-write of a damaged entry) is read from the copy written last;
:func:`gc_store` removes shards whose every entry has a newer copy.

Readers memory-map shards with ``safe_open`` and keep the handles open (an LRU); a reader re-scans the
folder only when asked for a key it does not know and the folder changed, or when a read fails.

Storage dtypes (bytes per LoRA with SmolLM2's FFN, r = 2: 30 layers × 3 modules × 2·(576 + 1536)·r values):
``float32`` exact (≈1.52 MB), ``bfloat16`` (default, ≈0.76 MB, relative error ≤ 2⁻⁸), ``int8``
(≈0.38 MB): each rank component (a row of A, a column of B) is scaled by its absolute maximum / 127
and rounded, with the fp32 scales stored beside it and applied on read (error ≤ absmax / 254).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from hyper_prag.errors import HyperPragError
from hyper_prag.io import atomic_write_bytes, sha256_file
from hyper_prag.lora import Lora, LoraSpec, check_base_model

log = logging.getLogger(__name__)

StoreDtype = Literal["bfloat16", "float32", "int8"]
SIDECAR_FORMAT = "hyper-prag-store/1"
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1}  # bytes per element, by safetensors dtype name
_RESCAN_GRACE_NS = 2_000_000_000  # folder mtimes are coarse (ext4: ~4 ms); re-scan while one is this fresh


def canonical_json(obj: Any) -> str:
    """Sorted-key, separator-tight JSON: equal objects give equal text, hence equal hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def store_key(document_text: str, base_model: str, spec: LoraSpec, augmentation: Mapping, encoder: Mapping) -> str:
    """Returns the content address of one document's LoRA.

    Args:
        document_text: the document text (exactly as encoded).
        base_model: identity of the base model.
        spec: the LoRA spec (rank, alpha, modules, layers).
        augmentation: augmentation settings (``{}`` for encoders that read only the text).
        encoder: encoder identity and settings (e.g. trainer hyper-parameters, checkpoint sha256).

    Returns:
        A 64-hex-digit sha256.
    """
    spec_part = {"rank": spec.rank, "alpha": spec.alpha, "modules": list(spec.target_modules), "layers": list(spec.layers)}
    payload = canonical_json({"text": document_text, "base": base_model, "spec": spec_part,
                          "augmentation": dict(augmentation), "encoder": dict(encoder)})
    return hashlib.sha256(payload.encode()).hexdigest()


def quantize_int8(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization along ``dim``.

    Args:
        x: a float tensor.
        dim: the axis that shares one scale (reduced to size 1 in the scale).

    Returns:
        ``(q, scale)``: int8 values and fp32 scales with ``x ≈ q * scale``.
    """
    scale = x.detach().float().abs().amax(dim=dim, keepdim=True) / 127.0  # (…, 1, …)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero vector stays zero
    q = torch.round(x.detach().float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def entry_sha256(tensors: Mapping[str, Tensor]) -> str:
    """The content hash of one store entry: sha256 over its tensors' names, dtypes, shapes and bytes, in name order.

    Args:
        tensors: the entry's tensors exactly as stored (``"<key>/A/<module>"`` → stored dtype).

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
    return digest.hexdigest()


def _entry_names(key: str, spec: LoraSpec, int8: bool) -> list[str]:
    parts = ("A", "B", "A_scale", "B_scale") if int8 else ("A", "B")
    return sorted(f"{key}/{part}/{m}" for part in parts for m in spec.target_modules)


class _Signature(NamedTuple):  # what tells that a file changed: a verified entry is trusted while this holds
    size: int
    mtime_ns: int
    inode: int


def _signature(path: Path) -> _Signature:
    st = os.stat(path)
    return _Signature(st.st_size, st.st_mtime_ns, st.st_ino)


class _Entry(NamedTuple):  # where one key's copy is
    shard: str  # the shard file's stem
    spec: LoraSpec
    meta: dict
    sha256: str | None  # None: written before per-entry hashes (the whole shard is checked instead)
    spec_sha256: str | None = None  # sha256 of the spec it was written with; None: written before specs were hashed


def spec_sha256(spec: LoraSpec) -> str:
    """sha256 of a LoRA spec's canonical JSON: recorded beside an entry's tensor hash, so an edited ``alpha`` or
    ``layers`` in a sidecar (which would rescale the LoRA or apply it to other layers) is refused on read."""
    return hashlib.sha256(canonical_json(json.loads(spec.to_json())).encode()).hexdigest()


SidecarState = Literal["ok", "foreign", "malformed", "dangling"]
_SIDECAR_HINT: dict[str, str] = {  # what to do about a sidecar that is not used, by its state
    "malformed": "`hyper-prag store verify --repair` removes it and its shard; `hyper-prag encode` re-encodes them",
    "foreign": "Left alone; read it with the hyper-prag version that wrote it",
    "dangling": "`hyper-prag store gc` removes it; `hyper-prag encode` encodes its documents again",
}


def _read_sidecar(path: Path) -> tuple[SidecarState, dict | str]:
    """Parses and checks a sidecar: ``("ok", sidecar)`` or ``(state, why it is not used)``."""
    try:
        info = json.loads(path.read_bytes())
    except OSError as err:
        return "malformed", f"unreadable ({err})"
    except ValueError as err:  # also UnicodeDecodeError
        return "malformed", f"not JSON ({err})"
    if not isinstance(info, dict):
        return "malformed", f"a JSON {type(info).__name__}, not an object"
    fmt = info.get("format")
    if isinstance(fmt, str) and fmt.startswith("hyper-prag-store/") and fmt != SIDECAR_FORMAT:
        return "foreign", f"format {fmt!r}, written by another hyper-prag version (this one reads {SIDECAR_FORMAT!r})"
    if fmt != SIDECAR_FORMAT:
        return "malformed", f"format {fmt!r} is not {SIDECAR_FORMAT!r}"
    if not isinstance(info.get("sha256"), str) or not isinstance(info.get("bytes"), int):
        return "malformed", "no shard sha256/bytes"
    if info.get("dtype", "bfloat16") not in ("bfloat16", "float32", "int8"):
        return "malformed", f"unknown dtype {info.get('dtype')!r}"
    entries = info.get("entries")
    if not isinstance(entries, dict):
        return "malformed", "no 'entries' object"
    return "ok", info  # the entries themselves are checked as they are parsed (LoraStore._entries)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``lock_path`` (created if missing) for the ``with`` block."""
    with open(lock_path, "a+b") as f:  # closing the file releases the lock (so does the writer's death)
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as err:  # e.g. Lustre mounted without -o flock
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("no file locks on %s (%s): concurrent writers may store a key twice", lock_path, err)
        yield


@contextmanager
def store_writes(root: str | Path, what: str = "write to") -> Iterator[None]:
    """Turns a failed write into the store (read-only folder, full disk, a file in the way) into a
    :class:`HyperPragError` that says what to do; the writes inside leave no partial file behind."""
    try:
        yield
    except OSError as err:
        raise HyperPragError(f"cannot {what} the LoRA store {root} ({err.strerror or err}): make it writable or free "
                             "disk space, or pass another folder with --store, then re-run; nothing half-written "
                             "was left and the entries already stored are intact.") from err


@dataclass
class StoreIssue:
    """One thing :func:`verify_store` found wrong."""

    path: str  # the shard or sidecar file
    why: str
    key: str | None = None  # the entry, when one entry (not the whole file) is affected
    doc_id: str | None = None  # its document, from the entry's metadata


@dataclass
class StoreReport:
    """What :func:`verify_store` / :func:`gc_store` checked, found and did."""

    root: str
    shards: int = 0  # shards checked
    entries: int = 0  # entries checked
    issues: list[StoreIssue] = field(default_factory=list)  # everything found wrong (before any repair)
    legacy: list[str] = field(default_factory=list)  # sidecars without per-entry hashes (repair adds them)
    removed: list[str] = field(default_factory=list)  # files deleted
    rewritten: list[str] = field(default_factory=list)  # keys of good entries copied out of a damaged shard
    lost: list[str] = field(default_factory=list)  # keys removed: `hyper-prag encode` encodes them again

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self) -> str:
        """A few lines for a person: counts, each issue, what was done."""
        lines = [f"store {self.root}: {self.shards} shards, {self.entries} entries checked, {len(self.issues)} issues"]
        for issue in self.issues:
            what = f" entry {issue.key[:12]}… (document {issue.doc_id or '?'})" if issue.key else ""
            lines.append(f"  {issue.path}{what}: {issue.why}")
        if self.legacy:
            lines.append(f"  {len(self.legacy)} sidecars have no per-entry hashes (older version); --repair adds them")
        if self.removed or self.rewritten or self.lost:
            lines.append(f"  removed {len(self.removed)} files, rewrote {len(self.rewritten)} good entries, "
                         f"dropped {len(self.lost)} damaged entries (re-run `hyper-prag encode` to encode them again)")
        return "\n".join(lines)


class LoraStore:
    """A folder of LoRAs addressed by :func:`store_key` (see the module docstring)."""

    def __init__(self, root: str | Path, dtype: StoreDtype | None = None, max_open_shards: int = 64) -> None:
        """
        Args:
            root: the store folder (created if missing; readers open it with :func:`existing_store`).
            dtype: storage dtype of the entries of a store that holds none yet (``bfloat16``, ``float32`` or
                ``int8``; ``None``: ``bfloat16``). A store keeps one precision: once it holds entries, new ones
                are stored in its dtype (:attr:`dtype`), with a warning when ``dtype`` names another. Reads
                return float32.
            max_open_shards: memory-mapped shard handles kept open (LRU).
        """
        if dtype not in (None, "bfloat16", "float32", "int8"):
            raise HyperPragError(f"store dtype must be 'bfloat16', 'float32' or 'int8', not {dtype!r}.")
        self.root = Path(root)
        self.shards = self.root / "shards"
        if self.root.exists() and not self.root.is_dir():
            raise HyperPragError(f"the LoRA store {self.root} is a file, not a folder; pass a folder with --store "
                                 "(an empty or new one to encode into, or the one `hyper-prag encode` wrote to).")
        with store_writes(self.root, "create"):
            self.shards.mkdir(parents=True, exist_ok=True)
        self.requested_dtype = dtype  # what the caller asked for; the store's own dtype wins (see dtype)
        self._warned_dtype = False
        self._index: dict[str, _Entry] = {}  # key -> where its (newest) copy is
        self._shard_info: dict[str, dict] = {}  # shard name -> sidecar without its entries
        self._ignored: dict[str, tuple[_Signature, SidecarState, str]] = {}  # sidecars not used, and why
        self._open: OrderedDict[str, tuple[Any, _Signature]] = OrderedDict()  # shard -> (safe_open handle, file signature)
        self._verified: dict[str, _Signature] = {}  # key -> its shard's signature when the entry last verified
        self._whole_ok: dict[str, tuple[_Signature, bool]] = {}  # shard -> (file signature, whole-file sha256 matched)
        self._max_open = max_open_shards
        self._specs: dict[tuple, LoraSpec] = {}  # one LoraSpec object per distinct spec
        self._scanned_mtime = -1
        self.refresh()

    # ------------------------------------------------------------------------------------ manifest
    def _shard_path(self, name: str) -> Path:
        return self.shards / f"{name}.safetensors"

    def _sidecar_path(self, name: str) -> Path:
        return self.shards / f"{name}.json"

    def _spec(self, spec: dict) -> LoraSpec:
        # parsed once per distinct spec: opening a big store is dominated by the loop over entries
        spec_id = (spec["rank"], spec["alpha"], tuple(spec["target_modules"]), tuple(spec["layers"]), spec["base_model"])
        if spec_id not in self._specs:
            self._specs[spec_id] = LoraSpec.from_json(json.dumps(spec))
        return self._specs[spec_id]

    def _entries(self, name: str, entries: dict) -> dict[str, _Entry] | str:
        """A sidecar's entries parsed, or why they cannot be (then none is used). A bad meta or sha256 shows on read."""
        try:
            return {key: _Entry(name, self._spec(e["spec"]), e.get("meta", {}), e.get("sha256"), e.get("spec_sha256"))
                    for key, e in entries.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return f"an entry without a valid spec ({type(err).__name__}: {err})"

    def refresh(self, force: bool = False) -> None:
        """Reads sidecars written since the last look (by this or another process).

        A sidecar that cannot be used is skipped with one warning (listed by :func:`verify_store`);
        it never hides the rest of the store.

        Args:
            force: re-scan even if the folder's modification time says nothing changed.
        """
        mtime = os.stat(self.shards).st_mtime_ns
        if not force and mtime == self._scanned_mtime and time.time_ns() - mtime > _RESCAN_GRACE_NS:
            return
        names = sorted(e.name[:-5] for e in os.scandir(self.shards) if e.name.endswith(".json") and not e.name.startswith("."))
        if not set(self._shard_info) <= set(names):  # a shard was removed (repair, gc, by hand): start over
            for table in (self._index, self._shard_info, self._open, self._verified, self._whole_ok):
                table.clear()
        self._ignored = {n: v for n, v in self._ignored.items() if n in names}
        for name in names:
            if name in self._shard_info:
                continue
            sidecar = self._sidecar_path(name)
            try:
                signature = _signature(sidecar)
            except FileNotFoundError:  # removed since the listing
                continue
            if name in self._ignored and self._ignored[name][0] == signature:
                continue  # known unusable, unchanged: warned already
            state, info = _read_sidecar(sidecar)
            entries = self._entries(name, info["entries"]) if state == "ok" else info
            if state == "ok" and isinstance(entries, str):
                state = "malformed"
            elif state == "ok" and not self._shard_path(name).is_file():
                state, entries = "dangling", f"its shard {name}.safetensors is missing"
            if state != "ok":
                self._ignored[name] = (signature, state, str(entries))
                log.warning("store sidecar %s is not used: %s. %s", sidecar, entries, _SIDECAR_HINT[state])
                continue
            self._ignored.pop(name, None)
            del info["entries"]
            self._shard_info[name] = info
            written = info.get("written_ns", 0)
            for key, entry in entries.items():
                old = self._index.get(key)
                if old is not None and self._shard_info[old.shard].get("written_ns", 0) >= written:
                    continue  # keep the copy written last (first listed among equals)
                self._index[key] = entry
                self._verified.pop(key, None)
        self._scanned_mtime = mtime

    def __contains__(self, key: str) -> bool:
        """Whether a sidecar lists ``key`` (cheap; :meth:`missing` also verifies the entry)."""
        if key not in self._index:
            self.refresh()
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Returns the keys (in order) not held as a verified entry: a damaged entry counts as missing (with a
        warning), so ``encode`` encodes it again. An entry verified once is trusted until its shard file changes.

        Args:
            keys: store keys.
        Returns:
            Those not stored or failing verification.
        """
        self.refresh()
        signatures: dict[str, _Signature | None] = {}
        out = []
        for key in keys:
            entry = self._index.get(key)
            if entry is None:
                out.append(key)
                continue
            if entry.shard not in signatures:
                try:
                    signatures[entry.shard] = _signature(self._shard_path(entry.shard))
                except OSError:
                    signatures[entry.shard] = None
            if signatures[entry.shard] is not None and self._verified.get(key) == signatures[entry.shard]:
                continue
            _, _, why = self._load_entry(key, entry)
            if why:
                log.warning("%s; counted as missing, so `hyper-prag encode` encodes it again",
                            self._describe(key, entry, why))
                out.append(key)
        return out

    def _require(self, key: str) -> _Entry:
        if key not in self:
            raise HyperPragError(f"LoRA {key[:12]}… is not in the store {self.root}; run `hyper-prag encode` first.")
        return self._index[key]

    def meta(self, key: str) -> dict:
        """Returns the metadata stored with an entry (e.g. doc_id, encoder, seconds)."""
        return dict(self._require(key).meta)

    def spec(self, key: str) -> LoraSpec:
        """Returns the spec of an entry without reading its tensors."""
        return self._require(key).spec

    # ------------------------------------------------------------------------------------ writing
    @property
    def dtype(self) -> StoreDtype:
        """The storage dtype of new entries: the store's own (its newest shard's), else the one asked for, else
        ``bfloat16``. One store keeps one precision: a re-encode with another ``store_dtype`` (a bf16 config
        run into a float32 store) does not mix precisions, it stores in the store's dtype."""
        held = self.held_dtype()
        return held or self.requested_dtype or "bfloat16"

    def held_dtype(self) -> StoreDtype | None:
        """The dtype of the store's newest shard; ``None`` for a store without entries."""
        if not self._shard_info:
            return None
        newest = max(self._shard_info.values(), key=lambda info: info.get("written_ns", 0))
        return newest.get("dtype", "bfloat16")

    def check_writable(self) -> None:
        """Writes and removes a probe file, so that a read-only folder or a full disk is a clear error before an
        encoder spends time on LoRAs that could not be stored.

        Raises:
            HyperPragError: the folder refuses writes (the message says what to do).
        """
        probe = self.shards / f".probe-{uuid.uuid4().hex}"
        with store_writes(self.root):
            atomic_write_bytes(probe, b"probe")  # temp file, fsync, rename: every step a shard write takes
            probe.unlink()

    def put(self, key: str, lora: Lora, meta: Mapping | None = None) -> bool:
        """Stores one LoRA (atomically); see :meth:`put_many`. Returns whether it was written."""
        return bool(self.put_many([(key, lora, meta or {})]))

    @staticmethod
    def _tensors(key: str, lora: Lora, dtype: StoreDtype) -> dict[str, Tensor]:
        tensors = {}
        for m in lora.spec.target_modules:
            a = lora.A[m].detach().to("cpu")  # (L, r, d_in)
            b = lora.B[m].detach().to("cpu")  # (L, d_out, r)
            if dtype == "int8":
                tensors[f"{key}/A/{m}"], tensors[f"{key}/A_scale/{m}"] = quantize_int8(a, dim=-1)  # scale (L, r, 1)
                tensors[f"{key}/B/{m}"], tensors[f"{key}/B_scale/{m}"] = quantize_int8(b, dim=-2)  # scale (L, 1, r)
            else:
                tensors[f"{key}/A/{m}"] = a.to(getattr(torch, dtype))
                tensors[f"{key}/B/{m}"] = b.to(getattr(torch, dtype))
        return {k: t.contiguous() for k, t in tensors.items()}

    def put_many(self, items: Sequence[tuple[str, Lora, Mapping]]) -> list[str]:
        """Writes LoRAs as one new shard: all of them or (after a crash) none.

        Idempotent across processes: keys already stored (by anyone) and verified are skipped, and the
        check and the commit happen under the store's write lock, so two writers racing on one key store
        it once. A key whose stored entry fails verification is written again (the new copy is used).

        Args:
            items: ``(key, single LoRA, metadata)`` triples (a key given twice is stored once, with its
                first LoRA). Metadata must be JSON-serialisable (e.g. ``{"doc_id", "encoder", "seconds"}``).
        Returns:
            The keys this call wrote, in the order given; the others were already stored.
        Raises:
            HyperPragError: a batched LoRA, a LoRA contradicting its spec, or non-finite weights.
        """
        wanted: dict[str, tuple[Lora, dict]] = {}
        for key, lora, meta in items:
            wanted.setdefault(key, (lora, dict(meta or {})))
        with store_writes(self.root), _exclusive(self.root / "write.lock"):
            self.refresh(force=True)  # sidecars other writers committed while we waited for the lock
            absent = set(self.missing(list(wanted)))
            fresh = {k: v for k, v in wanted.items() if k in absent}
            if fresh:
                self._commit(fresh, self._write_dtype())
        return list(fresh)

    def _write_dtype(self) -> StoreDtype:
        dtype = self.dtype
        if self.requested_dtype not in (None, dtype) and not self._warned_dtype:
            log.warning("the LoRA store %s holds %s LoRAs: new entries are stored as %s too, not %s (one store keeps "
                        "one precision; pass another --store for %s LoRAs)", self.root, dtype, dtype,
                        self.requested_dtype, self.requested_dtype)
            self._warned_dtype = True
        return dtype

    def _commit(self, fresh: Mapping[str, tuple[Lora, dict]], dtype: StoreDtype) -> None:
        """Writes ``key -> (LoRA, meta)`` as one ``dtype`` shard and its sidecar (the caller holds the write lock)."""
        tensors, entries = {}, {}
        for key, (lora, meta) in fresh.items():
            if lora.batch_size is not None:
                raise HyperPragError("put_many() takes single LoRAs; unbind() a batch first.")
            lora.validate(source=f"LoRA for key {key[:12]}…")
            if not all(torch.isfinite(t).all() for t in (*lora.A.values(), *lora.B.values())):
                raise HyperPragError(f"LoRA for key {key[:12]}… (meta {meta}) has NaN/inf weights: the encoder "
                                     "diverged. Lower its learning rate and re-run encode; nothing was stored.")
            own = self._tensors(key, lora, dtype)
            tensors |= own
            entries[key] = {"spec": json.loads(lora.spec.to_json()), "meta": meta, "sha256": entry_sha256(own),
                            "spec_sha256": spec_sha256(lora.spec)}
        self._write_shard(tensors, entries, dtype)

    def _write_shard(self, tensors: Mapping[str, Tensor], entries: Mapping[str, dict], dtype: str) -> str:
        """Writes one shard and then its sidecar (the commit point); indexes its entries as the newest copies."""
        data = save(dict(tensors), metadata={"format": SIDECAR_FORMAT})
        name = uuid.uuid4().hex
        atomic_write_bytes(self._shard_path(name), data)
        info = {"format": SIDECAR_FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "dtype": dtype, "written_ns": time.time_ns()}
        try:
            atomic_write_bytes(self._sidecar_path(name), canonical_json(info | {"entries": entries}).encode())
        except BaseException:
            try:  # a shard without its sidecar is ignored anyway: do not leave it behind
                self._shard_path(name).unlink(missing_ok=True)
            except OSError:
                pass  # (gc removes it later)
            raise
        self._shard_info[name] = info
        signature = _signature(self._shard_path(name))
        for key, entry in entries.items():
            self._index[key] = _Entry(name, self._spec(entry["spec"]), entry["meta"], entry["sha256"],
                                      entry.get("spec_sha256"))
            self._verified[key] = signature  # hashed from the very tensors written
        return name

    # ------------------------------------------------------------------------------------ reading
    @staticmethod
    def _doc_id(entry: _Entry) -> str | None:
        return entry.meta.get("doc_id") if isinstance(entry.meta, dict) else None

    def _describe(self, key: str, entry: _Entry, why: str) -> str:
        return (f"store entry {key[:12]}… (document {self._doc_id(entry) or '?'}) in shard "
                f"{self._shard_path(entry.shard)} is truncated or corrupted ({why})")

    def _bad_entry(self, key: str, entry: _Entry, why: str) -> HyperPragError:
        return HyperPragError(
            f"{self._describe(key, entry, why)}. Repair: `hyper-prag store verify --store {self.root} --repair` "
            "(keeps the shard's good entries), then re-run `hyper-prag encode`: it encodes only the removed documents."
        )

    def _handle(self, name: str) -> tuple[Any, _Signature | None, str]:
        """``(safe_open handle, file signature, "")``, or ``(None, None, why the shard cannot be read)``."""
        path = self._shard_path(name)
        try:
            signature = _signature(path)
        except OSError as err:
            return None, None, f"shard unreadable: {err.strerror or err}"
        cached = self._open.get(name)
        if cached is not None and cached[1] == signature:
            self._open.move_to_end(name)
            return cached[0], signature, ""
        self._open.pop(name, None)  # the file changed under an open handle: never read through it
        if signature.size != self._shard_info[name]["bytes"]:
            return None, None, f"shard has {signature.size} bytes, its sidecar says {self._shard_info[name]['bytes']}"
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            return None, None, f"shard header unreadable: {err}"
        self._open[name] = (handle, signature)
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)  # dropping the handle unmaps the file
        return handle, signature, ""

    def _whole_shard_ok(self, name: str, signature: _Signature) -> bool:
        """For entries without their own hash: the whole shard's sha256, checked once per file signature."""
        known = self._whole_ok.get(name)
        if known is None or known[0] != signature:
            known = (signature, sha256_file(self._shard_path(name)) == self._shard_info[name]["sha256"])
            self._whole_ok[name] = known
        return known[1]

    def _load_entry(self, key: str, entry: _Entry) -> tuple[Lora | None, dict[str, Tensor] | None, str]:
        """Reads and verifies one entry: ``(float32 LoRA, stored tensors, "")`` or ``(None, None, why it is bad)``."""
        handle, signature, why = self._handle(entry.shard)
        if handle is None:
            return None, None, why
        int8 = self._shard_info[entry.shard].get("dtype") == "int8"
        try:
            raw = {n: handle.get_tensor(n) for n in _entry_names(key, entry.spec, int8)}  # as stored
        except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as err:
            return None, None, f"tensors unreadable: {err}"
        A, B = {}, {}  # decoded first, checked below, returned only if every check passes
        for m in entry.spec.target_modules:
            # Copies, also of float32 tensors: one read from the memory map would change with the file after
            # it was verified (a shard rewritten in place), and what is served must be what was hashed.
            A[m] = raw[f"{key}/A/{m}"].to(torch.float32, copy=True)  # (L, r, d_in)
            B[m] = raw[f"{key}/B/{m}"].to(torch.float32, copy=True)  # (L, d_out, r)
            if int8:
                A[m] *= raw[f"{key}/A_scale/{m}"]  # (L, r, 1)
                B[m] *= raw[f"{key}/B_scale/{m}"]  # (L, 1, r)
        if entry.spec_sha256 is not None and spec_sha256(entry.spec) != entry.spec_sha256:
            return None, None, "spec hash mismatch: its rank, alpha, modules or layers changed after it was written"
        if entry.sha256 is not None:
            if entry_sha256(raw) != entry.sha256:
                return None, None, "content hash mismatch: its bytes changed after it was written"
        elif not self._whole_shard_ok(entry.shard, signature):
            return None, None, "shard sha256 mismatch: its bytes changed after it was written"
        # numpy: exact, single-threaded and ~10x faster here than torch.isfinite(...).all() on these small tensors
        bad = [m for m in entry.spec.target_modules if not (np.isfinite(A[m].numpy()).all() and np.isfinite(B[m].numpy()).all())]
        if bad:
            return None, None, f"non-finite (NaN/inf) weights in {bad}"
        lora = Lora(entry.spec, A, B)
        try:
            lora.validate(source=f"store entry {key[:12]}…")
        except HyperPragError as err:
            return None, None, str(err)
        self._verified[key] = signature
        return lora, raw, ""

    def get(self, key: str, base_model: str | None = None) -> Lora:
        """Reads one LoRA (float32, on CPU), verified: its bytes match the hash recorded at write time, its weights are finite.

        Args:
            key: its :func:`store_key`.
            base_model: if given, the identity the LoRA must have been made for.
        Returns:
            The LoRA.
        Raises:
            HyperPragError: unknown key, a corrupted, truncated or non-finite entry (naming its document and
                the repair), or a LoRA made for another base model.
        """
        entry = self._require(key)
        if base_model is not None and entry.spec.base_model != base_model:
            check_base_model(Lora(entry.spec, {}, {}), base_model, source=f"Stored LoRA {key[:12]}…")
        lora, _, why = self._load_entry(key, entry)
        if lora is None:
            self.refresh(force=True)  # another process may have re-written or moved the entry since we looked
            if key in self._index and self._index[key].shard != entry.shard:
                entry = self._index[key]
                lora, _, why = self._load_entry(key, entry)
        if lora is None:
            raise self._bad_entry(key, entry, why)
        return lora

    def get_many(self, keys: Sequence[str], base_model: str | None = None) -> list[Lora]:
        """Reads several LoRAs (e.g. the k of one question) through the open memory maps, each verified.

        Args:
            keys: store keys, in the order wanted.
            base_model: if given, every LoRA must have been made for this base model.

        Returns:
            The LoRAs, in the order of ``keys``.
        """
        return [self.get(k, base_model) for k in keys]

    # ------------------------------------------------------------------------------------ upkeep
    def stats(self) -> dict:
        """Returns ``{"documents", "bytes", "bytes_per_document", "shards"}`` of the whole store."""
        self.refresh()
        total = sum(info["bytes"] for info in self._shard_info.values())
        docs = len(self._index)
        return {"documents": docs, "bytes": total, "bytes_per_document": total / docs if docs else 0.0,
                "shards": len(self._shard_info)}

    def entry_bytes(self, keys: Iterable[str]) -> dict[str, float]:
        """The bytes each entry takes on disk: its shard's size shared among the shard's entries in proportion
        to their tensor bytes (so the header counts too; a shard of like entries gives each ``bytes / n``).

        Args:
            keys: stored keys (unknown ones raise, as :meth:`get` does).
        Returns:
            ``{key: bytes}``. Unlike :meth:`stats`, this is the cost of these entries alone: a store holding
            several recipes' LoRAs (per-document, hypernetwork, another rank) mixes their sizes in ``stats``.
        """
        data: dict[str, dict[str, int]] = {}  # shard -> {key: its tensor bytes}
        out: dict[str, float] = {}
        for key in keys:
            entry = self._require(key)
            if entry.shard not in data:
                handle, _, why = self._handle(entry.shard)
                if handle is None:
                    raise self._bad_entry(key, entry, why)
                sizes: dict[str, int] = {}
                for name in handle.keys():
                    tensor = handle.get_slice(name)
                    owner = name.split("/", 1)[0]
                    sizes[owner] = sizes.get(owner, 0) + math.prod(tensor.get_shape()) * _ITEMSIZE[tensor.get_dtype()]
                data[entry.shard] = sizes
            sizes = data[entry.shard]
            out[key] = self._shard_info[entry.shard]["bytes"] * sizes[key] / sum(sizes.values())
        return out

    def _remove_shard(self, name: str, report: StoreReport) -> None:
        """Deletes a sidecar, then its shard (a crash in between leaves a sidecar-less shard: garbage for gc)."""
        for path in (self._sidecar_path(name), self._shard_path(name)):
            try:
                path.unlink()
                report.removed.append(str(path))
            except FileNotFoundError:
                pass

    def check(self, repair: bool = False) -> StoreReport:
        """Verifies every shard (whole-file sha256) and entry (hash, finiteness, shape); optionally repairs.

        Repair (under the write lock) copies a damaged shard's good entries byte for byte into a new shard
        and removes the damaged one, so only bad entries are lost (``encode`` re-encodes them); removes
        malformed sidecars with their shards and sidecars without a shard; adds per-entry hashes to old
        sidecars. Sidecars of another hyper-prag version are listed and left alone.

        Args:
            repair: fix what was found.
        Returns:
            The :class:`StoreReport`.
        """
        report = StoreReport(str(self.root))
        guard = store_writes(self.root, "repair") if repair else nullcontext()
        lock = _exclusive(self.root / "write.lock") if repair else nullcontext()
        with guard, lock:
            self.refresh(force=True)
            for name, (_, state, why) in sorted(self._ignored.items()):
                report.issues.append(StoreIssue(str(self._sidecar_path(name)), f"{state} sidecar: {why}"))
                if repair and state in ("malformed", "dangling"):
                    self._remove_shard(name, report)
            for name in sorted(self._shard_info):
                self._check_shard(name, report, repair)
        if repair:
            self.refresh(force=True)
        return report

    def _check_shard(self, name: str, report: StoreReport, repair: bool) -> None:
        state, sidecar = _read_sidecar(self._sidecar_path(name))
        if state != "ok":  # changed since it was indexed; the next refresh reports it
            return
        report.shards += 1
        path, info, entries = self._shard_path(name), self._shard_info[name], sidecar["entries"]
        try:
            signature = _signature(path)
            whole_ok = sha256_file(path) == info["sha256"]
            self._whole_ok[name] = (signature, whole_ok)
        except OSError:  # vanished or unreadable: each entry below says why
            whole_ok = False
        if not whole_ok:
            report.issues.append(StoreIssue(str(path), "shard sha256 differs from its sidecar's (changed or truncated)"))
        good: dict[str, dict[str, Tensor]] = {}
        for key, entry in self._entries(name, entries).items():  # parsed before, when the shard was indexed
            report.entries += 1
            _, raw, why = self._load_entry(key, entry)
            if raw is None:
                report.issues.append(StoreIssue(str(path), why, key, self._doc_id(entry)))
            else:
                good[key] = raw
        legacy = any(e.get("sha256") is None for e in entries.values())
        if legacy:
            report.legacy.append(str(self._sidecar_path(name)))
        if not repair:
            return
        if whole_ok and len(good) == len(entries):
            if legacy:  # add the per-entry hashes; the shard itself is unchanged
                for key, raw in good.items():
                    entries[key]["sha256"] = entry_sha256(raw)
                    entries[key].setdefault("spec_sha256", spec_sha256(self._spec(entries[key]["spec"])))
                atomic_write_bytes(self._sidecar_path(name), canonical_json(sidecar).encode())
            return

        def served_here(key: str) -> bool:  # a copy superseded by a newer one needs no rescue
            return key in self._index and self._index[key].shard == name

        keep = {k: raw for k, raw in good.items() if served_here(k)}
        if keep:
            tensors = {n: t for raw in keep.values() for n, t in raw.items()}
            kept_entries = {k: entries[k] | {"sha256": entry_sha256(raw),
                                             "spec_sha256": spec_sha256(self._spec(entries[k]["spec"]))}
                            for k, raw in keep.items()}
            self._write_shard(tensors, kept_entries, info.get("dtype", "bfloat16"))
            report.rewritten.extend(keep)
        report.lost.extend(k for k in entries if k not in good and served_here(k))
        self._remove_shard(name, report)

    def verify(self) -> StoreReport:
        """Verifies the whole store (see :meth:`check`), changing nothing; returns the report if all is well.

        Raises:
            HyperPragError: listing every damaged shard, entry or sidecar and how to repair.
        """
        report = self.check()
        if not report.ok:
            raise HyperPragError(f"{report.summary()}\nRepair: `hyper-prag store verify --store {self.root} --repair` "
                                 "(keeps every good entry), then re-run encode: only the removed documents are re-encoded.")
        return report

    def gc(self, min_age_seconds: float = 300.0) -> StoreReport:
        """Repairs (:meth:`check`), then removes temp files and sidecar-less shards of writes that died half-way,
        and shards whose every entry has a newer copy. Never removes a good entry.

        Args:
            min_age_seconds: leftovers younger than this are kept: a writer at work may own them.
        Returns:
            The :class:`StoreReport` (``removed`` lists every file deleted).
        """
        report = self.check(repair=True)
        with store_writes(self.root, "clean up"), _exclusive(self.root / "write.lock"):
            self.refresh(force=True)
            now = time.time()
            for path in sorted(self.shards.iterdir()):
                orphan = path.suffix == ".safetensors" and not path.with_suffix(".json").exists()
                try:
                    if (path.name.endswith(".tmp") or orphan) and now - path.stat().st_mtime >= min_age_seconds:
                        path.unlink()
                        report.removed.append(str(path))
                except FileNotFoundError:  # a writer renamed it meanwhile
                    pass
            for name in sorted(self._shard_info):
                state, sidecar = _read_sidecar(self._sidecar_path(name))
                if state == "ok" and all(self._index.get(k) and self._index[k].shard != name for k in sidecar["entries"]):
                    self._remove_shard(name, report)  # every entry has a newer copy elsewhere
        self.refresh(force=True)
        return report


# ---------------------------------------------------------------------------------------- library API

def existing_store(root: str | Path, dtype: StoreDtype | None = None) -> LoraStore:
    """The LoRA store at ``root``, which must exist: readers (``ask``, ``verify``) never create one.

    Raises:
        HyperPragError: ``root`` holds no store (no ``shards/`` folder); the message says what to pass.
    """
    if not (Path(root) / "shards").is_dir():
        raise HyperPragError(f"no LoRA store at {root} (no shards/ folder): pass the folder `hyper-prag encode` wrote "
                             f"to, or encode documents into it first (`hyper-prag encode --store {root}`).")
    return LoraStore(root, dtype=dtype)


def verify_store(root: str | Path, repair: bool = False) -> StoreReport:
    """Verifies every shard and entry of a store; with ``repair``, fixes what it found (:meth:`LoraStore.check`).

    Args:
        root: the store folder.
        repair: keep the good entries of damaged shards, drop the bad ones and unusable sidecars.
    Returns:
        A :class:`StoreReport`; ``report.lost`` are the keys ``hyper-prag encode`` will encode again.
    """
    return existing_store(root).check(repair=repair)


def gc_store(root: str | Path, min_age_seconds: float = 300.0) -> StoreReport:
    """Repairs a store and removes its garbage; never removes a good entry (:meth:`LoraStore.gc`).

    Args:
        root: the store folder.
        min_age_seconds: leftovers younger than this may be a live writer's and are kept.
    Returns:
        A :class:`StoreReport` whose ``removed`` lists the files deleted.
    """
    return existing_store(root).gc(min_age_seconds)


def default_store(model: str) -> Path:
    """The store folder of a base model when none is given: ``cache_dir("lora_store") / <model folder name>``."""
    from hyper_prag.paths import cache_dir

    return cache_dir("lora_store") / Path(model).name

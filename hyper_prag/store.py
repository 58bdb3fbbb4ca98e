"""The LoRA store: content-addressed, sharded safetensors, safe for crashes and concurrent writers.

Key: :func:`store_key` = sha256 of (document text, base-model identity, LoRA spec, augmentation
settings, encoder identity and settings) in canonical JSON (DESIGN.md "Store key"). Re-encoding an
unchanged document is a cache hit; anything that changes the LoRA changes the key. The storage dtype
is not part of the key: it is a property of the store folder's shards, recorded per shard.

Layout of a store folder::

    shards/<uuid>.safetensors   many LoRAs: tensors "<key>/A/<module>" (L, r, d_in), "<key>/B/<module>" (L, d_out, r)
                                (int8 shards add "<key>/A_scale/<module>" (L, r, 1), "<key>/B_scale/<module>" (L, 1, r))
    shards/<uuid>.json          its sidecar: {"format", "sha256", "bytes", "dtype", "entries": {key: {"spec", "meta"}}}
    write.lock                  empty; a writer holds an exclusive flock on it while it commits a shard

Every :meth:`LoraStore.put_many` writes one new, immutable shard (temp file, fsync, rename) and
only then its sidecar (same way). The manifest is the union of sidecars: a shard without a sidecar
is a write that died half-way and is ignored (and removed by :meth:`LoraStore.gc`); two processes
never write the same file, so concurrent writers cannot corrupt each other.

Writers (the ranks of a distributed ``encode``, issue 8) take an exclusive lock on ``write.lock`` in the
store folder while they look for keys already stored and commit their shard, so a key is written once
however writers race: ``put_many`` is idempotent. The lock is ``flock``: the kernel releases it when a
writer dies, so a killed rank never blocks the others. On a file system without ``flock`` (a warning
says so) two writers racing on one key can both store it; a reader then keeps the copy it indexed first.

Readers memory-map shards with ``safe_open`` and keep the handles open (an LRU), so fetching the k
LoRAs of a question re-opens nothing; a reader re-scans the folder only when asked for a key it does
not know and the folder changed. :meth:`LoraStore.verify` re-hashes every shard; a shard that is
truncated or altered raises :class:`HyperPragError` naming it: delete it and re-run ``encode``, only
its documents are encoded again.

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
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, LoraSpec, check_base_model

log = logging.getLogger(__name__)

StoreDtype = Literal["bfloat16", "float32", "int8"]
SIDECAR_FORMAT = "hyper-prag-store/1"
_RESCAN_GRACE_NS = 2_000_000_000  # folder mtimes are coarse (ext4: ~4 ms); re-scan while one is this fresh


def _canonical(obj: Any) -> str:
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
    payload = _canonical({"text": document_text, "base": base_model, "spec": spec_part,
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
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


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a crash leaves either nothing or the whole file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class LoraStore:
    """A folder of LoRAs addressed by :func:`store_key` (see the module docstring)."""

    def __init__(self, root: str | Path, dtype: StoreDtype = "bfloat16", max_open_shards: int = 64) -> None:
        """
        Args:
            root: the store folder (created if missing).
            dtype: storage dtype of new entries (``bfloat16``, ``float32`` or ``int8``); reads return float32.
            max_open_shards: memory-mapped shard handles kept open (LRU).
        """
        if dtype not in ("bfloat16", "float32", "int8"):
            raise HyperPragError(f"store dtype must be 'bfloat16', 'float32' or 'int8', not {dtype!r}.")
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._index: dict[str, tuple[str, LoraSpec, dict]] = {}  # key -> (shard name, spec, meta)
        self._shard_info: dict[str, dict] = {}  # shard name -> sidecar without its entries
        self._open: OrderedDict[str, Any] = OrderedDict()  # shard name -> safe_open handle (LRU)
        self._max_open = max_open_shards
        self._specs: dict[tuple, LoraSpec] = {}  # one LoraSpec object per distinct spec
        self._scanned_mtime = -1
        self.refresh()

    # ------------------------------------------------------------------------------------ manifest
    def _shard_path(self, name: str) -> Path:
        return self.shards / f"{name}.safetensors"

    def refresh(self, force: bool = False) -> None:
        """Reads sidecars written since the last look (by this or another process).

        Args:
            force: re-scan even if the folder's modification time says nothing changed.
        """
        mtime = os.stat(self.shards).st_mtime_ns
        if not force and mtime == self._scanned_mtime and time.time_ns() - mtime > _RESCAN_GRACE_NS:
            return
        names = sorted(e.name[:-5] for e in os.scandir(self.shards) if e.name.endswith(".json") and not e.name.startswith("."))
        if not set(self._shard_info) <= set(names):  # a shard was deleted (e.g. a corrupted one): start over
            self._index.clear()
            self._shard_info.clear()
            self._open.clear()
        for name in names:
            if name in self._shard_info:
                continue
            sidecar = self.shards / f"{name}.json"
            try:
                info = json.loads(sidecar.read_text())
            except (OSError, ValueError) as err:
                raise HyperPragError(f"store sidecar {sidecar} is unreadable ({err}); delete it and its shard "
                                     f"{name}.safetensors, then re-run encode (only its documents are re-encoded).") from err
            if info.get("format") != SIDECAR_FORMAT or not self._shard_path(name).is_file():
                log.warning("ignoring store sidecar %s (foreign format or missing shard)", sidecar)
                continue
            entries = info.pop("entries")
            self._shard_info[name] = info
            for key, entry in entries.items():
                if key in self._index:
                    continue  # a duplicate written by a racing writer: first wins
                spec = entry["spec"]  # parsed once per distinct spec: opening a big store is dominated by this loop
                spec_id = (spec["rank"], spec["alpha"], tuple(spec["target_modules"]), tuple(spec["layers"]), spec["base_model"])
                if spec_id not in self._specs:
                    self._specs[spec_id] = LoraSpec.from_json(json.dumps(spec))
                self._index[key] = (name, self._specs[spec_id], entry.get("meta", {}))
        self._scanned_mtime = mtime

    def __contains__(self, key: str) -> bool:
        if key not in self._index:
            self.refresh()
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return list(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Returns the keys (in order) that the store does not hold yet."""
        self.refresh()
        return [k for k in keys if k not in self._index]

    def _require(self, key: str) -> tuple[str, LoraSpec, dict]:
        if key not in self:
            raise HyperPragError(f"LoRA {key[:12]}… is not in the store {self.root}; run `hyper-prag encode` first.")
        return self._index[key]

    def meta(self, key: str) -> dict:
        """Returns the metadata stored with an entry (e.g. doc_id, encoder, seconds)."""
        return dict(self._require(key)[2])

    def spec(self, key: str) -> LoraSpec:
        """Returns the spec of an entry without reading its tensors."""
        return self._require(key)[1]

    # ------------------------------------------------------------------------------------ writing
    def put(self, key: str, lora: Lora, meta: Mapping | None = None) -> None:
        """Stores one LoRA (atomically); see :meth:`put_many`."""
        self.put_many([(key, lora, meta or {})])

    def _tensors(self, key: str, lora: Lora) -> dict[str, Tensor]:
        tensors = {}
        for m in lora.spec.target_modules:
            a = lora.A[m].detach().to("cpu")  # (L, r, d_in)
            b = lora.B[m].detach().to("cpu")  # (L, d_out, r)
            if self.dtype == "int8":
                tensors[f"{key}/A/{m}"], tensors[f"{key}/A_scale/{m}"] = quantize_int8(a, dim=-1)  # scale (L, r, 1)
                tensors[f"{key}/B/{m}"], tensors[f"{key}/B_scale/{m}"] = quantize_int8(b, dim=-2)  # scale (L, 1, r)
            else:
                dtype = getattr(torch, self.dtype)
                tensors[f"{key}/A/{m}"] = a.to(dtype)
                tensors[f"{key}/B/{m}"] = b.to(dtype)
        return {k: t.contiguous() for k, t in tensors.items()}

    def put_many(self, items: Sequence[tuple[str, Lora, Mapping]]) -> None:
        """Writes LoRAs as one new shard: all of them or (after a crash) none.

        Idempotent across processes: keys already stored (by anyone) are skipped, and the check and the
        commit happen under the store's write lock, so two writers racing on one key store it once.

        Args:
            items: ``(key, single LoRA, metadata)`` triples; keys already stored are skipped. Metadata
                must be JSON-serialisable (e.g. ``{"doc_id", "encoder", "seconds"}``).

        Raises:
            HyperPragError: a batched LoRA, a LoRA contradicting its spec, or non-finite weights.
        """
        with _exclusive(self.root / "write.lock"):
            self.refresh(force=True)  # sidecars other writers committed while we waited for the lock
            fresh = {k: (lora, dict(meta or {})) for k, lora, meta in items if k not in self._index}
            if fresh:
                self._commit(fresh)

    def _commit(self, fresh: Mapping[str, tuple[Lora, dict]]) -> None:
        """Writes ``key -> (LoRA, meta)`` as one shard and its sidecar (the caller holds the write lock)."""
        tensors, entries = {}, {}
        for key, (lora, meta) in fresh.items():
            if lora.batch_size is not None:
                raise HyperPragError("put_many() takes single LoRAs; unbind() a batch first.")
            lora.validate(source=f"LoRA for key {key[:12]}…")
            if not all(torch.isfinite(t).all() for t in (*lora.A.values(), *lora.B.values())):
                raise HyperPragError(f"LoRA for key {key[:12]}… (meta {meta}) has NaN/inf weights: the encoder "
                                     "diverged. Lower its learning rate and re-run encode; nothing was stored.")
            tensors |= self._tensors(key, lora)
            entries[key] = {"spec": json.loads(lora.spec.to_json()), "meta": meta}
        data = save(tensors, metadata={"format": SIDECAR_FORMAT})
        name = uuid.uuid4().hex
        _atomic_write(self._shard_path(name), data)
        info = {"format": SIDECAR_FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "dtype": self.dtype}
        # The sidecar is the commit point: written only after the shard is durably in place.
        _atomic_write(self.shards / f"{name}.json", _canonical(info | {"entries": entries}).encode())
        self._shard_info[name] = info
        for key, entry in entries.items():
            self._index.setdefault(key, (name, fresh[key][0].spec, entry["meta"]))

    # ------------------------------------------------------------------------------------ reading
    def _corrupted(self, name: str, why: str) -> HyperPragError:
        return HyperPragError(
            f"store shard {self._shard_path(name)} is truncated or corrupted ({why}); delete it and its sidecar "
            f"{name}.json, then re-run encode (only its documents are re-encoded)."
        )

    def _handle(self, name: str):
        handle = self._open.get(name)
        if handle is not None:
            self._open.move_to_end(name)
            return handle
        path = self._shard_path(name)
        try:
            size = path.stat().st_size
        except OSError as err:
            raise self._corrupted(name, str(err)) from err
        if size != self._shard_info[name]["bytes"]:
            raise self._corrupted(name, f"{size} bytes, its sidecar says {self._shard_info[name]['bytes']}")
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise self._corrupted(name, str(err)) from err
        self._open[name] = handle
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)  # dropping the handle unmaps the file
        return handle

    def get(self, key: str, base_model: str | None = None) -> Lora:
        """Reads one LoRA (float32, on CPU).

        Args:
            key: its :func:`store_key`.
            base_model: if given, the identity the LoRA must have been made for.

        Returns:
            The LoRA.

        Raises:
            HyperPragError: unknown key, corrupted shard, or a LoRA made for another base model.
        """
        name, spec, _ = self._require(key)
        if base_model is not None and spec.base_model != base_model:
            check_base_model(Lora(spec, {}, {}), base_model, source=f"Stored LoRA {key[:12]}…")
        handle = self._handle(name)
        int8 = self._shard_info[name].get("dtype") == "int8"
        try:
            A, B = {}, {}
            for m in spec.target_modules:
                A[m] = handle.get_tensor(f"{key}/A/{m}").float()  # (L, r, d_in)
                B[m] = handle.get_tensor(f"{key}/B/{m}").float()  # (L, d_out, r)
                if int8:
                    A[m] *= handle.get_tensor(f"{key}/A_scale/{m}")  # (L, r, 1)
                    B[m] *= handle.get_tensor(f"{key}/B_scale/{m}")  # (L, 1, r)
        except (SafetensorError, OSError, RuntimeError, KeyError) as err:
            raise self._corrupted(name, str(err)) from err
        lora = Lora(spec, A, B)
        lora.validate(source=f"store entry {key[:12]}… in shard {name}")
        return lora

    def get_many(self, keys: Sequence[str], base_model: str | None = None) -> list[Lora]:
        """Reads several LoRAs (e.g. the k of one question) through the open memory maps.

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

    def verify(self) -> None:
        """Re-hashes every shard against its sidecar.

        Raises:
            HyperPragError: naming every corrupted or missing shard and what to delete.
        """
        self.refresh(force=True)
        bad = []
        for name, info in self._shard_info.items():
            path = self._shard_path(name)
            if not path.is_file() or _sha256_file(path) != info["sha256"]:
                bad.append(name)
        if bad:
            listed = ", ".join(f"{self._shard_path(n)}" for n in bad)
            raise HyperPragError(
                f"{len(bad)} store shard(s) corrupted (checksum mismatch): {listed}. Delete each and its .json "
                "sidecar, then re-run encode (only their documents are re-encoded)."
            )

    def gc(self, min_age_seconds: float = 300.0) -> int:
        """Removes leftovers of writes that died half-way: temp files and shards without a sidecar.

        Args:
            min_age_seconds: only files older than this are removed, so that the shard another process
                is writing right now (its sidecar follows within milliseconds) survives.

        Returns:
            The number of files removed.
        """
        removed, now = 0, time.time()
        for path in self.shards.iterdir():
            orphan = path.suffix == ".safetensors" and not path.with_suffix(".json").exists()
            if not (path.name.endswith(".tmp") or orphan):
                continue
            try:
                if now - path.stat().st_mtime >= min_age_seconds:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # a writer renamed it meanwhile
                continue
        return removed

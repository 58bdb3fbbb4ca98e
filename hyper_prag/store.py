"""The LoRA store: content-addressed, sharded safetensors, safe for crashes and concurrent writers.

Key: :func:`store_key` = sha256 of (document text, base-model identity, LoRA spec, augmentation
settings, encoder identity and settings) in canonical JSON (DESIGN.md "Store key"). Re-encoding an
unchanged document is a cache hit; anything that changes the LoRA changes the key.

Layout of a store folder::

    shards/<uuid>.safetensors   many LoRAs: tensors "<key>/A/<module>" (L, r, d_in), "<key>/B/<module>" (L, d_out, r)
    shards/<uuid>.json          its sidecar: {"sha256", "bytes", "entries": {key: {"spec", "meta"}}}

Every :meth:`LoraStore.put_many` writes one new, immutable shard (temp file, fsync, rename) and
only then its sidecar (same way). The manifest is the union of sidecars: a shard without a sidecar
is a write that died half-way and is ignored (and removed by :meth:`LoraStore.gc`); two processes
never write the same file, so concurrent writers cannot corrupt each other. Readers memory-map
shards with ``safe_open`` and keep the handles open (an LRU), so fetching the k LoRAs of a question
re-opens nothing. :meth:`LoraStore.verify` re-hashes every shard; a shard that is truncated or
altered raises :class:`HyperPragError` naming it — delete it and re-run ``encode``: only its
documents are encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, LoraSpec, check_base_model

log = logging.getLogger(__name__)

StoreDtype = Literal["bfloat16", "float32"]
SIDECAR_FORMAT = "hyper-prag-store/1"


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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LoraStore:
    """A folder of LoRAs addressed by :func:`store_key` (see the module docstring)."""

    def __init__(self, root: str | Path, dtype: StoreDtype = "bfloat16", max_open_shards: int = 64) -> None:
        """
        Args:
            root: the store folder (created if missing).
            dtype: storage dtype of new entries; reads return float32.
            max_open_shards: memory-mapped shard handles kept open (LRU).
        """
        if dtype not in ("bfloat16", "float32"):
            raise HyperPragError(f"store dtype must be 'bfloat16' or 'float32', not {dtype!r}.")
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._index: dict[str, tuple[str, dict]] = {}  # key -> (shard name, entry)
        self._shard_info: dict[str, dict] = {}  # shard name -> sidecar
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._max_open = max_open_shards
        self.refresh()

    # ------------------------------------------------------------------------------------ manifest
    def refresh(self) -> None:
        """Re-reads sidecars written since the last look (by this or another process)."""
        for sidecar in sorted(self.shards.glob("*.json")):
            name = sidecar.stem
            if name in self._shard_info:
                continue
            try:
                info = json.loads(sidecar.read_text())
            except (OSError, ValueError) as err:
                raise HyperPragError(f"store sidecar {sidecar} is unreadable ({err}); delete it and its shard "
                                     f"{name}.safetensors, then re-run encode.") from err
            if info.get("format") != SIDECAR_FORMAT or not (self.shards / f"{name}.safetensors").is_file():
                log.warning("ignoring store sidecar %s (foreign format or missing shard)", sidecar)
                continue
            self._shard_info[name] = info
            for key, entry in info["entries"].items():
                self._index.setdefault(key, (name, entry))

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

    def meta(self, key: str) -> dict:
        """Returns the metadata stored with an entry (e.g. doc_id, encoder, seconds)."""
        if key not in self:
            raise HyperPragError(f"LoRA {key[:12]}… is not in the store {self.root}; run `hyper-prag encode` first.")
        return dict(self._index[key][1].get("meta", {}))

    # ------------------------------------------------------------------------------------ writing
    def put(self, key: str, lora: Lora, meta: Mapping | None = None) -> None:
        """Stores one LoRA (atomically); see :meth:`put_many`."""
        self.put_many([(key, lora, meta or {})])

    def put_many(self, items: Sequence[tuple[str, Lora, Mapping]]) -> None:
        """Writes LoRAs as one new shard: all of them or (after a crash) none.

        Args:
            items: ``(key, single LoRA, metadata)`` triples; keys already stored are skipped.
        """
        self.refresh()
        fresh = {k: (lora, dict(meta or {})) for k, lora, meta in items if k not in self._index}
        if not fresh:
            return
        dtype = getattr(torch, self.dtype)
        tensors, entries = {}, {}
        for key, (lora, meta) in fresh.items():
            if lora.batch_size is not None:
                raise HyperPragError("put_many() takes single LoRAs; unbind() a batch first.")
            lora.validate(source=f"LoRA for key {key[:12]}…")
            for m in lora.spec.target_modules:
                tensors[f"{key}/A/{m}"] = lora.A[m].detach().to("cpu", dtype=dtype).contiguous()  # (L, r, d_in)
                tensors[f"{key}/B/{m}"] = lora.B[m].detach().to("cpu", dtype=dtype).contiguous()  # (L, d_out, r)
            entries[key] = {"spec": json.loads(lora.spec.to_json()), "meta": meta}
        name = uuid.uuid4().hex
        shard = self.shards / f"{name}.safetensors"
        _atomic_write(shard, lambda tmp: save_file(tensors, str(tmp), metadata={"format": SIDECAR_FORMAT}))
        info = {"format": SIDECAR_FORMAT, "sha256": _sha256_file(shard), "bytes": shard.stat().st_size,
                "dtype": self.dtype, "entries": entries}
        _atomic_write(self.shards / f"{name}.json", lambda tmp: Path(tmp).write_text(_canonical(info)))
        self._shard_info[name] = info
        for key, entry in entries.items():
            self._index.setdefault(key, (name, entry))

    # ------------------------------------------------------------------------------------ reading
    def _handle(self, name: str):
        handle = self._open.get(name)
        if handle is not None:
            self._open.move_to_end(name)
            return handle
        path = self.shards / f"{name}.safetensors"
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise HyperPragError(f"store shard {path} is truncated or corrupted ({err}); delete it and its "
                                 f"sidecar {name}.json, then re-run encode (only its documents are re-encoded).") from err
        self._open[name] = handle
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return handle

    def get(self, key: str, base_model: str | None = None) -> Lora:
        """Reads one LoRA (float32).

        Args:
            key: its :func:`store_key`.
            base_model: if given, the identity the LoRA must have been made for.

        Returns:
            The LoRA.

        Raises:
            HyperPragError: unknown key, corrupted shard, or a LoRA made for another base model.
        """
        if key not in self:
            raise HyperPragError(f"LoRA {key[:12]}… is not in the store {self.root}; run `hyper-prag encode` first.")
        name, entry = self._index[key]
        spec = LoraSpec.from_json(json.dumps(entry["spec"]))
        handle = self._handle(name)
        try:
            A = {m: handle.get_tensor(f"{key}/A/{m}").float() for m in spec.target_modules}
            B = {m: handle.get_tensor(f"{key}/B/{m}").float() for m in spec.target_modules}
        except (SafetensorError, OSError, RuntimeError, KeyError) as err:
            raise HyperPragError(f"store shard {self.shards / name}.safetensors is corrupted ({err}); delete it and "
                                 f"its sidecar, then re-run encode.") from err
        lora = Lora(spec, A, B)
        lora.validate(source=f"store entry {key[:12]}… in shard {name}")
        if base_model is not None:
            check_base_model(lora, base_model, source=f"Stored LoRA {key[:12]}…")
        return lora

    def get_many(self, keys: Sequence[str], base_model: str | None = None) -> list[Lora]:
        """Reads several LoRAs (e.g. the k of one question) through the open memory maps."""
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
        """Re-hashes every shard; raises :class:`HyperPragError` naming the first corrupted one."""
        self.refresh()
        for name, info in self._shard_info.items():
            path = self.shards / f"{name}.safetensors"
            if not path.is_file() or _sha256_file(path) != info["sha256"]:
                raise HyperPragError(f"store shard {path} is corrupted (checksum mismatch); delete it and "
                                     f"{name}.json, then re-run encode (only its documents are re-encoded).")

    def gc(self) -> int:
        """Removes leftovers of writes that died half-way (temp files, shards without sidecar).

        Only call it while no other process is writing. Returns the number of files removed.
        """
        removed = 0
        for path in self.shards.iterdir():
            orphan = path.suffix == ".safetensors" and not path.with_suffix(".json").exists()
            if path.name.endswith(".tmp") or orphan:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

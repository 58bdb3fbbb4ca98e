"""Encoding: turn every document of a corpus into a LoRA in the LoRA store (offline stage of P-RAG).

An :class:`~hyper_prag.encoders.Encoder` maps (augmented) documents to LoRAs: the paper's per-document trainer
(:class:`~hyper_prag.encoders.per_doc.PerDocEncoder`, batched) or a hypernetwork. The driver
:func:`encode_corpus` is the same for both::

    documents ──► store key (text + recipe: base model, LoRA spec, augmentation, encoder settings)
              ──► skip keys already in the store (cache hit; resume after a kill)
              ──► chunks of ``chunk_size`` ──► augment ──► encoder.encode ──► store.put_many (atomic)

Each chunk is written in one atomic ``put_many``, so a killed run loses at most the chunk in flight
and a re-run trains only what is missing. Missing documents are sorted by length before chunking so
each batched step pads little (a LoRA does not depend on its chunk: see ``per_doc``).

Beyond one process: per-document encoding is embarrassingly parallel. With ``strategy: ddp``
Lightning Fabric starts one process per device (or joins those torchrun / SLURM started) and::

    rank 0: missing keys, length-sorted ──broadcast──► every rank: the same chunks c_0, c_1, …
    rank r of W: encodes chunks r, r + W, r + 2W, … ──► the same store (put_many: atomic, idempotent)
    barrier ──► every rank reports the run's totals

No gradient crosses ranks, so nothing is wrapped in DDP; Lightning provides the process group and the
launch. A chunk holds the same documents as in a one-process run, and a LoRA depends only on its
document's text and the settings, so W ranks store exactly the LoRAs one process would. A rank that
dies loses its chunk in flight; re-running the same command encodes only what is missing.

Every run records its :class:`~hyper_prag.recipes.Recipe` (the key inputs, the warm-up LoRA) in the
store, so the online path finds the LoRAs without rebuilding the encoder. It is recorded right after the
run's first stored chunk (or at the end, when every LoRA was stored already): a run that fails before
storing any leaves the store's recipes as they were, so a reader never has to choose among recipes
without LoRAs (a run killed in between leaves LoRAs without their recipe; re-running it records it).
What would fail only after training (a store that refuses writes, templated augmentation without the
corpus's QA pairs) is checked before the first document is encoded. The YAML-driven run
(``configs/encode/*.yaml``) is :func:`hyper_prag.api.encode`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from hyper_prag.encoders import Encoder
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import LoraSpec
from hyper_prag.model import BaseModel
from hyper_prag.recipes import Recipe, record_recipe, recipe_for

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from hyper_prag.augment import AugmentConfig, AugmentedDocument
    from hyper_prag.corpus import Corpus, Document
    from hyper_prag.store import LoraStore

log = logging.getLogger(__name__)

__all__ = ["Encoder", "EncodeReport", "encode_corpus", "launch"]


@dataclass(frozen=True)
class EncodeReport:
    """What one :func:`encode_corpus` run did."""

    encoded: int  # documents trained/generated and stored by this run (by all ranks)
    skipped: int  # documents this run did not store: cache hits, duplicates, or stored by another writer meanwhile
    seconds: float  # wall time of encoding (augmentation + encoder + store writes; ranks run side by side)
    seconds_per_doc: float  # seconds / encoded (0 if none)
    bytes_per_doc: float  # bytes the store grew per encoded document (0 if none)
    store: str = ""  # store folder


def _plain(doc: "Document") -> "AugmentedDocument":
    from hyper_prag.augment import AugmentedDocument

    return AugmentedDocument(doc_id=doc.id, text=doc.text, rewrites=(), qa=())


def encode_corpus(
    documents: Sequence["Document"], encoder: Encoder, store: "LoraStore", base: BaseModel,
    augment_config: "AugmentConfig | None", chunk_size: int = 8, *, corpus: "Corpus | None" = None,
    spec: LoraSpec | None = None, on_chunk: Callable[[int, int], None] | None = None, progress: bool = True,
    fabric: "Fabric | None" = None, recipe: Recipe | None = None,
) -> EncodeReport:
    """Encodes every document not yet in the store, chunk by chunk.

    Args:
        documents: the documents to encode.
        encoder: per-doc trainer or hypernetwork.
        store: the LoRA store written to.
        base: the base model the LoRAs are for.
        augment_config: augmentation settings (required when ``encoder.uses_augmentation``).
        chunk_size: documents per ``encoder.encode`` call (one batched bank) and per store shard.
        corpus: the corpus, for template augmentation (``corpus.doc_qa``).
        spec: the LoRA spec in the key; defaults to ``encoder.spec``.
        on_chunk: called as ``on_chunk(chunk_index, documents_done)`` after each chunk this rank stored.
        progress: show a tqdm bar over documents (rank 0's).
        fabric: a launched Lightning ``Fabric`` whose ranks share the work (see the module docstring); every
            rank must call this with the same arguments. ``None``: this process encodes everything missing.
        recipe: the recipe written into the store (default: :func:`~hyper_prag.recipes.recipe_for` the encoder).

    Returns:
        An :class:`EncodeReport` of the whole run (the same on every rank).
    """
    if chunk_size < 1:
        raise HyperPragError(f"chunk_size must be >= 1, got {chunk_size}.")
    recipe = recipe or recipe_for(encoder, base, augment_config, spec)
    keys: dict[str, "Document"] = {}
    doc_qa = corpus.doc_qa if corpus is not None else {}
    for doc in documents:  # identical documents share one key: encode once
        keys.setdefault(recipe.key(doc.text, doc_qa.get(doc.id)), doc)
    bytes_before = store.stats()["bytes"]
    missing = set(store.missing(list(keys)))
    todo = sorted(((k, d) for k, d in keys.items() if k in missing), key=lambda kd: len(kd[1].text))
    rank, world = 0, 1
    if fabric is not None:
        bytes_before, todo = _as_rank_zero_saw_it(fabric, keys, bytes_before, todo)
        rank, world = fabric.global_rank, fabric.world_size
    if todo:  # every rank: one that failed alone would leave the others waiting at the barrier
        _check_before_work(store, encoder, augment_config, corpus, [d for _, d in todo])

    recorded = False

    def record() -> None:  # the recipe goes into the store after its first LoRA, never before one exists
        nonlocal recorded
        if not recorded:
            record_recipe(store.root, recipe, warmup=getattr(encoder, "warmup", None) if recipe.uses_warmup else None)
            recorded = True

    skipped = len(documents) - len(todo)
    chunks = [todo[c : c + chunk_size] for c in range(0, len(todo), chunk_size)]
    mine = range(rank, len(chunks), world)  # round-robin over length-sorted chunks: equal work per rank
    if rank == 0 and 0 < len(chunks) < world:
        log.warning("%d chunks for %d ranks: %d ranks have nothing to encode; lower chunk_size",
                    len(chunks), world, world - len(chunks))
    log.info("encode: %d documents, %d in the store already, %d to encode with %s; rank %d of %d: %d chunks",
             len(documents), skipped, len(todo), encoder.name, rank, world, len(mine))
    start = time.perf_counter()
    bar = tqdm(total=sum(len(chunks[c]) for c in mine), desc=f"encode ({encoder.name})", unit="doc",
               disable=not progress or not mine or rank != 0)
    done = written = 0
    for c in mine:
        chunk = chunks[c]
        chunk_start = time.perf_counter()
        docs = [d for _, d in chunk]
        if encoder.uses_augmentation:
            from hyper_prag.augment import augment_documents

            augmented = augment_documents(docs, augment_config, base=base, corpus=corpus)
        else:
            augmented = [_plain(d) for d in docs]
        loras = encoder.encode(augmented)
        seconds = (time.perf_counter() - chunk_start) / len(chunk)
        # put_many skips (and does not return) keys another writer stored meanwhile: count only our own.
        written += len(store.put_many([(k, lora, {"doc_id": d.id, "encoder": encoder.name, "seconds": seconds})
                                       for (k, d), lora in zip(chunk, loras)]))
        record()
        done += len(chunk)
        bar.update(len(chunk))
        if on_chunk is not None:
            on_chunk(c, done)
    bar.close()
    if fabric is not None:
        fabric.barrier()  # every rank stored its chunks: the store now holds the whole run
        store.refresh(force=True)
        written = int(fabric.all_reduce(torch.tensor(written), reduce_op="sum").item())
    if fabric is None or fabric.global_rank == 0:
        record()  # every LoRA of the run is stored (or was already): the recipe that reads them is recorded
    seconds = time.perf_counter() - start
    grown = store.stats()["bytes"] - bytes_before
    encoded = written
    skipped = len(documents) - encoded  # cached before the run, duplicates, or stored by another writer meanwhile
    if encoded < len(todo):
        log.info("encode: %d documents were stored by another writer meanwhile and kept", len(todo) - encoded)
    return EncodeReport(encoded=encoded, skipped=skipped, seconds=seconds,
                        seconds_per_doc=seconds / encoded if encoded else 0.0,
                        bytes_per_doc=grown / encoded if encoded else 0.0, store=str(getattr(store, "root", "")))


def _check_before_work(store: "LoraStore", encoder: Encoder, augment_config: "AugmentConfig | None",
                       corpus: "Corpus | None", documents: Sequence["Document"]) -> None:
    """What would fail after LoRAs were trained, checked before any is: the store takes writes, and templated
    augmentation (a lookup, no model) finds the corpus's QA pairs of every document to encode."""
    store.check_writable()
    if encoder.uses_augmentation and augment_config is not None and augment_config.source == "template":
        from hyper_prag.augment import augment_documents

        augment_documents(documents, augment_config, corpus=corpus)  # raises naming a document without pairs


def _as_rank_zero_saw_it(fabric: "Fabric", keys: dict[str, "Document"], store_bytes: int,
                         todo: list[tuple[str, "Document"]]) -> tuple[int, list[tuple[str, "Document"]]]:
    """Rank 0's store size and list of documents to encode, on every rank.

    Ranks that looked at the store at different moments (one already writing) would otherwise cut
    different lists into chunks. No rank writes before it has this list, so rank 0 saw the store before
    any write of the run.
    """
    store_bytes, agreed = fabric.broadcast((store_bytes, [k for k, _ in todo]), src=0)
    unknown = sum(k not in keys for k in agreed)
    if unknown:
        raise HyperPragError(f"rank {fabric.global_rank} computes other store keys than rank 0 for {unknown} documents; "
                             "every rank must run the same config, corpus and base model.")
    return store_bytes, [(k, keys[k]) for k in agreed]


def launch(device: str = "cpu", strategy: Literal["auto", "ddp"] = "auto", devices: int = 1,
           num_nodes: int = 1) -> "Fabric | None":
    """Starts (or joins) the processes of a distributed encoding run with Lightning Fabric.

    Lightning's launcher re-runs the current command once per further local device; under torchrun or
    SLURM's srun it joins the processes they started (Lightning reads their environment variables).

    Args:
        device: ``cpu`` (gloo process group) or ``cuda`` (nccl; each rank on ``cuda:<local rank>``).
        strategy: ``auto``: one process unless ``devices`` × ``num_nodes`` > 1; ``ddp``: Lightning's DDP.
        devices: processes per machine.
        num_nodes: machines.

    Returns:
        The launched ``Fabric``, or ``None`` for a single process.
    """
    if strategy == "auto" and devices == 1 and num_nodes == 1:
        return None
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cuda" if device.startswith("cuda") else "cpu", strategy=strategy, devices=devices,
                    num_nodes=num_nodes)
    fabric.launch()
    return fabric

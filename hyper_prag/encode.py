"""Encoding: turn every document of a corpus into a LoRA in the LoRA store (offline stage of P-RAG).

An :class:`Encoder` maps (augmented) documents to LoRAs: the paper's per-document trainer
(:class:`~hyper_prag.encoders.per_doc.PerDocEncoder`, batched) or a hypernetwork. The driver
:func:`encode_corpus` is the same for both::

    documents ──► store key (text, base model, LoRA spec, augmentation, encoder settings)
              ──► skip keys already in the store (cache hit; resume after a kill)
              ──► chunks of ``chunk_size`` ──► augment ──► encoder.encode ──► store.put_many (atomic)

Each chunk is written in one atomic ``put_many``, so a killed run loses at most the chunk in flight
and a re-run trains only what is missing. Missing documents are sorted by length before chunking so
each batched step pads little (a LoRA does not depend on its chunk: see ``per_doc``).

Beyond one process (issue 8): per-document encoding is embarrassingly parallel. With ``strategy: ddp``
Lightning Fabric starts one process per device (or joins those torchrun / SLURM started) and::

    rank 0: missing keys, length-sorted ──broadcast──► every rank: the same chunks c_0, c_1, …
    rank r of W: encodes chunks r, r + W, r + 2W, … ──► the same store (put_many: atomic, idempotent)
    barrier ──► every rank reports the run's totals

No gradient crosses ranks, so nothing is wrapped in DDP; Lightning provides the process group and the
launch. A chunk holds the same documents as in a one-process run, and a LoRA depends only on its
document's text and the settings, so W ranks store exactly the LoRAs one process would. A rank that
dies loses its chunk in flight; re-running the same command encodes only what is missing.

Config: :func:`encode_from_config`'s signature is the YAML schema (``configs/encode/*.yaml``), used by
``python -m train.encode --config …`` and ``hyper-prag encode --config …`` alike.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tqdm.auto import tqdm

from hyper_prag.encoders import Encoder
from hyper_prag.encoders.per_doc import FitBank, PerDocConfig, PerDocEncoder, fit_steps, train_warmup_lora
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import LoraSpec
from hyper_prag.model import BaseModel

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from hyper_prag.augment import AugmentConfig, AugmentedDocument
    from hyper_prag.corpus import Corpus, Document
    from hyper_prag.store import LoraStore

log = logging.getLogger(__name__)

__all__ = ["Encoder", "EncodeReport", "PerDocEncoder", "PerDocConfig", "encode_corpus", "encode_from_config",
           "launch", "add_arguments", "run_encode", "config_parser"]


@dataclass(frozen=True)
class EncodeReport:
    """What one :func:`encode_corpus` run did."""

    encoded: int  # documents trained/generated in this run (by all ranks)
    skipped: int  # documents already in the store (cache hits)
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
    fabric: "Fabric | None" = None,
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

    Returns:
        An :class:`EncodeReport` of the whole run (the same on every rank).
    """
    from hyper_prag.store import store_key

    if chunk_size < 1:
        raise HyperPragError(f"chunk_size must be >= 1, got {chunk_size}.")
    if encoder.uses_augmentation and augment_config is None:
        raise HyperPragError(f"encoder '{encoder.name}' trains on augmented documents: pass an AugmentConfig.")
    spec = (spec or getattr(encoder, "spec", None) or LoraSpec()).for_model(base)
    augmentation = augment_config.settings() if encoder.uses_augmentation else {}
    settings = encoder.settings()
    keys: dict[str, "Document"] = {}
    for doc in documents:  # identical texts share one key: encode once
        keys.setdefault(store_key(doc.text, base.identity, spec, augmentation, settings), doc)
    bytes_before = store.stats()["bytes"]
    missing = set(store.missing(list(keys)))
    todo = sorted(((k, d) for k, d in keys.items() if k in missing), key=lambda kd: len(kd[1].text))
    rank, world = 0, 1
    if fabric is not None:
        bytes_before, todo = _as_rank_zero_saw_it(fabric, keys, bytes_before, todo)
        rank, world = fabric.global_rank, fabric.world_size
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
    done = 0
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
        store.put_many([(k, lora, {"doc_id": d.id, "encoder": encoder.name, "seconds": seconds})
                        for (k, d), lora in zip(chunk, loras)])
        done += len(chunk)
        bar.update(len(chunk))
        if on_chunk is not None:
            on_chunk(c, done)
    bar.close()
    if fabric is not None:
        fabric.barrier()  # every rank stored its chunks: the store now holds the whole run
        store.refresh(force=True)
    seconds = time.perf_counter() - start
    grown = store.stats()["bytes"] - bytes_before
    encoded = len(todo)
    return EncodeReport(encoded=encoded, skipped=skipped, seconds=seconds,
                        seconds_per_doc=seconds / encoded if encoded else 0.0,
                        bytes_per_doc=grown / encoded if encoded else 0.0, store=str(getattr(store, "root", "")))


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


# ------------------------------------------------------------------------------ config-driven entry point


def _load_model(model: str, device: str) -> BaseModel:
    from hyper_prag.model import load_base_model, tiny_base_model

    if model == "tiny":
        return tiny_base_model(device=device)
    return load_base_model(model, device=device)


def _load_corpus(corpus: str | None) -> "Corpus":
    if corpus is None:
        from hyper_prag.benchmark import load_or_make_default

        return load_or_make_default()
    from hyper_prag.corpus import load_corpus

    return load_corpus(corpus)


def _make_logger(logger: str, log_dir: str, offline: bool, name: str):
    if logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(log_dir, name=name)
    if logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project="hyper-prag", name=name, save_dir=log_dir, offline=offline)
    return False


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


def encode_from_config(
    encoder: Literal["per-doc", "hypernet"] = "per-doc",
    checkpoint: str | None = None,
    model: str = "smollm2-135m-instruct",
    device: str = "cpu",
    strategy: Literal["auto", "ddp"] = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    corpus: str | None = None,
    split: str | None = "test",
    limit: int | None = None,
    store: str | None = None,
    store_dtype: Literal["bfloat16", "float32"] = "bfloat16",
    chunk_size: int = 8,
    rank: int = 2,
    alpha: float = 32.0,
    trainer: PerDocConfig = PerDocConfig(),
    augment: dict | None = None,
    warmup_split: str = "train",
    warmup_docs: int = 16,
    warmup_steps: int = 64,
    runner: Literal["lightning", "loop"] = "lightning",
    logger: Literal["csv", "wandb", "none"] = "csv",
    log_dir: str = "runs/encode",
    offline: bool = True,
    progress: bool = True,
    fit: FitBank | None = None,
) -> EncodeReport:
    """Encodes a corpus split into a LoRA store with the per-document trainer or a hypernetwork (the YAML schema).

    Args:
        encoder: ``per-doc`` (paper §3.2, batched trainer) or ``hypernet`` (needs ``checkpoint``).
        checkpoint: hypernetwork checkpoint (``encoder="hypernet"``).
        model: ``smollm2-135m-instruct`` (packaged default), ``tiny`` (random 2-layer test model) or a model folder.
        device: ``cpu`` / ``cuda``.
        strategy: ``auto``: one process unless ``devices`` × ``num_nodes`` > 1; ``ddp``: Lightning's DDP, one
            process per device, each encoding its share of the missing documents into the same store (see
            :func:`launch`; under torchrun / srun, pass the same ``devices`` and ``num_nodes`` as they use).
        devices: processes per machine (GPUs with ``device: cuda``).
        num_nodes: machines.
        corpus: corpus folder; ``None``: the default fictional benchmark.
        split: documents of this split (``None``: all).
        limit: encode at most this many documents (first ones of the split).
        store: LoRA store folder; ``None``: ``cache_dir("lora_store")/<model>``.
        store_dtype: storage dtype of the LoRAs.
        chunk_size: documents per batched bank.
        rank: LoRA rank (paper: 2).
        alpha: LoRA alpha (paper: 32).
        trainer: per-document trainer settings (:class:`PerDocConfig`).
        augment: :class:`~hyper_prag.augment.AugmentConfig` fields (``None``: its defaults).
        warmup_split: for ``trainer.init="warmup"``: the held-out split the warm-up LoRA trains on.
        warmup_docs: held-out documents used for the warm-up.
        warmup_steps: warm-up sequences (steps).
        runner: read by ``python -m train.encode``: ``lightning`` (it passes its lightning.Trainer runner as
            ``fit``) or ``loop``. This function trains with ``fit`` whatever the value (identical LoRAs).
        logger: Lightning logger for per-step losses: ``csv`` (default), ``wandb`` or ``none`` (rank 0 logs).
        log_dir: logger folder.
        offline: W&B offline mode (no network here).
        progress: tqdm bar over documents.
        fit: the runner of each chunk's LoRA bank (not a YAML key); ``None``: the plain loop (``fit_steps``).

    Returns:
        The :class:`EncodeReport` (of the whole run, on every rank).
    """
    from hyper_prag.augment import AugmentConfig, augment_documents
    from hyper_prag.paths import cache_dir
    from hyper_prag.store import LoraStore

    fabric = launch(device, strategy, devices, num_nodes)
    if fabric is not None:
        device = str(fabric.device)  # cuda:<local rank> on GPUs
    with fabric.rank_zero_first(local=True) if fabric else nullcontext():  # caches (model, benchmark) made once
        base = _load_model(model, device)
        full = _load_corpus(corpus)
    part = full.split(split) if split else full
    documents = list(part.documents)[:limit] if limit else list(part.documents)
    if not documents:
        raise HyperPragError(f"no documents to encode in corpus {full.name!r} split {split!r}; check --split.")
    augment_config = AugmentConfig(**(augment or {}))
    spec = LoraSpec(rank=rank, alpha=alpha).for_model(base)
    store_root = store or cache_dir("lora_store") / Path(str(model)).name
    if encoder == "hypernet":
        from hyper_prag.encoders.hypernet import HypernetEncoder

        if checkpoint is None:
            raise HyperPragError("encoder 'hypernet' needs a checkpoint: pass --checkpoint PATH (see hypernet training).")
        hypernet = HypernetEncoder.from_checkpoint(checkpoint, base)
        return encode_corpus(documents, hypernet, LoraStore(store_root, dtype=store_dtype), base, None, chunk_size,
                             corpus=full, progress=progress, fabric=fabric)
    warmup = None
    if trainer.init == "warmup":
        held = list(full.split(warmup_split).documents)[:warmup_docs]
        if not held:
            raise HyperPragError(f"init='warmup' needs held-out documents but split {warmup_split!r} is empty; "
                                 "set warmup_split to a split that is not encoded.")
        if fabric is None or fabric.global_rank == 0:
            held_aug = augment_documents(held, augment_config, base=base, corpus=full)
            warmup = train_warmup_lora(base, spec, held_aug, trainer, max_steps=warmup_steps)
        if fabric is not None:  # one warm-up LoRA for all ranks: its hash is part of every store key
            warmup = fabric.broadcast(warmup, src=0)
    lightning_logger = _make_logger(logger, log_dir, offline, name=f"encode-{Path(str(model)).name}") or None
    per_doc = PerDocEncoder(base, spec, trainer, warmup=warmup, fit=fit or fit_steps,
                           logger=lightning_logger)
    report = encode_corpus(documents, per_doc, LoraStore(store_root, dtype=store_dtype), base, augment_config,
                           chunk_size, corpus=full, spec=spec, progress=progress, fabric=fabric)
    if lightning_logger:
        lightning_logger.log_hyperparams({"model": model, "chunk_size": chunk_size, "rank": rank, "alpha": alpha,
                                          "world_size": fabric.world_size if fabric else 1,
                                          **{f"trainer.{k}": v for k, v in trainer.settings().items()}})
        lightning_logger.log_metrics({"encode/seconds_per_doc": report.seconds_per_doc,
                                      "encode/bytes_per_doc": report.bytes_per_doc, "encode/encoded": report.encoded})
        lightning_logger.finalize("success")
    return report


def config_parser():
    """The jsonargparse parser whose schema is :func:`encode_from_config`'s signature (+ ``--config``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m train.encode", description="Per-document LoRA encoding (paper §3.2).")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/encode/*.yaml)")
    parser.add_function_arguments(encode_from_config, skip={"fit"})
    return parser


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Parses a YAML config (and ``--key value`` overrides) into :func:`encode_from_config` keyword arguments."""
    parser = config_parser()
    args = (["--config", str(path)] if path else []) + list(overrides)
    cfg = parser.instantiate(parser.parse_args(args))
    return {k: v for k, v in cfg.as_dict().items() if k != "config"} | {"trainer": cfg.trainer}


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hyper-prag encode``."""
    parser.add_argument("--encoder", choices=["per-doc", "hypernet"], default=None,
                        help="per-doc: the paper's per-document LoRA training (batched); hypernet: a trained "
                             "hypernetwork (--checkpoint). Default from the config: per-doc")
    parser.add_argument("--checkpoint", default=None, help="hypernetwork checkpoint (--encoder hypernet)")
    parser.add_argument("--config", default=None, help="YAML config (configs/encode/*.yaml); flags below override it")
    parser.add_argument("--corpus", default=None, help="corpus folder (default: the fictional benchmark)")
    parser.add_argument("--split", default=None, help="documents of this split (default from config: test)")
    parser.add_argument("--limit", type=int, default=None, help="encode at most N documents")
    parser.add_argument("--store", default=None, help="LoRA store folder (default: cache)")
    parser.add_argument("--model", default=None, help="smollm2-135m-instruct | tiny | model folder")
    parser.add_argument("--chunk-size", type=int, default=None, help="documents trained together per step")
    parser.add_argument("--strategy", choices=["auto", "ddp"], default=None,
                        help="ddp: one process per device (Lightning DDP), each encoding its share; default: auto")
    parser.add_argument("--devices", type=int, default=None, help="processes per machine (strategy ddp)")
    parser.add_argument("--num-nodes", type=int, default=None, help="machines (strategy ddp)")
    parser.add_argument("--log-dir", default=None, help="folder of the Lightning logger chosen in the config")


def run_encode(args: argparse.Namespace) -> EncodeReport:
    """Runs ``hyper-prag encode``: the YAML config (if any) with the command-line flags on top."""
    overrides = []
    for flag, value in (("encoder", args.encoder), ("checkpoint", args.checkpoint), ("corpus", args.corpus), ("split", args.split), ("limit", args.limit),
                        ("store", args.store), ("model", args.model), ("chunk_size", args.chunk_size),
                        ("strategy", args.strategy), ("devices", args.devices), ("num_nodes", args.num_nodes),
                        ("log_dir", args.log_dir)):
        if value is not None:
            overrides += [f"--{flag}", str(value)]
    report = encode_from_config(**load_config(args.config, overrides))
    log.info("encoded %d, skipped %d (cached), %.2f s/doc, %.0f bytes/doc -> %s", report.encoded, report.skipped,
             report.seconds_per_doc, report.bytes_per_doc, report.store)
    return report

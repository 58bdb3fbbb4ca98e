"""The programmatic API: typed functions for the three things a user does.

- :func:`encode`: encode a corpus split into the LoRA store (its signature is the encode YAML schema,
  ``configs/encode/*.yaml``); records the :class:`~hyper_prag.recipes.Recipe` the online path reads.
- :func:`ask`: answer one question with one method (reads only: never trains, never parses an encode YAML).
- :func:`evaluate`: compare methods on a benchmark with the harness and write the tables and plots;
  retrieved documents missing from the store are encoded first, as an explicit step (``encode_missing``).

The CLI (:mod:`hyper_prag.cli`) only maps flags to these functions; the demo, the benchmarks and the
tests call them directly.

    from hyper_prag.api import ask, evaluate
    answer = ask("Who founded Varnholt?", method="prag", model="tiny")
    results = evaluate(["closed-book", "rag", "prag"], benchmark="fictional", limit=20)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from hyper_prag import assemble
from hyper_prag.combine import DEFAULT_COMBINE, CombineMode, check_combine_mode
from hyper_prag.encode import EncodeReport, encode_corpus, launch
from hyper_prag.encoders.per_doc import FitBank, PerDocConfig, fit_steps
from hyper_prag.errors import HyperPragError
from hyper_prag.evaluate import Results, compare, select_questions
from hyper_prag.lora import LoraSpec
from hyper_prag.corpus import Corpus
from hyper_prag.methods import Answer, LoraSource, MethodSpec, method_spec, parse_methods
from hyper_prag.model import DEFAULT_MODEL, portable_model_name
from hyper_prag.pipeline import Pipeline
from hyper_prag.recipes import recipe_for

if TYPE_CHECKING:
    from hyper_prag.store import LoraStore

log = logging.getLogger(__name__)

RetrieverName = Literal["bm25", "dense"]
WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)
Runner = Literal["lightning", "loop"]  # which trainer hyper-prag encode runs each bank with


# ----------------------------------------------------------------------------------------------- encode


def encode(
    encoder: Literal["per-doc", "hypernet", "refine"] = "per-doc",
    checkpoint: str | None = None,
    refine_steps: int = 4,
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: bool = True,
    strategy: Literal["auto", "ddp"] = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    corpus: str | None = None,
    columns: str | None = None,
    split: str | None = "test",
    limit: int | None = None,
    store: str | None = None,
    store_dtype: Literal["bfloat16", "float32"] = "bfloat16",
    chunk_size: int = 8,
    rank: int = LoraSpec.rank,
    alpha: float = LoraSpec.alpha,
    target_modules: tuple[str, ...] = LoraSpec.target_modules,
    layers: tuple[int, ...] = (),
    trainer: PerDocConfig = PerDocConfig(),
    augment: dict | None = None,
    warmup_split: str = "train",
    warmup_docs: int = 16,
    warmup_steps: int = 64,
    runner: Runner = "lightning",
    logger: Literal["csv", "wandb", "none"] = "csv",
    log_dir: str = "runs/encode",
    offline: bool = True,
    progress: bool = True,
    fit: FitBank | None = None,
) -> EncodeReport:
    """Encodes a corpus split into a LoRA store with the per-document trainer or a hypernetwork (the YAML schema).

    Args:
        encoder: ``per-doc`` (paper §3.2, batched trainer), ``hypernet`` (needs ``checkpoint``), or ``refine``:
            the hypernetwork's LoRA refined by ``refine_steps`` per-document steps (``trainer`` settings).
        checkpoint: hypernetwork checkpoint (``encoder="hypernet"`` / ``"refine"``): a path or a shipped one's
            name (``fictional``, ``squad``); ``None``: the one shipped for ``corpus``.
        refine_steps: k, per-document steps from the generated LoRA (``encoder="refine"``; 0 = the hypernet's).
        model: ``smollm2-135m-instruct`` (packaged default), ``tiny`` (random 2-layer test model), a model
            folder or a hub id in the Hugging Face cache.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: model weights: ``auto`` (bf16 on CUDA when supported, else fp32), ``float32``, ``bfloat16``,
            ``float16``; LoRA factors and optimizer state stay float32.
        local_files_only: never download a hub model or dataset (default).
        strategy: ``auto``: one process unless ``devices`` × ``num_nodes`` > 1; ``ddp``: Lightning's DDP, one
            process per device, each encoding its share of the missing documents into the same store (see
            :func:`hyper_prag.encode.launch`; under torchrun / srun, pass the same ``devices`` and ``num_nodes``).
        devices: processes per machine (GPUs with ``device: cuda``).
        num_nodes: machines.
        corpus: corpus name or folder, ``datasets`` folder or hub dataset id (``None``: the fictional benchmark).
        columns: column mapping of a ``datasets`` corpus, e.g. ``"id=doc_id,text=body"``.
        split: documents of this split (``None``: all).
        limit: encode at most this many documents (first ones of the split).
        store: LoRA store folder; ``None``: ``cache_dir("lora_store")/<model>``.
        store_dtype: storage dtype of the LoRAs.
        chunk_size: documents per batched bank.
        rank: LoRA rank (paper: 2).
        alpha: LoRA alpha (paper: 32).
        target_modules: the linears adapted in every chosen layer (paper: the FFN's gate/up/down; a model
            with a fused ``gate_up_proj`` maps gate/up onto it), or attention projections (``q_proj``, ``k_proj``,
            ``v_proj``, ``o_proj``).
        layers: decoder layers adapted (``()``: all).
        trainer: per-document trainer settings (:class:`PerDocConfig`).
        augment: :class:`~hyper_prag.augment.AugmentConfig` fields (``None``: its defaults).
        warmup_split: for ``trainer.init="warmup"``: the held-out split the warm-up LoRA trains on.
        warmup_docs: held-out documents used for the warm-up.
        warmup_steps: warm-up sequences (steps).
        runner: read by ``hyper-prag encode`` (:mod:`hyper_prag.training.encode`): ``lightning`` trains each
            chunk's bank under a ``lightning.Trainer``, ``loop`` with the library's plain loop; both give
            bit-identical LoRAs. This function trains with ``fit`` whatever the value.
        logger: Lightning logger for per-step losses: ``csv`` (default), ``wandb`` or ``none`` (rank 0 logs).
        log_dir: logger folder.
        offline: W&B offline mode (no network here).
        progress: tqdm bar over documents.
        fit: the runner of each chunk's LoRA bank (not a YAML key); ``None``: the plain loop (``fit_steps``).

    Returns:
        The :class:`EncodeReport` (of the whole run, on every rank).
    """
    if limit is not None and limit < 1:
        raise HyperPragError(f"limit must be a positive number of documents, got {limit}.")
    from hyper_prag.model import resolve_device

    device = str(resolve_device(device))
    fabric = launch(device, strategy, devices, num_nodes)
    if fabric is not None:
        device = str(fabric.device)  # cuda:<local rank> on GPUs
    with fabric.rank_zero_first(local=True) if fabric else nullcontext():  # caches (model, benchmark) made once
        base = assemble.load_model(model, device, dtype, local_files_only)
        full = assemble.load_corpus(corpus, columns, local_files_only)
    part = full.split(split) if split else full
    documents = list(part.documents)[:limit] if limit else list(part.documents)
    if not documents:
        raise HyperPragError(f"no documents to encode in corpus {full.name!r} split {split!r}; check --split.")
    lora_store = assemble.open_store(store, model, store_dtype)
    if encoder in ("hypernet", "refine"):
        source = assemble.hypernet_source(checkpoint, base, corpus if corpus is not None else assemble.DEFAULT_CORPUS)
        if encoder == "hypernet":
            return encode_corpus(documents, source.encoder, lora_store, base, None, chunk_size, corpus=full,
                                 progress=progress, fabric=fabric)
        from hyper_prag.augment import AugmentConfig
        from hyper_prag.encoders.refine import RefineEncoder

        if refine_steps < 0:
            raise HyperPragError(f"refine_steps must be 0 or more, got {refine_steps}.")
        refine = RefineEncoder(source.encoder, refine_steps, trainer, fit=fit or fit_steps)
        augment_config = AugmentConfig(**(augment or {})) if refine.uses_augmentation else None
        return encode_corpus(documents, refine, lora_store, base, augment_config, chunk_size, corpus=full,
                             progress=progress, fabric=fabric)
    config = {"rank": rank, "alpha": alpha, "target_modules": target_modules, "layers": layers, "trainer": trainer,
              "augment": augment, "warmup_split": warmup_split,
              "warmup_docs": warmup_docs, "warmup_steps": warmup_steps}
    warmup = None
    if trainer.init == "warmup" and (fabric is None or fabric.global_rank == 0):
        warmup = assemble.per_doc_from_config(base, full, config, lora_store.root).encoder.warmup
    if trainer.init == "warmup" and fabric is not None:  # one warm-up LoRA for all ranks: its hash is in every key
        warmup = fabric.broadcast(warmup, src=0)
    per_doc = assemble.per_doc_from_config(base, full, config, lora_store.root, warmup=warmup)
    lightning_logger = _make_logger(logger, log_dir, offline, name=f"encode-{Path(str(model)).name}") or None
    per_doc.encoder.fit, per_doc.encoder.logger = fit or fit_steps, lightning_logger
    report = encode_corpus(documents, per_doc.encoder, lora_store, base, per_doc.augment_config, chunk_size,
                           corpus=full, progress=progress, fabric=fabric, recipe=per_doc.recipe)
    if lightning_logger:
        lightning_logger.log_hyperparams({"model": model, "chunk_size": chunk_size, "rank": rank, "alpha": alpha,
                                          "world_size": fabric.world_size if fabric else 1,
                                          **{f"trainer.{k}": v for k, v in trainer.settings().items()}})
        lightning_logger.log_metrics({"encode/seconds_per_doc": report.seconds_per_doc,
                                      "encode/docs_per_min": 60.0 / report.seconds_per_doc if report.encoded else 0.0,
                                      "encode/bytes_per_doc": report.bytes_per_doc, "encode/encoded": report.encoded})
        lightning_logger.finalize("success")
    return report


def _make_logger(logger: str, log_dir: str, offline: bool, name: str):
    if logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(log_dir, name=name)
    if logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(project="hyper-prag", name=name, save_dir=log_dir, offline=offline)
    return False


def encode_config_parser(prog: str = "hyper-prag encode"):
    """The jsonargparse parser whose schema is :func:`encode`'s signature (+ ``--config``), flags hyphenated.

    Args:
        prog: the program name in its usage line.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    from hyper_prag.flags import hyphenate

    parser = ArgumentParser(prog=prog, description="Encode documents into LoRAs (per-document training, paper "
                            "§3.2, or a hypernetwork) into the LoRA store. Every flag is a key of the YAML.")
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML config: a file or a shipped config's name (tiny, demo, paper, ...)")
    parser.add_function_arguments(encode, skip={"fit"})
    return hyphenate(parser)


def load_encode_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                       prog: str = "hyper-prag encode") -> dict[str, Any]:
    """Parses an encode YAML (and ``--key value`` overrides) into :func:`encode` keyword arguments.

    Args:
        path: a YAML file or a shipped config's name (:func:`hyper_prag.paths.config_file`); ``None``: the
            signature's defaults (or a ``--config`` among ``overrides``).
        overrides: command-line arguments, e.g. ``["--limit", "4", "--trainer.epochs", "2"]``.
        prog: the program name of usage lines and ``--help``.
    """
    from hyper_prag.flags import config_argv

    parser = encode_config_parser(prog)
    args = config_argv((["--config", str(path)] if path else []) + list(overrides), "encode")
    cfg = parser.instantiate(parser.parse_args(args))
    return {k: v for k, v in cfg.as_dict().items() if k != "config"} | {"trainer": cfg.trainer}


# -------------------------------------------------------------------------------------------------- ask


def ask(
    question: str,
    method: str = "prag",
    *,
    benchmark: str = assemble.DEFAULT_CORPUS,
    split: str | None = "test",
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: bool = True,
    columns: str | None = None,
    k: int = 3,
    retriever: RetrieverName = "bm25",
    store: str | Path | None = None,
    recipe: str | None = None,
    hypernet: str | Path | None = None,
    combine: CombineMode = DEFAULT_COMBINE,
    max_new_tokens: int = 32,
) -> Answer:
    """Answers one question with one method; reads the store and never trains.

    Args:
        question: the question.
        method: a method of :data:`hyper_prag.methods.METHODS`.
        benchmark: corpus name or folder whose ``split`` documents are retrieved from.
        split: the split (``None``: the whole corpus).
        model: base model name, folder or cached hub id.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        local_files_only: never download a hub model or dataset (default).
        columns: column mapping of a ``datasets`` corpus.
        k: documents retrieved per question (paper: 3; at most the split's documents).
        retriever: ``bm25`` (paper) or ``dense``.
        store: LoRA store folder (``prag*``; default: the cache's store of ``model``); it must exist.
        recipe: which recorded per-document recipe of the store to read (needed only when it holds several).
        hypernet: hypernetwork checkpoint (``hypernet*``): a path or a shipped one's name; ``None``: the one
            shipped for ``benchmark``.
        combine: how the k LoRAs are combined: ``softmax`` (weights from the retrieval scores), ``sum`` (the
            paper), ``mean``.
        max_new_tokens: generation budget.

    Returns:
        The :class:`~hyper_prag.methods.Answer` (prediction, documents, LoRAs applied, timing).
    """
    _check_positive(k=k, max_new_tokens=max_new_tokens)
    check_combine_mode(combine)
    spec = method_spec(method)
    base = assemble.load_model(model, device, dtype, local_files_only)
    full = assemble.load_corpus(benchmark, columns, local_files_only)
    corpus = assemble.load_split(full, split)
    if spec.retrieves:
        _check_k(k, corpus, split)
    retriever_ = assemble.build_retriever(retriever, corpus, device) if spec.retrieves else None
    source: LoraSource | None = None
    augment = None
    if spec.lora == "store" or spec.context == "augmented":
        from hyper_prag.sources import StoreSource

        lora_store = assemble.open_store(store, model, create=False)  # reading: a missing store is an error
        found = assemble.per_doc_from_store(base, lora_store.root, recipe)
        if spec.context == "augmented":
            augment = assemble.augment_function(base, full, _augment_config(found.augment))
        if spec.lora == "store":
            source = StoreSource(lora_store, found, full.doc_qa)
    elif spec.lora == "hypernet":
        source = assemble.hypernet_source(hypernet, base, benchmark)
    pipeline = Pipeline(base, retriever_, corpus, k=k, max_new_tokens=max_new_tokens, combine_mode=combine,
                        batch_size=1, augment=augment)
    if source is not None:
        source = _source_for(spec, {spec.lora: source}, corpus)
    return assemble.build_method(method, pipeline, source).answer([question])[0]


def _augment_config(fields: Any):
    from hyper_prag.augment import AugmentConfig

    return AugmentConfig(**(fields or {}))


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise HyperPragError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


def _check_k(k: int, corpus: Any, split: str | None) -> None:
    """Refuses a ``k`` larger than the documents retrieval can return (it would silently return fewer)."""
    n = len(corpus.documents)
    if k > n:
        where = f"split {split!r} of {corpus.name!r}" if split else repr(corpus.name)
        raise HyperPragError(f"--k {k} asks for more documents than {where} holds ({n}); choose --k {n} or fewer.")


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(
    methods: str | Sequence[str],
    *,
    benchmark: str = assemble.DEFAULT_CORPUS,
    split: str | None = "test",
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: bool = True,
    columns: str | None = None,
    questions: str | None = None,
    question_columns: str | None = None,
    k: int = 3,
    retriever: RetrieverName = "bm25",
    store: str | Path | None = None,
    encode_config: str | Path | None = None,
    recipe: str | None = None,
    hypernet: str | Path | None = None,
    combine: CombineMode = DEFAULT_COMBINE,
    max_new_tokens: int = 32,
    limit: int | None = None,
    per_type: int | None = None,
    batch_size: int = 8,
    chunk_size: int = 4,
    encode_missing: bool = True,
    resamples: int = 1000,
    seed: int = 0,
    out: str | Path | None = "results/evaluate",
    progress: bool = True,
    wandb_project: str = "hyper-prag",
    wandb_mode: WandbMode = "offline",
    wandb_dir: str | Path = "runs/wandb",
) -> Results:
    """Compares methods on the same questions: builds the pipeline and methods, encodes missing LoRAs, scores.

    Args:
        methods: method names (a list or a comma-separated string).
        benchmark: ``fictional``, ``squad``, ``hotpotqa`` or a corpus folder.
        split: the split whose documents are retrieved from and whose questions are asked.
        model: base model name, folder or cached hub id.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        local_files_only: never download a hub model or dataset (default).
        columns: column mapping of a ``datasets`` corpus.
        questions: a second dataset whose questions are asked, ``"path_or_name[:split]"`` (a ``save_to_disk``
            folder, a ``.jsonl``/``.parquet``/``.csv`` file or a cached hub id); for a corpus that carries none,
            such as a ``datasets`` one (:func:`hyper_prag.corpus.load_questions`).
        question_columns: its column mapping, e.g. ``"question=query,answers=answer,doc_ids=passage_id"`` (or
            ``context=passage``: the gold document found by its text).
        k: documents retrieved per question (at most the split's documents).
        retriever: ``bm25`` or ``dense``.
        store: LoRA store folder (default: the cache's store of ``model``).
        encode_config: encode YAML whose settings the ``prag`` methods use; ``None``: the store's recorded
            recipe (``recipe`` chooses among several), or the encode defaults if the store has none.
        recipe: a recorded recipe id (when ``encode_config`` is not given).
        hypernet: hypernetwork checkpoint (``hypernet*`` methods): a path or a shipped one's name
            (``fictional``, ``squad``); ``None``: the one shipped for ``benchmark``.
        combine: how k LoRAs are combined: ``softmax`` (weights from the retrieval scores), ``sum`` (the
            paper), ``mean``.
        max_new_tokens: generation budget per answer.
        limit: evaluate the first N questions (after ``per_type``).
        per_type: evaluate the first N questions of each type.
        batch_size: questions per retrieval / generation batch.
        chunk_size: documents per LoRA bank when encoding missing ones.
        encode_missing: encode retrieved documents missing from the store (else: error).
        resamples: bootstrap resamples per confidence interval.
        seed: bootstrap seed (0 or more).
        out: folder for results.json, results.md and the plots (``None``: write nothing).
        progress: progress bars.
        wandb_project: W&B project of the run (the training runs' project by default).
        wandb_mode: ``offline`` (default: written under ``wandb_dir``, ``wandb sync`` uploads it), ``online``
            or ``disabled`` (see :mod:`hyper_prag.tracking`).
        wandb_dir: folder that receives the W&B run.

    Returns:
        The :class:`~hyper_prag.evaluate.Results`.
    """
    from hyper_prag.sources import StoreSource, wrong_partners

    # Every setting is checked before anything runs: a bad one must not surface after all questions were answered.
    _check_positive(k=k, max_new_tokens=max_new_tokens, limit=limit, per_type=per_type, batch_size=batch_size,
                    chunk_size=chunk_size, resamples=resamples)
    if seed < 0:
        raise HyperPragError(f"--seed must be 0 or more (it seeds the bootstrap), got {seed}.")
    check_combine_mode(combine)
    if wandb_mode not in WANDB_MODES:
        raise HyperPragError(f"--wandb-mode {wandb_mode!r} is unknown; choose one of {', '.join(WANDB_MODES)}.")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise HyperPragError(f"--out {out} is a file; give a folder for results.json, results.md and the plots.")
    names = parse_methods(methods)
    base = assemble.load_model(model, device, dtype, local_files_only)
    full = assemble.load_corpus(benchmark, columns, local_files_only, questions, question_columns)
    question_source = questions
    corpus = full.split(split) if split else full
    questions = select_questions(corpus.questions, per_type, limit)
    if not corpus.documents or not questions:
        raise HyperPragError(_nothing_to_ask(full, benchmark, split, question_source))
    if any(method_spec(m).retrieves for m in names):
        _check_k(k, corpus, split)
    retriever_ = assemble.build_retriever(retriever, corpus, device)
    static = [method_spec(m) for m in names if not method_spec(m).dynamic]  # flare/dragin: no LoRAs, no augmentation
    kinds = {s.lora for s in static}
    contexts = {s.context for s in static}
    # The documents the evaluated questions retrieve: what the prag methods need LoRAs for.
    hits = retriever_.search([q.question for q in questions], k)
    needed = [corpus.document(i) for i in dict.fromkeys(h.doc_id for row in hits for h in row)]
    partner = wrong_partners(corpus.documents) if any(s.wrong_doc for s in static) else {}
    # The wrong-document control also needs the LoRAs that stand in for the retrieved ones.
    needed += [d for d in dict.fromkeys(partner[d.id] for d in needed) if d not in needed] if partner else []

    def served(spec: MethodSpec) -> list[Any]:
        """The documents whose LoRAs method ``spec`` applies for ``needed`` (the control: their partners)."""
        return [partner[d.id] for d in needed] if spec.wrong_doc else list(needed)

    costs: dict[str, dict[str, float | None]] = {}
    sources: dict[str, LoraSource] = {}
    augment = None
    chosen_recipe = None
    store_root = Path(store) if store is not None else assemble.default_store_path(model)  # DA-RAG only reads it
    lora_store = None
    if "store" in kinds or "augmented" in contexts:
        per_doc = _per_doc_for_evaluate(base, full, store_root, encode_config, recipe)
        chosen_recipe = per_doc.recipe
        augment = assemble.augment_function(base, full, per_doc.augment_config)
        if "augmented" in contexts:
            start = time.perf_counter()
            augment(needed)  # augmentation is offline work: done (or read from its cache) before timing
            costs["da-rag"] = {"encode_seconds_per_doc": (time.perf_counter() - start) / max(1, len(needed)),
                               "bytes_per_doc": None}
        if "store" in kinds:
            lora_store = assemble.open_store(store_root, model, create=encode_missing)  # it encodes what is missing
            source = StoreSource(lora_store, per_doc.recipe, full.doc_qa)
            missing = lora_store.missing(source.names(needed))
            if missing and not encode_missing:
                raise HyperPragError(f"{len(missing)} retrieved documents have no LoRA in {lora_store.root}; "
                                     "run `hyper-prag encode` or drop --no-encode.")
            report = encode_corpus(needed, per_doc.encoder, lora_store, base, per_doc.augment_config, chunk_size,
                                   corpus=full, recipe=per_doc.recipe, progress=progress)
            # The cost of the LoRAs this run uses, as recorded when each was encoded (now or by an earlier run).
            recorded = [lora_store.meta(key).get("seconds") for key in source.names(needed)]
            recorded = [s for s in recorded if s is not None]
            enc = sum(recorded) / len(recorded) if recorded else (report.seconds_per_doc if report.encoded else None)
            for m in ("prag", "prag-wrong-doc", "prag-both"):
                served_keys = source.names(served(method_spec(m))) if m in names else []
                costs[m] = {"encode_seconds_per_doc": enc, "bytes_per_doc": _bytes_per_doc(lora_store, served_keys)}
            sources["store"] = source
    if "hypernet" in kinds:
        hyper = assemble.hypernet_source(hypernet, base, benchmark)
        start = time.perf_counter()
        hyper.loras(needed)  # generation cost per document (the online path pays it in its `lora` stage)
        per_doc_s = (time.perf_counter() - start) / max(1, len(needed))
        # Bytes: those of the hypernet's own entries, where `encode --encoder hypernet` stored them in this store.
        if lora_store is None:
            lora_store = _existing_store(store_root)
        hyper_recipe = recipe_for(hyper.encoder, base)
        for m in ("hypernet", "hypernet-wrong-doc", "hypernet-both"):
            served_keys = ([hyper_recipe.key(d.text, full.doc_qa.get(d.id)) for d in served(method_spec(m))]
                           if m in names else [])
            costs[m] = {"encode_seconds_per_doc": per_doc_s, "bytes_per_doc": _bytes_per_doc(lora_store, served_keys)}
        sources["hypernet"] = hyper
    pipeline = Pipeline(base, retriever_, corpus, k=k, max_new_tokens=max_new_tokens, combine_mode=combine,
                        batch_size=batch_size, augment=augment)
    built = [assemble.build_method(m, pipeline, _source_for(method_spec(m), sources, corpus)) for m in names]
    config = {"benchmark": str(benchmark), "split": split, "model": model, "base_identity": base.identity,
              "device": str(base.device), "dtype": str(base.dtype).removeprefix("torch."),
              "k": k, "retriever": retriever, "combine": combine, "max_new_tokens": max_new_tokens,
              "batch_size": batch_size, "limit": limit, "per_type": per_type,
              "store": str(store) if store is not None else None,
              "hypernet": str(hypernet) if hypernet is not None else None,
              "hypernet_sha256": getattr(getattr(sources.get("hypernet"), "encoder", None), "sha256", None),
              "encode_config": str(encode_config) if encode_config is not None else None,
              "recipe": chosen_recipe.id if chosen_recipe is not None else None,
              "question_source": question_source, "question_columns": question_columns,
              "documents_retrieved": len(needed)}
    tokenizer = base.tokenizer
    results = compare(built, questions, costs=costs, n_resamples=resamples, seed=seed, chunk=batch_size,
                      device=base.device, config=config, progress=progress,
                      count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False).input_ids))
    paths = results.write(out) if out is not None else {}
    if wandb_mode != "disabled":
        from hyper_prag.tracking import log_results

        log_results(results, plots={k: v for k, v in paths.items() if k.endswith("_png")}, project=wandb_project,
                    mode=wandb_mode, save_dir=wandb_dir)
    return results


# ------------------------------------------------------------------------------------------ export-lora


def export_lora(doc_id: str, out: str | Path, *, benchmark: str = assemble.DEFAULT_CORPUS, model: str = DEFAULT_MODEL,
                store: str | Path | None = None, recipe: str | None = None) -> Path:
    """Writes one document's stored LoRA as a PEFT adapter folder (``peft.PeftModel.from_pretrained`` loads it).

    Args:
        doc_id: the document's id in ``benchmark``.
        out: the adapter folder to write.
        benchmark: corpus name or folder that holds the document.
        model: the base model the LoRA was encoded for.
        store: LoRA store folder (default: the cache's store of ``model``); it must exist.
        recipe: which recorded per-document recipe to read (only when the store holds several).

    Returns:
        The adapter folder.
    """
    from hyper_prag.lora import export_peft
    from hyper_prag.sources import StoreSource

    base = assemble.load_model(model)
    corpus = assemble.load_corpus(benchmark)
    lora_store = assemble.open_store(store, model, create=False)
    source = StoreSource(lora_store, assemble.per_doc_from_store(base, lora_store.root, recipe), corpus.doc_qa)
    (lora,) = source.loras([corpus.document(doc_id)])
    folder = export_peft(lora, out, base_model_name_or_path=portable_model_name(model))
    log.info("LoRA of document %s (key %s) -> %s", doc_id, source.names([corpus.document(doc_id)])[0], folder)
    return folder


# Settings an evaluate run records in its config under its own keyword (see recorded_settings).
REPRODUCED: tuple[str, ...] = ("split", "model", "k", "retriever", "combine", "max_new_tokens", "per_type", "limit",
                               "encode_config", "recipe", "hypernet", "store")


def recorded_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The :func:`evaluate` keyword arguments that repeat a run from its recorded ``Results.config``."""
    return {"benchmark": config["benchmark"], **{k: config[k] for k in REPRODUCED if config.get(k) is not None}}


def _source_for(spec: MethodSpec, sources: Mapping[str, LoraSource], corpus: Corpus) -> LoraSource | None:
    """The LoRA source of method ``spec``: its kind's, or for the wrong-document control that source with every
    document's LoRA swapped for its partner's (:class:`~hyper_prag.sources.WrongDocSource`)."""
    from hyper_prag.sources import WrongDocSource

    source = sources.get(spec.lora)
    return WrongDocSource(source, corpus.documents) if spec.wrong_doc and source is not None else source


def _nothing_to_ask(full: Corpus, benchmark: str, split: str | None, question_source: str | None) -> str:
    """Why an evaluation has no documents or no questions, and what to pass instead."""
    if not full.questions:
        return (f"benchmark {benchmark!r} has {len(full.documents)} documents and no questions (a datasets corpus "
                "carries documents only): name its questions with --questions PATH_OR_ID[:SPLIT] and their columns "
                "with --question-columns question=...,answers=...,doc_ids=... (or context=... to find each gold "
                "document by its text); or add questions.jsonl to the corpus folder.")
    with_docs = sorted({d.split for d in full.documents})
    with_questions = sorted({q.split for q in full.questions})
    where = f" from {question_source!r}" if question_source else ""
    return (f"split {split!r} of benchmark {benchmark!r} has {sum(d.split == split for d in full.documents)} "
            f"documents and {sum(q.split == split for q in full.questions)} questions{where}; documents are in "
            f"splits {with_docs}, questions in {with_questions}: choose one of those with --split (a question's split "
            "is its gold documents', or a mapped split column's).")


def _existing_store(root: Path) -> "LoraStore | None":
    """The LoRA store at ``root`` if there is one (read only; nothing is created)."""
    from hyper_prag.store import existing_store

    try:
        return existing_store(root)
    except HyperPragError:
        return None


def _bytes_per_doc(lora_store: "LoraStore | None", keys: Sequence[str]) -> float | None:
    """Mean on-disk bytes of the store entries one method serves (:meth:`~hyper_prag.store.LoraStore.entry_bytes`):
    its own entries only, since a store may also hold other recipes' LoRAs of other sizes. ``None``: no store,
    no keys, or some of them not stored (LoRAs generated on the fly are not stored)."""
    keys = list(dict.fromkeys(keys))
    if lora_store is None or not keys or any(k not in lora_store for k in keys):
        return None
    sizes = lora_store.entry_bytes(keys)
    return sum(sizes.values()) / len(sizes)


def _per_doc_for_evaluate(base, corpus, store_root: Path, encode_config: str | Path | None,
                          recipe: str | None) -> "assemble.PerDoc":
    """The per-document encoder the prag methods read (and encode missing documents) with."""
    if encode_config is not None:
        return assemble.per_doc_from_config(base, corpus, load_encode_config(encode_config), store_root)
    try:
        found = assemble.per_doc_from_store(base, store_root, recipe)
    except HyperPragError:
        if recipe is not None:
            raise
        from hyper_prag.recipes import list_recipes

        if list_recipes(store_root, base.identity, "per-doc"):
            raise  # several recipes: the error lists them and asks for --recipe
        other_models = assemble.other_models_note(base, store_root)
        if other_models:
            log.warning("the store %s has no per-document recipe for this model (%s) Encoding with the encode "
                        "defaults instead.", store_root, other_models)
        else:
            log.info("the store %s has no per-document recipe for this model: using the encode defaults", store_root)
        return assemble.per_doc_from_config(base, corpus, load_encode_config(None), store_root)
    return assemble.per_doc_from_recipe(base, found, store_root)

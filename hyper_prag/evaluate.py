"""The one evaluation harness: every method on the same questions, the same prompt, the same scoring.

Scoring (SQuAD v1.1 style, max over all accepted answer aliases):

- ``normalize_answer``: lower-case; drop thousands separators *inside numbers* ("15,140" → "15140",
  so it matches "15140" and "15,140"; the PRAG reference code splits at the comma and keeps "15");
  other punctuation between digits separates two numbers ("3,4", "1990-1995"); delete the remaining
  punctuation except a decimal point between digits; remove the articles a/an/the; collapse whitespace.
- ``em``: normalised prediction == normalised alias.
- ``f1``: token-level F1 between the two normalised strings.
- ``accuracy`` ("contains"): the normalised alias occurs as whole words inside the normalised
  prediction (small instruction models are verbose: "It was founded in 1873." contains "1873").

Every mean comes with a seeded percentile-bootstrap 95% confidence interval (1,000 resamples of the
questions), per question type and in total. Latency is reported per pipeline stage (median and
mean seconds per question), with peak memory and, when the caller passes them, the offline encoding
cost per document and store bytes per document. :meth:`Results.write` writes ``results.json``,
``results.md`` (one row per method) and the PNG plots of :mod:`hyper_prag.plots`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hyper_prag.errors import HyperPragError
from hyper_prag.pipeline import STAGES, Answer, Method, peak_memory

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("f1", "em", "accuracy")
TOTAL = "total"

_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")  # thousands separator: 15,140 / 1,000,000
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_DIGIT_SEPARATOR = re.compile(r"(?<=\d)[^\w\s.](?=\d)")  # "3,4" / "1990-1995": two numbers, not one
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_KEEP = "\x00"  # placeholder protecting decimal points while punctuation is deleted


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation that keeps numbers whole (see the module docstring).

    Args:
        text: a prediction or an answer alias.

    Returns:
        The normalised string (lower case, single spaces).
    """
    text = text.lower()
    text = _NUMBER_COMMA.sub("", text)
    text = _DIGIT_SEPARATOR.sub(" ", text)
    text = _DECIMAL_POINT.sub(_KEEP, text)
    text = "".join(ch for ch in text if not _is_punctuation(ch)).replace(_KEEP, ".")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1(prediction: str, alias: str) -> float:
    pred, gold = prediction.split(), alias.split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """Scores one prediction against all accepted aliases (max over aliases for every metric).

    Args:
        prediction: the generated answer.
        answers: accepted aliases (non-empty).

    Returns:
        ``{"em": 0|1, "f1": [0, 1], "accuracy": 0|1}``.
    """
    if not answers:
        raise HyperPragError("a question has no accepted answers; every question needs at least one.")
    pred = normalize_answer(prediction)
    golds = [normalize_answer(a) for a in answers]
    padded = f" {pred} "
    return {
        "em": float(any(pred == g for g in golds)),
        "f1": max(_f1(pred, g) for g in golds),
        "accuracy": float(any(g and f" {g} " in padded for g in golds)),
    }


def bootstrap_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean with a percentile-bootstrap confidence interval (resampling questions with replacement).

    Args:
        values: one score per question.
        n_resamples: bootstrap resamples.
        seed: RNG seed (same seed, same interval).
        level: confidence level.

    Returns:
        ``(mean, low, high)``; NaNs for no values.
    """
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))  # (B, n)
    means = x[idx].mean(axis=1)  # (B,)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(x.mean()), float(low), float(high))


# --------------------------------------------------------------------------------------------- results


@dataclass
class MethodResult:
    """One method's scores, latency and costs over the evaluated questions."""

    name: str
    scores: dict[str, dict[str, dict[str, float]]]  # type|"total" -> metric -> {"mean","low","high","n"}
    latency: dict[str, dict[str, float]]  # "median"|"mean" -> stage|"total" -> seconds per question
    memory: dict[str, float]  # peak memory (MiB), see pipeline.peak_memory
    retrievals: float  # mean retriever calls per question
    encode_seconds_per_doc: float | None = None  # offline cost per document (None: not applicable/unknown)
    bytes_per_doc: float | None = None  # LoRA store bytes per document (None: no store)
    wall_seconds: float = 0.0  # wall time of the whole method run
    predictions: list[dict[str, Any]] = field(default_factory=list)  # per question


@dataclass
class Results:
    """Everything one harness run measured."""

    methods: list[MethodResult]
    types: list[str]  # question types, sorted
    config: dict[str, Any] = field(default_factory=dict)

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "types": self.types, "methods": [asdict(m) for m in self.methods]}

    def to_markdown(self) -> str:
        """One row per method: F1 ± CI per type and total, EM, accuracy, retriever calls/question, time/question
        and its breakdown, costs."""
        cols = [f"F1 {t}" for t in self.types] + ["F1 total", "EM", "Acc", "retrievals/q", "s/question",
                                                   "retrieve/lora/apply/generate ms", "enc. s/doc", "bytes/doc",
                                                   "peak RSS MiB"]
        lines = ["| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]

        def pm(cell: Mapping[str, float]) -> str:
            if math.isnan(cell["mean"]):
                return "–"
            return f"{100 * cell['mean']:.1f} ± {100 * (cell['high'] - cell['low']) / 2:.1f}"

        for m in self.methods:
            med = m.latency["median"]
            row = [pm(m.scores[t]["f1"]) for t in self.types] + [pm(m.scores[TOTAL]["f1"]), pm(m.scores[TOTAL]["em"]),
                                                                 pm(m.scores[TOTAL]["accuracy"])]
            row += [f"{m.retrievals:.2f}", f"{med['total']:.3f}", "/".join(f"{1000 * med[s]:.1f}" for s in STAGES),
                    "–" if m.encode_seconds_per_doc is None else f"{m.encode_seconds_per_doc:.2f}",
                    "–" if m.bytes_per_doc is None else f"{m.bytes_per_doc:,.0f}",
                    f"{m.memory.get('max_rss_mib', math.nan):.0f}"]
            lines.append(f"| {m.name} | " + " | ".join(row) + " |")
        n = self.config.get("questions", "?")
        notes = [f"", f"F1/EM/Acc in %, mean ± half-width of the 95% bootstrap CI over {n} questions "
                      f"({self.config.get('n_resamples', 1000)} resamples, seed {self.config.get('seed', 0)}); "
                      "times are medians per question (batch stages divided evenly over the batch); "
                      "peak RSS is the process maximum so far (monotone over methods)."]
        return "\n".join(lines + notes) + "\n"

    def write(self, out: str | Path, plots: bool = True) -> dict[str, Path]:
        """Writes ``results.json``, ``results.md`` and (if ``plots``) ``f1.png`` and ``latency.png`` into ``out``.

        Returns:
            name -> path of every file written.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "results.json", "markdown": out / "results.md"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n", encoding="utf-8")
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        if plots:
            from hyper_prag.plots import plot_f1, plot_latency

            paths["f1_png"] = plot_f1(self, out / "f1.png")
            paths["latency_png"] = plot_latency(self, out / "latency.png")
        return paths


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)


def _summaries(per_question: list[dict[str, float]], types: list[str], all_types: list[str],
               n_resamples: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group in [*all_types, TOTAL]:
        rows = [s for s, t in zip(per_question, types) if group in (TOTAL, t)]
        out[group] = {}
        for metric in METRICS:
            mean, low, high = bootstrap_ci([r[metric] for r in rows], n_resamples, seed)
            out[group][metric] = {"mean": mean, "low": low, "high": high, "n": len(rows)}
    return out


def _latency(answers: Sequence[Answer]) -> dict[str, dict[str, float]]:
    table = {s: np.array([a.timing.get(s, 0.0) for a in answers]) for s in STAGES}  # stage -> (n,)
    table["total"] = sum(table.values())  # (n,)
    return {"median": {s: float(np.median(v)) for s, v in table.items()},
            "mean": {s: float(np.mean(v)) for s, v in table.items()}}


def evaluate(
    methods: Sequence[Method], questions: Sequence[Any], *, costs: Mapping[str, Mapping[str, float | None]] | None = None,
    n_resamples: int = 1000, seed: int = 0, chunk: int = 8, device: Any = None, progress: bool = True,
    config: Mapping[str, Any] | None = None,
) -> Results:
    """Runs every method over the same questions and scores them.

    Args:
        methods: the methods (each has ``name`` and ``answer(questions)``).
        questions: :class:`~hyper_prag.corpus.Question` records (``question``, ``answers``, ``type``, ``id``).
        costs: method name -> ``{"encode_seconds_per_doc": ..., "bytes_per_doc": ...}`` (from the encode
            report / store stats); methods without an entry get ``None``.
        n_resamples: bootstrap resamples per confidence interval.
        seed: bootstrap seed.
        chunk: questions handed to a method per call (the progress bar advances per chunk).
        device: the model's device, for CUDA peak memory.
        progress: show tqdm bars.
        config: recorded in the results (benchmark, split, k, ...).

    Returns:
        The :class:`Results`.
    """
    if not questions:
        raise HyperPragError("no questions to evaluate; check --benchmark, --split and --limit.")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise HyperPragError(f"methods must have distinct names, got {names}.")
    texts = [q.question for q in questions]
    types = [q.type for q in questions]
    all_types = sorted(set(types))
    results: list[MethodResult] = []
    for method in methods:
        if device is not None and str(device).startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        answers: list[Answer] = []
        with tqdm(total=len(texts), desc=f"evaluate {method.name}", unit="q", disable=not progress) as bar:
            for i in range(0, len(texts), chunk):
                answers += method.answer(texts[i : i + chunk])
                bar.update(min(chunk, len(texts) - i))
        wall = time.perf_counter() - start
        per_question = [score(a.prediction, q.answers) for a, q in zip(answers, questions)]
        cost = (costs or {}).get(method.name, {})
        results.append(MethodResult(
            name=method.name,
            scores=_summaries(per_question, types, all_types, n_resamples, seed),
            latency=_latency(answers),
            memory=peak_memory(device),
            retrievals=float(np.mean([a.retrievals for a in answers])),
            encode_seconds_per_doc=cost.get("encode_seconds_per_doc"),
            bytes_per_doc=cost.get("bytes_per_doc"),
            wall_seconds=wall,
            predictions=[{"id": q.id, "type": q.type, "question": q.question, "answers": list(q.answers),
                          "prediction": a.prediction, "doc_ids": list(a.doc_ids), "lora_names": list(a.lora_names),
                          "retrievals": a.retrievals, "timing": dict(a.timing), **s}
                         for a, q, s in zip(answers, questions, per_question)],
        ))
        total = results[-1].scores[TOTAL]
        log.info("%s: F1 %.1f EM %.1f Acc %.1f, %.3f s/question (median)", method.name, 100 * total["f1"]["mean"],
                 100 * total["em"]["mean"], 100 * total["accuracy"]["mean"], results[-1].latency["median"]["total"])
    cfg = {"questions": len(questions), "n_resamples": n_resamples, "seed": seed, **(config or {})}
    return Results(results, all_types, cfg)


# ------------------------------------------------------------------------------------------------- CLI


def select_questions(questions: Sequence[Any], per_type: int | None = None, limit: int | None = None) -> list[Any]:
    """The questions a run evaluates: the first ``per_type`` of each type (corpus order kept), then the first ``limit``.

    Benchmarks list their questions grouped by type, so ``limit`` alone would take one type only.
    """
    chosen = list(questions)
    if per_type:
        taken: Counter[str] = Counter()
        kept = []
        for q in chosen:
            if taken[q.type] < per_type:
                taken[q.type] += 1
                kept.append(q)
        chosen = kept
    return chosen[:limit] if limit else chosen


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hyper-prag evaluate``."""
    from hyper_prag.pipeline import DYNAMIC_METHODS, METHOD_NAMES, add_pipeline_arguments

    parser.add_argument("--methods", default="closed-book,rag,prag",
                        help=f"comma-separated methods: {','.join(METHOD_NAMES + DYNAMIC_METHODS)}")
    add_pipeline_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions of the split")
    parser.add_argument("--per-type", type=int, default=None,
                        help="evaluate the first N questions of each question type (before --limit)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per retrieval/generation batch")
    parser.add_argument("--chunk-size", type=int, default=4, help="documents per LoRA bank when encoding missing ones")
    parser.add_argument("--no-encode", action="store_true", help="fail instead of encoding documents missing from the store")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per confidence interval")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--out", default="results/evaluate", help="folder for results.json, results.md and plots")


# Settings a run records in its config under the argument's own name (dest); see evaluate_argv.
REPRODUCED: tuple[str, ...] = ("split", "model", "k", "retriever", "combine", "max_new_tokens", "per_type", "limit",
                               "encode_config", "hypernet", "store")


def evaluate_argv(config: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    """The ``hyper-prag evaluate`` arguments that reproduce a run from its recorded ``config``.

    Args:
        config: ``Results.config`` (``results.json``'s ``"config"``).
        methods: the methods to run.

    Returns:
        ``--benchmark``, ``--methods`` and every :data:`REPRODUCED` setting that differs from the CLI default.
    """
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    argv = ["--benchmark", str(config["benchmark"]), "--methods", ",".join(methods)]
    for key in REPRODUCED:
        value = config.get(key)
        if value is not None and value != parser.get_default(key):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def run_evaluate(args: argparse.Namespace) -> Results:
    """Runs ``hyper-prag evaluate``: builds the pipeline and methods, encodes missing LoRAs, scores, writes files."""
    from hyper_prag.pipeline import (DYNAMIC_METHODS, RECIPES, HypernetSource, Pipeline, StoreSource, build_augment,
                                     default_store, load_benchmark, load_model, per_doc_setup)
    from hyper_prag.retrieve import build_or_load

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in RECIPES and m not in DYNAMIC_METHODS]
    if unknown or not names:
        raise HyperPragError(f"unknown methods {unknown}; choose from {', '.join([*RECIPES, *DYNAMIC_METHODS])}.")
    base = load_model(args.model, args.device)
    full = load_benchmark(args.benchmark)
    corpus = full.split(args.split) if args.split else full
    questions = select_questions(corpus.questions, args.per_type, args.limit)
    if not corpus.documents or not questions:
        raise HyperPragError(f"benchmark {args.benchmark!r} split {args.split!r} has {len(corpus.documents)} "
                             f"documents and {len(questions)} questions; choose another --split.")
    retriever = build_or_load(args.retriever, corpus, device=args.device)
    recipes = [RECIPES[m] for m in names if m in RECIPES]  # flare/dragin need no LoRAs or augmentation here
    kinds = {kind for _, _, kind in recipes}
    contexts = {context for _, context, _ in recipes}
    # The documents the evaluated questions retrieve: what the prag methods need LoRAs for.
    hits = retriever.search([q.question for q in questions], args.k)
    needed = [corpus.document(i) for i in dict.fromkeys(h.doc_id for row in hits for h in row)]
    costs: dict[str, dict[str, float | None]] = {}
    sources: dict[str, Any] = {}
    augment = None
    if "store" in kinds or "augmented" in contexts:
        setup = per_doc_setup(base, full, args.encode_config)
        augment = build_augment(base, full, setup.augment_config)
        if "augmented" in contexts:
            start = time.perf_counter()
            augment(needed)  # augmentation is offline work: done (or read from its cache) before timing
            costs["da-rag"] = {"encode_seconds_per_doc": (time.perf_counter() - start) / max(1, len(needed)),
                               "bytes_per_doc": None}
        if "store" in kinds:
            from hyper_prag.encode import encode_corpus
            from hyper_prag.store import LoraStore

            store = LoraStore(args.store or default_store(args.model))
            source = StoreSource.for_encoder(store, setup.encoder, base, setup.augment_config, setup.spec)
            missing = store.missing(source.names(needed))
            if missing and args.no_encode:
                raise HyperPragError(f"{len(missing)} retrieved documents have no LoRA in {store.root}; "
                                     "run `hyper-prag encode` or drop --no-encode.")
            report = encode_corpus(needed, setup.encoder, store, base, setup.augment_config, args.chunk_size,
                                   corpus=full, spec=setup.spec)
            stats = store.stats()
            # The cost of the LoRAs this run uses, as recorded when each was encoded (now or by an earlier run).
            recorded = [store.meta(key).get("seconds") for key in source.names(needed)]
            recorded = [s for s in recorded if s is not None]
            enc = sum(recorded) / len(recorded) if recorded else (report.seconds_per_doc if report.encoded else None)
            for m in ("prag", "prag-both"):
                costs[m] = {"encode_seconds_per_doc": enc, "bytes_per_doc": stats.get("bytes_per_document")}
            sources["store"] = source
    if "hypernet" in kinds:
        if not args.hypernet:
            raise HyperPragError("the hypernet methods need --hypernet CHECKPOINT.")
        source = HypernetSource.from_checkpoint(args.hypernet, base)
        start = time.perf_counter()
        source.loras(needed)  # generation cost per document (the online path pays it in its `lora` stage)
        per_doc = (time.perf_counter() - start) / max(1, len(needed))
        for m in ("hypernet", "hypernet-both"):
            costs[m] = {"encode_seconds_per_doc": per_doc, "bytes_per_doc": None}
        sources["hypernet"] = source
    pipeline = Pipeline(base, retriever, corpus, k=args.k, max_new_tokens=args.max_new_tokens,
                        combine_mode=args.combine, batch_size=args.batch_size, augment=augment)
    methods = [pipeline.method(m, sources.get(RECIPES[m][2]) if m in RECIPES else None) for m in names]
    config = {"benchmark": args.benchmark, "split": args.split, "model": args.model, "base_identity": base.identity,
              "k": args.k, "retriever": args.retriever, "combine": args.combine, "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "limit": args.limit, "per_type": args.per_type, "store": args.store,
              "hypernet": args.hypernet,
              "hypernet_sha256": sources["hypernet"].encoder.sha256 if "hypernet" in sources else None,
              "encode_config": args.encode_config, "documents_retrieved": len(needed)}
    results = evaluate(methods, questions, costs=costs, n_resamples=args.resamples, seed=args.seed,
                       chunk=args.batch_size, device=args.device, config=config)
    paths = results.write(args.out)
    print(results.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results

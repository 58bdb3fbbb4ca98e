"""Which per-document recipe injects a document's facts into SmolLM2, and at what encoding cost (oracle study).

    python benchmarks/perdoc_recipe.py --docs 24 --factors lr,epochs,n_qa,loss_on --interference
    python benchmarks/perdoc_recipe.py                                  # every factor, 100 documents (hours on 2 cores)
    python benchmarks/perdoc_recipe.py --base lr=3e-3 --factors rank,modules --docs 48
    python benchmarks/perdoc_recipe.py --base lr=3e-3 --factors epochs=1 --extra epochs=1,n_qa=10   # a combined candidate
    python benchmarks/perdoc_recipe.py --plan                           # the recipes and their steps, nothing run
    python benchmarks/perdoc_recipe.py --split val --docs 24 --base source=extractive,lr=3e-3,epochs=3 \
        --factors lr=1e-3,lr=1e-2,epochs=2,source=llm-fewshot      # a recipe for corpora without QA pairs

Every single-fact (``lookup``) question of the fictional benchmark names one document. Each question is
answered under **its own document's LoRA alone** (oracle: no retrieval, no summing), through the online
path (``Pipeline.answer_given``, no passage in the prompt, greedy decoding), for ``--docs`` documents of
``--split`` drawn with ``--seed`` (default ``test``; choose a recipe on ``val`` documents, then report it on
test questions it was not chosen on). Recipes move ONE factor at a time away from a base
recipe (:data:`BASE`, changed with ``--base``); :data:`FACTORS` lists the levels of every factor, and any
``field=value`` in ``--factors`` is one more level. The augmentation source is a factor like the others:
``template`` (the benchmark's templated pairs), ``llm`` / ``llm-fewshot`` (SmolLM2 self-augmentation),
``extractive`` (no LLM) or ``both``; only ``template`` and ``both`` read the templated pairs, so a study with
``--base source=extractive`` measures what a corpus that brings no QA pairs gets.

Rows of the table:

* every recipe: oracle F1 / EM / "answer contained" with 95% bootstrap CIs, the paired F1 difference to
  the base recipe (bootstrap over the same questions), the median answer length in tokens, training
  steps per document and encoding seconds per document: **CPU seconds** of this process (augmentation +
  training; with ``OMP_NUM_THREADS=1`` the time one idle core would take, whatever else runs on the
  machine) and wall seconds. The Pareto front of F1 against CPU s/doc is marked.
* ``closed-book``: the base model with no LoRA.
* ``wrong-doc`` (per recipe): each question under another study document's LoRA of the same recipe. A
  gain this control shows too is answer format, not the document's knowledge.

``--interference``: the same questions under the combination of k LoRAs of one recipe, the question's
own document and k − 1 others (the best BM25 matches among the study documents, or random ones), with
the paper's sum and the fixes of :mod:`hyper_prag.combine` (mean, 1/√k, BM25-softmax weights, Frobenius
renormalisation), against the oracle LoRA alone.

Cache (``--cache``, default ``runs/perdoc_recipe``): one folder per recipe (a hash of its settings and the
base model) holding ``recipe.json``, a :class:`~hyper_prag.store.LoraStore` of its document LoRAs (content
keys, :func:`hyper_prag.store.store_key`, with each LoRA's encoding cost in its metadata) and, for warm-up
recipes, the warm-up LoRA; generated answers are cached by the exact LoRAs and questions they used. A killed
run re-uses everything it finished; a second run of the same command trains and generates nothing.

Outputs (``--out``, default ``results/perdoc_recipe``): ``perdoc_recipe.json``, ``perdoc_recipe.md`` and
``perdoc_recipe.png`` (F1 against CPU s/doc, CIs, Pareto front, closed-book and wrong-document lines).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from hyper_prag import extractive
from hyper_prag.augment import AugmentConfig, AugmentedDocument, augment_documents
from hyper_prag.combine import combine, combine_renormalized, scale, softmax_weights
from hyper_prag.corpus import Corpus, Document, Question
from hyper_prag.encoders.per_doc import PerDocConfig, PerDocEncoder, document_sequences, train_warmup_lora
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, LoraSpec, load_lora, save_lora
from hyper_prag.model import FFN_MODULES, BaseModel
from hyper_prag.pipeline import Pipeline
from hyper_prag.scoring import bootstrap_ci, score, summarize
from hyper_prag.store import LoraStore, store_key

log = logging.getLogger("perdoc_recipe")

# template: the benchmark's QA pairs | llm / llm-fewshot: self-augmentation by the base model (paper §3.2; the
# few-shot prompt with validated pairs) | extractive: questions from the document's own sentences (no LLM) |
# both: template and llm merged. Only template and both read the corpus's templated pairs (Corpus.doc_qa).
Source = Literal["template", "llm", "llm-fewshot", "extractive", "both"]
TEMPLATED: tuple[str, ...] = ("template", "both")  # the sources that read Corpus.doc_qa


# ------------------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class EncodeRecipe:
    """One way to encode a document: augmentation, trainer and LoRA shape (every field enters the cache key)."""

    source: Source = "template"  # see Source: template | llm | llm-fewshot | extractive | both
    n_qa: int = 3  # QA pairs per source (template: the first n of its 4-10 pairs; 0: all it has; paper: 3)
    n_rewrites: int = 0  # rewrites d_i^k besides the document (template, extractive: sentence re-orderings; paper: 1)
    trainer: PerDocConfig = PerDocConfig(lr=1e-3, epochs=2)  # lr, epochs, loss_on, init, ...
    rank: int = 2  # LoRA rank r (paper: 2)
    alpha: float = 32.0  # ΔW = alpha / r · B A (paper: 32)
    target_modules: tuple[str, ...] = FFN_MODULES  # linears adapted in every layer (paper: the FFN)
    warmup_docs: int = 16  # init="warmup": held-out (train split) documents the warm-up LoRA trains on
    warmup_steps: int = 64  # init="warmup": warm-up sequences (steps)

    def __post_init__(self) -> None:
        if self.source not in get_args(Source):
            raise HyperPragError(f"unknown augmentation source {self.source!r}; use one of {get_args(Source)}.")
        if self.source in ("llm", "llm-fewshot") and self.n_qa <= 0:  # the LLM is asked for n_qa pairs
            raise HyperPragError(f"source {self.source!r} with n_qa {self.n_qa} asks the LLM for no QA pair; give "
                                 f"n_qa too, e.g. --extra source={self.source},n_qa=3.")

    def settings(self) -> dict[str, Any]:
        return {**asdict(self), "trainer": self.trainer.settings(), "target_modules": list(self.target_modules)}

    def id(self, base_identity: str) -> str:
        """16 hex digits naming this recipe for this base model (its cache folder)."""
        payload = json.dumps({"recipe": self.settings(), "base": base_identity}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# The base of the sweep: the benchmark's templated QA (LLM-free, so a study run measures the trainer, not
# the augmenter), no rewrites, the paper's rank 2 / alpha 32 on the FFN, lr 1e-3 for 2 epochs (the paper's
# 3e-4 was tuned on 1B-8B models) and random initialisation: 6 steps per document.
BASE = EncodeRecipe()

# One factor at a time: factor -> its levels, each a set of overrides of the base recipe.
FACTORS: dict[str, list[dict[str, Any]]] = {
    "epochs": [{"epochs": 1}, {"epochs": 4}],
    "lr": [{"lr": 3e-4}, {"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}],
    "n_qa": [{"n_qa": 10}, {"n_qa": 20}],
    "source": [{"source": "llm"}, {"source": "both"}, {"source": "extractive"}, {"source": "llm-fewshot"}],
    "rewrites": [{"n_rewrites": 1}],
    "loss_on": [{"loss_on": "answer"}],
    "rank": [{"rank": 4}, {"rank": 8}],
    "modules": [{"target_modules": ("down_proj",)}, {"target_modules": ("gate_proj", "up_proj")}],
    "init": [{"init": "warmup"}],
    "examples": [{"examples": False}],
    "qa_context": [{"qa_context": "none"}],
}
_TRAINER_FIELDS = {f.name for f in fields(PerDocConfig)}
_RECIPE_FIELDS = {f.name for f in fields(EncodeRecipe)} - {"trainer"}


def with_overrides(recipe: EncodeRecipe, overrides: Mapping[str, Any]) -> EncodeRecipe:
    """The recipe with some fields changed; trainer fields (``lr``, ``epochs``, ``loss_on``, …) by their own name.

    Args:
        recipe: the starting recipe.
        overrides: field -> value.

    Returns:
        The new recipe.
    """
    unknown = set(overrides) - _TRAINER_FIELDS - _RECIPE_FIELDS
    if unknown:
        raise HyperPragError(f"unknown recipe field(s) {sorted(unknown)}; use {sorted(_RECIPE_FIELDS | _TRAINER_FIELDS)}.")
    top = {k: v for k, v in overrides.items() if k in _RECIPE_FIELDS}
    trainer = {k: v for k, v in overrides.items() if k in _TRAINER_FIELDS}
    return replace(recipe, **top, trainer=replace(recipe.trainer, **trainer))


def parse_override(text: str) -> tuple[str, Any]:
    """``"lr=3e-3"`` -> ``("lr", 0.003)``, typed like the field's default; modules join with ``+``."""
    if "=" not in text:
        raise HyperPragError(f"--base takes field=value, got {text!r} (e.g. lr=3e-3, n_qa=10, target_modules=down_proj).")
    key, value = (s.strip() for s in text.split("=", 1))
    default = getattr(BASE.trainer, key) if key in _TRAINER_FIELDS else getattr(BASE, key, None)
    if key not in _TRAINER_FIELDS | _RECIPE_FIELDS:
        raise HyperPragError(f"unknown recipe field {key!r}; use {sorted(_RECIPE_FIELDS | _TRAINER_FIELDS)}.")
    if isinstance(default, tuple):
        return key, tuple(v for v in value.split("+") if v)
    if isinstance(default, bool):
        return key, value.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return key, int(value)
    if isinstance(default, float):
        return key, float(value)
    return key, value


def label_of(overrides: Mapping[str, Any]) -> str:
    """A row name such as ``lr=0.003`` or ``target_modules=down_proj``; ``base`` for no override."""
    if not overrides:
        return "base"
    parts = []
    for k, v in overrides.items():
        parts.append(f"{k}={'+'.join(v) if isinstance(v, tuple) else f'{v:g}' if isinstance(v, float) else v}")
    return ",".join(parts)


def plan(base_recipe: EncodeRecipe, factors: Sequence[str],
         extra: Sequence[Mapping[str, Any]] = ()) -> dict[str, tuple[str, EncodeRecipe]]:
    """The recipes of a study: ``label -> (factor, recipe)``, the base first, then each factor's levels.

    Args:
        base_recipe: the base of the sweep.
        factors: names of :data:`FACTORS` (all their levels) or single levels ``field=value`` (:func:`parse_override`,
            e.g. ``lr=3e-3``, ``source=llm-fewshot``), filed under the factor of :data:`FACTORS` that varies that field.
        extra: further recipes, each a set of overrides of the base changing several fields at once
            (factor ``combined``), e.g. a candidate default assembled from the best level of each factor.

    A level that equals the base recipe (e.g. ``--base lr=3e-3`` and the lr level 3e-3) is left out.
    """
    unknown = [f for f in factors if f not in FACTORS and "=" not in f]
    if unknown:
        raise HyperPragError(f"unknown factor(s) {unknown}; choose from {sorted(FACTORS)} or give a level as "
                             "field=value (e.g. lr=3e-3).")
    factor_of = {key: factor for factor, group in FACTORS.items() for level in group for key in level}
    recipes = {"base": ("base", base_recipe)}
    for name in factors:
        if name in FACTORS:
            chosen = [(name, level) for level in FACTORS[name]]
        else:
            key, value = parse_override(name)
            chosen = [(factor_of.get(key, key), {key: value})]
        for factor, level in chosen:
            recipe = with_overrides(base_recipe, level)
            if recipe != base_recipe:
                recipes[label_of(level)] = (factor, recipe)
    for overrides in extra:
        recipe = with_overrides(base_recipe, overrides)
        if recipe != base_recipe:
            recipes[label_of(overrides)] = ("combined", recipe)
    return recipes


def drop_duplicate_levels(recipes: Mapping[str, tuple[str, EncodeRecipe]], corpus: Corpus, docs: Sequence[Document]
                          ) -> tuple[dict[str, tuple[str, EncodeRecipe]], dict[str, str]]:
    """Leaves out recipes that would train on the same pairs as an earlier one (n_qa above the pairs there are).

    The template source takes the first ``n_qa`` of a document's pairs and the extractive source the first
    ``n_qa`` it writes, so for either every ``n_qa`` at or above the most pairs any study document has (or
    gets) gives the same data (but another cache key).

    Returns:
        ``(kept recipes, {dropped label: the label it duplicates})``.
    """
    most = {"template": max((len(corpus.doc_qa.get(d.id, ())) for d in docs), default=0),
            "extractive": max((len(extractive.extract_qa(d.text, d.title)) for d in docs), default=0)}
    kept: dict[str, tuple[str, EncodeRecipe]] = {}
    seen: dict[EncodeRecipe, str] = {}
    dropped: dict[str, str] = {}
    for label, (factor, recipe) in recipes.items():
        effective = recipe
        if recipe.source in most and (recipe.n_qa <= 0 or recipe.n_qa >= most[recipe.source]):
            effective = replace(recipe, n_qa=most[recipe.source])
        if effective in seen:
            dropped[label] = seen[effective]
            continue
        seen[effective] = label
        kept[label] = (factor, recipe)
    return kept, dropped


# ------------------------------------------------------------------------------------------- study data


def study_questions(corpus: Corpus, n_docs: int, seed: int = 0, split: str = "test") -> tuple[list[Document], list[Question]]:
    """The single-fact questions of ``split`` (one per document), ``n_docs`` of them drawn with ``seed``.

    Returns:
        ``(documents, questions)``, question i about document i.
    """
    part = corpus.split(split)
    lookups = sorted((q for q in part.questions if q.type == "lookup" and len(q.doc_ids) == 1), key=lambda q: q.id)
    random.Random(seed).shuffle(lookups)
    chosen, seen = [], set()
    for q in lookups:
        if q.doc_ids[0] not in seen and len(chosen) < n_docs:
            chosen.append(q)
            seen.add(q.doc_ids[0])
    if not chosen:
        raise HyperPragError(f"corpus {corpus.name!r} has no single-document 'lookup' question in split {split!r}.")
    return [part.document(q.doc_ids[0]) for q in chosen], chosen


def augment_for(recipe: EncodeRecipe, docs: Sequence[Document], base: BaseModel, corpus: Corpus,
                cache: Path) -> list[AugmentedDocument]:
    """The augmented documents of a recipe; ``both`` merges the template's and the LLM's QA pairs and rewrites.

    Only the :data:`TEMPLATED` sources are handed the corpus: ``extractive``, ``llm`` and ``llm-fewshot`` see the
    documents alone, as they would on a user's corpus that brings no QA pairs.
    """
    def one(source: str) -> list[AugmentedDocument]:
        config = AugmentConfig(n_rewrites=recipe.n_rewrites, n_qa=recipe.n_qa, source=source)  # type: ignore[arg-type]
        return augment_documents(docs, config, base=base, corpus=corpus if source in TEMPLATED else None, cache=cache)

    if recipe.source != "both":
        return one(recipe.source)
    template, llm = one("template"), one("llm")
    return [AugmentedDocument(t.doc_id, t.text, tuple(dict.fromkeys(l.rewrites + t.rewrites)),
                              tuple(dict.fromkeys(t.qa + l.qa))) for t, l in zip(template, llm)]


def augmentation_settings(recipe: EncodeRecipe, base: BaseModel) -> dict[str, Any]:
    """What defines a recipe's augmented data (the augmenting model included for LLM sources)."""
    def one(source: str) -> dict[str, Any]:
        return AugmentConfig(n_rewrites=recipe.n_rewrites, n_qa=recipe.n_qa, source=source).settings(base)  # type: ignore[arg-type]

    if recipe.source == "both":
        return {"source": "both", "template": one("template"), "llm": one("llm")}
    return one(recipe.source)


def check_targets(base: BaseModel, modules: Sequence[str]) -> None:
    """Raises unless every target module is a linear of the model's decoder layers the injector can adapt (its FFN
    linears and the attention projections it has as separate linears: ``BaseModel.linear_modules``)."""
    bad = [m for m in modules if m not in base.linear_modules]
    if bad:
        raise HyperPragError(f"target modules {bad} are not linears of {base.name}'s decoder layers; choose from "
                             f"{list(base.linear_modules)}.")


# --------------------------------------------------------------------------------------------- encoding


@dataclass
class RecipeLoras:
    """The LoRAs one recipe made for the study documents, their store keys and encoding cost."""

    recipe: EncodeRecipe
    folder: Path
    loras: dict[str, Lora]  # doc id -> LoRA (read back from the store)
    keys: dict[str, str]  # doc id -> store key
    meta: dict[str, dict]  # doc id -> {"cpu_seconds", "seconds", "steps", ...} as recorded at encoding
    trained: int  # documents trained by this call (0: all from the cache)
    warmup: dict | None = None  # warm-up LoRA cost, for init="warmup"


def _warmup(base: BaseModel, corpus: Corpus, recipe: EncodeRecipe, spec: LoraSpec, folder: Path,
            cache: Path) -> tuple[Lora, dict]:
    """The recipe's warm-up LoRA (paper Table 2), trained once on held-out train-split documents and cached."""
    path, info = folder / "warmup.safetensors", folder / "warmup.json"
    if path.is_file() and info.is_file():
        return load_lora(path), json.loads(info.read_text())
    held = list(corpus.split("train").documents)[: recipe.warmup_docs]
    if not held:
        raise HyperPragError("init='warmup' needs held-out documents: the corpus has no 'train' split.")
    cpu, wall = time.process_time(), time.perf_counter()
    held_aug = augment_for(recipe, held, base, corpus, cache)
    lora = train_warmup_lora(base, spec, held_aug, recipe.trainer, max_steps=recipe.warmup_steps)
    cost = {"cpu_seconds": time.process_time() - cpu, "seconds": time.perf_counter() - wall,
            "docs": len(held), "steps": recipe.warmup_steps}
    save_lora(lora, path)
    info.write_text(json.dumps(cost))
    return lora, cost


def encode_recipe(base: BaseModel, corpus: Corpus, recipe: EncodeRecipe, docs: Sequence[Document], root: Path,
                  chunk_size: int = 4) -> RecipeLoras:
    """Encodes the documents with one recipe, training only those its store does not hold yet.

    Documents train in banks of ``chunk_size`` (sorted by length, so little padding); each chunk's CPU and
    wall seconds (augmentation + training) are divided over its documents and recorded with their LoRAs.

    Args:
        base: the frozen base model.
        corpus: the corpus (template QA; its train split for warm-up).
        recipe: the recipe.
        docs: the study documents.
        root: the study cache; the recipe's folder is ``root/recipes/<id>``.
        chunk_size: documents per LoRA bank.

    Returns:
        The :class:`RecipeLoras`, every LoRA read back from the store (so a resumed run sees the same tensors).
    """
    check_targets(base, recipe.target_modules)
    folder = root / "recipes" / recipe.id(base.identity)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.json").write_text(json.dumps({"recipe": recipe.settings(), "base": base.identity}, indent=2))
    augment_cache = root / "augment"
    spec = LoraSpec(rank=recipe.rank, alpha=recipe.alpha, target_modules=tuple(recipe.target_modules)).for_model(base)
    warmup, warmup_cost = (None, None)
    if recipe.trainer.init == "warmup":
        warmup, warmup_cost = _warmup(base, corpus, recipe, spec, folder, augment_cache)
    encoder = PerDocEncoder(base, spec, recipe.trainer, warmup=warmup)
    augmentation = augmentation_settings(recipe, base)
    keys = {d.id: store_key(d.text, base.identity, spec, augmentation, encoder.settings()) for d in docs}
    store = LoraStore(folder / "store")
    missing = set(store.missing(keys.values()))
    todo = sorted((d for d in docs if keys[d.id] in missing), key=lambda d: len(d.text))
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        cpu, wall = time.process_time(), time.perf_counter()
        augmented = augment_for(recipe, chunk, base, corpus, augment_cache)
        steps = [len(document_sequences(base, aug, recipe.trainer)) * recipe.trainer.epochs for aug in augmented]
        loras = encoder.encode(augmented)
        cpu_s, wall_s = (time.process_time() - cpu) / len(chunk), (time.perf_counter() - wall) / len(chunk)
        store.put_many([(keys[d.id], lora, {"doc_id": d.id, "cpu_seconds": cpu_s, "seconds": wall_s, "steps": n,
                                            "qa_pairs": len(aug.qa), "variants": len(aug.variants)})
                        for d, lora, aug, n in zip(chunk, loras, augmented, steps)])
        log.info("recipe %s: %d/%d documents encoded (%.1f CPU s/doc)", folder.name, start + len(chunk), len(todo), cpu_s)
    ordered = [keys[d.id] for d in docs]
    loras = dict(zip((d.id for d in docs), store.get_many(ordered, base_model=base.identity)))
    meta = {d.id: store.meta(keys[d.id]) for d in docs}
    return RecipeLoras(recipe, folder, loras, keys, meta, len(todo), warmup_cost)


# ------------------------------------------------------------------------------------------- answering


class _Table:
    """A LoRA source over a fixed table (``hyper_prag.methods.LoraSource``): one LoRA per pseudo-document."""

    name = "table"

    def __init__(self, table: Mapping[str, Lora]) -> None:
        self.table = table

    def loras(self, documents: Sequence[Document]) -> list[Lora]:
        return [self.table[d.id] for d in documents]

    def names(self, documents: Sequence[Document]) -> list[str]:
        return [f"table:{d.id}" for d in documents]


@dataclass
class Answerer:
    """Answers questions each under a LoRA of its own (or none) through the online path, with a disk cache."""

    base: BaseModel
    cache: Path  # generated answers, one JSON per (model, LoRAs, questions, budget)
    batch_size: int = 8
    max_new_tokens: int = 16
    generated: int = 0  # questions answered by the model (not from the cache) so far

    def __call__(self, questions: Sequence[Question], loras: Sequence[Lora | None], names: Sequence[str | None]) -> list[str]:
        """Greedy answers; question i uses ``loras[i]`` (``names[i]`` identifies it exactly, e.g. its store keys).

        Each question stands in as a pseudo-document whose "LoRA" is the given one, so the pipeline's own
        combine (of one LoRA: the identity), stacking and injection apply it; no passage enters the prompt.
        """
        payload = json.dumps({"base": self.base.identity, "max_new_tokens": self.max_new_tokens,
                              "rows": [[q.id, q.question, n] for q, n in zip(questions, names)]}, sort_keys=True)
        path = self.cache / f"{hashlib.sha256(payload.encode()).hexdigest()[:24]}.json"
        if path.is_file():
            return json.loads(path.read_text())["predictions"]
        docs = [Document(id=q.id, title="", text=q.question) for q in questions]
        pipeline = Pipeline(self.base, None, Corpus("perdoc-recipe", tuple(docs)), max_new_tokens=self.max_new_tokens,
                            batch_size=self.batch_size, single_mode="side")
        table = {d.id: lora for d, lora in zip(docs, loras) if lora is not None}
        given = [[d] if lora is not None else [] for d, lora in zip(docs, loras)]
        answers = pipeline.answer_given([q.question for q in questions], given, "none", _Table(table) if table else None)
        predictions = [a.prediction for a in answers]
        self.generated += len(questions)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"predictions": predictions}))
        return predictions


def score_row(questions: Sequence[Question], predictions: Sequence[str], tokenizer, resamples: int = 1000,
              seed: int = 0, reference: Sequence[float] | None = None) -> dict[str, Any]:
    """F1 / EM / answer-contained with 95% CIs, median answer tokens, and the paired ΔF1 to ``reference``.

    Args:
        questions: the questions.
        predictions: one answer per question.
        tokenizer: counts answer tokens.
        resamples: bootstrap resamples.
        seed: bootstrap seed.
        reference: per-question F1 of the reference row (same questions), for the paired difference.

    Returns:
        A row dict (means in [0, 1]); ``per_question_f1`` keeps the scores for later pairing.
    """
    scored = [score(p, q.answers) for q, p in zip(questions, predictions)]
    total = summarize(scored, ["lookup"] * len(scored), [], n_resamples=resamples, seed=seed)["total"]
    row: dict[str, Any] = {"n": len(scored)}
    for metric, cell in total.items():
        row[metric], row[f"{metric}_ci"] = cell["mean"], [cell["low"], cell["high"]]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions]
    row["median_answer_tokens"] = statistics.median(lengths) if lengths else math.nan
    row["per_question_f1"] = [s["f1"] for s in scored]
    if reference is not None:
        mean, low, high = bootstrap_ci([s["f1"] - r for s, r in zip(scored, reference)], resamples, seed)
        row["delta_f1"], row["delta_f1_ci"] = mean, [low, high]
    return row


# ------------------------------------------------------------------------------------------ interference


FIXES: dict[str, str] = {
    "sum": "Σ ΔW_i (the paper's merge: rank concatenation)",
    "mean": "(1/k) Σ ΔW_i (= 1/k · sum)",
    "sum/sqrt(k)": "(1/√k) Σ ΔW_i",
    "bm25-softmax": "Σ softmax(BM25)_i ΔW_i",
    "renorm-max": "Σ ΔW_i rescaled per module and layer to max_i ‖ΔW_i‖_F",
}


def combined_loras(loras: Sequence[Lora], scores: Sequence[float]) -> dict[str, Lora]:
    """Every fix of :data:`FIXES` applied to one question's k LoRAs (its own first) and their BM25 scores."""
    k = len(loras)
    return {
        "sum": combine(loras, "sum"),
        "mean": combine(loras, "mean"),
        "sum/sqrt(k)": scale(combine(loras, "sum"), 1 / math.sqrt(k)),
        "bm25-softmax": combine(loras, "sum", softmax_weights(scores)),
        "renorm-max": combine_renormalized(loras, target="max"),
    }


def companions(questions: Sequence[Question], docs: Sequence[Document], k: int, others: Literal["bm25", "random"],
               seed: int = 0) -> tuple[list[list[str]], list[list[float]]]:
    """For each question: its own document then k − 1 other study documents, and the BM25 score of each.

    ``bm25``: the others are the best BM25 matches of the question among the study documents (topped up
    at random when fewer share a term with it); ``random``: drawn with ``seed``.
    """
    from hyper_prag.retrieve import BM25Retriever

    retriever = BM25Retriever.build(Corpus("perdoc-recipe-study", tuple(docs)))
    hits = retriever.search([q.question for q in questions], k=len(docs))
    rng = random.Random(seed)
    ids, scores = [], []
    for q, row in zip(questions, hits):
        own, by_id = q.doc_ids[0], {h.doc_id: h.score for h in row}
        ranked = [h.doc_id for h in row if h.doc_id != own] if others == "bm25" else []
        rest = [d.id for d in docs if d.id != own and d.id not in ranked]
        rng.shuffle(rest)
        chosen = [own, *(ranked + rest)[: k - 1]]
        ids.append(chosen)
        scores.append([by_id.get(d, 0.0) for d in chosen])
    return ids, scores


def interference(answer: Answerer, questions: Sequence[Question], docs: Sequence[Document], encoded: RecipeLoras,
                 k: int = 3, others: Literal["bm25", "random"] = "bm25", resamples: int = 1000,
                 seed: int = 0, tokenizer=None) -> dict[str, Any]:
    """Oracle LoRA alone vs the k-document combinations of every fix, on the same questions.

    Returns:
        ``{"k", "others", "rows": {name: row}, "own_softmax_weight"}``; each fix row has the paired ΔF1 to the oracle.
    """
    ids, scores = companions(questions, docs, k, others, seed)
    oracle_pred = answer(questions, [encoded.loras[q.doc_ids[0]] for q in questions],
                         [encoded.keys[q.doc_ids[0]] for q in questions])
    oracle = score_row(questions, oracle_pred, tokenizer, resamples, seed)
    rows = {"oracle (own LoRA alone)": oracle}
    per_fix: dict[str, list[Lora]] = {name: [] for name in FIXES}
    for row_ids, row_scores in zip(ids, scores):
        for name, lora in combined_loras([encoded.loras[d] for d in row_ids], row_scores).items():
            per_fix[name].append(lora)
    for name in FIXES:
        names = [json.dumps([name, [encoded.keys[d] for d in row_ids], row_scores]) for row_ids, row_scores in zip(ids, scores)]
        predictions = answer(questions, per_fix[name], names)
        rows[name] = score_row(questions, predictions, tokenizer, resamples, seed, reference=oracle["per_question_f1"])
        rows[name]["what"] = FIXES[name]
    own_weight = [softmax_weights(s)[0] for s in scores]
    return {"k": k, "others": others, "rows": rows, "own_softmax_weight_mean": sum(own_weight) / len(own_weight),
            "companions": {q.id: row_ids for q, row_ids in zip(questions, ids)}}


# --------------------------------------------------------------------------------------------- the study


def run_study(base: BaseModel, corpus: Corpus, docs: Sequence[Document], questions: Sequence[Question],
              recipes: Mapping[str, tuple[str, EncodeRecipe]], root: Path, *, chunk_size: int = 4,
              batch_size: int = 8, max_new_tokens: int = 16, resamples: int = 1000, seed: int = 0,
              interference_recipe: str | None = None, k: int = 3, others: Literal["bm25", "random"] = "bm25",
              progress: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Encodes the documents with every recipe (cached) and scores the oracle, control and closed-book rows.

    Args:
        base: the frozen base model.
        corpus: the corpus (template QA; warm-up data).
        docs: the study documents.
        questions: one single-fact question per document (question i about ``docs[i]``).
        recipes: ``label -> (factor, recipe)`` (:func:`plan`); ``"base"`` is the reference of the paired ΔF1.
        root: the cache folder.
        chunk_size: documents per LoRA bank.
        batch_size: questions per generate call.
        max_new_tokens: answer budget.
        resamples: bootstrap resamples.
        seed: bootstrap and control seed.
        interference_recipe: a label of ``recipes`` whose LoRAs the interference table combines, ``"best"`` (the
            highest oracle F1) or ``None`` (no table).
        k: documents combined per question in the interference table.
        others: how the k − 1 other documents are chosen.
        progress: called with one line per finished stage.

    Returns:
        The study's JSON-able result (see :func:`write_outputs`).
    """
    if len(docs) < 2:
        raise HyperPragError("the study needs at least 2 documents (the wrong-document control swaps them).")
    answer = Answerer(base, root / "answers", batch_size, max_new_tokens)
    tok = base.tokenizer
    threads = torch.get_num_threads()
    closed = score_row(questions, answer(questions, [None] * len(questions), [None] * len(questions)), tok, resamples, seed)
    rows: dict[str, Any] = {"closed-book": {"kind": "control", **closed}}
    encoded_all: dict[str, RecipeLoras] = {}
    wrong_of = {d.id: docs[(i + 1) % len(docs)].id for i, d in enumerate(docs)}  # each question gets the next doc's LoRA
    for label, (factor, recipe) in recipes.items():
        cpu = time.process_time()
        encoded = encode_recipe(base, corpus, recipe, docs, root, chunk_size)
        encoded_all[label] = encoded
        own = [q.doc_ids[0] for q in questions]
        oracle = score_row(questions, answer(questions, [encoded.loras[d] for d in own], [encoded.keys[d] for d in own]),
                           tok, resamples, seed)
        wrong = [wrong_of[d] for d in own]
        control = score_row(questions, answer(questions, [encoded.loras[d] for d in wrong], [encoded.keys[d] for d in wrong]),
                            tok, resamples, seed)
        meta = [encoded.meta[d.id] for d in docs]
        rows[label] = {
            "kind": "recipe", "factor": factor, "recipe": encoded.recipe.settings(), "recipe_id": encoded.folder.name,
            **oracle,
            "wrong_doc": {m: control[m] for m in ("f1", "f1_ci", "em", "em_ci", "contained", "contained_ci",
                                                    "median_answer_tokens")},
            "steps_per_doc": statistics.mean(m["steps"] for m in meta),
            "qa_pairs_per_doc": statistics.mean(m.get("qa_pairs", 0) for m in meta),
            "cpu_s_per_doc": statistics.mean(m["cpu_seconds"] for m in meta),
            "wall_s_per_doc": statistics.mean(m["seconds"] for m in meta),
            "warmup": encoded.warmup, "trained_now": encoded.trained,
        }
        progress(f"{label}: F1 {100 * oracle['f1']:.1f} EM {100 * oracle['em']:.1f} (wrong-doc F1 "
                 f"{100 * control['f1']:.1f}), {rows[label]['cpu_s_per_doc']:.1f} CPU s/doc, trained "
                 f"{encoded.trained} now ({time.process_time() - cpu:.0f} CPU s)")
    if "base" in rows:  # paired: the same questions under each recipe and under the base recipe
        reference = rows["base"]["per_question_f1"]
        for label, row in rows.items():
            if row.get("kind") == "recipe" and label != "base":
                mean, low, high = bootstrap_ci([a - b for a, b in zip(row["per_question_f1"], reference)], resamples, seed)
                row["delta_f1"], row["delta_f1_ci"] = mean, [low, high]
    mark_pareto(rows)
    result: dict[str, Any] = {
        "documents": [d.id for d in docs], "questions": [q.id for q in questions], "n": len(questions),
        "base_model": base.name, "base_identity": base.identity, "torch_threads": threads,
        "chunk_size": chunk_size, "max_new_tokens": max_new_tokens, "rows": rows,
        "predictions_generated_now": answer.generated,
    }
    steps = [r["steps_per_doc"] for r in rows.values() if r.get("kind") == "recipe"]
    cpu = [r["cpu_s_per_doc"] for r in rows.values() if r.get("kind") == "recipe"]
    if sum(steps) > 0:
        result["cpu_s_per_doc_step"] = sum(cpu) / sum(steps)  # CPU seconds of one training sequence of one document
    if interference_recipe == "best":
        interference_recipe = max((label for label, r in rows.items() if r.get("kind") == "recipe"),
                                  key=lambda label: rows[label]["f1"])
    if interference_recipe is not None:
        if interference_recipe not in encoded_all:
            raise HyperPragError(f"--interference-recipe {interference_recipe!r} is not a recipe of this run "
                                 f"({sorted(encoded_all)}).")
        result["interference"] = interference(answer, questions, docs, encoded_all[interference_recipe], k, others,
                                              resamples, seed, tok)
        result["interference"]["recipe"] = interference_recipe
        progress("interference: " + ", ".join(f"{n} F1 {100 * r['f1']:.1f}"
                                             for n, r in result["interference"]["rows"].items()))
    return result


def mark_pareto(rows: Mapping[str, dict]) -> None:
    """Sets ``pareto`` on every recipe row: no other recipe is at least as good in F1 at no more CPU s/doc."""
    recipes = [(label, r) for label, r in rows.items() if r.get("kind") == "recipe"]
    for label, r in recipes:
        r["pareto"] = not any(o["f1"] >= r["f1"] and o["cpu_s_per_doc"] <= r["cpu_s_per_doc"]
                              and (o["f1"] > r["f1"] or o["cpu_s_per_doc"] < r["cpu_s_per_doc"])
                              for other, o in recipes if other != label)


# ------------------------------------------------------------------------------------------------ outputs


def _pct(row: Mapping[str, Any], metric: str) -> str:
    low, high = row[f"{metric}_ci"]
    return f"{100 * row[metric]:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def markdown(result: Mapping[str, Any]) -> str:
    """The study's tables as Markdown: recipes (Pareto-marked) with controls, then the interference table."""
    rows = result["rows"]
    lines = [f"# Per-document recipe study (oracle, {result['n']} single-fact questions of the "
             f"{result.get('split', 'test')} split, {result['base_model']})", "",
             f"Command: `{result.get('command', '')}`", "",
             "F1 / EM / contained: % with 95% bootstrap CIs; ΔF1: paired difference to `base` on the same questions; "
             "wrong-doc: each question under another document's LoRA of the same recipe; CPU s/doc: encoding "
             f"(augmentation + training) CPU seconds per document, torch threads = {result['torch_threads']}; "
             "★: on the Pareto front of F1 vs CPU s/doc.", ""]
    if "base" in rows:
        recipe = rows["base"]["recipe"]
        trainer = ", ".join(f"{k} {v}" for k, v in recipe["trainer"].items() if k in ("lr", "epochs", "loss_on", "init",
                                                                                 "qa_context", "examples"))
        lines += [f"Base recipe: {recipe['source']} augmentation, n_qa {recipe['n_qa']}, {recipe['n_rewrites']} rewrite(s), "
                  f"{trainer}, rank {recipe['rank']}, alpha {recipe['alpha']:g}, {'+'.join(recipe['target_modules'])}; "
                  "every other row changes the fields its name gives.", ""]
    lines += ["| row | factor | F1 | EM | contained | ΔF1 vs base | wrong-doc F1 | med. tokens | steps/doc | CPU s/doc | wall s/doc |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        if r.get("kind") != "recipe":
            lines.append(f"| {label} | control | {_pct(r, 'f1')} | {_pct(r, 'em')} | {_pct(r, 'contained')} | | | "
                         f"{r['median_answer_tokens']:g} | 0 | 0 | 0 |")
            continue
        delta = _pct(r, "delta_f1") if "delta_f1" in r else "—"
        lines.append(f"| {label}{' ★' if r['pareto'] else ''} | {r['factor']} | {_pct(r, 'f1')} | {_pct(r, 'em')} | "
                     f"{_pct(r, 'contained')} | {delta} | {_pct(r['wrong_doc'], 'f1')} | {r['median_answer_tokens']:g} | "
                     f"{r['steps_per_doc']:.1f} | {r['cpu_s_per_doc']:.1f} | {r['wall_s_per_doc']:.1f} |")
    if "cpu_s_per_doc_step" in result:
        lines += ["", f"One training sequence of one document costs {result['cpu_s_per_doc_step']:.2f} CPU s here "
                      "(mean over the recipes)."]
    for note in result.get("notes", []):
        lines += ["", f"- {note}"]
    if "interference" in result:
        inter = result["interference"]
        lines += ["", f"## Summing interference (recipe `{inter['recipe']}`, k = {inter['k']}: own document + "
                      f"{inter['k'] - 1} {inter['others']} others)", "",
                  f"Mean softmax(BM25) weight of the own document: {inter['own_softmax_weight_mean']:.3f}.", "",
                  "| combination | ΔW | F1 | EM | contained | ΔF1 vs oracle | med. tokens |", "|---|---|---|---|---|---|---|"]
        for name, r in inter["rows"].items():
            delta = _pct(r, "delta_f1") if "delta_f1" in r else "—"
            lines.append(f"| {name} | {r.get('what', 'ΔW_own')} | {_pct(r, 'f1')} | {_pct(r, 'em')} | "
                         f"{_pct(r, 'contained')} | {delta} | {r['median_answer_tokens']:g} |")
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: Path) -> Path:
    """F1 against CPU s/doc per recipe (95% CI bars), the Pareto front, closed-book and base wrong-doc lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    recipes = [(label, r) for label, r in rows.items() if r.get("kind") == "recipe"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, r in recipes:
        f1, (low, high) = 100 * r["f1"], r["f1_ci"]
        ax.errorbar(r["cpu_s_per_doc"], f1, yerr=[[f1 - 100 * low], [100 * high - f1]], fmt="o",
                    color="tab:red" if r["pareto"] else "tab:blue", capsize=3)
        ax.annotate(label, (r["cpu_s_per_doc"], f1), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((r["cpu_s_per_doc"], 100 * r["f1"]) for _, r in recipes if r["pareto"])
    if front:
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:red", alpha=0.6,
                label="Pareto front")
    ax.axhline(100 * rows["closed-book"]["f1"], color="gray", linestyle="--", label="closed-book")
    if "base" in rows:
        ax.axhline(100 * rows["base"]["wrong_doc"]["f1"], color="gray", linestyle=":", label="wrong-doc (base)")
    ax.set_xlabel(f"encoding CPU seconds per document ({result['torch_threads']} thread(s))")
    ax.set_ylabel("oracle F1 (%)")
    ax.set_title(f"Per-document recipes on {result['base_model']}: {result['n']} single-fact questions")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: Mapping[str, Any], out: Path) -> list[Path]:
    """Writes ``perdoc_recipe.json`` (per-question F1 kept), ``.md`` and ``.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "perdoc_recipe.json", out / "perdoc_recipe.md", out / "perdoc_recipe.png"]
    paths[0].write_text(json.dumps(result, indent=2, default=str))
    paths[1].write_text(markdown(result))
    plot(result, paths[2])
    return paths


# ------------------------------------------------------------------------------------------------ command


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=100, help="documents of --split (one single-fact question each)")
    parser.add_argument("--split", default="test",
                        help="split the documents and questions are drawn from; choose recipes on val, report test")
    parser.add_argument("--factors", default="all",
                        help=f"comma-separated factors ({','.join(FACTORS)}) or single levels field=value "
                             "(e.g. lr=3e-3,source=llm-fewshot), or 'all'")
    parser.add_argument("--base", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the base recipe (repeatable, or comma-separated), e.g. lr=3e-3")
    parser.add_argument("--extra", action="append", default=[], metavar="FIELD=VALUE,...",
                        help="a further recipe changing several fields of the base at once (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("results/perdoc_recipe"), help="folder for JSON, MD and PNG")
    parser.add_argument("--cache", type=Path, default=Path("runs/perdoc_recipe"), help="LoRA stores and answer cache")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (name or folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="document draw, bootstrap and controls")
    parser.add_argument("--chunk-size", type=int, default=4, help="documents per LoRA bank")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per CI")
    parser.add_argument("--interference", action="store_true", help="also the summing-interference table")
    parser.add_argument("--interference-recipe", default="best",
                        help="recipe label whose LoRAs are combined ('best': the highest oracle F1)")
    parser.add_argument("--k", type=int, default=3, help="documents combined per question (interference)")
    parser.add_argument("--others", choices=("bm25", "random"), default="bm25", help="how the other k-1 are chosen")
    parser.add_argument("--plan", action="store_true", help="print the recipes and exit")
    parser.add_argument("--note", action="append", default=[], help="a line added to the notes of the outputs")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    overrides = dict(parse_override(part) for text in args.base for part in text.split(",") if part.strip())
    base_recipe = with_overrides(BASE, overrides)
    factors = list(FACTORS) if args.factors == "all" else [f.strip() for f in args.factors.split(",") if f.strip()]
    extra = [dict(parse_override(part) for part in text.split(",") if part.strip()) for text in args.extra]
    recipes = plan(base_recipe, factors, extra)
    if args.plan:
        for label, (factor, recipe) in recipes.items():
            print(f"{label:32s} {factor:9s} {json.dumps(recipe.settings(), default=str)}")
        return {"recipes": list(recipes)}

    from hyper_prag import assemble

    base = assemble.load_model(args.model, args.device)
    corpus = assemble.load_corpus("fictional")
    docs, questions = study_questions(corpus, args.docs, args.seed, args.split)
    notes = []
    for _, r in recipes.values():
        check_targets(base, r.target_modules)
    recipes, dropped = drop_duplicate_levels(recipes, corpus, docs)
    notes += [f"{label} left out: it trains on exactly the data of {kept} (its source has no more QA pairs)."
              for label, kept in dropped.items()]
    result = run_study(base, corpus, docs, questions, recipes, args.cache, chunk_size=args.chunk_size,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, resamples=args.resamples,
                       seed=args.seed, interference_recipe=args.interference_recipe if args.interference else None,
                       k=args.k, others=args.others)
    result["command"] = "python benchmarks/perdoc_recipe.py " + " ".join(argv)
    result["split"] = args.split
    result["notes"] = notes + list(args.note)
    paths = write_outputs(result, args.out)
    print(markdown(result))
    print("wrote", *map(str, paths))
    return result


if __name__ == "__main__":
    main()

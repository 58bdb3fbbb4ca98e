"""The online path: retrieve top-k documents → obtain their LoRAs → combine → apply → generate.

Every method of the paper's comparison runs through one :class:`Pipeline` with one prompt
(:func:`hyper_prag.prompts.question_prompt`); methods differ only in what stands in the context
and which LoRAs are applied (paper §3.3, §4.1)::

    method          retrieval   context                       LoRAs
    closed-book     no          nothing                       none
    rag             top-k       the k documents               none
    da-rag          top-k       the k documents' augmented    none
                                text (rewrites + QA pairs)
    prag            top-k       nothing                       per-document LoRAs from the store
    hypernet        top-k       nothing                       hypernetwork LoRAs, generated on the fly
    prag-both       top-k       the k documents               store LoRAs      ("combine both")
    hypernet-both   top-k       the k documents               hypernet LoRAs   ("combine both")
    flare           dynamic     the documents of each         none (optional: their LoRAs)
                                retrieval (hyper_prag.dynamic)
    dragin          dynamic     as flare                      none (optional: their LoRAs)

For a batch of questions: one retriever call; the LoRAs of all distinct retrieved documents are
fetched (store) or generated (hypernet) once; each question's k LoRAs are combined into one
(:func:`hyper_prag.combine.combine`, rank concatenation = Σ ΔW_i). One question is answered with
the combined LoRA merged into the weights (or as a side path); several questions whose combined
LoRAs have the same spec (same rank: k documents each, equal per-document ranks) are answered in
one generate call with the ``batched`` injector (question n uses LoRA n); the rest one by one.
The model is restored after every question, also when generation raises (the injector is a
context manager).

Timing per question, in seconds: ``retrieve`` (retriever call, plus prompt building; for DA-RAG the
look-up of the augmented documents, which is offline work the harness caches before timing),
``lora`` (store fetch or hypernet generation), ``apply`` (combine + stack + inject + restore) and
``generate``. Stages run once per batch are
divided evenly over the questions that shared them (:attr:`Answer.shared` says over how many).

FLARE and DRAGIN (dynamic retrieval: they decide while generating when and what to retrieve, one
question at a time) are the :class:`Method` s of :mod:`hyper_prag.dynamic`, on the same pipeline,
prompt and timing stages; ``Answer.retrievals`` counts their retriever calls.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import torch

from hyper_prag.combine import CombineMode, combine
from hyper_prag.corpus import Corpus, Document
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import injected
from hyper_prag.lora import Lora, LoraSpec, stack
from hyper_prag.model import BaseModel
from hyper_prag.prompts import question_prompt

if TYPE_CHECKING:
    from hyper_prag.augment import AugmentConfig
    from hyper_prag.encoders.hypernet import HypernetEncoder
    from hyper_prag.hypernet import Hypernet
    from hyper_prag.retrieve import Hit, Retriever
    from hyper_prag.store import LoraStore

log = logging.getLogger(__name__)

MethodName = Literal["closed-book", "rag", "da-rag", "prag", "hypernet", "prag-both", "hypernet-both"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)
DynamicName = Literal["flare", "dragin"]  # dynamic retrieval, in hyper_prag.dynamic
DYNAMIC_METHODS: tuple[str, ...] = get_args(DynamicName)
Context = Literal["none", "documents", "augmented"]  # what stands before the question
LoraKind = Literal["none", "store", "hypernet"]  # where the LoRAs come from
STAGES: tuple[str, ...] = ("retrieve", "lora", "apply", "generate")

# method -> (retrieves?, context, LoRA source kind): the table of the module docstring.
RECIPES: dict[str, tuple[bool, Context, LoraKind]] = {
    "closed-book": (False, "none", "none"),
    "rag": (True, "documents", "none"),
    "da-rag": (True, "augmented", "none"),
    "prag": (True, "none", "store"),
    "hypernet": (True, "none", "hypernet"),
    "prag-both": (True, "documents", "store"),
    "hypernet-both": (True, "documents", "hypernet"),
}


@dataclass(frozen=True)
class Answer:
    """What one method answered to one question, and how."""

    question: str
    prediction: str
    doc_ids: tuple[str, ...] = ()  # retrieved documents, best first
    lora_names: tuple[str, ...] = ()  # applied LoRAs (store keys, or "hypernet:<doc id>")
    retrievals: int = 0  # retriever calls made for this question (FLARE/DRAGIN: several)
    timing: Mapping[str, float] = field(default_factory=dict)  # stage -> seconds (see STAGES)
    shared: int = 1  # batch stages were divided evenly over this many questions

    @property
    def seconds(self) -> float:
        return float(sum(self.timing.values()))


class Method(Protocol):
    """A way of answering questions (the harness compares these)."""

    name: str

    def answer(self, questions: Sequence[str]) -> list[Answer]:
        """One :class:`Answer` per question, in order."""
        ...


class Augmented(Protocol):
    """What DA-RAG reads of an augmented document (``hyper_prag.augment.AugmentedDocument``)."""

    doc_id: str

    @property
    def variants(self) -> tuple[str, ...]: ...

    qa: tuple[tuple[str, str], ...]


class LoraSource(Protocol):
    """Where the online path gets one LoRA per retrieved document."""

    name: str

    def loras(self, documents: Sequence[Document]) -> list[Lora]:
        """One single LoRA per document, made for the pipeline's base model."""
        ...

    def names(self, documents: Sequence[Document]) -> list[str]:
        """A name per document's LoRA (store key, or hypernet + doc id) to report what was applied."""
        ...


# ------------------------------------------------------------------------------------------ LoRA sources


class StoreSource:
    """Per-document LoRAs read from a :class:`~hyper_prag.store.LoraStore` by their store keys."""

    name = "store"

    def __init__(self, store: "LoraStore", key_fn: Callable[[Document], str], base_model: str | None = None) -> None:
        """
        Args:
            store: the LoRA store.
            key_fn: a document's store key (must match the key the encoder wrote it under).
            base_model: identity of the base model; the store refuses LoRAs made for another one.
        """
        self.store, self.key_fn, self.base_model = store, key_fn, base_model

    @classmethod
    def for_encoder(cls, store: "LoraStore", encoder: Any, base: BaseModel, augment_config: "AugmentConfig | None",
                    spec: LoraSpec | None = None) -> "StoreSource":
        """The source whose keys are those :func:`hyper_prag.encode.encode_corpus` writes with ``encoder``.

        Args:
            store: the LoRA store.
            encoder: an ``Encoder`` (per-doc or hypernet): its ``settings()`` enter the key.
            base: the base model.
            augment_config: augmentation settings (used when ``encoder.uses_augmentation``).
            spec: LoRA spec in the key; defaults to ``encoder.spec``.
        """
        from hyper_prag.store import store_key

        spec = (spec or getattr(encoder, "spec", None) or LoraSpec()).for_model(base)
        augmentation = augment_config.settings() if encoder.uses_augmentation and augment_config else {}
        settings = encoder.settings()

        def key_fn(doc: Document) -> str:
            return store_key(doc.text, base.identity, spec, augmentation, settings)

        return cls(store, key_fn, base.identity)

    def names(self, documents: Sequence[Document]) -> list[str]:
        return [self.key_fn(doc) for doc in documents]

    def loras(self, documents: Sequence[Document]) -> list[Lora]:
        keys = self.names(documents)
        missing = set(self.store.missing(keys))
        if missing:
            ids = [doc.id for doc, key in zip(documents, keys) if key in missing]
            raise HyperPragError(
                f"{len(ids)} retrieved documents have no LoRA in the store {getattr(self.store, 'root', '')} "
                f"(e.g. {ids[:3]}): encode them first with `hyper-prag encode` using the same settings, or let "
                "`hyper-prag evaluate` encode them."
            )
        return self.store.get_many(keys, base_model=self.base_model)


class HypernetSource:
    """LoRAs generated on the fly by a hypernetwork (one batched forward per call; no store)."""

    name = "hypernet"

    def __init__(self, hypernet: "Hypernet | HypernetEncoder", base: BaseModel | None = None) -> None:
        """
        Args:
            hypernet: a :class:`~hyper_prag.hypernet.HypernetEncoder`, or a bare ``Hypernet`` with ``base``.
            base: the base model (needed with a bare ``Hypernet``).
        """
        from hyper_prag.encoders.hypernet import HypernetEncoder

        if not isinstance(hypernet, HypernetEncoder):
            if base is None:
                raise HyperPragError("HypernetSource(hypernet, base): a bare Hypernet needs the base model.")
            hypernet = HypernetEncoder(hypernet, base, checkpoint_sha256="in-memory")
        self.encoder = hypernet

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, base: BaseModel) -> "HypernetSource":
        from hyper_prag.encoders.hypernet import HypernetEncoder

        return cls(HypernetEncoder.from_checkpoint(checkpoint, base))

    def names(self, documents: Sequence[Document]) -> list[str]:
        return [f"hypernet:{doc.id}" for doc in documents]

    def loras(self, documents: Sequence[Document]) -> list[Lora]:
        return self.encoder.generate([doc.text for doc in documents])


# ----------------------------------------------------------------------------------------- the pipeline


def augmented_passage(aug: Augmented) -> str:
    """DA-RAG's passage for one document: its variants (text + rewrites), then its QA pairs."""
    qa = "\n".join(f"Q: {q.strip()} A: {a.strip()}" for q, a in aug.qa)
    return "\n".join(v.strip() for v in aug.variants) + (f"\n{qa}" if qa else "")


@dataclass
class Pipeline:
    """The shared online path of every method: one base model, retriever, corpus and prompt."""

    base: BaseModel
    retriever: "Retriever | None"  # None: only closed-book can run
    corpus: Corpus  # resolves retrieved ids to documents
    k: int = 3  # documents retrieved per question (paper: 3)
    max_new_tokens: int = 32  # generation budget per answer
    combine_mode: CombineMode = "sum"  # how a question's k LoRAs are combined (paper: sum)
    single_mode: Literal["merged", "side"] = "merged"  # injector for one question (merged: no per-token cost)
    batch_size: int = 8  # questions per retriever / generate call
    augment: Callable[[Sequence[Document]], Sequence[Augmented]] | None = None  # DA-RAG's augmented documents
    generation_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. min_new_tokens (equal-length timing)

    def method(self, name: MethodName | DynamicName, source: LoraSource | None = None) -> Method:
        """Returns the :class:`Method` ``name`` on this pipeline.

        Args:
            name: one of :data:`METHOD_NAMES` or :data:`DYNAMIC_METHODS` (with default settings).
            source: the LoRA source for ``prag*`` (a :class:`StoreSource`) and ``hypernet*`` (a
                :class:`HypernetSource`) methods; optional for ``flare`` / ``dragin`` (the retrieved
                documents' LoRAs are applied too); ignored otherwise.
        """
        if name in DYNAMIC_METHODS:
            from hyper_prag.dynamic import Dragin, Flare

            return (Flare if name == "flare" else Dragin)(self, source=source)
        if name not in RECIPES:
            raise HyperPragError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES + DYNAMIC_METHODS)}.")
        retrieve, context, kind = RECIPES[name]
        if kind != "none" and source is None:
            what = "a LoRA store (--store)" if kind == "store" else "a hypernetwork checkpoint (--hypernet)"
            raise HyperPragError(f"method {name!r} needs {what}.")
        if retrieve and self.retriever is None:
            raise HyperPragError(f"method {name!r} retrieves documents but the pipeline has no retriever.")
        if context == "augmented" and self.augment is None:
            raise HyperPragError(f"method {name!r} needs augmented documents: give the pipeline an `augment` function.")
        return RetrievalMethod(name, self, retrieve, context, source if kind != "none" else None)

    def answer(self, questions: Sequence[str], retrieve: bool, context: Context,
               source: LoraSource | None) -> list[Answer]:
        """Answers questions in batches of ``batch_size`` (see the module docstring).

        Args:
            questions: the questions.
            retrieve: retrieve the top-k documents.
            context: what to put before the question.
            source: where LoRAs come from (``None``: no LoRA).

        Returns:
            One :class:`Answer` per question.
        """
        answers: list[Answer] = []
        for i in range(0, len(questions), self.batch_size):
            answers += self._answer_batch(list(questions[i : i + self.batch_size]), retrieve, context, source)
        return answers

    # -------------------------------------------------------------------------------- internals

    def _passages(self, docs: list[Document], context: Context) -> list[str]:
        if context == "none":
            return []
        if context == "documents":
            return [doc.text for doc in docs]
        return [augmented_passage(aug) for aug in self.augment(docs)]  # type: ignore[misc]

    def _answer_batch(self, questions: list[str], retrieve: bool, context: Context,
                      source: LoraSource | None) -> list[Answer]:
        n = len(questions)
        start = time.perf_counter()
        hits: list[list[Hit]] = self.retriever.search(questions, self.k) if retrieve else [[] for _ in questions]
        docs = [[self.corpus.document(h.doc_id) for h in row] for row in hits]
        prompts = [question_prompt(self.base, q, self._passages(d, context)) for q, d in zip(questions, docs)]
        batch_time = {"retrieve": time.perf_counter() - start, "lora": 0.0}

        names: list[tuple[str, ...]] = [() for _ in questions]
        per_question: list[list[Lora]] = [[] for _ in questions]
        if source is not None:
            start = time.perf_counter()
            unique = list({doc.id: doc for row in docs for doc in row}.values())  # each document once per batch
            loras = dict(zip((d.id for d in unique), source.loras(unique)))
            lora_names = dict(zip((d.id for d in unique), source.names(unique)))
            per_question = [[loras[d.id] for d in row] for row in docs]
            names = [tuple(lora_names[d.id] for d in row) for row in docs]
            batch_time["lora"] = time.perf_counter() - start

        predictions, apply_s, generate_s = self._generate(prompts, per_question)
        return [
            Answer(question=q, prediction=p, doc_ids=tuple(d.id for d in row), lora_names=nm,
                   retrievals=int(retrieve), shared=n,
                   timing={"retrieve": batch_time["retrieve"] / n, "lora": batch_time["lora"] / n,
                           "apply": a, "generate": g})
            for q, p, row, nm, a, g in zip(questions, predictions, docs, names, apply_s, generate_s)
        ]

    def _generate(self, prompts: list[str], per_question: list[list[Lora]]
                  ) -> tuple[list[str], list[float], list[float]]:
        """Generates every prompt with its combined LoRA; groups questions whose LoRAs can be stacked."""
        n = len(prompts)
        predictions: list[str] = [""] * n
        apply_s, generate_s = [0.0] * n, [0.0] * n
        combined: list[Lora | None] = [None] * n
        start = time.perf_counter()
        for i, loras in enumerate(per_question):
            if loras:
                combined[i] = combine(loras, self.combine_mode)
        combine_s = (time.perf_counter() - start) / n
        groups: dict[LoraSpec | None, list[int]] = {}
        for i, lora in enumerate(combined):
            groups.setdefault(lora.spec if lora is not None else None, []).append(i)
        for spec, rows in groups.items():
            if spec is None:
                self._run_group(prompts, rows, None, "side", predictions, apply_s, generate_s)
            elif len(rows) > 1:  # same spec = same rank: stackable, one batched generate
                self._run_group(prompts, rows, [combined[i] for i in rows], "batched", predictions, apply_s, generate_s)
            else:
                self._run_group(prompts, rows, [combined[rows[0]]], self.single_mode, predictions, apply_s, generate_s)
        return predictions, [a + combine_s for a in apply_s], generate_s

    def _run_group(self, prompts: list[str], rows: list[int], loras: list[Lora] | None, mode: str,
                   predictions: list[str], apply_s: list[float], generate_s: list[float]) -> None:
        with ExitStack() as applied:  # restores the model on exit, also when generate raises
            t0 = time.perf_counter()
            if loras is not None:
                lora = stack(loras) if mode == "batched" else loras[0]  # batched: A (N, L, Σr, d_in)
                applied.enter_context(injected(self.base, lora, mode=mode))  # type: ignore[arg-type]
            t1 = time.perf_counter()
            outputs = self.base.generate([prompts[i] for i in rows], max_new_tokens=self.max_new_tokens,
                                         **self.generation_kwargs)
            t2 = time.perf_counter()
            applied.close()
            t3 = time.perf_counter()
        for i, out in zip(rows, outputs):
            predictions[i] = out
            apply_s[i] = ((t1 - t0) + (t3 - t2)) / len(rows)
            generate_s[i] = (t2 - t1) / len(rows)


@dataclass
class RetrievalMethod:
    """A :class:`Method` made of the pipeline's stages (every method of the table but FLARE/DRAGIN)."""

    name: str
    pipeline: Pipeline
    retrieve: bool
    context: Context
    source: LoraSource | None

    def answer(self, questions: Sequence[str]) -> list[Answer]:
        return self.pipeline.answer(questions, self.retrieve, self.context, self.source)


def peak_memory(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak memory so far, in MiB: the process's max RSS (monotone), plus CUDA's max allocated on GPU.

    Args:
        device: the model's device; CUDA peak is reported only for a CUDA device.
    """
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"max_rss_mib": rss_kb / (1024 * 1024 if sys.platform == "darwin" else 1024)}
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# ------------------------------------------------------------------------------------- building from args


def load_benchmark(name: str) -> Corpus:
    """``fictional`` (the generated benchmark), ``squad`` / ``hotpotqa`` (fetched), or a corpus folder."""
    if name == "fictional":
        from hyper_prag.benchmark import load_or_make_default

        return load_or_make_default()
    if name in ("squad", "hotpotqa"):
        from hyper_prag.realdata import load_real

        return load_real(name)  # type: ignore[arg-type]
    if Path(name).is_dir():
        from hyper_prag.corpus import load_corpus

        return load_corpus(name)
    raise HyperPragError(f"unknown benchmark {name!r}: use fictional, squad, hotpotqa or a corpus folder.")


def load_model(name: str, device: str = "cpu") -> BaseModel:
    """``tiny`` (random test model), ``smollm2-135m-instruct`` (default) or a local model folder."""
    from hyper_prag.model import load_base_model, tiny_base_model

    return tiny_base_model(device=device) if name == "tiny" else load_base_model(name, device=device)


@dataclass
class PerDocSetup:
    """The per-document encoder and settings whose store keys the ``prag`` methods read."""

    encoder: Any  # PerDocEncoder
    augment_config: "AugmentConfig"
    spec: LoraSpec
    corpus: Corpus


def per_doc_setup(base: BaseModel, corpus: Corpus, encode_config: str | Path | None = None) -> PerDocSetup:
    """Builds the per-document encoder exactly as ``hyper-prag encode --config`` does (same store keys).

    Args:
        base: the base model.
        corpus: the full corpus (warm-up initialisation trains on its held-out split).
        encode_config: the encode YAML (``configs/encode/*.yaml``); ``None``: the encode defaults.
    """
    from hyper_prag.augment import AugmentConfig, augment_documents
    from hyper_prag.encode import load_config
    from hyper_prag.encoders.per_doc import PerDocEncoder, train_warmup_lora

    cfg = load_config(encode_config)
    augment_config = AugmentConfig(**(cfg.get("augment") or {}))
    spec = LoraSpec(rank=cfg["rank"], alpha=cfg["alpha"]).for_model(base)
    trainer, warmup = cfg["trainer"], None
    if trainer.init == "warmup":
        held = list(corpus.split(cfg["warmup_split"]).documents)[: cfg["warmup_docs"]]
        if not held:
            raise HyperPragError(f"init='warmup' needs documents in split {cfg['warmup_split']!r}.")
        held_aug = augment_documents(held, augment_config, base=base, corpus=corpus)
        warmup = train_warmup_lora(base, spec, held_aug, trainer, max_steps=cfg["warmup_steps"])
    encoder = PerDocEncoder(base, spec, trainer, warmup=warmup)
    return PerDocSetup(encoder, augment_config, spec, corpus)


def build_augment(base: BaseModel, corpus: Corpus, augment_config: "AugmentConfig"
                  ) -> Callable[[Sequence[Document]], Sequence[Augmented]]:
    """DA-RAG's augmentation, memoised per document id (the augmenter also caches on disk)."""
    from hyper_prag.augment import augment_documents

    memo: dict[str, Augmented] = {}

    def augment(docs: Sequence[Document]) -> list[Augmented]:
        todo = [d for d in {d.id: d for d in docs}.values() if d.id not in memo]
        if todo:
            for doc, aug in zip(todo, augment_documents(todo, augment_config, base=base, corpus=corpus)):
                memo[doc.id] = aug
        return [memo[d.id] for d in docs]

    return augment


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``ask`` and ``evaluate``."""
    parser.add_argument("--benchmark", default="fictional", help="fictional | squad | hotpotqa | corpus folder")
    parser.add_argument("--split", default="test", help="split whose documents are retrieved from and questions asked")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct | tiny | model folder")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--k", type=int, default=3, help="documents retrieved per question (paper: 3)")
    parser.add_argument("--retriever", choices=["bm25", "dense"], default="bm25", help="retriever (paper: bm25)")
    parser.add_argument("--store", default=None, help="LoRA store folder (prag methods; default: cache)")
    parser.add_argument("--encode-config", default=None,
                        help="encode YAML whose settings made the store's LoRAs (default: encode's defaults)")
    parser.add_argument("--hypernet", default=None, help="hypernetwork checkpoint (hypernet methods)")
    parser.add_argument("--combine", choices=["sum", "mean"], default="sum", help="how k LoRAs are combined")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per answer")


def default_store(model: str) -> Path:
    from hyper_prag.paths import cache_dir

    return cache_dir("lora_store") / Path(model).name


def add_ask_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hyper-prag ask``."""
    parser.add_argument("question", help="the question")
    parser.add_argument("--method", choices=METHOD_NAMES + DYNAMIC_METHODS, default="prag", help="how to answer")
    add_pipeline_arguments(parser)


def run_ask(args: argparse.Namespace) -> Answer:
    """Runs ``hyper-prag ask``: answers one question and prints the answer, documents and LoRAs applied."""
    from hyper_prag.retrieve import build_or_load
    from hyper_prag.store import LoraStore

    base = load_model(args.model, args.device)
    full = load_benchmark(args.benchmark)
    corpus = full.split(args.split) if args.split else full
    if not corpus.documents:
        raise HyperPragError(f"benchmark {args.benchmark!r} has no documents in split {args.split!r}.")
    _, context, kind = RECIPES.get(args.method, (True, "none", "none"))  # flare/dragin: no LoRA, no augmentation
    retriever = build_or_load(args.retriever, corpus, device=args.device) if args.method != "closed-book" else None
    source: LoraSource | None = None
    augment = None
    if kind == "store" or context == "augmented":
        setup = per_doc_setup(base, full, args.encode_config)
        augment = build_augment(base, full, setup.augment_config)
        if kind == "store":
            store = LoraStore(args.store or default_store(args.model))
            source = StoreSource.for_encoder(store, setup.encoder, base, setup.augment_config, setup.spec)
    elif kind == "hypernet":
        if not args.hypernet:
            raise HyperPragError(f"method {args.method!r} needs --hypernet CHECKPOINT.")
        source = HypernetSource.from_checkpoint(args.hypernet, base)
    pipeline = Pipeline(base, retriever, corpus, k=args.k, max_new_tokens=args.max_new_tokens,
                        combine_mode=args.combine, batch_size=1, augment=augment)
    answer = pipeline.method(args.method, source).answer([args.question])[0]
    print(f"answer ({args.method}): {answer.prediction}")
    for rank, doc_id in enumerate(answer.doc_ids, start=1):
        doc = corpus.document(doc_id)
        print(f"  [{rank}] {doc.id} {doc.title}: {doc.text[:100].strip()}{'…' if len(doc.text) > 100 else ''}")
    for name in answer.lora_names:
        print(f"  LoRA applied: {name}")
    if not answer.lora_names:
        print("  no LoRA applied")
    print("  time: " + ", ".join(f"{s} {answer.timing.get(s, 0.0) * 1000:.0f} ms" for s in STAGES))
    return answer

"""The online path: retrieve top-k documents → obtain their LoRAs → combine → apply → generate.

Every static method of :data:`hyper_prag.methods.METHODS` runs through one :class:`Pipeline` with one
prompt (:func:`hyper_prag.prompts.question_prompt`); methods differ only in what stands in the context
and which LoRAs are applied (paper §3.3, §4.1). This module only reads: LoRAs come from a
:class:`~hyper_prag.methods.LoraSource` (the store, by the keys ``encode`` recorded, or a hypernetwork);
building models, stores and methods from names is :mod:`hyper_prag.assemble`'s job.

For a batch of questions: one retriever call; the LoRAs of all distinct retrieved documents are
fetched (store) or generated (hypernet) once; each question's k LoRAs are combined into one
(:func:`hyper_prag.combine.combine`, rank concatenation = Σ ΔW_i). One question is answered with
the combined LoRA merged into the weights (or as a side path); several questions are answered in
one generate call with the ``batched`` injector (question n uses LoRA n), their combined LoRAs
padded to one rank (:func:`hyper_prag.combine.pad_rank`, the same ΔW). The model is restored after
every generate call, also when generation raises (the injector is a context manager).

Timing per question, in seconds: ``retrieve`` (retriever call, plus prompt building; for DA-RAG the
look-up of the augmented documents, which is offline work the harness caches before timing),
``lora`` (store fetch or hypernet generation), ``apply`` (combine + stack + inject + restore) and
``generate``. Stages run once per batch are divided evenly over the questions that shared them
(:attr:`Answer.shared` says over how many).

FLARE and DRAGIN (dynamic retrieval: they decide while generating when and what to retrieve, one
question at a time) are the methods of :mod:`hyper_prag.dynamic`, on the same pipeline, prompt and
timing stages; ``Answer.retrievals`` counts their retriever calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from hyper_prag.activated import HeadCache, head_cache, prefill, split_prompts
from hyper_prag.activated import generate as activated_generate
from hyper_prag.combine import DEFAULT_COMBINE, CombineMode, check_combine_mode, combine, pad_rank
from hyper_prag.corpus import Corpus, Document
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import exclusive, injected
from hyper_prag.lora import Lora, stack
from hyper_prag.methods import Answer, Augmented, Context, LoraSource, MethodSpec
from hyper_prag.model import BaseModel
from hyper_prag.prompts import answer_text, fixed_head, head_of, question_prompt

if TYPE_CHECKING:
    from hyper_prag.retrieve import Hit, Retriever

log = logging.getLogger(__name__)


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
    combine_mode: CombineMode = DEFAULT_COMBINE  # how a question's k LoRAs are combined (hyper_prag.combine)
    single_mode: Literal["merged", "side"] = "merged"  # injector for one question (merged: no per-token cost)
    batch_size: int = 8  # questions per retriever / generate call
    augment: Callable[[Sequence[Document]], Sequence[Augmented]] | None = None  # DA-RAG's augmented documents
    generation_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. min_new_tokens (equal-length timing)
    prefix_cache: bool = True  # prompts with no passages and no all-positions LoRA decode after the cached head

    def __post_init__(self) -> None:
        check_combine_mode(self.combine_mode)

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
            chunk = list(questions[i : i + self.batch_size])
            start = time.perf_counter()
            hits: list[list[Hit]] = self.retriever.search(chunk, self.k) if retrieve else [[] for _ in chunk]  # type: ignore[union-attr]
            docs = [[self.corpus.document(h.doc_id) for h in row] for row in hits]
            scores = [[h.score for h in row] for row in hits]
            answers += self._answer_batch(chunk, docs, context, source, time.perf_counter() - start, int(retrieve),
                                          scores)
        return answers

    def answer_given(self, questions: Sequence[str], documents: Sequence[Sequence[Document]], context: Context,
                     source: LoraSource | None) -> list[Answer]:
        """Answers each question with the documents it is given instead of retrieved ones (oracle studies).

        Args:
            questions: the questions.
            documents: per question, the documents whose text / LoRAs it gets (the same path as retrieval's top-k).
            context: what to put before the question.
            source: where LoRAs come from (``None``: no LoRA).
        """
        if len(documents) != len(questions):
            raise HyperPragError(f"answer_given: {len(documents)} document lists for {len(questions)} questions.")
        answers: list[Answer] = []
        for i in range(0, len(questions), self.batch_size):
            answers += self._answer_batch(list(questions[i : i + self.batch_size]),
                                          [list(d) for d in documents[i : i + self.batch_size]], context, source, 0.0, 0)
        return answers

    def fit_passages(self, question: str, doc_ids: Sequence[str], passages: Sequence[str]) -> list[str]:
        """The passages, cut so that the prompt and ``max_new_tokens`` fit the model's positions.

        The lowest-ranked passages are cut first (shortened, then dropped); a warning names what was cut.
        A question that alone does not fit is an error.

        Args:
            question: the question.
            doc_ids: the passages' document ids (for the warning).
            passages: the passages, best first.
        """
        limit = getattr(self.base.model.config, "max_position_embeddings", None)
        out = list(passages)
        if not limit or not out:
            return out
        budget = int(limit) - self.max_new_tokens
        tokenizer = self.base.tokenizer
        cut: dict[str, int] = {}
        for _ in range(4):  # token counts of a passage alone and inside the prompt differ by a few: re-check
            over = len(tokenizer(question_prompt(self.base, question, out), add_special_tokens=False).input_ids) - budget
            if over <= 0:
                break
            for i in reversed(range(len(out))):
                offsets = tokenizer(out[i], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                keep = max(0, len(offsets) - over - 8)  # 8: margin for the cut's own tokens
                doc = doc_ids[i] if i < len(doc_ids) else str(i)
                cut[doc] = cut.get(doc, 0) + len(offsets) - keep
                over -= len(offsets) - keep
                out[i] = out[i][: offsets[keep][0]] if keep else ""
                if over <= 0:
                    break
            out = [p for p in out if p.strip()]
            if not out:
                break
        if len(tokenizer(question_prompt(self.base, question, out), add_special_tokens=False).input_ids) > budget:
            raise HyperPragError(f"the question alone does not fit the model's {limit} positions with "
                                 f"max_new_tokens={self.max_new_tokens}; shorten it or lower --max-new-tokens.")
        if cut:
            log.warning("prompt for %r cut to the model's %d positions: %s", question[:60], limit,
                        ", ".join(f"{doc} lost {n} tokens" for doc, n in cut.items()))
        return out

    # -------------------------------------------------------------------------------- internals

    def _passages(self, docs: list[Document], context: Context) -> list[str]:
        if context == "none":
            return []
        if context == "documents":
            return [doc.text for doc in docs]
        return [augmented_passage(aug) for aug in self.augment(docs)]  # type: ignore[misc]

    def _answer_batch(self, questions: list[str], docs: list[list[Document]], context: Context,
                      source: LoraSource | None, retrieve_s: float, retrievals: int,
                      scores: list[list[float]] | None = None) -> list[Answer]:
        n = len(questions)
        start = time.perf_counter()
        prompts = [question_prompt(self.base, q, self.fit_passages(q, [x.id for x in d], self._passages(d, context)))
                   for q, d in zip(questions, docs)]
        batch_time = {"retrieve": retrieve_s + time.perf_counter() - start, "lora": 0.0}

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

        # A source that does not say where its LoRAs act made them for every position; no LoRA: the head is the base
        # model's either way.
        apply_from = getattr(source, "apply_from", "all") if source is not None else "none"
        predictions, apply_s, generate_s = self._generate(prompts, per_question, scores, apply_from)
        return [
            Answer(question=q, prediction=p, doc_ids=tuple(d.id for d in row), lora_names=nm,
                   retrievals=retrievals, shared=n,
                   timing={"retrieve": batch_time["retrieve"] / n, "lora": batch_time["lora"] / n,
                           "apply": a, "generate": g})
            for q, p, row, nm, a, g in zip(questions, predictions, docs, names, apply_s, generate_s)
        ]

    def combine(self, loras: Sequence[Lora], scores: Sequence[float] | None = None) -> Lora:
        """One question's k LoRAs as one, by :attr:`combine_mode` (``scores``: their retrieval scores; questions
        given their documents without scores get equal weights under ``softmax``, i.e. the mean)."""
        return combine(loras, self.combine_mode, scores=scores)

    def _generate(self, prompts: list[str], per_question: list[list[Lora]], scores: list[list[float]] | None = None,
                  apply_from: str = "all") -> tuple[list[str], list[float], list[float]]:
        """Generates every prompt with its combined LoRA; groups questions whose LoRAs can be stacked.

        ``apply_from="question"``: the LoRAs act from the question's text on (they were trained so); the prompt
        head before it is read by the base model, from the cached KV prefix where it is the fixed head."""
        n = len(prompts)
        predictions: list[str] = [""] * n
        apply_s, generate_s = [0.0] * n, [0.0] * n
        combined: list[Lora | None] = [None] * n
        start = time.perf_counter()
        for i, loras in enumerate(per_question):
            if loras:
                combined[i] = self.combine(loras, scores[i] if scores else None)
        combine_s = (time.perf_counter() - start) / n
        # Questions whose LoRAs differ only in rank or scaling share one batched generate: padded to one rank
        # and rescaled to one scaling (the same ΔW each).
        groups: dict[tuple | None, list[int]] = {}
        for i, lora in enumerate(combined):
            spec = lora.spec if lora is not None else None
            groups.setdefault(None if spec is None else (spec.base_model, spec.target_modules, spec.layers),
                              []).append(i)
        for group, rows in groups.items():
            if group is None:
                self._run_group(prompts, rows, None, "side", predictions, apply_s, generate_s, apply_from)
                continue
            rank = max(combined[i].spec.rank for i in rows)  # type: ignore[union-attr]
            scaling = combined[rows[0]].spec.scaling  # type: ignore[union-attr]
            loras = [pad_rank(combined[i], rank, scaling) for i in rows]  # type: ignore[arg-type]
            mode = "batched" if len(rows) > 1 else self.single_mode
            self._run_group(prompts, rows, loras, mode, predictions, apply_s, generate_s, apply_from)
        return predictions, [a + combine_s for a in apply_s], generate_s

    def _heads(self, prompts: list[str], apply_from: str) -> list[tuple[HeadCache, list[list[int]]]] | None:
        """The prompts' heads (read by the base model) and their token ids after them, grouped by head, or
        ``None`` to generate the whole prompts as they are (a LoRA acting everywhere, or no prefix cache)."""
        if apply_from == "all" or (not self.prefix_cache and apply_from != "question"):
            return None
        fixed = fixed_head(self.base)
        if apply_from != "question" and not all(p.startswith(fixed) for p in prompts):
            return None  # no LoRA and passages in the prompt: nothing to reuse
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            head = fixed if prompt.startswith(fixed) else head_of(prompt)
            groups.setdefault(head, []).append(i)
        with exclusive(self.base):  # the head is the base model's: computed while no LoRA is applied
            out = []
            for head, rows in groups.items():
                cache = head_cache(self.base, head) if head == fixed else prefill(self.base, head)
                out.append((cache, rows, split_prompts(self.base, [prompts[i] for i in rows], head)))
        return out  # type: ignore[return-value]

    def _run_group(self, prompts: list[str], rows: list[int], loras: list[Lora] | None, mode: str,
                   predictions: list[str], apply_s: list[float], generate_s: list[float], apply_from: str = "all",
                   heads: list | None = None) -> None:
        heads = heads or self._heads([prompts[i] for i in rows], apply_from)
        if heads is not None and len(heads) > 1:  # prompts with other heads (their own passages): one generate each
            for cache, members, suffixes in heads:
                sub = [rows[j] for j in members]
                sub_mode = mode if len(sub) > 1 or loras is None else self.single_mode
                self._run_group(prompts, sub, None if loras is None else [loras[j] for j in members], sub_mode,
                                predictions, apply_s, generate_s, apply_from, [(cache, list(range(len(sub))), suffixes)])
            return
        with ExitStack() as applied:  # restores the model on exit, also when generate raises
            t0 = time.perf_counter()
            if loras is not None:
                lora = stack(loras) if mode == "batched" else loras[0]  # batched: A (N, L, Σr, d_in)
                applied.enter_context(injected(self.base, lora, mode=mode))  # type: ignore[arg-type]
            else:  # no LoRA, but another thread's LoRA must not be in the weights while we generate
                applied.enter_context(exclusive(self.base))
            t1 = time.perf_counter()
            if heads is None or self.generation_kwargs:
                outputs = self.base.generate([prompts[i] for i in rows], max_new_tokens=self.max_new_tokens,
                                             **self.generation_kwargs)
            else:
                outputs = [""] * len(rows)
                for cache, members, suffixes in heads:
                    for j, text in zip(members, activated_generate(self.base, cache, suffixes, self.max_new_tokens)):
                        outputs[j] = text
            t2 = time.perf_counter()
            applied.close()
            t3 = time.perf_counter()
        for i, out in zip(rows, outputs):
            predictions[i] = answer_text(self.base, out)  # a plain (no chat template) prompt's answer: its first line
            apply_s[i] = ((t1 - t0) + (t3 - t2)) / len(rows)
            generate_s[i] = (t2 - t1) / len(rows)


@dataclass
class RetrievalMethod:
    """A static method of the table (every method but FLARE/DRAGIN) made of the pipeline's stages."""

    spec: MethodSpec
    pipeline: Pipeline
    source: LoraSource | None = None  # required exactly when spec.lora != "none"

    def __post_init__(self) -> None:
        name, spec = self.spec.name, self.spec
        if spec.dynamic:
            raise HyperPragError(f"method {name!r} is dynamic: build it with hyper_prag.dynamic.")
        if spec.lora != "none" and self.source is None:
            what = "a LoRA store (--store)" if spec.lora == "store" else "a hypernetwork checkpoint (--hypernet)"
            raise HyperPragError(f"method {name!r} needs {what}.")
        if spec.retrieves and self.pipeline.retriever is None:
            raise HyperPragError(f"method {name!r} retrieves documents but the pipeline has no retriever.")
        if spec.context == "augmented" and self.pipeline.augment is None:
            raise HyperPragError(f"method {name!r} needs augmented documents: give the pipeline an `augment` function.")
        if spec.lora == "none":
            self.source = None

    @property
    def name(self) -> str:
        return self.spec.name

    def answer(self, questions: Sequence[str]) -> list[Answer]:
        return self.pipeline.answer(questions, self.spec.retrieves, self.spec.context, self.source)

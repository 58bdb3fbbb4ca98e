"""Dynamic retrieval, the paper's baselines that decide *while generating* when and what to retrieve.

:class:`Flare` and :class:`Dragin` are :class:`~hyper_prag.methods.Method` s on a
:class:`~hyper_prag.pipeline.Pipeline`: they reuse its base model, retriever, corpus, ``k``,
``max_new_tokens`` and prompt (:func:`hyper_prag.prompts.question_prompt`, retrieved documents as its
passages), so they are scored on equal terms with the static methods (PRAG paper §4.1). Decoding is
greedy, one question at a time, one token per forward pass with a KV cache; the answer is kept as
token ids (never re-tokenised) and decoded once at the end.

FLARE (Jiang et al., EMNLP 2023, "direct" FLARE, §3.2)::

    answer = []
    until EOS or max_new_tokens:
        ŝ = LM(prompt(question) ⊕ answer)               look-ahead: ≤ lookahead tokens, ends at . ! ? or a newline
        if retrievals < max_retrievals and min_i p(ŝ_i) < threshold:
            query = ŝ without its tokens of p < mask_threshold      (masked implicit query; the question if empty)
            D = retriever(query, k)
            ŝ = LM(prompt(question, passages=D) ⊕ answer)           the sentence regenerated with D in context
        answer += ŝ

The look-ahead is generated without documents (as in the paper); documents condition only the
sentence they were retrieved for. There is no initial retrieval with the question.

DRAGIN (Su et al., ACL 2024; D = no documents at first)::

    until EOS or max_new_tokens:
        c = LM(prompt(question, passages=D) ⊕ answer)   the rest of the budget
        RIND (when): score_i = H_i · a_i · s_i for every token c_i, where
            H_i  entropy (nats) of the distribution c_i was drawn from,
            a_i  max_{j>i} A_{j,i}: the most attention c_i receives from a later token, A the last layer's
                 attention averaged over heads, rescaled to mean 1 over c_i's sentence (as DRAGIN's code
                 does, so that the threshold is on the entropy's scale),
            s_i  0 for stopwords, punctuation and special tokens, 1 otherwise;
        if retrievals == max_retrievals or no score > threshold: answer += c; stop
        t = the first token with score > threshold
        QFS (what): the query_words words of (question ⊕ answer ⊕ c[:t]) that token t attends to most
            (last layer, mean over heads; a word's attention is the sum over its tokens, as DRAGIN's
            code merges tokens into words; stopwords, punctuation, special tokens and everything of the
            prompt but the question are excluded), in text order
        D = retriever(query, k); answer += c[:t]        truncate before t, continue with D in the prompt

D stays in the prompt until the next retrieval replaces it. DRAGIN reads attention weights, which
only the eager attention implementation returns: :func:`eager_attention` switches the model to it
for the method's forward passes (``set_attn_implementation``) and back afterwards;
:class:`HyperPragError` if the model still returns none (load it with ``attn_implementation="eager"``).

Parametric LoRAs (optional, off by default): with a :class:`~hyper_prag.methods.LoraSource`, every
generation that has retrieved documents in its prompt (FLARE: the regenerated sentence; DRAGIN: all
generation after a retrieval) also runs with those documents' LoRAs combined
(:meth:`hyper_prag.pipeline.Pipeline.combine`, the pipeline's ``combine_mode``) and applied with the pipeline's
``single_mode`` injector (default merged): "combine both", with the LoRAs following the documents.
The model is restored after each such generation, also when it raises.

Timing (:data:`~hyper_prag.methods.STAGES`, seconds per question): ``retrieve`` (retriever calls,
query formulation, prompt building), ``lora`` (LoRA fetch), ``apply`` (combine + inject + restore),
``generate`` (all decoding, including discarded look-aheads and DRAGIN's attention passes).
``Answer.retrievals`` counts retriever calls. ``Pipeline.generation_kwargs`` are not used here.
"""

from __future__ import annotations

import functools
import logging
import string
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hyper_prag.corpus import Document
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import exclusive, injected
from hyper_prag.model import BaseModel
from hyper_prag.methods import STAGES, Answer, LoraSource
from hyper_prag.pipeline import Pipeline
from hyper_prag.prompts import question_prompt

log = logging.getLogger(__name__)

SENTENCE_END: tuple[str, ...] = (".", "!", "?")


# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class FlareConfig:
    """FLARE's settings (Jiang et al. 2023, §3.2; the paper tunes θ and β per data set)."""

    threshold: float = 0.4  # θ: retrieve when a look-ahead token has probability below it (0: never)
    mask_threshold: float | None = None  # β: tokens below it are left out of the query; None: θ
    lookahead: int = 64  # most tokens of one look-ahead sentence (FLARE: 64)
    max_retrievals: int = 3  # retriever calls per question, at most

    def __post_init__(self) -> None:
        beta = self.threshold if self.mask_threshold is None else self.mask_threshold
        if not (0.0 <= self.threshold <= 1.0 and 0.0 <= beta <= 1.0):
            raise HyperPragError(f"FLARE thresholds are probabilities in [0, 1]; got {self.threshold}, {beta}.")
        _check_counts(lookahead=self.lookahead, max_retrievals=self.max_retrievals)


@dataclass(frozen=True)
class DraginConfig:
    """DRAGIN's settings (Su et al. 2024; defaults: its HotpotQA / Llama2-7b-chat configuration)."""

    threshold: float = 1.4  # RIND score above which a token triggers retrieval (tune per model)
    query_words: int = 35  # QFS: most-attended words kept in the query (DRAGIN's retrieve_keep_top_k)
    max_retrievals: int = 3  # retriever calls per question, at most

    def __post_init__(self) -> None:
        _check_counts(query_words=self.query_words, max_retrievals=self.max_retrievals)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < (0 if name == "max_retrievals" else 1):
            raise HyperPragError(f"{name} = {value} is out of range; use a positive number (max_retrievals may be 0).")


# ------------------------------------------------------------------------------------------- decoding


@dataclass
class Continuation:
    """Greedily decoded tokens and what FLARE and DRAGIN read off them."""

    ids: list[int]  # generated tokens, EOS excluded
    probs: list[float]  # probability of each generated token under the model
    entropies: list[float]  # entropy (nats) of the distribution each token was drawn from
    eos: bool  # generation ended with EOS: the answer is complete


def ends_sentence(piece: str) -> bool:
    """Whether a decoded token ends a sentence (. ! ? or a newline; "3.14" is cut after "3.")."""
    return "\n" in piece or piece.rstrip().endswith(SENTENCE_END)


@torch.no_grad()
def greedy_decode(base: BaseModel, context: Sequence[int], max_tokens: int,
                  stop_at_sentence_end: bool = False) -> Continuation:
    """Greedy decoding after ``context``, one token per forward pass with a KV cache.

    Args:
        base: the base model (runs on its device).
        context: prompt token ids, including any answer generated so far.
        max_tokens: most tokens to generate.
        stop_at_sentence_end: also stop after a token that ends a sentence (:func:`ends_sentence`).

    Returns:
        The :class:`Continuation` (EOS is not among its tokens).
    """
    ids: list[int] = []
    probs: list[float] = []
    entropies: list[float] = []
    inputs = torch.tensor([list(context)], dtype=torch.long, device=base.device)  # (1, T)
    past = None
    while len(ids) < max_tokens:
        out = base.model(input_ids=inputs, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,)
        token = int(logp.argmax())
        if token == base.tokenizer.eos_token_id:
            return Continuation(ids, probs, entropies, eos=True)
        ids.append(token)
        probs.append(float(logp[token].exp()))
        entropies.append(float(torch.special.entr(logp.exp()).sum()))
        if stop_at_sentence_end and ends_sentence(base.tokenizer.decode([token])):
            break
        inputs = torch.tensor([[token]], dtype=torch.long, device=base.device)  # (1, 1)
    return Continuation(ids, probs, entropies, eos=False)


@contextmanager
def eager_attention(base: BaseModel) -> Iterator[None]:
    """Runs the block with the model's eager attention (the one that returns weights), then switches back."""
    before = base.model.config._attn_implementation
    if before != "eager":
        try:
            base.model.set_attn_implementation("eager")
        except (AttributeError, ValueError) as err:
            raise HyperPragError(f"DRAGIN needs attention weights but {base.name} cannot switch to eager attention "
                                 f"({err}); load it with attn_implementation='eager'.") from err
    try:
        yield
    finally:
        if before != "eager":
            base.model.set_attn_implementation(before)


@torch.no_grad()
def last_layer_attention(base: BaseModel, ids: Sequence[int]) -> Tensor:
    """The last layer's attention over ``ids``, averaged over heads (what RIND and QFS read).

    Args:
        base: the base model, with eager attention (see :func:`eager_attention`).
        ids: the whole sequence (prompt, answer so far, new tokens).

    Returns:
        (T, T) float tensor on the CPU; row j is what position j attends to (zero above the diagonal).
    """
    inputs = torch.tensor([list(ids)], dtype=torch.long, device=base.device)  # (1, T)
    out = base.model(input_ids=inputs, output_attentions=True, use_cache=False, logits_to_keep=1)
    if not out.attentions or out.attentions[-1] is None:
        raise HyperPragError(f"{base.name} returned no attention weights (attention implementation "
                             f"{base.model.config._attn_implementation!r}); DRAGIN needs them: load the model with "
                             "attn_implementation='eager' (load_base_model(..., attn_implementation='eager')).")
    return out.attentions[-1][0].float().mean(dim=0).cpu()  # (H, T, T) -> (T, T)


# ------------------------------------------------------------------------------------ when and what


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN_PLUS  # NLTK's English list; bm25s is a dependency already

    return frozenset(STOPWORDS_EN_PLUS)


def is_content(text: str) -> bool:
    """Whether a token or word carries content: has a letter or digit and is no stopword (s_i = 1)."""
    core = text.strip().lower().strip(string.punctuation)
    return any(ch.isalnum() for ch in core) and core not in _stopwords()


def masked_query(base: BaseModel, ids: Sequence[int], probs: Sequence[float], mask_threshold: float) -> str:
    """FLARE's implicit query: the look-ahead sentence with its low-confidence tokens removed.

    Args:
        base: the base model (its tokenizer decodes).
        ids: the look-ahead tokens.
        probs: their probabilities.
        mask_threshold: tokens of probability below it are removed (FLARE's β).

    Returns:
        The query text ("" when every token was masked).
    """
    kept = [t for t, p in zip(ids, probs) if p >= mask_threshold]
    return base.tokenizer.decode(kept, skip_special_tokens=True).strip()


def rind_scores(entropies: Tensor, attention: Tensor, content: Tensor, sentence_end: Tensor) -> Tensor:
    """DRAGIN's RIND score of every generated token (see the module docstring).

    Args:
        entropies: (n,) entropy H_i of the distribution each token was drawn from.
        attention: (n, n) attention among the generated tokens; row j is what token j attends to.
        content: (n,) s_i: 1 for content tokens, 0 for stopwords, punctuation and special tokens.
        sentence_end: (n,) True for a token that ends its sentence.

    Returns:
        (n,) scores H_i · a_i · s_i, a_i rescaled to mean 1 over each sentence.
    """
    n = entropies.shape[0]
    if n == 0:
        return entropies
    received = torch.tril(attention, diagonal=-1).amax(dim=0)  # (n,) max_{j>i} A[j, i]; the last token gets 0
    scale = torch.zeros(n)
    bounds = [i + 1 for i in range(n) if sentence_end[i]]
    start = 0
    for end in [b for b in bounds if b < n] + [n]:
        total = float(received[start:end].sum())
        if total > 0:
            scale[start:end] = (end - start) / total  # mean 1 over the sentence
        start = end
    return entropies * received * scale * content  # (n,)


def qfs_words(attention: Tensor, pieces: Sequence[str], eligible: Sequence[bool], n_words: int) -> list[range]:
    """DRAGIN's QFS: the ``n_words`` context words the triggering token attends to most, in text order.

    A word is a run of eligible tokens that starts with a whitespace-led token (or after an ineligible
    one); its attention is the sum over its tokens. Words without content (:func:`is_content`) are dropped.

    Args:
        attention: (T,) attention of the triggering token over the context positions.
        pieces: (T,) decoded text of each context token.
        eligible: (T,) False for tokens that cannot enter the query (prompt template, instruction,
            passages, special tokens).
        n_words: how many words to keep.

    Returns:
        The chosen words as token-position ranges, sorted by position.
    """
    words: list[range] = []
    for i, (piece, ok) in enumerate(zip(pieces, eligible)):
        if not ok:
            continue
        if words and words[-1].stop == i and not piece[:1].isspace():
            words[-1] = range(words[-1].start, i + 1)  # a sub-word token continues the word
        else:
            words.append(range(i, i + 1))
    words = [w for w in words if is_content("".join(pieces[j] for j in w))]
    ranked = sorted(words, key=lambda w: -float(attention[w.start:w.stop].sum()))  # stable: ties keep text order
    return sorted(ranked[:n_words], key=lambda w: w.start)


# ------------------------------------------------------------------------------------------- episodes


@dataclass
class _Episode:
    """One question's run of a dynamic method: its retriever calls, documents, LoRAs and seconds per stage."""

    pipeline: Pipeline
    source: LoraSource | None
    question: str
    timing: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    doc_ids: list[str] = field(default_factory=list)  # every retrieved document, first retrieval first
    lora_names: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # doc id -> score of its latest retrieval
    retrievals: int = 0

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timing[stage] += time.perf_counter() - start

    def prompt(self, docs: Sequence[Document]) -> tuple[list[int], list[bool]]:
        """The prompt's token ids with ``docs`` as passages, and which of its tokens belong to the question."""
        with self.timed("retrieve"):
            passages = self.pipeline.fit_passages(self.question, [d.id for d in docs], [d.text for d in docs])
            text = question_prompt(self.pipeline.base, self.question, passages)
            enc = self.pipeline.base.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            start = text.rfind(self.question.strip())  # the question stands after the passages
            end = start + len(self.question.strip())
            in_question = [a < end and b > start for a, b in enc["offset_mapping"]]
        return list(enc["input_ids"]), in_question

    def retrieve(self, query: str) -> list[Document]:
        """One retriever call for ``query``; returns the top-k documents."""
        with self.timed("retrieve"):
            hits = self.pipeline.retriever.search([query], self.pipeline.k)[0]  # type: ignore[union-attr]
            docs = [self.pipeline.corpus.document(h.doc_id) for h in hits]
            self.scores |= {h.doc_id: h.score for h in hits}
        self.retrievals += 1
        self.doc_ids += [d.id for d in docs if d.id not in self.doc_ids]
        log.debug("retrieval %d for %r: query %r -> %s", self.retrievals, self.question, query, [d.id for d in docs])
        return docs

    @contextmanager
    def applied(self, docs: Sequence[Document]) -> Iterator[None]:
        """Runs the block with ``docs``' combined LoRAs applied (nothing without a source or documents)."""
        if self.source is None or not docs:
            yield
            return
        with self.timed("lora"):
            loras = self.source.loras(docs)
        self.lora_names += [n for n in self.source.names(docs) if n not in self.lora_names]
        start = time.perf_counter()
        with ExitStack() as applied:  # restores the model on exit, also when the block raises
            lora = self.pipeline.combine(loras, [self.scores.get(d.id, 0.0) for d in docs])
            applied.enter_context(injected(self.pipeline.base, lora, mode=self.pipeline.single_mode))
            self.timing["apply"] += time.perf_counter() - start
            yield
            start = time.perf_counter()
        self.timing["apply"] += time.perf_counter() - start

    def answer(self, ids: Sequence[int]) -> Answer:
        text = self.pipeline.base.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
        return Answer(question=self.question, prediction=text, doc_ids=tuple(self.doc_ids),
                      lora_names=tuple(self.lora_names), retrievals=self.retrievals, timing=dict(self.timing))


def _check_pipeline(pipeline: Pipeline, name: str) -> None:
    if pipeline.retriever is None:
        raise HyperPragError(f"method {name!r} retrieves documents but the pipeline has no retriever.")


# -------------------------------------------------------------------------------------------- methods


@dataclass
class Flare:
    """FLARE, direct variant: retrieve when a look-ahead sentence holds a low-confidence token."""

    pipeline: Pipeline
    config: FlareConfig = field(default_factory=FlareConfig)
    source: LoraSource | None = None  # optional: the retrieved documents' LoRAs while regenerating
    name: str = "flare"

    def __post_init__(self) -> None:
        _check_pipeline(self.pipeline, self.name)

    def answer(self, questions: Sequence[str]) -> list[Answer]:
        """One :class:`Answer` per question, each answered on its own.

        The model is held for each question's whole episode: its forwards run the model itself (not through
        the pipeline), with or without the retrieved documents' LoRAs, and another thread's injection or layer
        cut must never show in them."""
        out = []
        for q in questions:
            with exclusive(self.pipeline.base):
                out.append(self._answer(q))
        return out

    def _answer(self, question: str) -> Answer:
        cfg, base, budget = self.config, self.pipeline.base, self.pipeline.max_new_tokens
        beta = cfg.threshold if cfg.mask_threshold is None else cfg.mask_threshold
        run = _Episode(self.pipeline, self.source, question)
        closed_book, _ = run.prompt([])
        answer: list[int] = []
        eos = False
        while not eos and len(answer) < budget:
            n = min(cfg.lookahead, budget - len(answer))
            with run.timed("generate"):
                sentence = greedy_decode(base, closed_book + answer, n, stop_at_sentence_end=True)
            if run.retrievals < cfg.max_retrievals and any(p < cfg.threshold for p in sentence.probs):
                docs = run.retrieve(masked_query(base, sentence.ids, sentence.probs, beta) or question)
                context, _ = run.prompt(docs)
                with run.applied(docs), run.timed("generate"):
                    sentence = greedy_decode(base, context + answer, n, stop_at_sentence_end=True)
            answer += sentence.ids
            eos = sentence.eos
        return run.answer(answer)


@dataclass
class Dragin:
    """DRAGIN: RIND decides when to retrieve, QFS what to retrieve (see the module docstring)."""

    pipeline: Pipeline
    config: DraginConfig = field(default_factory=DraginConfig)
    source: LoraSource | None = None  # optional: the retrieved documents' LoRAs after each retrieval
    name: str = "dragin"

    def __post_init__(self) -> None:
        _check_pipeline(self.pipeline, self.name)

    def answer(self, questions: Sequence[str]) -> list[Answer]:
        """One :class:`Answer` per question, each answered on its own (with eager attention).

        The model is held while its attention implementation is switched and for each episode (see
        :meth:`Flare.answer`): the switch is the model's, every thread would see it."""
        out = []
        for q in questions:
            with exclusive(self.pipeline.base), eager_attention(self.pipeline.base):
                out.append(self._answer(q))
        return out

    def _answer(self, question: str) -> Answer:
        cfg, base, budget = self.config, self.pipeline.base, self.pipeline.max_new_tokens
        run = _Episode(self.pipeline, self.source, question)
        answer: list[int] = []
        docs: list[Document] = []
        while len(answer) < budget:
            context, in_question = run.prompt(docs)
            with run.applied(docs), run.timed("generate"):
                new = greedy_decode(base, context + answer, budget - len(answer))
                check = run.retrievals < cfg.max_retrievals and bool(new.ids)
                attention = last_layer_attention(base, context + answer + new.ids) if check else None  # (T, T)
            trigger = self._trigger(new, attention) if attention is not None else None
            if trigger is None:
                answer += new.ids
                break
            with run.timed("retrieve"):
                sequence = context + answer + new.ids[:trigger]  # the trigger token stands right after it
                eligible = in_question + [True] * (len(sequence) - len(context))
                query = self._query(sequence, eligible, attention[len(sequence), : len(sequence)]) or question
            docs = run.retrieve(query)
            answer += new.ids[:trigger]  # truncate before the trigger; the documents come into the prompt
        return run.answer(answer)

    def _trigger(self, new: Continuation, attention: Tensor) -> int | None:
        """RIND: the first generated token whose score exceeds the threshold, or None."""
        tokenizer = self.pipeline.base.tokenizer
        n = len(new.ids)
        pieces = tokenizer.batch_decode([[t] for t in new.ids])
        special = set(tokenizer.all_special_ids)
        content = torch.tensor([float(t not in special and is_content(p)) for t, p in zip(new.ids, pieces)])  # (n,)
        ends = torch.tensor([ends_sentence(p) for p in pieces])  # (n,)
        scores = rind_scores(torch.tensor(new.entropies), attention[-n:, -n:], content, ends)  # (n,)
        above = (scores > self.config.threshold).nonzero()
        return int(above[0]) if len(above) else None

    def _query(self, sequence: list[int], eligible: list[bool], attention: Tensor) -> str:
        """QFS over the question and the answer so far, given the trigger token's attention row (T,)."""
        tokenizer = self.pipeline.base.tokenizer
        special = set(tokenizer.all_special_ids)
        eligible = [ok and t not in special for t, ok in zip(sequence, eligible)]
        pieces = [tokenizer.decode([t]) if ok else "" for t, ok in zip(sequence, eligible)]
        words = qfs_words(attention, pieces, eligible, self.config.query_words)
        return " ".join(tokenizer.decode(sequence[w.start:w.stop]).strip() for w in words)

"""Document augmentation (paper §3.2): rewrites of each document and QA pairs about it.

For document d_i the paper's self-augmentation asks the LLM for n rewrites d_i^1..n (same facts,
other wording) and m question/answer pairs (q_i^j, a_i^j) (paper: 1 rewrite, 3 QA pairs). The
per-document trainer then trains on every ``[d_i^k ⊕ q_i^j ⊕ a_i^j]`` (:func:`training_pairs`).

Sources:

``llm``       the paper's self-augmentation with a base LLM (batched greedy generation, cached by
              content hash under ``cache_dir("augment")``). The augmenting model may differ from the
              model that answers (paper Table 3); its identity is part of :meth:`AugmentConfig.settings`.
              Output that does not parse is retried once with a few-shot prompt, then repaired
              (partial pairs salvaged) or dropped — counted in :class:`AugmentStats`, never a crash.
``llm-fewshot`` the same generation with a prompt of three worked examples (passage -> short questions
              with answers copied from it) and validated output (:func:`validate_qa`): a question must end
              in "?", its answer must be a span of the document ("The answer is: X" is salvaged to X),
              instruction echoes ("The original passage ...") and duplicates are rejected; rejections are
              counted by reason in ``AugmentStats.rejected``. For small augmenting models whose plain
              output echoes the prompt. Cached like ``llm``, under its own settings.
``template``  LLM-free: the QA pairs a corpus ships (``Corpus.doc_qa``; the fictional benchmark has
              templated pairs for every document) and deterministic sentence re-orderings as rewrites.
``extractive`` LLM-free, for corpora without QA pairs: wh- and cloze questions written from the
              document's own sentences, answers that are exact spans of it (:mod:`hyper_prag.extractive`),
              and the template source's sentence re-orderings as rewrites. Deterministic, not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from hyper_prag import extractive
from hyper_prag.corpus import Corpus, Document
from hyper_prag.errors import HyperPragError
from hyper_prag.model import BaseModel
from hyper_prag.paths import cache_dir

log = logging.getLogger(__name__)

PROMPT_VERSION = 1  # bump when a prompt below changes: cached augmentations then no longer match

REWRITE_PROMPT = (
    "Rewrite the following passage in different words. Keep every fact: all names, dates, numbers and "
    "places must stay exactly the same. Output only the rewritten passage.\n\nPassage: {doc}"
)
QA_PROMPT = (
    "Write {n} questions about the passage below, each followed by its short answer taken from the passage. "
    "Use exactly this format, one per line:\nQ: <question>\nA: <short answer>\n\nPassage: {doc}"
)
QA_FEWSHOT_PROMPT = (
    "Write {n} questions about a passage, each followed by its short answer taken from the passage.\n\n"
    "Example passage: Mara Olen (born 1950) was a painter from Kelb. She won the Silver Prize in 1981.\n"
    "Q: When was Mara Olen born?\nA: 1950\nQ: What was Mara Olen's job?\nA: painter\n"
    "Q: Which prize did Mara Olen win in 1981?\nA: the Silver Prize\n\nPassage: {doc}"
)
FEWSHOT_PROMPT_VERSION = 1  # the same for the llm-fewshot source's prompt and validation
FEWSHOT_QA_PROMPT = (
    "Write {n} short questions about the last passage. Each answer is a few words copied exactly from "
    "that passage.\n\n"
    "Passage: Mara Olen (born 1950) was a painter from Kelb. She won the Silver Prize in 1981.\n"
    "Q: When was Mara Olen born?\nA: 1950\nQ: Where was Mara Olen from?\nA: Kelb\n"
    "Q: Which prize did Mara Olen win in 1981?\nA: the Silver Prize\n\n"
    "Passage: Brenford Mills is a textile company based in Ostra. It was founded by Ivo Tamm in 1902 and "
    "employs 1,200 people.\n"
    "Q: Where is Brenford Mills based?\nA: Ostra\nQ: Who founded Brenford Mills?\nA: Ivo Tamm\n"
    "Q: How many people does Brenford Mills employ?\nA: 1,200\n\n"
    "Passage: The Lannor river rises in the Ketta hills and flows 310 km to the sea at Port Aven.\n"
    "Q: Where does the Lannor river rise?\nA: the Ketta hills\nQ: How long is the Lannor river?\nA: 310 km\n"
    "Q: Where does the Lannor river reach the sea?\nA: Port Aven\n\n"
    "Passage: {doc}"
)
# What a small model writes when it echoes its instructions instead of asking about the passage.
# A match that is itself in the document is no echo ("the Northwest Passage").
_ECHO = re.compile(r"\b(?:the|this|that|original|above|following|given) (?:passage|text)\b|passage|"
                   r"answer to (?:the|this|that) question|\brewrit|\bthe question\b|short answer|"
                   r"\bquestions? about\b|^\s*[QA]\s*:", re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:short\s+|correct\s+|final\s+)?answer(?:\s+to\s+(?:the|this|that)"
                            r"\s+question)?(?:\s+(?:is|was|would be))?\s*[:\-–]?\s*", re.IGNORECASE)
_QA_LINE = re.compile(r"^\s*(?:\d+[.)]\s*)?(Q|A|Question|Answer)\s*\d*\s*[:：]\s*(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class AugmentConfig:
    """How documents are augmented; everything here enters the LoRA store key."""

    n_rewrites: int = 1  # d_i^1..n rewrites per document (paper: 1)
    n_qa: int = 3  # (q, a) pairs per document (paper: 3)
    # llm: self-augmentation with the LLM | llm-fewshot: the same with worked examples and validated pairs |
    # template: the corpus's doc_qa | extractive: questions written from the document's sentences (no LLM)
    source: Literal["llm", "llm-fewshot", "template", "extractive"] = "llm"
    max_new_tokens: int = 160  # generation budget of one rewrite / one QA block
    max_answer_words: int = 12  # longer "answers" are dropped: the paper's answers are short
    batch_size: int = 8  # documents per generation batch

    def settings(self, augmenter: BaseModel | None = None) -> dict:
        """The settings that define the augmented data (the augmenting model's identity included)."""
        out = {"n_rewrites": self.n_rewrites, "n_qa": self.n_qa, "source": self.source}
        if self.source == "llm":
            out |= {"prompt_version": PROMPT_VERSION, "max_new_tokens": self.max_new_tokens,
                    "max_answer_words": self.max_answer_words,
                    "augmenter": augmenter.identity if augmenter is not None else None}
        elif self.source == "llm-fewshot":
            out |= {"prompt_version": FEWSHOT_PROMPT_VERSION, "max_new_tokens": self.max_new_tokens,
                    "max_answer_words": self.max_answer_words,
                    "augmenter": augmenter.identity if augmenter is not None else None}
        elif self.source == "extractive":
            out |= {"extractive_version": extractive.VERSION}
        return out


@dataclass(frozen=True)
class AugmentedDocument:
    """One document with its rewrites and QA pairs."""

    doc_id: str
    text: str  # the original document d_i
    rewrites: tuple[str, ...] = ()  # d_i^1.. (other wordings, same facts)
    qa: tuple[tuple[str, str], ...] = ()  # (q_i^j, a_i^j)

    @property
    def variants(self) -> tuple[str, ...]:
        """The d_i^k of the paper: the document itself followed by its rewrites."""
        return (self.text, *self.rewrites)


@dataclass
class AugmentStats:
    """What happened to the LLM's output (reported, never raised)."""

    documents: int = 0
    cached: int = 0
    parsed: int = 0  # QA blocks that parsed on the first try
    retried: int = 0  # QA blocks generated a second time
    repaired: int = 0  # blocks whose partial pairs were salvaged
    dropped_pairs: int = 0  # pairs thrown away (empty / too long / repeating the question)
    no_qa: int = 0  # documents left with no QA pair at all
    rewrites_replaced: int = 0  # rewrites too short or empty, replaced by the original text
    rejected: dict[str, int] = field(default_factory=dict)  # llm-fewshot: pairs rejected by validate_qa, by reason
    extra: dict = field(default_factory=dict)


def training_pairs(aug: AugmentedDocument) -> list[tuple[str, str, str]]:
    """All ``(d_i^k, q_i^j, a_i^j)`` of a document: every variant with every QA pair (paper §3.2)."""
    return [(d, q, a) for d in aug.variants for q, a in aug.qa]


# ----------------------------------------------------------------------------------------------- parsing


def parse_qa(text: str, max_answer_words: int = 12, stats: AugmentStats | None = None) -> list[tuple[str, str]]:
    """Extracts (question, answer) pairs from LLM output in the ``Q: … / A: …`` format.

    Lenient: numbering, "Question:"/"Answer:" labels, blank lines and trailing chatter are tolerated;
    a question without answer is dropped; answers that are empty, too long, or repeat the question
    are dropped (counted in ``stats.dropped_pairs``).

    Args:
        text: raw generated text (the leading ``Q:`` may be missing when it was in the prompt).
        max_answer_words: longest accepted answer.
        stats: optional counters to update.

    Returns:
        The pairs, in order, without duplicates.
    """
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    lines = text.strip().splitlines()
    if lines and not _QA_LINE.match(lines[0]):
        lines[0] = "Q: " + lines[0]  # the prompt ended with "Q:"
    for line in lines:
        match = _QA_LINE.match(line)
        if not match:
            continue
        label, content = match.group(1).lower()[0], match.group(2).strip()
        if label == "q":
            question = content or None
        elif question is not None:
            answer = content.rstrip(".").strip()
            ok = answer and len(answer.split()) <= max_answer_words and answer.lower() != question.lower()
            if ok and (question, answer) not in pairs:
                pairs.append((question, answer))
            elif stats is not None:
                stats.dropped_pairs += 1
            question = None
    return pairs


def answer_span(answer: str, document: str) -> str | None:
    """The document's own spelling of ``answer``, matched case-insensitively with any whitespace or
    punctuation between its words ("5068" does not match "5,068"; "5, 068" does); None when absent."""
    words = re.findall(r"\w+", answer)
    if not words:
        return None
    match = re.search(r"(?<!\w)" + r"\W+".join(map(re.escape, words)) + r"(?!\w)", document, re.IGNORECASE)
    return match.group() if match else None


def validate_qa(pairs: Sequence[tuple[str, str]], document: str, max_answer_words: int = 12,
                stats: AugmentStats | None = None) -> list[tuple[str, str]]:
    """Keeps the pairs a closed-book question can be trained on; counts the others by reason.

    A kept question ends in "?" and does not echo the instructions ("The original passage ...", "What is
    the answer to the question ...", "Rewrite ...", anything about "the passage"); its answer, stripped of
    a prefix such as "The answer to this question is:", is a span of the document (returned as the
    document spells it), at most ``max_answer_words`` words, and not contained in its question.

    Args:
        pairs: parsed ``(question, answer)`` pairs (:func:`parse_qa`).
        document: the text the answers must come from.
        max_answer_words: longest accepted answer.
        stats: ``stats.rejected[reason]`` is incremented for each rejected pair; reasons: ``echo``,
            ``no_question_mark``, ``empty_answer``, ``too_long``, ``answer_not_in_document``,
            ``answer_in_question``, ``duplicate``.

    Returns:
        The kept pairs, in order.
    """
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()

    def echoes(text: str) -> bool:
        match = _ECHO.search(text)
        return match is not None and match.group().strip().lower() not in document.lower()

    def reject(reason: str) -> None:
        if stats is not None:
            stats.rejected[reason] = stats.rejected.get(reason, 0) + 1

    for question, answer in pairs:
        question = question.strip()
        answer = _ANSWER_PREFIX.sub("", answer.strip(), count=1).strip().strip("\"'“”‘’").rstrip(".").strip()
        if echoes(question) or echoes(answer):
            reject("echo")
        elif not question.endswith("?"):
            reject("no_question_mark")
        elif not answer:
            reject("empty_answer")
        elif len(answer.split()) > max_answer_words:
            reject("too_long")
        elif (span := answer_span(answer, document)) is None:
            reject("answer_not_in_document")
        elif answer_span(span, question) is not None:
            reject("answer_in_question")
        elif (key := " ".join(re.findall(r"\w+", question.lower()))) in seen:
            reject("duplicate")
        else:
            seen.add(key)
            kept.append((question, span))
    return kept


def _clean_rewrite(text: str, original: str, stats: AugmentStats) -> str:
    text = re.sub(r"^(here is|rewritten passage)[^:\n]*:\s*", "", text.strip(), flags=re.IGNORECASE).strip()
    if len(text) < 0.5 * len(original):
        stats.rewrites_replaced += 1
        return original
    return text


# ----------------------------------------------------------------------------------------------- cache


def _doc_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Cache:
    """JSONL cache of augmentations, one file per (augmenter, settings); a truncated last line is skipped."""

    def __init__(self, folder: Path, settings: dict) -> None:
        tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(folder) / f"augment-{tag}.jsonl"
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    row = json.loads(line)
                    self.rows[row["hash"]] = row
                except (ValueError, KeyError):
                    log.warning("skipping unreadable line %d of augmentation cache %s", n, self.path)

    def get(self, text: str) -> dict | None:
        return self.rows.get(_doc_hash(text))

    def add(self, text: str, rewrites: list[str], qa: list[tuple[str, str]]) -> None:
        row = {"hash": _doc_hash(text), "rewrites": rewrites, "qa": [list(p) for p in qa]}
        self.rows[row["hash"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------- sources


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _template(docs: Sequence[Document], config: AugmentConfig, corpus: Corpus | None) -> list[AugmentedDocument]:
    if corpus is None:
        raise HyperPragError("augmentation source 'template' needs the corpus (its doc_qa pairs).")
    out = []
    for doc in docs:
        pairs = corpus.doc_qa.get(doc.id)
        if not pairs:
            raise HyperPragError(f"document {doc.id!r} has no doc_qa pairs in corpus {corpus.name!r}; use augmentation "
                                 "source 'extractive' (no LLM) or 'llm' for corpora without templated QA.")
        qa = tuple(pairs[: config.n_qa]) if config.n_qa > 0 else tuple(pairs)
        out.append(AugmentedDocument(doc.id, doc.text, _reorderings(doc.text, config.n_rewrites), qa))
    return out


def _reorderings(text: str, n: int) -> tuple[str, ...]:
    """``n`` deterministic rewrites: the sentences after the first in a shuffled order (seeded by the text)."""
    sentences = _sentences(text)
    rng = random.Random(_doc_hash(text))
    rewrites = []
    for _ in range(n):
        head, tail = sentences[:1], sentences[1:]  # the first sentence names the entity: keep it first
        rng.shuffle(tail)
        rewrites.append(" ".join(head + tail))
    return tuple(rewrites)


def _extractive(docs: Sequence[Document], config: AugmentConfig, stats: AugmentStats) -> list[AugmentedDocument]:
    out = []
    for doc in docs:
        qa = tuple(extractive.extract_qa(doc.text, doc.title, config.n_qa))
        stats.no_qa += 0 if qa else 1
        out.append(AugmentedDocument(doc.id, doc.text, _reorderings(doc.text, config.n_rewrites), qa))
    return out


def _llm(docs: Sequence[Document], config: AugmentConfig, base: BaseModel, cache: _Cache,
         stats: AugmentStats) -> list[AugmentedDocument]:
    """Self-augmentation: rewrites, then QA pairs (a second prompt for documents short of ``n_qa`` pairs).

    Source ``llm``: the plain prompt, then the few-shot one, lenient parsing. Source ``llm-fewshot``: the
    worked-examples prompt, then the plain one, every pair through :func:`validate_qa`.
    """
    validated = config.source == "llm-fewshot"
    first, second = (FEWSHOT_QA_PROMPT, QA_PROMPT) if validated else (QA_PROMPT, QA_FEWSHOT_PROMPT)

    def parse(output: str, doc: Document) -> list[tuple[str, str]]:
        if not validated:
            return parse_qa(output, config.max_answer_words, stats)
        local = AugmentStats()
        pairs = parse_qa(output, max_answer_words=10**6, stats=local)  # validate_qa applies the limit
        if local.dropped_pairs:
            stats.rejected["malformed"] = stats.rejected.get("malformed", 0) + local.dropped_pairs
        return validate_qa(pairs, doc.text, config.max_answer_words, stats)

    todo = [d for d in docs if cache.get(d.text) is None]
    stats.cached += len(docs) - len(todo)
    batches = range(0, len(todo), config.batch_size)
    for start in tqdm(batches, desc="augment", unit="batch", disable=len(batches) < 2):
        chunk = todo[start : start + config.batch_size]
        rewrites: list[list[str]] = [[] for _ in chunk]
        for _ in range(config.n_rewrites):
            outs = base.generate([base.chat_prompt(REWRITE_PROMPT.format(doc=d.text)) for d in chunk],
                                 max_new_tokens=config.max_new_tokens)
            for i, (d, o) in enumerate(zip(chunk, outs)):
                rewrites[i].append(_clean_rewrite(o, d.text, stats))
        qa: list[list[tuple[str, str]]] = [[] for _ in chunk]
        if config.n_qa > 0:
            prompts = [base.chat_prompt(first.format(n=config.n_qa, doc=d.text)) + "Q:" for d in chunk]
            for i, o in enumerate(base.generate(prompts, max_new_tokens=config.max_new_tokens)):
                qa[i] = parse(o, chunk[i])
            retry = [i for i, pairs in enumerate(qa) if len(pairs) < config.n_qa]
            stats.parsed += len(chunk) - len(retry)
            if retry:
                stats.retried += len(retry)
                prompts = [base.chat_prompt(second.format(n=config.n_qa, doc=chunk[i].text)) + "Q:" for i in retry]
                for i, o in zip(retry, base.generate(prompts, max_new_tokens=config.max_new_tokens)):
                    merged = _merge(qa[i], parse(o, chunk[i])) if validated else \
                        list(dict.fromkeys(qa[i] + parse_qa(o, config.max_answer_words, stats)))
                    if merged:
                        stats.repaired += 1
                    else:
                        stats.no_qa += 1
                    qa[i] = merged
        for i, d in enumerate(chunk):
            cache.add(d.text, rewrites[i], qa[i][: config.n_qa])
    out = []
    for d in docs:
        row = cache.get(d.text)
        out.append(AugmentedDocument(d.id, d.text, tuple(row["rewrites"]), tuple(tuple(p) for p in row["qa"])))
    return out


def _merge(first: list[tuple[str, str]], more: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``first`` then the pairs of ``more`` whose question it does not ask yet (case and punctuation aside)."""
    seen = {" ".join(re.findall(r"\w+", q.lower())) for q, _ in first}
    return first + [(q, a) for q, a in more if " ".join(re.findall(r"\w+", q.lower())) not in seen]


def augment_documents(docs: Sequence[Document], config: AugmentConfig, base: BaseModel | None = None,
                      corpus: Corpus | None = None, cache: Path | None = None,
                      stats: AugmentStats | None = None) -> list[AugmentedDocument]:
    """Augments documents (rewrites + QA pairs), reusing cached results.

    Args:
        docs: the documents.
        config: counts and source.
        base: the augmenting LLM (sources ``"llm"`` and ``"llm-fewshot"``).
        corpus: the corpus holding ``doc_qa`` (source ``"template"``).
        cache: cache folder (default ``cache_dir("augment")``).
        stats: optional counters, filled in.

    Returns:
        One :class:`AugmentedDocument` per input document, in order.
    """
    stats = stats if stats is not None else AugmentStats()
    stats.documents += len(docs)
    if config.source == "template":
        return _template(docs, config, corpus)
    if config.source == "extractive":
        result = _extractive(docs, config, stats)
        if stats.no_qa:
            log.info("extractive augmentation: %d of %d documents gave no QA pair", stats.no_qa, len(docs))
        return result
    if config.source not in ("llm", "llm-fewshot"):
        raise HyperPragError(f"unknown augmentation source {config.source!r}; "
                             "use 'llm', 'llm-fewshot', 'template' or 'extractive'.")
    if base is None:
        raise HyperPragError(f"augmentation source {config.source!r} needs the augmenting base model.")
    result = _llm(docs, config, base, _Cache(cache or cache_dir("augment"), config.settings(base)), stats)
    log.info("augmentation: %s", {k: v for k, v in asdict(stats).items() if v and k != "extra"})
    return result


# ----------------------------------------------------------------------------------------------- files + CLI


def save_augmented(path: str | Path, docs: Sequence[AugmentedDocument]) -> Path:
    """Writes augmented documents as JSONL (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"doc_id": d.doc_id, "text": d.text, "rewrites": list(d.rewrites),
                                "qa": [list(p) for p in d.qa]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_augmented(path: str | Path) -> list[AugmentedDocument]:
    """Reads a file written by :func:`save_augmented`; a malformed line raises naming file and line."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(AugmentedDocument(row["doc_id"], row["text"], tuple(row["rewrites"]),
                                         tuple((q, a) for q, a in row["qa"])))
        except (ValueError, KeyError, TypeError) as err:
            raise HyperPragError(f"{path}, line {n}: not an augmented document ({err}); re-run hyper-prag augment.") from err
    return out

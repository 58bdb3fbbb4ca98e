"""The teacher of context distillation: the frozen base LLM that reads the document in its prompt.

A generated LoRA should make the model answer *as if it had read the document*. The teacher is the same
frozen LLM with the document(s) as passages of the online prompt (:func:`hyper_prag.prompts.question_prompt`,
what standard RAG asks); the student is the LLM under the generated LoRA, asked the question alone
(Doc-to-LoRA, DistilledPRAG, deep context distillation)::

    teacher   question_prompt(q, passages=[d]) ⊕ a    ──► frozen LLM            ──► p_t(a_j | d, q, a_<j)
    student   question_prompt(q)               ⊕ a    ──► frozen LLM + ΔW(d)    ──► p_s(a_j | q, a_<j)
    loss      KL(p_t ‖ p_s) on the answer tokens a_j (the answer is tokenized apart, so both see the same a_j)

The teacher never changes during training, so its distribution on every training answer is computed once:
Doc-to-LoRA keeps its top-k (k = 16) log-probabilities per answer token. :class:`TeacherCache` stores them
on disk, one safetensors file per (base model identity, k), one entry per (teacher prompt, answer): the
entry key hashes :data:`TEACHER_VERSION`, the base identity, k, the sha256 of every passage, the question,
the sha256 of the rendered teacher prompt (so a changed chat template or prompt is a new entry) and the
answer. A changed document or model is therefore a cache miss and is recomputed; nothing is invalidated by hand.

The KL is taken over the teacher's top-k (:func:`topk_kl`), at temperature T, in one of two supports:

``topk``       both distributions restricted to the teacher's k tokens and renormalised there:
               q_t = softmax(log p_t[top-k] / T), q_s = softmax(z_s[top-k] / T). Exact at any T from the cached
               T = 1 log-probabilities (a softmax over a subset does not depend on the normaliser). It says
               nothing about the mass the student puts outside the top-k: the CE on the gold answer does.
``topk_tail``  k + 1 buckets: the k tokens and one "tail" bucket with the rest of the mass, for the teacher
               1 − Σ p_t[top-k], for the student 1 − Σ p_s[top-k]; both tempered as log-masses / T and
               renormalised. At T = 1 it is the exact KL between the bucketed distributions, so mass the
               student moves outside the teacher's top-k costs too.

Both are 0 exactly when the student's distribution equals the teacher's, and positive otherwise; the KL is
multiplied by T² (Hinton et al.) so its gradient scale does not shrink with T.

For corpora without gold answers, :func:`teacher_answers` gives the teacher's own greedy answers (document
in the prompt) to generated questions: what the student should say, by the same teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from hyper_prag.io import atomic_file
from hyper_prag.model import BaseModel
from hyper_prag.paths import cache_dir
from hyper_prag.prompts import question_prompt
from hyper_prag.sequences import TokenSequence, labelled_logits, right_pad, tokenize

log = logging.getLogger(__name__)

TEACHER_VERSION = 1  # bump when what an entry holds changes: every cached entry then misses
KlSupport = Literal["topk", "topk_tail"]


@dataclass(frozen=True)
class TeacherQuery:
    """One question the teacher answers with its documents in context, and the answer it is scored on."""

    passages: tuple[str, ...]  # the document(s) the question is about, in prompt order
    question: str
    answer: str  # the target: a gold answer, or the teacher's own greedy one


@dataclass
class TeacherTopK:
    """The teacher's next-token distribution at each of the A answer tokens of one query, top-k only."""

    indices: Tensor  # (A, k) int64 token ids, most likely first
    logprobs: Tensor  # (A, k) float32 log-probabilities of those tokens (full-vocabulary softmax at T = 1)
    gold: Tensor  # (A,) float32 log-probability of the answer's own token (the teacher's CE is −mean(gold))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def teacher_sequence(base: BaseModel, query: TeacherQuery) -> TokenSequence:
    """The teacher's sequence: the online prompt with the passages, then the answer (labels on the answer only).

    The answer is tokenized apart from the prompt (:func:`~hyper_prag.sequences.tokenize`) exactly as the
    student's ``qa_sequence`` target, so answer token j is the same token in both.
    """
    eos = base.tokenizer.eos_token or ""
    return tokenize(base, question_prompt(base, query.question, query.passages), f"{query.answer.strip()}{eos}",
                    "answer")


def entry_key(base: BaseModel, query: TeacherQuery, k: int) -> str:
    """The cache key of one query's top-k (see the module docstring for what it covers)."""
    prompt = question_prompt(base, query.question, query.passages)
    fields = [TEACHER_VERSION, base.identity, k, [text_sha256(p) for p in query.passages], query.question,
              text_sha256(prompt), query.answer]
    return text_sha256(json.dumps(fields, ensure_ascii=False))


@torch.no_grad()
def teacher_topk(base: BaseModel, queries: Sequence[TeacherQuery], k: int = 16, batch_size: int = 8
                 ) -> list[TeacherTopK]:
    """Runs the teacher (passages in the prompt) and keeps its top-k log-probabilities at every answer token.

    Args:
        base: the frozen base model.
        queries: the queries.
        k: tokens kept per position.
        batch_size: sequences per forward.

    Returns:
        One :class:`TeacherTopK` per query (CPU tensors), in order.
    """
    out: list[TeacherTopK] = []
    pad = base.tokenizer.pad_token_id
    for i in tqdm(range(0, len(queries), batch_size), desc="teacher top-k", unit="batch",
                  disable=len(queries) <= batch_size):
        seqs = [teacher_sequence(base, q) for q in queries[i : i + batch_size]]
        ids, mask, labels = right_pad(seqs, pad)  # each (n, T)
        dev = base.device
        logits, targets, owner = labelled_logits(base, None, ids.to(dev), mask.to(dev), labels.to(dev))  # (K, V) …
        logp = logits.log_softmax(-1)  # (K, V)
        top, idx = logp.topk(k, dim=-1)  # (K, k), (K, k)
        gold = logp.gather(-1, targets[:, None]).squeeze(-1)  # (K,)
        for n in range(len(seqs)):
            rows = owner == n  # the answer tokens of sequence n, in order
            out.append(TeacherTopK(idx[rows].cpu(), top[rows].float().cpu(), gold[rows].float().cpu()))
    return out


class TeacherCache:
    """Teacher top-k log-probabilities on disk: a safetensors file per (base identity, k), an entry per query."""

    def __init__(self, root: str | Path | None = None, save_every: int = 512) -> None:
        """
        Args:
            root: cache folder; default ``cache_dir("teacher")``.
            save_every: queries computed between two saves of the file.
        """
        self.root = Path(root) if root is not None else cache_dir("teacher")
        self.save_every = save_every
        self._loaded: dict[Path, dict[str, Tensor]] = {}
        self.computed = 0  # entries computed (not read from disk) by this object, for logs and tests

    def path(self, base: BaseModel, k: int) -> Path:
        return self.root / f"{base.identity}-k{k}-v{TEACHER_VERSION}.safetensors"

    @staticmethod
    def _read(path: Path) -> dict[str, Tensor]:
        try:
            return load_file(str(path)) if path.is_file() else {}
        except (SafetensorError, OSError) as err:
            log.warning("teacher cache %s unreadable (%s): recomputing", path, err)
            return {}

    def get(self, base: BaseModel, queries: Sequence[TeacherQuery], k: int = 16, batch_size: int = 8
            ) -> list[TeacherTopK]:
        """The teacher's top-k of every query, computing (and saving) only those not cached yet.

        Args:
            base: the frozen base model (the teacher).
            queries: the queries.
            k: tokens kept per answer position.
            batch_size: sequences per teacher forward.

        Returns:
            One :class:`TeacherTopK` per query, in order.
        """
        path = self.path(base, k)
        if path not in self._loaded:
            self._loaded[path] = self._read(path)
        table = self._loaded[path]
        keys = [entry_key(base, q, k) for q in queries]
        todo = list({key: q for key, q in zip(keys, queries) if f"{key}.indices" not in table}.items())
        start = time.perf_counter()
        for i in range(0, len(todo), self.save_every):  # saved chunk by chunk: an interrupted run keeps its work
            chunk = todo[i : i + self.save_every]
            fresh = teacher_topk(base, [q for _, q in chunk], k, batch_size)
            for (key, _), top in zip(chunk, fresh):
                table |= {f"{key}.indices": top.indices.to(torch.int32), f"{key}.logprobs": top.logprobs,
                          f"{key}.gold": top.gold}
            self.computed += len(chunk)
            self._save(path, table)
            log.info("teacher: top-%d of %d / %d answers computed in %.1f s (%d cached)", k, i + len(chunk),
                     len(todo), time.perf_counter() - start, len(queries) - len(todo))
        return [TeacherTopK(table[f"{key}.indices"].long(), table[f"{key}.logprobs"], table[f"{key}.gold"])
                for key in keys]

    def _save(self, path: Path, table: dict[str, Tensor]) -> None:
        # As the doc-embedding cache: a whole new file renamed into place (readers see one complete file), and
        # entries another process saved meanwhile are kept.
        table.update({k: v for k, v in self._read(path).items() if k not in table})
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in table.items()}, str(tmp))


def topk_kl(student_logits: Tensor, indices: Tensor, logprobs: Tensor, temperature: float = 1.0,
            support: KlSupport = "topk") -> Tensor:
    """T² · KL(teacher ‖ student) per position over the teacher's top-k (supports: module docstring).

    Args:
        student_logits: ``(K, V)`` the student's logits at K answer positions.
        indices: ``(K, k)`` the teacher's top-k token ids there.
        logprobs: ``(K, k)`` the teacher's log-probabilities of those tokens (T = 1).
        temperature: T.
        support: ``topk`` or ``topk_tail``.

    Returns:
        ``(K,)`` non-negative.
    """
    if support == "topk":
        t = logprobs / temperature  # (K, k)
        s = student_logits.gather(-1, indices) / temperature  # (K, k)
    else:
        s_logp = student_logits.float().log_softmax(-1).gather(-1, indices)  # (K, k)

        def with_tail(lp: Tensor) -> Tensor:  # log-masses of the k tokens and of the rest
            rest = torch.log(-torch.expm1(lp.logsumexp(-1, keepdim=True).clamp(max=-1e-6)))  # (K, 1): log(1 − Σ p)
            return torch.cat([lp, rest], dim=-1) / temperature  # (K, k + 1)

        t, s = with_tail(logprobs), with_tail(s_logp)
    t, s = t.log_softmax(-1), s.float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (K,)
    return kl.clamp(min=0) * temperature ** 2


def answers_path(root: Path, base: BaseModel) -> Path:
    return root / f"{base.identity}-answers-v{TEACHER_VERSION}.json"


@torch.no_grad()
def teacher_answers(base: BaseModel, questions: Sequence[tuple[tuple[str, ...], str]], max_new_tokens: int = 32,
                    batch_size: int = 16, cache: str | Path | None = None) -> list[str]:
    """The teacher's own greedy answers: each question asked with its passages in the prompt (cached on disk).

    Args:
        base: the frozen base model (the teacher).
        questions: ``(passages, question)`` pairs.
        max_new_tokens: generation budget per answer.
        batch_size: prompts per generate call.
        cache: cache folder (a JSON file per base identity); default ``cache_dir("teacher")``.

    Returns:
        One answer per question, in order (possibly empty: the caller decides what to keep).
    """
    root = Path(cache) if cache is not None else cache_dir("teacher")
    path = answers_path(root, base)
    table: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    prompts = [question_prompt(base, q, passages) for passages, q in questions]
    keys = [text_sha256(json.dumps([TEACHER_VERSION, base.identity, max_new_tokens, text_sha256(p)])) for p in prompts]
    todo = list(dict.fromkeys(k for k in keys if k not in table))
    if todo:
        where = {k: p for k, p in zip(keys, prompts)}
        for i in tqdm(range(0, len(todo), batch_size), desc="teacher answers", unit="batch",
                      disable=len(todo) <= batch_size):
            chunk = todo[i : i + batch_size]
            table |= dict(zip(chunk, base.generate([where[k] for k in chunk], max_new_tokens=max_new_tokens)))
        root.mkdir(parents=True, exist_ok=True)
        on_disk = json.loads(path.read_text()) if path.is_file() else {}
        fd, tmp = tempfile.mkstemp(prefix=".answers-", suffix=".tmp", dir=root)
        with os.fdopen(fd, "w") as handle:
            json.dump(on_disk | table, handle)
        os.replace(tmp, path)
        log.info("teacher: %d greedy answers generated (%d cached)", len(todo), len(keys) - len(todo))
    return [table[k] for k in keys]


__all__ = ["TEACHER_VERSION", "KlSupport", "TeacherQuery", "TeacherTopK", "TeacherCache", "teacher_sequence",
           "teacher_topk", "entry_key", "topk_kl", "teacher_answers"]

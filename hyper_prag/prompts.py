"""The prompt templates every method shares (one place, so every method is scored on equal terms).

At inference every method asks the same question the same way; only what stands before the
question differs (nothing, retrieved passages, or augmented passages). Per-document training
sequences (paper §3.2, ``[d_i^k ⊕ q_i^j ⊕ a_i^j]``) end with exactly the inference prompt of a
closed-book question, so what a LoRA learns is asked for in the form it was learnt. Every prompt
starts with the same worked examples (:data:`DEMONSTRATIONS`, earlier user/assistant turns), so
every method answers in the same short format and EM/F1 compare knowledge, not verbosity.

A base model without a chat template (a pretrained, not instruction-tuned checkpoint) is asked in
a plain format instead, built by :meth:`~hyper_prag.model.BaseModel.chat_prompt`::

    <each worked example, as below, followed by " <its answer>\n\n">
    [Passage 1: …\n\n]Answer the question with a short phrase, without explanation.
    Question: <question>
    Answer:

and its training answers follow the cue after one space (``"Answer: Paris"``). Such a model does
not stop by itself after the answer: :func:`answer_text` keeps the first line of its completion.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from hyper_prag.model import BaseModel

INSTRUCTION = "Answer the question with a short phrase, without explanation."

# Fixed worked examples, placed as earlier user/assistant turns before every question of every method
# (and of every training sequence): questions with and without a passage, each answered by the bare
# answer. A small instruction-tuned model follows a shown format far more reliably than the instruction
# alone, above all when passages stand before the question (SmolLM2-135M with the instruction only:
# standard RAG answered in sentences, median 18 tokens; with these turns 4.5 tokens, measured on 40
# fictional test lookups with the right document as passage).
DEMONSTRATIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (  # (question, passages, answer)
    ("Who founded Microsoft?", ("Microsoft is an American technology company founded by Bill Gates and Paul Allen "
                                "in 1975. It is headquartered in Redmond.",), "Bill Gates and Paul Allen"),
    ("When was the novel Dracula published?", (), "1897"),
    ("What was Marie Curie's occupation?", ("Marie Curie was a physicist and chemist born in Warsaw in 1867.",),
     "physicist"),
)


def user_message(question: str, passages: Sequence[str] = ()) -> str:
    """The user turn: optional numbered passages, the instruction, then the question."""
    context = "".join(f"Passage {i + 1}: {p.strip()}\n\n" for i, p in enumerate(passages))
    return f"{context}{INSTRUCTION}\nQuestion: {question.strip()}"


def demonstration() -> tuple[tuple[str, str], ...]:
    """The worked examples every prompt starts with, as (user, assistant) turns."""
    return tuple((user_message(q, passages), a) for q, passages, a in DEMONSTRATIONS)


def fixed_head(base: BaseModel) -> str:
    """What every prompt of ``base`` starts with: the system turn and the worked examples, up to the
    question's own user message. Training sequences read it but carry no loss on it
    (``sequences.tokenize(..., unlearned=fixed_head(base))``)."""
    mark = "\u0000question\u0000"
    full = base.chat_prompt(mark, history=demonstration())
    return full[: full.index(mark)]


def format_id() -> str:
    """12 hex digits naming the prompt format (instruction, worked examples, what training learns of them);
    part of every per-document store key, so LoRAs trained under another format are never served."""
    payload = json.dumps({"instruction": INSTRUCTION, "examples": DEMONSTRATIONS, "head": "unlearned"}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def question_prompt(base: BaseModel, question: str, passages: Sequence[str] = ()) -> str:
    """The full prompt for one question, ready for the answer (the plain format without a chat template).

    The :func:`demonstration` turns stand before the question, the same for every method.

    Args:
        base: the model whose chat template (or plain format) is used.
        question: the question.
        passages: documents put in context (standard RAG, DA-RAG, "combine both"); none for
            closed-book and purely parametric methods.

    Returns:
        The prompt string.
    """
    return base.chat_prompt(user_message(question, passages), history=demonstration())


def _target(base: BaseModel, answer: str) -> str:
    """The answer as a training target: after the chat template's assistant header, or after the plain cue and a space."""
    eos = base.tokenizer.eos_token or ""
    return f"{'' if base.has_chat_template else ' '}{answer.strip()}{eos}"


def answer_text(base: BaseModel, completion: str) -> str:
    """The answer in a generated completion: all of it for a chat model, the first line for a plain prompt."""
    text = completion.strip()
    return text if base.has_chat_template else text.split("\n", 1)[0].strip()


def training_sequence(base: BaseModel, document: str, question: str, answer: str, examples: bool = True
                      ) -> tuple[str, str]:
    """One per-document training sequence ``d ⊕ q ⊕ a`` (paper §3.2), as ``(prefix, answer)``.

    The prefix is the document (or one of its rewrites) followed by the closed-book question
    prompt; the answer is followed by the end-of-turn token. The causal-LM loss is taken over
    the whole concatenation (paper) or only the answer, as the trainer chooses. Without a chat
    template the answer starts with a space, after the plain ``Answer:`` cue.

    Args:
        base: the model whose chat template is used.
        document: d_i^k, the document or a rewrite of it.
        question: q_i^j.
        answer: a_i^j.
        examples: the worked examples stand before the question, as at answer time; ``False``: the
            question alone after the system turn (shorter and cheaper to train on).

    Returns:
        ``(prefix, target)``, to be concatenated by the tokenizer.
    """
    prompt = question_prompt(base, question) if examples else base.chat_prompt(user_message(question))
    return f"{document.strip()}\n\n{prompt}", _target(base, answer)


def closed_book_sequence(base: BaseModel, question: str, answer: str, examples: bool = True) -> tuple[str, str]:
    """A question/answer pair without its document, as ``(prefix, answer)``: the closed-book question
    prompt (with the worked examples, or the question alone after the system turn) and the answer."""
    prompt = question_prompt(base, question) if examples else base.chat_prompt(user_message(question))
    return prompt, _target(base, answer)


def qa_sequence(base: BaseModel, question: str, answer: str) -> tuple[str, str]:
    """A question/answer pair with no document: what a generated LoRA alone must answer (hypernetwork)."""
    return question_prompt(base, question), _target(base, answer)

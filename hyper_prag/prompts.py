"""The prompt templates every method shares (one place, so every method is scored on equal terms).

At inference every method asks the same question the same way; only what stands in the system turn
differs (nothing, retrieved passages, or augmented passages). Per-document training sequences
(paper §3.2, ``[d_i^k ⊕ q_i^j ⊕ a_i^j]``) end with exactly the inference prompt of a closed-book
question, so what a LoRA learns is asked for in the form it was learnt. Every prompt holds the same
worked examples (:data:`DEMONSTRATIONS`, earlier user/assistant turns), so every method answers in the
same short format and EM/F1 compare knowledge, not verbosity::

    system     <the model's own system text>[\n\nPassage 1: …\n\nPassage 2: …]
    user       Answer the question with a short phrase, without explanation.\nQuestion: <example>
    assistant  <its bare answer>                                  (… one pair per worked example)
    user       Answer the question with a short phrase, without explanation.\nQuestion: <question>
    assistant  ▌

Passages stand in the system turn, not in the question's user turn (only a chat template without a system
role, such as Gemma's, gets them at the start of the question's user turn): the last user turn then reads
exactly like a worked example, and a small model answers it in their format. With the passages in the
user turn before the question, SmolLM2-135M restated them in sentences (standard RAG median 17.5 answer
tokens on 100 fictional test questions) and read them worse (see ``benchmarks/demo_variants.py``).

A base model without a chat template (a pretrained, not instruction-tuned checkpoint) is asked in
a plain format instead, built by :meth:`~hyper_prag.model.BaseModel.chat_prompt`::

    [Passage 1: …\n\n…\n\n]<each worked example, as below, followed by " <its answer>\n\n">
    Answer the question with a short phrase, without explanation.
    Question: <question>
    Answer:

and its training answers follow the cue after one space (``"Answer: Paris"``). Such a model does
not stop by itself after the answer: :func:`answer_text` keeps the first line of its completion.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from hyper_prag.errors import HyperPragError
from hyper_prag.model import BaseModel

INSTRUCTION = "Answer the question with a short phrase, without explanation."

# Fixed worked examples, placed as earlier user/assistant turns before every question of every method
# (and of every training sequence that keeps them): each question answered by the bare answer. A small
# instruction-tuned model follows a shown format far more reliably than the instruction alone; the kinds
# of question a small model otherwise answers in sentences (two-hop, comparison, yes/no) are among them.
DEMONSTRATIONS: tuple[tuple[str, str], ...] = (  # (question, answer)
    ("Who founded Microsoft?", "Bill Gates and Paul Allen"),
    ("When was the novel Dracula published?", "1897"),
    ("What was Marie Curie's occupation?", "physicist"),
    ("In which city was the author of Dracula born?", "Dublin"),
    ("Who was born earlier, Albert Einstein or Isaac Newton?", "Isaac Newton"),
    ("Were Mozart and Beethoven born in the same country?", "no"),
)

# Where retrieved passages stand (part of the format id): in the system turn, after the model's own text.
PASSAGES_IN = "system"


def user_message(question: str, passages: Sequence[str] = ()) -> str:
    """The user turn: the instruction, then the question; ``passages`` (numbered) before them only where the
    passages cannot stand in the system turn (see :func:`question_prompt`)."""
    context = f"{_passage_block(passages)}\n\n" if passages else ""
    return f"{context}{INSTRUCTION}\nQuestion: {question.strip()}"


def system_message(base: BaseModel, passages: Sequence[str] = ()) -> str | None:
    """The system turn: the model's own system text, then the numbered passages; ``None`` (the model's
    default turn) without passages."""
    if not passages:
        return None
    own = base.default_system.strip()
    return f"{own}\n\n{_passage_block(passages)}" if own else _passage_block(passages)


def _passage_block(passages: Sequence[str]) -> str:
    return "\n\n".join(f"Passage {i + 1}: {p.strip()}" for i, p in enumerate(passages))


def demonstration() -> tuple[tuple[str, str], ...]:
    """The worked examples every prompt holds, as (user, assistant) turns."""
    return tuple((user_message(q), a) for q, a in DEMONSTRATIONS)


def fixed_head(base: BaseModel) -> str:
    """What every prompt of ``base`` without passages starts with: the system turn and the worked examples,
    up to the question's own user message. Training sequences read it but carry no loss on it
    (``sequences.tokenize(..., unlearned=fixed_head(base))``); an activated LoRA acts after it
    (:mod:`hyper_prag.activated`)."""
    mark = "\u0000question\u0000"
    full = base.chat_prompt(mark, history=demonstration())
    return full[: full.index(mark)]


def head_of(prompt: str) -> str:
    """The part of a :func:`question_prompt` before its question's user message (system turn with any passages,
    worked examples): what an activated LoRA leaves to the base model. Without passages it is :func:`fixed_head`."""
    at = prompt.rfind(INSTRUCTION)  # the question's user message opens with the instruction (the last one)
    if at < 0:
        raise HyperPragError("the prompt does not hold a question turn of hyper_prag.prompts; build it with "
                             "question_prompt.")
    return prompt[:at]


def format_id() -> str:
    """12 hex digits naming the prompt format (instruction, worked examples, what training learns of them);
    part of every per-document store key, so LoRAs trained under another format are never served."""
    payload = json.dumps({"instruction": INSTRUCTION, "examples": DEMONSTRATIONS, "head": "unlearned",
                          "passages": PASSAGES_IN}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def question_prompt(base: BaseModel, question: str, passages: Sequence[str] = ()) -> str:
    """The full prompt for one question, ready for the answer (the plain format without a chat template).

    The :func:`demonstration` turns stand before the question, the same for every method; passages
    stand in the system turn (:func:`system_message`).

    Args:
        base: the model whose chat template (or plain format) is used.
        question: the question.
        passages: documents put in context (standard RAG, DA-RAG, "combine both"); none for
            closed-book and purely parametric methods.

    Returns:
        The prompt string.
    """
    if passages and not base.takes_system_turn:  # a template without a system role: before the instruction
        return base.chat_prompt(user_message(question, passages), history=demonstration())
    return base.chat_prompt(user_message(question), system=system_message(base, passages), history=demonstration())


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

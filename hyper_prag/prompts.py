"""The prompt templates every method shares (one place, so every method is scored on equal terms).

At inference every method asks the same question the same way; only what stands before the
question differs (nothing, retrieved passages, or augmented passages). Per-document training
sequences (paper §3.2, ``[d_i^k ⊕ q_i^j ⊕ a_i^j]``) end with exactly the inference prompt of a
closed-book question, so what a LoRA learns is asked for in the form it was learnt.
"""

from __future__ import annotations

from collections.abc import Sequence

from hyper_prag.model import BaseModel

INSTRUCTION = "Answer the question with a short phrase, without explanation."


def user_message(question: str, passages: Sequence[str] = ()) -> str:
    """The user turn: optional numbered passages, the instruction, then the question."""
    context = "".join(f"Passage {i + 1}: {p.strip()}\n\n" for i, p in enumerate(passages))
    return f"{context}{INSTRUCTION}\nQuestion: {question.strip()}"


def question_prompt(base: BaseModel, question: str, passages: Sequence[str] = ()) -> str:
    """The full chat prompt for one question, ready for the assistant's answer.

    Args:
        base: the model whose chat template is used.
        question: the question.
        passages: documents put in context (standard RAG, DA-RAG, "combine both"); none for
            closed-book and purely parametric methods.

    Returns:
        The prompt string.
    """
    return base.chat_prompt(user_message(question, passages))


def training_sequence(base: BaseModel, document: str, question: str, answer: str) -> tuple[str, str]:
    """One per-document training sequence ``d ⊕ q ⊕ a`` (paper §3.2), as ``(prefix, answer)``.

    The prefix is the document (or one of its rewrites) followed by the closed-book question
    prompt; the answer is followed by the end-of-turn token. The causal-LM loss is taken over
    the whole concatenation (paper) or only the answer, as the trainer chooses.

    Args:
        base: the model whose chat template is used.
        document: d_i^k, the document or a rewrite of it.
        question: q_i^j.
        answer: a_i^j.

    Returns:
        ``(prefix, target)``, to be concatenated by the tokenizer.
    """
    eos = base.tokenizer.eos_token or ""
    return f"{document.strip()}\n\n{question_prompt(base, question)}", f"{answer.strip()}{eos}"


def qa_sequence(base: BaseModel, question: str, answer: str) -> tuple[str, str]:
    """A question/answer pair with no document: what a generated LoRA alone must answer (hypernetwork)."""
    eos = base.tokenizer.eos_token or ""
    return question_prompt(base, question), f"{answer.strip()}{eos}"

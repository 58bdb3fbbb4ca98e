"""Training sequences for the causal-LM loss: tokenisation, right-pad collate, the loss on labelled tokens.

Both trainers learn from the same kind of sequence, a *prefix* followed by a *target*:

* the per-document trainer (:mod:`hyper_prag.encoders.per_doc`, paper §3.2): prefix = d ⊕ q (the document
  or a rewrite with the closed-book question prompt), target = a (the answer and the end-of-turn token);
* the hypernet trainer (``hyper_prag/training/hypernet.py``): prefix = the question prompt alone, target = a.

Prefix and target are tokenised apart and concatenated, so the target span is exact. Every position
carries a label: the next-token id it must predict, or :data:`IGNORE` (no loss)::

    input_ids  [p_1 … p_P  a_1 … a_A  pad … pad]
    labels     [p_1 … p_P  a_1 … a_A  IGN … IGN]     loss_on="all"    (paper: the whole d ⊕ q ⊕ a)
    labels     [IGN … IGN  a_1 … a_A  IGN … IGN]     loss_on="answer"

A prefix may hold an *unlearned* span (``tokenize(..., unlearned=...)``): text every sequence shares, such
as the prompt's system turn and worked examples (:func:`hyper_prag.prompts.fixed_head`). It is read but
never learned, whatever ``loss_on`` says: a LoRA trained on it learns to repeat the worked examples'
answers instead of its document.

Sequence n of a right-padded batch under LoRA n (``inject.injected(mode="batched")``) has the loss

    loss_n = 1/|K_n| Σ_{t ∈ K_n} −log p(labels[n, t+1] | input_ids[n, ≤ t]; W + ΔW_n)

where K_n = the positions t whose *next* label is not IGNORE: a mean over that sequence's labelled tokens,
not over the batch, so summing the loss_n gives each sequence exactly its own gradient. Logits are
computed only at the K = Σ_n |K_n| labelled positions (the (N, T, V) logits tensor is never formed).
Right padding after the real tokens of a causal model, masked in attention and labelled IGNORE, changes
nothing before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from hyper_prag.activated import HeadCache, from_head_end, suffix_hidden
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import injected
from hyper_prag.lora import Lora
from hyper_prag.model import BaseModel

IGNORE = -100  # label of a position that carries no loss (Hugging Face's convention)
LossOn = Literal["all", "answer"]


@dataclass(frozen=True)
class TokenSequence:
    """One tokenised training sequence ``prefix ⊕ target`` with its labels (IGNORE where no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def tokenize(base: BaseModel, prefix: str, target: str, loss_on: LossOn, max_length: int | None = None,
             unlearned: str = "") -> TokenSequence:
    """Tokenises ``prefix ⊕ target`` (prefix and target separately, so the target span is exact).

    Args:
        base: the model whose tokenizer is used (no special tokens are added: the chat template has them).
        prefix: what the model reads before the target (may be empty).
        target: the tokens to learn (the answer and its end-of-turn token).
        loss_on: ``"all"``: every position carries a loss; ``"answer"``: the prefix positions are IGNORE.
        max_length: keep the last ``max_length`` tokens (the question and answer survive); ``None``: all.
        unlearned: a span of ``prefix`` (its last occurrence) whose tokens are IGNORE under any ``loss_on``;
            the prefix is tokenised in three pieces around it (split at the chat template's special
            tokens, so the ids are those of the whole prefix). ``""``: none.

    Returns:
        The :class:`TokenSequence`.
    """
    tok = base.tokenizer
    at = prefix.rfind(unlearned) if unlearned else -1
    if unlearned and at < 0:
        raise HyperPragError("the unlearned span is not part of the training prefix; build both from the same "
                             "prompt (hyper_prag.prompts).")
    pieces = [(prefix, True)] if at < 0 else [(prefix[:at], True), (unlearned, False),
                                              (prefix[at + len(unlearned):], True)]
    p: list[int] = []
    labels: list[int] = []
    for text, learned in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"] if text else []
        p += piece
        labels += list(piece) if learned and loss_on == "all" else [IGNORE] * len(piece)
    a = tok(target, add_special_tokens=False)["input_ids"]
    ids = p + a
    labels += list(a)
    if max_length is not None:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return TokenSequence(tuple(ids), tuple(labels))


def right_pad(sequences: Sequence[TokenSequence], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pads sequences to the longest one (dynamic padding: each batch to its own longest).

    Args:
        sequences: the N sequences of one batch.
        pad_id: token id of the padding.

    Returns:
        ``(input_ids (N, T), attention_mask (N, T) 1 = real token, labels (N, T) IGNORE at padding)``, int64.
    """
    T = max(len(s.input_ids) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)  # (N, T)
    labels = torch.full((len(sequences), T), IGNORE, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)  # (N, T)
    for i, s in enumerate(sequences):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.input_ids)] = 1
    return ids, mask, labels


def labelled_logits(base: BaseModel, lora: Lora | None, input_ids: Tensor, attention_mask: Tensor,
                    labels: Tensor, head: HeadCache | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Logits at the labelled positions of each sequence, with sequence n under LoRA n (or under no LoRA).

    Args:
        base: the frozen base model.
        lora: a batch of N LoRAs, one per sequence (differentiable), or ``None`` for the plain model.
        input_ids: ``(N, T)``.
        attention_mask: ``(N, T)``, 1 = real token.
        labels: ``(N, T)``, IGNORE where no loss.
        head: the cached prompt head every sequence starts with (:mod:`hyper_prag.activated`): the LoRA acts from
            the question onward and only the tokens after the head run (the same logits as a full forward with
            ``injected(..., active_from=P)``); ``None``: a full forward, the LoRA at every position.

    Returns:
        ``(logits (K, V) float32, targets (K,), owner (K,))``: the K labelled positions of the batch, and the
        sequence each belongs to.
    """
    if head is not None:
        return _labelled_after_head(base, lora, input_ids, attention_mask, labels, head)

    def hidden() -> Tensor:
        return base.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    if lora is None:
        h = hidden()  # (N, T, H)
    else:
        with injected(base, lora, mode="batched"):
            h = hidden()  # (N, T, H)
    return labelled_positions(base, h, labels)


def labelled_positions(base: BaseModel, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """LM-head logits where the next token carries a label: ``h`` ``(N, T, H)`` at positions predicting
    ``labels[:, 1:]`` ``(N, T−1)``. Returns ``(logits (K, V) float32, targets (K,), owner (K,))``."""
    targets = labels[:, 1:]  # (N, T-1): token t+1 is predicted at position t
    labelled = targets != IGNORE  # (N, T-1)
    logits = base.model.lm_head(h[:, :-1][labelled]).float()  # (K, V): only positions with a label
    owner = torch.arange(len(targets), device=labels.device)[:, None].expand_as(targets)[labelled]  # (K,)
    return logits, targets[labelled], owner


def check_after_head(head: HeadCache, input_ids: Tensor, labels: Tensor) -> None:
    """Checks that sequences ``(N, T)`` start with ``head`` and carry no label inside it (a loss there cannot be
    computed from the cache: the head is read, never learned)."""
    head.check_prefix(input_ids)
    if bool((labels[:, 1: head.length] != IGNORE).any()):
        raise HyperPragError("these sequences carry a loss inside the cached prompt head; tokenize them with "
                             "unlearned=prompt_head(base) or use apply_from='all'.")


def _labelled_after_head(base: BaseModel, lora: Lora | None, input_ids: Tensor, attention_mask: Tensor,
                         labels: Tensor, head: HeadCache) -> tuple[Tensor, Tensor, Tensor]:
    check_after_head(head, input_ids, labels)
    P = head.length
    with injected(base, lora, mode="batched") if lora is not None else nullcontext():
        h = suffix_hidden(base, head, input_ids[:, P:], attention_mask[:, P:])  # (N, T − P, H)
    return labelled_positions(base, from_head_end(head, h), labels[:, P - 1:])  # positions P − 1 … T − 1


def per_sample_mean(values: Tensor, owner: Tensor, n: int) -> Tensor:
    """Mean of ``values`` ``(K,)`` per sample (``owner`` ``(K,)`` in 0 … n−1) → ``(n,)``; 0 for a sample with none."""
    total = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, owner, values)  # (n,)
    count = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, owner, torch.ones_like(values))
    return total / count.clamp(min=1)  # (n,)


def sequence_losses(base: BaseModel, lora: Lora | None, input_ids: Tensor, attention_mask: Tensor,
                    labels: Tensor, head: HeadCache | None = None) -> Tensor:
    """The causal-LM loss of each sequence under its own LoRA: a mean over its labelled tokens (module docstring).

    Args:
        base: the frozen base model.
        lora: a batch of N LoRAs (differentiable), or ``None`` for the plain model.
        input_ids: ``(N, T)``.
        attention_mask: ``(N, T)``.
        labels: ``(N, T)``.
        head: see :func:`labelled_logits`.

    Returns:
        ``(N,)`` losses; a trainer sums them (one gradient per sequence) or averages them.
    """
    logits, targets, owner = labelled_logits(base, lora, input_ids, attention_mask, labels, head)  # (K, V), (K,), (K,)
    return per_sample_mean(F.cross_entropy(logits, targets, reduction="none"), owner, len(input_ids))  # (N,)


__all__ = ["IGNORE", "LossOn", "TokenSequence", "tokenize", "right_pad", "labelled_logits", "labelled_positions",
           "check_after_head", "per_sample_mean",
           "sequence_losses"]

"""Activated LoRA application: the prompt's fixed head is read by the base model, the LoRA acts from the question on.

Every closed-book, P-RAG and hypernet prompt starts with the same head, the system turn and the worked examples
up to the question's own text (:func:`hyper_prag.prompts.prompt_head`): 244 of the ~275 tokens of a SmolLM2
question. A LoRA that acts only from the question onward (PEFT's *activated LoRA*, ``alora_invocation_tokens``)
leaves the head's keys and values exactly those of the base model, so they are computed once and reused::

    all positions     [head ⊕ question ⊕ answer]  every token under W + ΔW      (one forward over ~275 tokens)
    from the question [head]  under W             ── KV cache, computed once per base model and prompt format
                      [question ⊕ answer] under W + ΔW, attending to the cached head   (~30 tokens per step)

Both are exact forwards of the same causal model: the second equals a full forward whose LoRA is masked at the
head's positions (``injected(..., active_from=P)``), and with ΔW = 0 both equal the plain model. A LoRA is
served the way it was trained: the hypernet checkpoint records its application (``apply_from``).

:class:`HeadCache` holds the head's per-layer keys and values and its last hidden state (the logits that
predict the first token after it); :func:`head_cache` makes it once per model and head text.
:func:`suffix_hidden` runs the tokens after the head, :func:`generate` decodes greedily from the cached head
(the question tokens left-padded between the head and the answer, positions counted over real tokens only).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from hyper_prag.errors import HyperPragError
from hyper_prag.model import BaseModel

ApplyFrom = Literal["all", "question"]  # where a LoRA acts: every position, or from the question's text onward
APPLY_FROM: tuple[str, ...] = ("all", "question")

_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, HeadCache]]" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()
ACTIVE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models with a LoRA applied (hyper_prag.inject)


@dataclass(frozen=True)
class HeadCache:
    """The base model's keys and values over a fixed prompt head (no LoRA), reused by every sequence after it."""

    text: str
    ids: tuple[int, ...]  # the head's token ids, P of them
    keys: tuple[Tensor, ...]  # per decoder layer (1, kv_heads, P, head_dim)
    values: tuple[Tensor, ...]  # per decoder layer (1, kv_heads, P, head_dim)
    last_hidden: Tensor  # (1, hidden): final-normed state at position P − 1 (it predicts the first token after)

    @property
    def length(self) -> int:
        return len(self.ids)

    def past(self, n: int) -> DynamicCache:
        """A fresh cache holding the head for a batch of ``n`` (a forward appends to it; the head is never changed)."""
        return DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                            for k, v in zip(self.keys, self.values)])

    def to(self, device: torch.device) -> "HeadCache":
        move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return HeadCache(self.text, self.ids, move(self.keys), move(self.values), self.last_hidden.to(device))

    def check_prefix(self, input_ids: Tensor) -> None:
        """Raises unless every row of ``input_ids`` ``(N, T)`` starts with the head's ids."""
        head = torch.tensor(self.ids, device=input_ids.device)
        if input_ids.shape[1] < self.length or not bool((input_ids[:, : self.length] == head).all()):
            raise HyperPragError("these sequences do not start with the cached prompt head; build them with "
                                 "hyper_prag.prompts (the same base model and prompt format), or use apply_from='all'.")


def head_cache(base: BaseModel, text: str) -> HeadCache:
    """The :class:`HeadCache` of ``text`` on ``base``, computed on first use and kept while the model lives.

    Computed with no LoRA applied (refused while one is: the head must hold the base model's keys and values).
    The cache is keyed by the text, so another prompt format or system turn gets its own.
    """
    with _GUARD:
        per_model = _CACHES.setdefault(base.model, {})
        cached = per_model.get(text)
    if cached is not None and cached.keys[0].device == base.device:
        return cached
    cache = prefill(base, text)
    with _GUARD:
        per_model[text] = cache
    return cache


def prefill(base: BaseModel, text: str) -> HeadCache:
    """The base model's keys and values over ``text`` (no LoRA may be applied), not kept: for a head met once,
    such as a prompt whose system turn holds retrieved passages."""
    if base.model in ACTIVE:
        raise HyperPragError("the prompt head's cache must be computed with no LoRA applied; compute it "
                             "(head_cache) before injecting.")
    ids = base.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise HyperPragError("an empty prompt head cannot be cached; use apply_from='all'.")
    with torch.no_grad():
        out = base.model.model(input_ids=torch.tensor([ids], device=base.device), use_cache=True)
    past = out.past_key_values
    return HeadCache(text, tuple(ids), tuple(layer.keys for layer in past.layers),
                     tuple(layer.values for layer in past.layers), out.last_hidden_state[:, -1])


def after_head(cache: HeadCache, n: int, length: int, device: torch.device) -> dict:
    """Keyword arguments of a decoder forward over ``length`` tokens after the head, for a batch of ``n``: a fresh
    copy of the cached head and the tokens' absolute positions P … P + length − 1 (pass the attention mask over
    head and tokens, ``(n, P + length)``, beside them)."""
    positions = (cache.length + torch.arange(length, device=device)).expand(n, length)  # (n, length)
    return {"past_key_values": cache.past(n), "position_ids": positions, "use_cache": True}


def from_head_end(cache: HeadCache, h: Tensor) -> Tensor:
    """``h`` ``(N, S, H)`` of the tokens after the head with the head's last state before them: positions
    P − 1 … P + S − 1, so position P − 1 predicts the first token after the head."""
    return torch.cat([cache.last_hidden.to(h.dtype).expand(len(h), 1, -1), h], 1)  # (N, S + 1, H)


def suffix_hidden(base: BaseModel, cache: HeadCache, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final-normed hidden states of the tokens after the head, attending to the cached head.

    Args:
        base: the model (with whatever LoRA the caller applied: it sees only these positions).
        cache: the head, on ``base``'s device.
        input_ids: ``(N, S)`` the tokens after the head, right-padded.
        attention_mask: ``(N, S)`` 1 = real token.

    Returns:
        ``(N, S, hidden)``; position j is absolute position P + j.
    """
    N, S = input_ids.shape
    head = torch.ones(N, cache.length, dtype=attention_mask.dtype, device=attention_mask.device)
    return base.model.model(input_ids=input_ids, attention_mask=torch.cat([head, attention_mask], 1),
                            **after_head(cache, N, S, input_ids.device)).last_hidden_state  # (N, S, H)


def split_prompts(base: BaseModel, prompts: Sequence[str], head: str) -> list[list[int]] | None:
    """The token ids after ``head`` of each prompt (tokenised apart from the head, as training does), or
    ``None`` if some prompt does not start with it."""
    if not all(p.startswith(head) for p in prompts):
        return None
    return [base.tokenizer(p[len(head):], add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def generate(base: BaseModel, cache: HeadCache, suffixes: Sequence[Sequence[int]], max_new_tokens: int = 32
             ) -> list[str]:
    """Greedy decoding after the cached head (the counterpart of :meth:`BaseModel.generate`).

    The suffixes are left-padded between the head and the first new token; padding is masked and positions
    count only real tokens, so each row computes what it would alone.

    Args:
        base: the model, with the caller's LoRA applied (it acts on the suffix and the new tokens only).
        cache: the head on ``base``'s device.
        suffixes: per prompt, its token ids after the head (:func:`split_prompts`).
        max_new_tokens: generation budget per prompt.

    Returns:
        One decoded, stripped completion per prompt.
    """
    if any(len(s) == 0 for s in suffixes):
        raise HyperPragError("a prompt holds nothing after its head; give it a question.")
    tok, device = base.tokenizer, base.device
    N, S, P = len(suffixes), max(len(s) for s in suffixes), cache.length
    ids = torch.full((N, S), tok.pad_token_id, dtype=torch.long)  # (N, S) left-padded
    mask = torch.zeros(N, S, dtype=torch.long)  # (N, S)
    for i, s in enumerate(suffixes):
        ids[i, S - len(s):], mask[i, S - len(s):] = torch.tensor(list(s)), 1
    ids, mask = ids.to(device), mask.to(device)
    full_mask = torch.cat([torch.ones(N, P, dtype=torch.long, device=device), mask], 1)  # (N, P + S)
    positions = P + (mask.cumsum(1) - 1).clamp(min=0)  # (N, S) real tokens count from P
    past = cache.past(N)
    eos = tok.eos_token_id
    done = torch.zeros(N, dtype=torch.bool, device=device)
    new: list[Tensor] = []
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        out = base.model(input_ids=step_ids, attention_mask=full_mask, position_ids=step_pos, past_key_values=past,
                         use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)  # (N,)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        new.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1  # (N, 1)
        full_mask = torch.cat([full_mask, torch.ones(N, 1, dtype=torch.long, device=device)], 1)
    tokens = torch.stack(new, 1)  # (N, T_new)
    return [text.strip() for text in tok.batch_decode(tokens, skip_special_tokens=True)]


__all__ = ["APPLY_FROM", "ApplyFrom", "HeadCache", "after_head", "from_head_end", "generate", "head_cache", "prefill",
           "split_prompts", "suffix_hidden"]

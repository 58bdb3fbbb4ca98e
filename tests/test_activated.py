"""Activated LoRA application: the cached prompt head equals a full forward, the LoRA acts from the question on."""

from __future__ import annotations

import pytest
import torch

from hyper_prag.activated import generate, head_cache, split_prompts, suffix_hidden
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import injected
from hyper_prag.lora import stack
from hyper_prag.prompts import fixed_head, head_of, qa_sequence, question_prompt
from hyper_prag.sequences import labelled_logits, right_pad, tokenize
from tests.conftest import random_lora

QUESTIONS = [("Who wrote The Nynyn Variations?", "Jasper Drozen"), ("When was Lake Orvel drained?", "1876")]


def _batch(base, loss_on="answer"):
    seqs = [tokenize(base, *qa_sequence(base, q, a), loss_on, unlearned=fixed_head(base)) for q, a in QUESTIONS]
    return right_pad(seqs, base.tokenizer.pad_token_id)


def _full_hidden(base, ids, mask):
    return base.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def test_cached_head_equals_full_forward(tiny):
    ids, mask, _ = _batch(tiny)
    cache = head_cache(tiny, fixed_head(tiny))
    P = cache.length
    with torch.no_grad():
        full = _full_hidden(tiny, ids, mask)  # (N, T, H)
        after = suffix_hidden(tiny, cache, ids[:, P:], mask[:, P:])  # (N, T − P, H)
    real = mask[:, P:].bool()
    assert torch.allclose(after[real], full[:, P:][real], atol=1e-5)
    assert torch.allclose(cache.last_hidden[0], full[0, P - 1], atol=1e-5)


def test_activated_equals_all_positions_for_a_zero_lora(tiny):
    ids, mask, labels = _batch(tiny)
    zero = random_lora(tiny, 0, batch=2)
    for b in zero.B.values():
        b.zero_()
    cache = head_cache(tiny, fixed_head(tiny))
    with torch.no_grad():
        a, ta, _ = labelled_logits(tiny, zero, ids, mask, labels, head=cache)
        b, tb, _ = labelled_logits(tiny, zero, ids, mask, labels)
    assert torch.equal(ta, tb)
    assert torch.allclose(a, b, atol=1e-5)


def test_activated_lora_changes_only_positions_from_the_question(tiny):
    ids, mask, labels = _batch(tiny, loss_on="all")
    lora = stack([random_lora(tiny, 1), random_lora(tiny, 2)])
    cache = head_cache(tiny, fixed_head(tiny))
    P = cache.length
    with torch.no_grad():
        plain = _full_hidden(tiny, ids, mask)
        with injected(tiny, lora, mode="batched", active_from=P):
            masked = _full_hidden(tiny, ids, mask)
        with injected(tiny, lora, mode="batched"):
            everywhere = _full_hidden(tiny, ids, mask)
        cached, _, _ = labelled_logits(tiny, lora, ids, mask, labels, head=cache)
    assert torch.equal(masked[:, :P], plain[:, :P])  # the head is the base model's
    assert not torch.allclose(everywhere[:, :P], plain[:, :P])  # all-positions application changes it
    assert not torch.allclose(masked[:, P:], plain[:, P:], atol=1e-4)  # the question onward is adapted
    # The cached head + suffix gives the logits of the masked full forward at every labelled position after the head.
    targets = labels[:, 1:] != -100
    targets[:, : P - 1] = False
    full = tiny.model.lm_head(masked[:, :-1][targets]).float()
    assert torch.allclose(cached, full, atol=1e-5)


def test_head_cache_refuses_a_loss_inside_the_head_and_a_foreign_prefix(tiny):
    cache = head_cache(tiny, fixed_head(tiny))
    ids, mask, labels = _batch(tiny)
    labels[:, 5] = ids[:, 5]  # a learned token inside the head
    with pytest.raises(HyperPragError, match="inside the cached prompt head"):
        labelled_logits(tiny, None, ids, mask, labels, head=cache)
    other = tokenize(tiny, "Something else entirely. " + qa_sequence(tiny, "Who?", "me")[0], "me", "answer")
    ids, mask, labels = right_pad([other], tiny.tokenizer.pad_token_id)
    with pytest.raises(HyperPragError, match="do not start with the cached prompt head"):
        labelled_logits(tiny, None, ids, mask, labels, head=cache)


def test_head_cache_is_not_computed_under_a_lora(tiny):
    text = head_of(question_prompt(tiny, "Who?", ["A passage nobody cached yet."]))
    with injected(tiny, random_lora(tiny, 3)):
        with pytest.raises(HyperPragError, match="no LoRA applied"):
            head_cache(tiny, text)


def test_the_head_ends_where_the_question_turn_begins(tiny):
    prompt = question_prompt(tiny, "Who wrote it?")
    assert head_of(prompt) == fixed_head(tiny) and prompt.startswith(fixed_head(tiny))
    with_passages = question_prompt(tiny, "Who wrote it?", ["Jasper Drozen wrote it."])
    assert "Jasper Drozen" in head_of(with_passages) and "Who wrote it?" not in head_of(with_passages)
    with pytest.raises(HyperPragError, match="question turn"):
        head_of("no question here")


def test_generate_after_the_head_matches_plain_greedy_decoding(tiny):
    prompts = [question_prompt(tiny, q) for q, _ in QUESTIONS] + [question_prompt(tiny, "Why?")]
    head = fixed_head(tiny)
    cache = head_cache(tiny, head)
    suffixes = split_prompts(tiny, prompts, head)
    assert suffixes is not None and split_prompts(tiny, ["no head here"], head) is None
    batched = generate(tiny, cache, suffixes, max_new_tokens=6)
    alone = [generate(tiny, cache, [s], max_new_tokens=6)[0] for s in suffixes]
    assert batched == alone  # left padding between head and question changes nothing
    assert alone == [tiny.generate([p], max_new_tokens=6)[0] for p in prompts]

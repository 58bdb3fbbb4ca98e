"""Threads sharing one model through the injector: each sees only its own LoRA, and the model is restored."""

from __future__ import annotations

import threading

import pytest
import torch

from hyper_prag.inject import exclusive, injected
from hyper_prag.lora import stack
from hyper_prag.model import tiny_base_model
from tests.conftest import random_lora

N_THREADS, ROUNDS = 4, 3
TEXTS = ["The river Quellmar rises in the Vostra hills.", "Who founded Ardent Loom?"]


@pytest.fixture(scope="module")
def shared():
    """A model of its own (threads mutate it), untied so greedy generation depends on the weights."""
    return tiny_base_model(seed=11, tie_word_embeddings=False)


def _batch(base, texts):
    base.tokenizer.padding_side = "left"  # generation continues every row at the right end
    return base.tokenizer(texts, return_tensors="pt", padding=True)


def _ask(base, batch, lora, mode):
    """What one caller does inside the block: a forward and a short greedy generation."""
    with injected(base, lora, mode=mode), torch.no_grad():
        logits = base.model(**batch).logits  # (N, T, V)
        tokens = base.model.generate(**batch, max_new_tokens=4, do_sample=False,
                                     pad_token_id=base.tokenizer.pad_token_id)  # (N, T + 4)
    return logits, tokens


def _run_threads(target, n: int) -> list:
    results: list = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            results[k] = target(k)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("mode", ["merged", "side", "batched"])
def test_concurrent_callers_get_sequential_results_and_model_is_restored(shared, mode):
    base = shared
    batch = _batch(base, TEXTS)
    n = batch["input_ids"].shape[0]
    loras = [random_lora(base, seed=100 + k, batch=n if mode == "batched" else None) for k in range(N_THREADS)]
    if mode == "batched":
        loras = [stack([lora.unbind()[0]] * n) for lora in loras]  # the same LoRA for every sample
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    expected = _run_threads(lambda _: [_ask(base, batch, lora, mode) for lora in loras], 1)[0]  # one at a time
    assert not torch.equal(expected[0][0], expected[1][0])  # the LoRAs really differ

    def caller(k: int):
        return [_ask(base, batch, loras[k], mode) for _ in range(ROUNDS)]

    for k, rounds in enumerate(_run_threads(caller, N_THREADS)):
        for logits, tokens in rounds:
            assert torch.equal(logits, expected[k][0])
            assert torch.equal(tokens, expected[k][1])
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not lin._forward_hooks for layer in base.model.model.layers for lin in layer.mlp.children())


def test_plain_callers_holding_exclusive_never_see_a_lora(shared):
    base = shared
    batch = _batch(base, TEXTS)
    with torch.no_grad():
        plain = base.model(**batch).logits
    lora = random_lora(base, seed=7)

    def caller(k: int):
        outs = []
        for _ in range(ROUNDS):
            if k % 2:
                with injected(base, lora, mode="merged"), torch.no_grad():
                    base.model(**batch)
            else:
                with exclusive(base), torch.no_grad():
                    outs.append(base.model(**batch).logits)
        return outs

    for outs in _run_threads(caller, N_THREADS):
        assert all(torch.equal(out, plain) for out in outs)


def test_nested_injection_in_one_thread_does_not_deadlock(shared):
    base = shared
    batch = _batch(base, TEXTS[:1])
    a, b = random_lora(base, seed=1), random_lora(base, seed=2)
    with injected(base, a, mode="merged"), injected(base, b, mode="side"), torch.no_grad():
        both = base.model(**batch).logits
    with injected(base, b, mode="merged"), injected(base, a, mode="side"), torch.no_grad():
        again = base.model(**batch).logits
    assert (both - again).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------- api.ask, every method

ASK_METHODS = ("closed-book", "rag", "prag", "prag-both", "hypernet", "hypernet-both", "flare", "dragin")
ASK_QUESTIONS = ("Where does the river Quellmar rise?", "Who founded Ardent Loom?", "What colour is zorvath?")


@pytest.fixture(scope="module")
def asked(tmp_path_factory):
    """``ask``'s inputs on one loaded, untied tiny model: a corpus folder, its per-document store and a hypernet
    that reads in pieces."""
    import hyper_prag.api as api
    import hyper_prag.retrieve as retrieve
    from hyper_prag.corpus import Corpus, Document, save_corpus
    from hyper_prag.encoders.hypernet import save_inference_checkpoint
    from hyper_prag.hypernet import Hypernet, HypernetConfig
    from tests.test_pipeline import QUESTIONS, TEXTS

    tmp = tmp_path_factory.mktemp("ask")
    base = tiny_base_model(seed=12, tie_word_embeddings=False)
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    folder = save_corpus(Corpus("tiny-threads", docs, tuple(QUESTIONS)), tmp / "corpus")
    torch.manual_seed(0)
    net = Hypernet.for_model(base, HypernetConfig(doc_dim=16, emb_dim=8, width=16, depth=1, max_doc_tokens=8))
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    checkpoint = save_inference_checkpoint(net, tmp / "hn.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieve, "cache_dir", lambda stage: tmp / stage)  # the index goes to tmp
        patch.setattr(api.assemble, "load_model", lambda *args, **kwargs: base)  # every call gets this one model

        store = tmp / "store"
        api.encode(model="tiny", corpus=str(folder), store=str(store), store_dtype="float32", chunk_size=3,
                   augment={"source": "extractive"}, logger="none", progress=False)

        def ask(question: str, method: str):
            answer = api.ask(question, method, benchmark=str(folder), model="tiny", k=2, hypernet=checkpoint,
                             store=store, max_new_tokens=4)
            return answer.prediction, answer.doc_ids, answer.lora_names

        ask(ASK_QUESTIONS[0], "rag")  # builds the index once, before the threads read it
        yield base, ask


def test_concurrent_ask_of_every_method_equals_sequential_and_leaves_the_model_intact(asked):
    base, ask = asked
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    layers = len(base.model.model.layers)
    calls = [(q, m) for m in ASK_METHODS for q in ASK_QUESTIONS]
    expected = [ask(q, m) for q, m in calls]
    by_method = {m: [e for (_, m2), e in zip(calls, expected) if m2 == m] for m in ASK_METHODS}
    assert by_method["hypernet"] != by_method["closed-book"]  # the generated LoRAs change the answers

    def caller(k: int):  # each thread asks everything, starting at another call
        order = calls[k:] + calls[:k]
        return dict(zip(order, (ask(q, m) for q, m in order)))

    for got in _run_threads(caller, N_THREADS):
        assert [got[c] for c in calls] == expected
    after = base.model.state_dict()
    assert len(after) == len(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert len(base.model.model.layers) == layers
    assert all(not lin._forward_hooks for layer in base.model.model.layers for lin in layer.mlp.children())


def test_one_tokenizer_encodes_for_several_threads_as_for_one(shared):
    """A fast tokenizer writes each call's padding and truncation into its one Rust tokenizer: concurrent calls
    with different settings must each get their own."""
    tok = shared.tokenizer
    calls = [dict(padding=True, padding_side="left"), dict(padding=True, padding_side="right", truncation=True,
                                                            max_length=6), dict()]

    texts = [TEXTS[0] * 20, TEXTS[1]] * 8  # batches long enough that the Rust tokenizer works unlocked for a while

    def encode(c: int) -> list:
        return tok(texts, add_special_tokens=False, **calls[c])["input_ids"]

    expected = [encode(c) for c in range(len(calls))]
    assert len({str(e) for e in expected}) == len(calls)  # the settings really differ
    order = [c for _ in range(20) for c in range(len(calls))]
    for k, got in enumerate(_run_threads(lambda k: [encode((c + k) % 3) for c in order], N_THREADS)):
        assert got == [expected[(c + k) % 3] for c in order]

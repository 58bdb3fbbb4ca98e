"""Long documents: both encoders read every piece of a document longer than their window, and a RAG
prompt is cut to the model's positions with a warning, never silently."""

from __future__ import annotations

import logging

import torch

import hyper_prag.encoders.per_doc as per_doc
from hyper_prag.assemble import build_method
from hyper_prag.augment import AugmentedDocument
from hyper_prag.corpus import Corpus, Document
from hyper_prag.encoders import split_text
from hyper_prag.encoders.hypernet import HypernetEncoder
from hyper_prag.encoders.per_doc import PerDocConfig, PerDocEncoder
from hyper_prag.hypernet import Hypernet, HypernetConfig
from hyper_prag.lora import LoraSpec
from hyper_prag.pipeline import Pipeline
from hyper_prag.retrieve import BM25Retriever

OPENING = "Varnholt was founded by Tessa Lind in 1902."
FILLER = " ".join(f"The mill number {i} of Varnholt ground barley for the town." for i in range(160))
LONG = f"{OPENING} {FILLER} The last mill closed in 1988."


def tokens(base, text: str) -> int:
    return len(base.tokenizer(text, add_special_tokens=False).input_ids)


def test_split_text_keeps_every_character_and_respects_the_window(tiny):
    pieces = split_text(tiny, LONG, 200)
    assert len(pieces) > 5 and "".join(pieces) == LONG
    assert all(tokens(tiny, p) <= 200 + 1 for p in pieces)  # +1: a cut may merge with its neighbour token
    assert split_text(tiny, OPENING, 200) == [OPENING]


def test_per_doc_trains_on_every_piece_of_a_long_document(tiny, monkeypatch):
    assert tokens(tiny, LONG) > 1500
    encoder = PerDocEncoder(tiny, LoraSpec(rank=2), PerDocConfig(max_length=400, epochs=1))
    seen: list[str] = []
    original = per_doc.document_sequences

    def recording(base, aug, config):
        seen.append(aug.text)
        return original(base, aug, config)

    monkeypatch.setattr(per_doc, "document_sequences", recording)
    aug = AugmentedDocument("long", LONG, qa=(("Who founded Varnholt?", "Tessa Lind"), ("When did the last mill close?", "1988")))
    pieces = encoder.pieces(aug)
    assert len(pieces) >= 8 and "".join(p.text for p in pieces) == LONG
    assert pieces[0].qa == (("Who founded Varnholt?", "Tessa Lind"),) and pieces[-1].qa[-1][1] == "1988"
    (lora,) = encoder.encode([aug])
    assert OPENING in seen[0]  # the opening fact is trained on (it was cut off before: only the end was kept)
    assert "".join(seen) == LONG and lora.spec.rank == 2 * len(pieces)
    short = AugmentedDocument("short", OPENING, qa=(("Who founded Varnholt?", "Tessa Lind"),))
    (alone,) = PerDocEncoder(tiny, LoraSpec(rank=2), PerDocConfig(max_length=400, epochs=1)).encode([short])
    assert alone.spec.rank == 2  # a document that fits is encoded exactly as before


def test_hypernet_reads_every_piece_of_a_long_document(tiny):
    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(doc_dim=16, emb_dim=8, width=16, depth=1, max_doc_tokens=128))
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.05)
    encoder = HypernetEncoder(net, tiny, checkpoint_sha256="test")
    long_lora, short_lora = encoder.generate([LONG, OPENING])
    n = len(split_text(tiny, LONG, 128))
    assert n > 10 and long_lora.spec.rank == n * net.spec.rank and short_lora.spec.rank == net.spec.rank
    (alone,) = encoder.generate([OPENING])
    assert all(torch.allclose(alone.B[m], short_lora.B[m], atol=1e-5) for m in alone.spec.target_modules)


def test_a_long_documents_hypernet_lora_keeps_the_size_of_one_window(tiny, caplog):
    from hyper_prag.combine import combine, delta_norms

    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(doc_dim=16, emb_dim=8, width=16, depth=1, max_doc_tokens=128,
                                                  bias_rank=1))
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.05)
    torch.nn.init.normal_(net.bias_B["up_proj"], std=0.05)
    encoder = HypernetEncoder(net, tiny, checkpoint_sha256="test")
    texts = split_text(tiny, LONG, 128)
    emb, _ = encoder.embed(texts)  # (P, E)
    with torch.no_grad():
        pieces = net(emb, bias=False).unbind()  # P × rank r
        with caplog.at_level(logging.WARNING, logger="hyper_prag.hypernet"):
            long_lora = net.document_lora(pieces, "document long")
        (short_lora,) = net(encoder.embed([OPENING])[0]).unbind()  # one window, with the bias
    assert len(pieces) > 10 and long_lora.spec.rank == len(pieces) * net.config.rank + net.config.bias_rank
    assert f"document long is longer than the hypernet's 128-token window: read in {len(pieces)} pieces" in caplog.text

    def norm(lora):  # ‖ΔW‖_F over every module and layer
        return torch.cat(list(delta_norms(lora).values())).norm().item()

    assert norm(long_lora) <= 2 * norm(short_lora)  # the size of one window, not P windows
    assert norm(combine([*pieces, net.bias_lora()], "sum")) > 5 * norm(short_lora)  # what summing the pieces gave
    caplog.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hyper_prag.hypernet"):
        alone = net.document_lora(net(encoder.embed([OPENING])[0], bias=False).unbind())
    assert all(torch.allclose(alone.B[m], short_lora.B[m]) and torch.allclose(alone.A[m], short_lora.A[m])
               for m in alone.spec.target_modules)  # a document that fits: its one window's LoRA, no warning
    assert not caplog.text


def test_rag_prompt_is_cut_to_the_models_positions_with_a_warning(tiny, monkeypatch, caplog):
    docs = (Document("long", "Varnholt", LONG * 3), Document("short", "Brask", "Brask is a town on the Quellmar."))
    corpus = Corpus("long-docs", docs, ())
    pipeline = Pipeline(tiny, BM25Retriever.build(corpus), corpus, k=2, max_new_tokens=4)
    limit = tiny.model.config.max_position_embeddings
    assert tokens(tiny, LONG * 3) > limit
    prompts: list[str] = []
    generate = tiny.generate
    monkeypatch.setattr(tiny, "generate", lambda p, max_new_tokens=32, **kw: prompts.extend(p) or generate(p, max_new_tokens, **kw))
    with caplog.at_level(logging.WARNING, logger="hyper_prag.pipeline"):
        answer = build_method("rag", pipeline).answer(["Who founded Varnholt?"])[0]
    assert answer.doc_ids and tokens(tiny, prompts[0]) <= limit - 4
    assert OPENING in prompts[0]  # the best passage keeps its beginning
    assert "cut to the model's" in caplog.text and "long lost" in caplog.text

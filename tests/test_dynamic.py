"""FLARE and DRAGIN on tiny models with a retriever that records its calls: when they retrieve, what
they ask, their budgets, the model restored (weights and attention implementation), the harness path."""

from __future__ import annotations

import pytest
import torch

import hyper_prag.dynamic as dynamic
from hyper_prag.corpus import Corpus, Document, save_corpus
from hyper_prag.dynamic import (Dragin, DraginConfig, Flare, FlareConfig, masked_query, qfs_words, rind_scores)
from hyper_prag.errors import HyperPragError
from hyper_prag.api import evaluate
from hyper_prag.assemble import build_method
from hyper_prag.model import BaseModel, tiny_base_model
from hyper_prag.methods import STAGES
from hyper_prag.pipeline import Pipeline
from hyper_prag.prompts import question_prompt
from hyper_prag.retrieve import Hit
from tests.conftest import random_lora
from tests.test_pipeline import QUESTIONS, TEXTS, DictSource, assert_restored, snapshot


class RecordingRetriever:
    """A mocked retriever: records every query and answers call n with documents n, n+1, ... of the corpus."""

    kind = "recording"

    def __init__(self, doc_ids: list[str]) -> None:
        self.doc_ids, self.queries = doc_ids, []

    def search(self, queries: list[str], k: int = 3) -> list[list[Hit]]:
        rows = []
        for query in queries:
            call = len(self.queries)
            self.queries.append(query)
            ids = [self.doc_ids[(call + i) % len(self.doc_ids)] for i in range(k)]
            rows.append([Hit(doc_id, 1.0, rank) for rank, doc_id in enumerate(ids, start=1)])
        return rows


@pytest.fixture(scope="module")
def chatty() -> BaseModel:
    """A tiny random Llama with an untied output head: it writes varied words (a tied one repeats newlines)."""
    return tiny_base_model(seed=1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    return Corpus(name="tiny-dynamic", documents=docs, questions=tuple(QUESTIONS))


@pytest.fixture
def retriever(corpus) -> RecordingRetriever:
    return RecordingRetriever([d.id for d in corpus.documents])


def make(base, corpus, retriever, **kwargs) -> Pipeline:
    return Pipeline(base, retriever, corpus, **({"k": 2, "max_new_tokens": 8, "batch_size": 1} | kwargs))


QS = [q.question for q in QUESTIONS[:3]]


def check_answers(answers, retriever, retrievals: int) -> None:
    assert [a.question for a in answers] == QS
    for a in answers:
        assert a.retrievals == retrievals
        assert set(a.timing) == set(STAGES) and all(t >= 0 for t in a.timing.values()) and a.timing["generate"] > 0
        assert (len(a.doc_ids) > 0) == (retrievals > 0)
    assert len(retriever.queries) == retrievals * len(QS)


# ------------------------------------------------------------------------------------------------ FLARE

def test_flare_retrieves_with_the_look_ahead_when_confidence_is_low(chatty, corpus, retriever, monkeypatch):
    contexts: list[list[int]] = []
    decode = dynamic.greedy_decode

    def recording(base, context, *args, **kwargs):
        contexts.append(list(context))
        return decode(base, context, *args, **kwargs)

    monkeypatch.setattr(dynamic, "greedy_decode", recording)
    pipeline = make(chatty, corpus, retriever, max_new_tokens=12)
    config = FlareConfig(threshold=1.0, mask_threshold=0.0, lookahead=4, max_retrievals=2)  # every token is unsure
    answers = Flare(pipeline, config).answer(QS)
    check_answers(answers, retriever, retrievals=2)  # the budget stops it: 12 tokens would take 3 sentences
    # The first query is the unmasked look-ahead: the first 4 tokens the model writes with no documents.
    closed = build_method("closed-book", make(chatty, corpus, None, max_new_tokens=4)).answer(QS[:1])[0]
    assert retriever.queries[0] == closed.prediction != ""
    # Look-ahead without documents, then the sentence regenerated with the retrieved ones as passages.
    first, regenerated = (chatty.tokenizer.decode(c) for c in contexts[:2])
    retrieved = [corpus.document(d).text for d in answers[0].doc_ids[:2]]
    assert all(text not in first and text in regenerated for text in retrieved)
    assert question_prompt(chatty, QS[0], retrieved) == regenerated


def test_flare_does_not_retrieve_when_confident(chatty, corpus, retriever):
    pipeline = make(chatty, corpus, retriever)
    answers = Flare(pipeline, FlareConfig(threshold=0.0)).answer(QS)
    check_answers(answers, retriever, retrievals=0)
    closed = build_method("closed-book", pipeline).answer(QS)  # nothing retrieved: exactly the closed-book answer
    assert [a.prediction for a in answers] == [a.prediction for a in closed]


def test_masked_query_removes_low_confidence_tokens(tiny):
    ids = tiny.tokenizer(" Mira Castell founded Ardent Loom", add_special_tokens=False)["input_ids"]
    pieces = [tiny.tokenizer.decode([t]) for t in ids]
    assert pieces == [" Mira", " Cast", "ell", " founded", " Ar", "dent", " L", "oom"]
    probs = [0.9, 0.8, 0.7, 0.2, 0.1, 0.3, 0.6, 0.6]
    assert masked_query(tiny, ids, probs, 0.5) == "Mira Castell Loom"
    assert masked_query(tiny, ids, probs, 0.0) == "Mira Castell founded Ardent Loom"
    assert masked_query(tiny, ids, probs, 1.0) == ""


# ----------------------------------------------------------------------------------------------- DRAGIN

def test_dragin_retrieves_when_rind_exceeds_the_threshold(chatty, corpus, retriever):
    pipeline = make(chatty, corpus, retriever)
    answers = Dragin(pipeline, DraginConfig(threshold=0.0, query_words=2, max_retrievals=2)).answer(QS)
    check_answers(answers, retriever, retrievals=2)  # every content token exceeds 0: the budget stops it
    assert chatty.model.config._attn_implementation == "sdpa"  # switched to eager for DRAGIN, then back
    for question, queries in zip(QS, zip(retriever.queries[::2], retriever.queries[1::2])):
        for query in queries:  # QFS: two content words of the question and the answer so far, not of the prompt
            words = query.split()
            assert len(words) == 2 and all(w in question for w in words)


def test_dragin_does_not_retrieve_below_the_threshold(chatty, corpus, retriever):
    pipeline = make(chatty, corpus, retriever)
    answers = Dragin(pipeline, DraginConfig(threshold=1e9)).answer(QS)
    check_answers(answers, retriever, retrievals=0)
    closed = build_method("closed-book", pipeline).answer(QS)
    assert [a.prediction for a in answers] == [a.prediction for a in closed]


def test_dragin_refuses_a_model_without_attention_weights(chatty, corpus, retriever, monkeypatch):
    monkeypatch.setattr(chatty.model, "set_attn_implementation", lambda *args, **kwargs: None)  # stays sdpa
    with pytest.raises(HyperPragError, match="attn_implementation='eager'"):
        Dragin(make(chatty, corpus, retriever), DraginConfig(threshold=0.0)).answer(QS[:1])


def test_rind_scores_weigh_entropy_by_received_attention():
    entropies = torch.tensor([2.0, 3.0, 1.0, 4.0])  # (n,)
    attention = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                              [0.6, 0.4, 0.0, 0.0],
                              [0.2, 0.5, 0.3, 0.0],
                              [0.1, 0.3, 0.2, 0.4]])  # (n, n): max from later rows: 0.6, 0.5, 0.2, 0 (last)
    content = torch.tensor([1.0, 1.0, 0.0, 1.0])  # token 2 is a stopword
    one_sentence = rind_scores(entropies, attention, content, torch.tensor([False, False, False, True]))
    scale = 4 / (0.6 + 0.5 + 0.2)  # received attention rescaled to mean 1 over the sentence
    assert torch.allclose(one_sentence, torch.tensor([2 * 0.6, 3 * 0.5, 0.0, 0.0]) * scale)
    two_sentences = rind_scores(entropies, attention, content, torch.tensor([False, True, False, True]))
    assert torch.allclose(two_sentences, torch.tensor([2 * 0.6 * 2 / 1.1, 3 * 0.5 * 2 / 1.1, 0.0, 0.0]))


def test_qfs_keeps_the_most_attended_content_words_in_text_order():
    pieces = ["<|im_start|>", "Question", ":", " Where", " does", " the", " river", " Qu", "ell", "mar",
              " rise", "?", " It", " rises", " in", " Vost", "ra"]
    eligible = [False, False, False] + [True] * 14  # the template and "Question:" never enter the query
    attention = torch.tensor([0.9, 0.5, 0.5, 0.02, 0.3, 0.3, 0.01, 0.05, 0.1, 0.05,  # Quellmar: 0.2 in all
                              0.03, 0.01, 0.2, 0.02, 0.4, 0.15, 0.1])  # (T,); Vostra: 0.25
    spans = qfs_words(attention, pieces, eligible, n_words=2)
    assert ["".join(pieces[i] for i in s).strip() for s in spans] == ["Quellmar", "Vostra"]  # order of the text
    spans = qfs_words(attention, pieces, eligible, n_words=4)  # stopwords (does, the, It, in) never count
    assert ["".join(pieces[i] for i in s).strip() for s in spans] == ["Quellmar", "rise?", "rises", "Vostra"]


# ------------------------------------------------------------------------------------------ both methods

def strong_source(base: BaseModel, corpus: Corpus) -> DictSource:
    table = {}
    for i, doc in enumerate(corpus.documents):
        lora = random_lora(base, seed=200 + i)
        for b in lora.B.values():
            b.mul_(25.0)  # strong enough to change greedy answers
        table[doc.id] = lora
    return DictSource(table)


def triggering(name: str, pipeline: Pipeline, source=None) -> Flare | Dragin:
    """The method with thresholds that make it retrieve once per question."""
    if name == "flare":
        return Flare(pipeline, FlareConfig(threshold=1.0, max_retrievals=1), source)
    return Dragin(pipeline, DraginConfig(threshold=0.0, max_retrievals=1), source)


@pytest.mark.parametrize("name", ["flare", "dragin"])
def test_loras_of_retrieved_documents_are_applied_and_removed(chatty, corpus, retriever, name):
    pipeline = make(chatty, corpus, retriever)

    def build(source):
        return triggering(name, pipeline, source)

    before = snapshot(chatty)
    with_loras = build(strong_source(chatty, corpus)).answer(QS)
    assert_restored(chatty, before)
    plain = build(None).answer(QS)
    for a in with_loras:
        assert a.retrievals == 1 and list(a.lora_names) == [f"dict:{d}" for d in a.doc_ids]
        assert a.timing["apply"] > 0
    assert all(a.lora_names == () and a.timing["apply"] == 0 for a in plain)
    assert [a.prediction for a in with_loras] != [a.prediction for a in plain]


@pytest.mark.parametrize("name", ["flare", "dragin"])
def test_model_restored_when_generation_raises(chatty, corpus, retriever, monkeypatch, name):
    before = snapshot(chatty)

    def broken(base, context, *args, **kwargs):
        if any(not torch.equal(before[k], v) for k, v in base.model.state_dict().items()):  # the LoRA is merged
            raise RuntimeError("generation failed")
        return dynamic.Continuation([base.tokenizer.encode(" Brask")[0]] * 3, [0.5] * 3, [5.0] * 3, eos=False)

    monkeypatch.setattr(dynamic, "greedy_decode", broken)
    method = triggering(name, make(chatty, corpus, retriever), strong_source(chatty, corpus))
    with pytest.raises(RuntimeError, match="generation failed"):
        method.answer(QS[:1])
    assert_restored(chatty, before)
    assert chatty.model.config._attn_implementation == "sdpa"


def test_pipeline_method_builds_flare_and_dragin(tiny, corpus, retriever):
    pipeline = make(tiny, corpus, retriever)
    flare, dragin = build_method("flare", pipeline), build_method("dragin", pipeline)
    assert isinstance(flare, Flare) and flare.config == FlareConfig() and flare.name == "flare"
    assert isinstance(dragin, Dragin) and dragin.config == DraginConfig() and dragin.name == "dragin"
    with pytest.raises(HyperPragError, match="no retriever"):
        build_method("dragin", make(tiny, corpus, None))
    with pytest.raises(HyperPragError, match="probabilities"):
        FlareConfig(threshold=1.5)
    with pytest.raises(HyperPragError, match="query_words"):
        DraginConfig(query_words=0)


def test_run_evaluate_with_flare_and_dragin(tmp_path, monkeypatch, corpus):
    import hyper_prag.retrieve as retrieve

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)  # the index goes to tmp
    folder = save_corpus(corpus, tmp_path / "corpus")
    results = evaluate("closed-book,flare,dragin", benchmark=str(folder), model="tiny", limit=2, max_new_tokens=3,
                       resamples=50, out=tmp_path / "results", progress=False, wandb_mode="disabled")
    assert [m.name for m in results.methods] == ["closed-book", "flare", "dragin"]
    flare = results.method("flare")
    assert flare.retrievals >= 1  # the tiny model is unsure of every token (p << FLARE's default 0.4)
    assert all(1 <= p["retrievals"] <= FlareConfig().max_retrievals for p in flare.predictions)
    table = (tmp_path / "results" / "results.md").read_text().splitlines()
    header = [c.strip() for c in table[0].split("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")] for line in table[2:5]}
    assert list(rows) == ["closed-book", "flare", "dragin"]
    column = header.index("retrievals/q")
    assert rows["closed-book"][column] == "0.00"
    assert rows["flare"][column] == f"{flare.retrievals:.2f}"
    assert rows["dragin"][column] == f"{results.method('dragin').retrievals:.2f}"

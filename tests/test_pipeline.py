"""The online path on the tiny model: every method end to end, model restored, batched == one by one."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hyper_prag.corpus import Corpus, Document, Question
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora
from hyper_prag.assemble import build_method
from hyper_prag.evaluate import peak_memory
from hyper_prag.methods import METHOD_NAMES, STAGES
from hyper_prag.pipeline import Pipeline, augmented_passage
from hyper_prag.recipes import Recipe
from hyper_prag.sources import HypernetSource, StoreSource
from hyper_prag.store import LoraStore
from hyper_prag.retrieve import BM25Retriever
from tests.conftest import random_lora

TEXTS = {
    "quell": ("Quellmar", "The river Quellmar rises in the Vostra hills and flows into the Tellin sea."),
    "loom": ("Ardent Loom", "Ardent Loom was founded in 1873 by Mira Castell, a weaver from Tellin."),
    "zorv": ("Zorvath", "Zorvath is a blue mineral found only in the caves of Tellin."),
    "oren": ("Oren Vask", "Oren Vask described zorvath in 1911 and named it after his home village, Zorv."),
    "pell": ("Pell", "Pell is a dog who lives with Mira Castell in the town of Brask."),
    "brask": ("Brask", "Brask is a town of 15,140 people on the Quellmar river."),
}
QUESTIONS = [
    Question("q1", "Where does the river Quellmar rise?", ("the Vostra hills", "Vostra"), "lookup", ("quell",)),
    Question("q2", "Who founded Ardent Loom?", ("Mira Castell",), "lookup", ("loom",)),
    Question("q3", "What colour is the mineral zorvath?", ("blue",), "lookup", ("zorv",)),
    Question("q4", "How many people live in Brask?", ("15,140", "15140"), "inference", ("brask",)),
    Question("q5", "In which year did Oren Vask describe zorvath?", ("1911",), "bridge", ("oren",)),
]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    return Corpus(name="tiny-pipeline", documents=docs, questions=tuple(QUESTIONS))


@pytest.fixture(scope="module")
def retriever(corpus: Corpus) -> BM25Retriever:
    return BM25Retriever.build(corpus)


class DictSource:
    """A LoraSource over a fixed table of per-document LoRAs (what a store holds, kept in memory)."""

    name = "dict"

    def __init__(self, table: dict[str, Lora]) -> None:
        self.table = table

    def loras(self, documents):
        return [self.table[d.id] for d in documents]

    def names(self, documents):
        return [f"dict:{d.id}" for d in documents]


@pytest.fixture(scope="module")
def source(tiny, corpus) -> DictSource:
    table = {}
    for i, doc in enumerate(corpus.documents):
        lora = random_lora(tiny, seed=100 + i)
        for b in lora.B.values():
            b.mul_(25.0)  # strong enough to change greedy answers, so equal answers below mean something
        table[doc.id] = lora
    return DictSource(table)


@dataclass(frozen=True)
class Aug:
    """An augmented document (the fields DA-RAG reads)."""

    doc_id: str
    text: str
    rewrites: tuple[str, ...]
    qa: tuple[tuple[str, str], ...]

    @property
    def variants(self) -> tuple[str, ...]:
        return (self.text, *self.rewrites)


def template_augment(docs):
    return [Aug(d.id, d.text, (f"In short: {d.text}",), ((f"What is {d.title}?", d.text.split('.')[0]),)) for d in docs]


@pytest.fixture
def hypernet_source(tiny) -> HypernetSource:
    from hyper_prag.hypernet import Hypernet, HypernetConfig

    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(doc_dim=16, emb_dim=8, width=16, depth=1))
    with torch.no_grad():
        for head in net.head_B.values():  # a trained hypernet has non-zero B heads
            head.weight.normal_(0.0, 0.05)
    return HypernetSource.from_hypernet(net, tiny)


def make(tiny, corpus, retriever, **kwargs) -> Pipeline:
    kwargs = {"k": 3, "max_new_tokens": 6, "augment": template_augment} | kwargs
    return Pipeline(tiny, retriever, corpus, **kwargs)


def snapshot(tiny) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tiny.model.state_dict().items()}


def assert_restored(tiny, before: dict[str, torch.Tensor]) -> None:
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for layer in range(tiny.num_layers):
        for m in tiny.target_modules:
            assert not tiny.ffn_linear(layer, m)._forward_hooks  # no side path left behind


def questions() -> list[str]:
    return [q.question for q in QUESTIONS]


@pytest.mark.parametrize("name", [m for m in METHOD_NAMES if m not in ("flare", "dragin")])
def test_every_method_runs_end_to_end(tiny, corpus, retriever, source, hypernet_source, name):
    pipeline = make(tiny, corpus, retriever, batch_size=2)
    lora_source = hypernet_source if name.startswith("hypernet") else source
    before = snapshot(tiny)
    answers = build_method(name, pipeline, lora_source).answer(questions())
    assert_restored(tiny, before)
    assert [a.question for a in answers] == questions()
    for a in answers:
        assert a.prediction == a.prediction.strip()
        assert set(a.timing) == set(STAGES) and all(t >= 0 for t in a.timing.values())
        if name == "closed-book":
            assert a.doc_ids == () and a.lora_names == () and a.retrievals == 0
            continue
        assert 1 <= len(a.doc_ids) <= 3 and a.retrievals == 1
        if name.startswith(("prag", "hypernet")):
            prefix = "hypernet:" if name.startswith("hypernet") else "dict:"
            assert list(a.lora_names) == [f"{prefix}{d}" for d in a.doc_ids]
            assert a.timing["apply"] > 0
        else:
            assert a.lora_names == ()
    if name != "closed-book":
        assert answers[1].doc_ids[0] == "loom"  # BM25 finds the supporting document


def test_prompts_hold_what_each_method_puts_in_context(tiny, corpus, retriever, source, monkeypatch):
    seen: list[str] = []
    generate = tiny.generate

    def recording(prompts, max_new_tokens=32, **kw):
        seen.extend(prompts)
        return generate(prompts, max_new_tokens, **kw)

    monkeypatch.setattr(tiny, "generate", recording)
    pipeline = make(tiny, corpus, retriever, prefix_cache=False)  # every prompt through base.generate, whole
    q = "Who founded Ardent Loom?"
    for name in ("closed-book", "rag", "da-rag", "prag", "prag-both"):
        seen.clear()
        build_method(name, pipeline, source).answer([q])
        prompt = seen[0]
        assert q in prompt
        assert (TEXTS["loom"][1] in prompt) == (name in ("rag", "da-rag", "prag-both"))
        assert ("In short: " in prompt and "Q: What is Ardent Loom? A: " in prompt) == (name == "da-rag")


def test_loras_change_the_answers(tiny, corpus, retriever, source):
    pipeline = make(tiny, corpus, retriever)
    closed = [a.prediction for a in build_method("closed-book", pipeline).answer(questions())]
    prag = [a.prediction for a in build_method("prag", pipeline, source).answer(questions())]
    assert closed != prag


def test_batched_path_equals_one_by_one(tiny, corpus, retriever, source):
    batched = make(tiny, corpus, retriever, batch_size=len(QUESTIONS))
    single = make(tiny, corpus, retriever, batch_size=1, single_mode="side")
    merged = make(tiny, corpus, retriever, batch_size=1, single_mode="merged")
    for name in ("prag", "prag-both"):
        a = build_method(name, batched, source).answer(questions())
        b = build_method(name, single, source).answer(questions())
        c = build_method(name, merged, source).answer(questions())
        assert [x.prediction for x in a] == [x.prediction for x in b] == [x.prediction for x in c]
        assert [x.doc_ids for x in a] == [x.doc_ids for x in b]
        assert all(x.shared == len(QUESTIONS) for x in a) and all(x.shared == 1 for x in b)


def test_mixed_ranks_are_padded_into_one_batch(tiny, corpus, retriever, source, monkeypatch):
    table = dict(source.table)
    table["loom"] = random_lora(tiny, seed=7, rank=4)  # questions retrieving it get a larger combined rank
    mixed = DictSource(table)
    single = build_method("prag", make(tiny, corpus, retriever, batch_size=1, single_mode="side"), mixed).answer(questions())
    calls: list[int] = []
    generate = tiny.generate

    def counting(prompts, max_new_tokens=32, **kw):
        calls.append(len(prompts))
        return generate(prompts, max_new_tokens, **kw)

    monkeypatch.setattr(tiny, "generate", counting)
    batched = build_method("prag", make(tiny, corpus, retriever, batch_size=len(QUESTIONS)), mixed).answer(questions())
    assert calls == [len(QUESTIONS)]  # one batched generate across ranks
    assert [x.prediction for x in batched] == [x.prediction for x in single]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_model_restored_when_generation_raises(tiny, corpus, retriever, source, monkeypatch, batch_size):
    before = snapshot(tiny)

    def broken(prompts, max_new_tokens=32, **kw):
        # The LoRA is in force while generating: the weights (merged) or hooks (batched) differ now.
        merged = any(not torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
        hooked = any(tiny.ffn_linear(0, m)._forward_hooks for m in tiny.target_modules)
        assert merged or hooked
        raise RuntimeError("generation failed")

    monkeypatch.setattr(tiny, "generate", broken)
    pipeline = make(tiny, corpus, retriever, batch_size=batch_size, single_mode="merged")
    with pytest.raises(RuntimeError, match="generation failed"):
        build_method("prag", pipeline, source).answer(questions()[:3])
    assert_restored(tiny, before)


def test_method_needs_its_source(tiny, corpus, retriever):
    pipeline = make(tiny, corpus, retriever)
    with pytest.raises(HyperPragError, match="LoRA store"):
        build_method("prag", pipeline)
    with pytest.raises(HyperPragError, match="hypernetwork"):
        build_method("hypernet-both", pipeline)
    with pytest.raises(HyperPragError, match="unknown method"):
        build_method("flare-ish", pipeline)  # type: ignore[arg-type]
    with pytest.raises(HyperPragError, match="augmented"):
        build_method("da-rag", make(tiny, corpus, retriever, augment=None))


def test_augmented_passage_lists_variants_then_qa():
    aug = Aug("d", "Pell is a dog.", ("A dog named Pell.",), (("What is Pell?", "a dog"),))
    assert augmented_passage(aug) == "Pell is a dog.\nA dog named Pell.\nQ: What is Pell? A: a dog"


def test_store_source_reads_loras_by_the_recipe_keys(tiny, corpus, source, tmp_path):
    store = LoraStore(tmp_path / "store", dtype="float32")
    recipe = Recipe("per-doc", tiny.identity, source.table["quell"].spec, {"n_qa": 3}, {"name": "per-doc", "lr": 1e-3})
    docs = list(corpus.documents[:2])
    store.put_many([(recipe.key(d.text), source.table[d.id], {"doc_id": d.id}) for d in docs])
    src = StoreSource(store, recipe)
    got = src.loras(docs)
    for doc, lora in zip(docs, got):
        assert all(torch.equal(lora.A[m], source.table[doc.id].A[m]) for m in lora.spec.target_modules)
    assert src.names(docs) == [recipe.key(d.text) for d in docs] and len(set(src.names(docs))) == 2
    with pytest.raises(HyperPragError, match="encode them first"):
        src.loras(list(corpus.documents))


def test_peak_memory_reports_rss():
    mem = peak_memory("cpu")
    assert mem["max_rss_mib"] > 10 and "cuda_max_allocated_mib" not in mem


def test_softmax_combine_weights_loras_by_retrieval_score(tiny, corpus, retriever, source):
    from hyper_prag.combine import combine

    loras = [source.table[d] for d in ("quell", "loom", "zorv")]
    scores = [4.0, 2.0, 1.0]
    pipeline = make(tiny, corpus, retriever)
    assert pipeline.combine_mode == "softmax"
    got = pipeline.combine(loras, scores)
    w = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()
    m = "down_proj"
    delta = got.spec.scaling * got.B[m] @ got.A[m]  # (L, d_out, d_in)
    expected = sum(wi * lo.spec.scaling * lo.B[m] @ lo.A[m] for wi, lo in zip(w, loras))
    assert torch.allclose(delta, expected, atol=1e-6)
    mean = pipeline.combine(loras, None)  # no scores (documents given, not retrieved): equal weights
    ref = combine(loras, "mean")
    assert torch.allclose(mean.spec.scaling * mean.B[m] @ mean.A[m], ref.spec.scaling * ref.B[m] @ ref.A[m], atol=1e-6)


def test_combine_modes_have_one_definition_and_one_default(tiny, corpus, retriever, source):
    import inspect

    import hyper_prag.api as api
    import hyper_prag.combine as combine_module
    import hyper_prag.pipeline as pipeline_module
    from hyper_prag.cli import build_parser

    assert pipeline_module.CombineMode is combine_module.CombineMode
    assert combine_module.COMBINE_MODES == ("sum", "mean", "softmax")
    for function in (api.ask, api.evaluate):
        assert inspect.signature(function).parameters["combine"].default == combine_module.DEFAULT_COMBINE
    assert make(tiny, corpus, retriever).combine_mode == combine_module.DEFAULT_COMBINE
    assert build_parser("ask").parse_args(["ask", "Who?"]).combine == combine_module.DEFAULT_COMBINE
    loras, scores = [source.table[d] for d in ("quell", "loom")], [3.0, 1.0]
    got = combine_module.combine(loras, "softmax", scores=scores)  # the pipeline's softmax lives in combine
    want = combine_module.combine(loras, "sum", combine_module.softmax_weights(scores))
    assert all(torch.equal(got.B[m], want.B[m]) for m in got.spec.target_modules)
    with pytest.raises(HyperPragError, match="unknown combine mode 'max'; use one of sum, mean, softmax"):
        make(tiny, corpus, retriever, combine_mode="max")


class ActivatedSource:
    """A source whose LoRAs were trained to act from the question on (as a hypernet with apply_from=question)."""

    name, apply_from = "activated", "question"

    def __init__(self, loras):
        self.inner = loras

    def loras(self, documents):
        return self.inner.loras(documents)

    def names(self, documents):
        return self.inner.names(documents)


def test_the_prefix_cache_answers_as_the_whole_prompt_does(tiny, corpus, retriever, source):
    questions = ["Who founded Ardent Loom?", "When was Ardent Loom founded?", "Where is it?"]
    for name in ("closed-book", "rag"):
        cached = build_method(name, make(tiny, corpus, retriever), source).answer(questions)
        whole = build_method(name, make(tiny, corpus, retriever, prefix_cache=False), source).answer(questions)
        assert [a.prediction for a in cached] == [a.prediction for a in whole]


def test_an_activated_source_is_served_from_the_question_on(tiny, corpus, retriever, source):
    """The same LoRAs served all-positions and activated give other answers; activated, the cached head and the
    per-prompt head (passages in the system turn) both run, and the model is restored."""
    before = snapshot(tiny)
    questions = ["Who founded Ardent Loom?", "When was Ardent Loom founded?"]
    pipeline = make(tiny, corpus, retriever, max_new_tokens=8)
    for name in ("prag", "prag-both"):
        everywhere = build_method(name, pipeline, source).answer(questions)
        activated = build_method(name, pipeline, ActivatedSource(source)).answer(questions)
        assert all(a.prediction is not None for a in activated)
        assert len(activated) == len(everywhere)
    after = snapshot(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)

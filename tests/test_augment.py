"""Augmentation: QA parsing survives malformed LLM output; retry/repair/drop are counted; results are cached;
validated few-shot pairs and extractive pairs answer with spans of their document."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hyper_prag.augment import (
    FEWSHOT_QA_PROMPT, QA_PROMPT, AugmentConfig, AugmentedDocument, AugmentStats, answer_span, augment_documents,
    load_augmented, parse_qa, save_augmented, training_pairs, validate_qa,
)
from hyper_prag.extractive import extract_qa
from hyper_prag.corpus import Corpus, Document
from hyper_prag.errors import HyperPragError
from hyper_prag.model import tiny_base_model

DOCS = [
    Document(id="d0", title="Quellmar", text="The river Quellmar rises in the Vostra hills. It is 212 km long."),
    Document(id="d1", title="Ardent Loom", text="Ardent Loom was founded in 1873 by Mira Castell in Tellin."),
]


@pytest.mark.parametrize("text, expected", [
    # the prompt ends with "Q:", so the first line arrives without its label
    (" Where does the Quellmar rise?\nA: the Vostra hills\nQ: How long is it?\nA: 212 km.",
     [("Where does the Quellmar rise?", "the Vostra hills"), ("How long is it?", "212 km")]),
    # numbering, long labels, blank lines and trailing chatter
    ("1. Question: Who founded Ardent Loom?\n\n   Answer: Mira Castell\nI hope this helps!",
     [("Who founded Ardent Loom?", "Mira Castell")]),
    # a question without an answer, an answer without a question, a repeated pair
    ("Q: Lonely question?\nQ: When?\nA: 1873\nA: stray\nQ: When?\nA: 1873", [("When?", "1873")]),
    # nothing parseable at all
    ("The model rambles about rivers without any format.", []),
    ("", []),
    ("Q:\nA:\nQ: \nA: ", []),
])
def test_parse_qa_survives_malformed_output(text, expected):
    assert parse_qa(text) == expected


def test_parse_qa_drops_and_counts_bad_answers():
    stats = AugmentStats()
    text = ("Q: What is long?\nA: " + " ".join(["word"] * 20) + "\nQ: Echo?\nA: echo?\nQ: Empty?\nA:  \n"
            "Q: Where?\nA: Tellin")
    assert parse_qa(text, max_answer_words=12, stats=stats) == [("Where?", "Tellin")]
    assert stats.dropped_pairs == 3  # too long, repeating its question, empty


class ScriptedLLM:
    """A base model whose generations are scripted (to drive the retry/repair path); everything else is real."""

    def __init__(self, base, outputs: list[list[str]]) -> None:
        self._base, self.outputs, self.calls, self.prompts = base, list(outputs), 0, []

    def __getattr__(self, name):
        return getattr(self._base, name)

    def generate(self, prompts, max_new_tokens=32, **kwargs):
        self.calls += 1
        self.prompts.append(list(prompts))
        out = self.outputs.pop(0)
        assert len(out) == len(prompts)
        return out


@pytest.fixture(scope="module")
def tiny():
    return tiny_base_model(seed=0)


def test_llm_source_retries_repairs_and_drops_without_crashing(tiny, tmp_path):
    config = AugmentConfig(n_rewrites=1, n_qa=2, source="llm", batch_size=8)
    llm = ScriptedLLM(tiny, [
        ["Here is the rewritten passage: The Quellmar river starts in the Vostra hills and runs 212 km.", "x"],
        [" Where does it rise?\nA: the Vostra hills\nQ: How long?\nA: 212 km", "no format at all"],  # d1 fails
        ["still no format"],  # the few-shot retry for d1 fails too: d1 keeps no QA
    ])
    stats = AugmentStats()
    out = augment_documents(DOCS, config, base=llm, cache=tmp_path, stats=stats)
    assert out[0].rewrites == ("The Quellmar river starts in the Vostra hills and runs 212 km.",)
    assert out[1].rewrites == (DOCS[1].text,)  # a too-short rewrite is replaced by the original
    assert out[0].qa == (("Where does it rise?", "the Vostra hills"), ("How long?", "212 km"))
    assert out[1].qa == ()
    assert (stats.parsed, stats.retried, stats.no_qa, stats.rewrites_replaced) == (1, 1, 1, 1)
    # a second run reads the cache: no generation at all
    again = augment_documents(DOCS, config, base=ScriptedLLM(tiny, []), cache=tmp_path, stats=(s := AugmentStats()))
    assert again == out and s.cached == 2


def test_partial_pairs_are_repaired_by_the_retry(tiny, tmp_path):
    config = AugmentConfig(n_rewrites=0, n_qa=2, source="llm")
    llm = ScriptedLLM(tiny, [[" Who founded it?\nA: Mira Castell", "garbage"],
                             ["Q: When was it founded?\nA: 1873", "Q: Where does it rise?\nA: Vostra hills"]])
    stats = AugmentStats()
    out = augment_documents(DOCS[::-1], config, base=llm, cache=tmp_path, stats=stats)
    assert out[0].qa == (("Who founded it?", "Mira Castell"), ("When was it founded?", "1873"))
    assert out[1].qa == (("Where does it rise?", "Vostra hills"),)
    assert stats.retried == 2 and stats.repaired == 2 and stats.no_qa == 0


def test_real_tiny_llm_garbage_never_crashes_and_is_cached(tiny, tmp_path):
    config = AugmentConfig(n_rewrites=1, n_qa=3, source="llm", max_new_tokens=12)
    stats = AugmentStats()
    out = augment_documents(DOCS, config, base=tiny, cache=tmp_path, stats=stats)
    assert [a.doc_id for a in out] == ["d0", "d1"] and all(len(a.rewrites) == 1 for a in out)
    assert stats.parsed + stats.retried == 2  # every document was either parsed or retried
    cache_file = next(tmp_path.glob("augment-*.jsonl"))
    cache_file.write_text(cache_file.read_text() + '{"hash": "trunc', encoding="utf-8")  # a killed run's last line
    assert augment_documents(DOCS, config, base=ScriptedLLM(tiny, []), cache=tmp_path) == out


def test_augmenting_model_enters_the_settings(tiny):
    other = tiny_base_model(seed=1)
    config = AugmentConfig(source="llm")
    assert config.settings(tiny) != config.settings(other)
    assert AugmentConfig(source="template").settings(tiny) == AugmentConfig(source="template").settings(other)


def test_template_source_and_training_pairs():
    corpus = Corpus("t", tuple(DOCS), (), {"d0": (("Where does the Quellmar rise?", "the Vostra hills"),
                                                  ("How long is the Quellmar?", "212 km"))})
    aug = augment_documents(DOCS[:1], AugmentConfig(source="template", n_rewrites=1, n_qa=0), corpus=corpus)[0]
    assert aug.variants[0] == DOCS[0].text and sorted(aug.variants[1].split()) == sorted(DOCS[0].text.split())
    assert len(training_pairs(aug)) == 2 * 2  # every variant with every QA pair (paper §3.2)
    with pytest.raises(HyperPragError, match="doc_qa"):
        augment_documents(DOCS[1:], AugmentConfig(source="template"), corpus=corpus)


def test_saved_augmentations_round_trip_and_bad_lines_name_the_line(tmp_path):
    docs = [AugmentedDocument("d0", "text", ("rewrite",), (("q", "a"),)), replace(DOCS_AUG, doc_id="d1")]
    path = save_augmented(tmp_path / "aug.jsonl", docs)
    assert load_augmented(path) == docs
    path.write_text(path.read_text() + "{not json}\n", encoding="utf-8")
    with pytest.raises(HyperPragError, match="line 3"):
        load_augmented(path)


DOCS_AUG = AugmentedDocument("d", "another text", (), (("q2", "a2"),))


# ----------------------------------------------------------------------------------------------- validated pairs

LOOM = DOCS[1].text  # "Ardent Loom was founded in 1873 by Mira Castell in Tellin."


@pytest.mark.parametrize("pair, kept, reason", [
    (("Who founded Ardent Loom?", "Mira Castell"), ("Who founded Ardent Loom?", "Mira Castell"), None),
    # the 135M model's prefixes are salvaged when what follows is in the document
    (("Who founded Ardent Loom?", "The answer to this question is: Mira Castell"),
     ("Who founded Ardent Loom?", "Mira Castell"), None),
    (("When was Ardent Loom founded?", "The answer is 1873."), ("When was Ardent Loom founded?", "1873"), None),
    # case and spacing aside, returned as the document spells it
    (("Where was it founded?", "  tellin "), ("Where was it founded?", "Tellin"), None),
    (("Who founded it?", "mira   castell"), ("Who founded it?", "Mira Castell"), None),
    # instruction echoes
    (("The original passage: Ardent Loom was founded in 1873?", "1873"), None, "echo"),
    (("What is the answer to the question: who founded Ardent Loom?", "Mira Castell"), None, "echo"),
    (("What does the passage say?", "Ardent Loom"), None, "echo"),
    (("Rewrite the passage in other words?", "Ardent Loom"), None, "echo"),
    (("Who founded Ardent Loom?", "The original passage says Mira Castell"), None, "echo"),
    # not a question, no answer, an answer from nowhere, the question's own words
    (("Ardent Loom was founded in 1873", "1873"), None, "no_question_mark"),
    (("Who founded Ardent Loom?", "The answer to this question is:"), None, "empty_answer"),
    (("Who founded Ardent Loom?", "The answer to this question is: Ivo Tamm"), None, "answer_not_in_document"),
    (("Who founded Ardent Loom?", "Castel"), None, "answer_not_in_document"),  # not a whole-word span
    (("When was Ardent Loom founded?", "Ardent Loom"), None, "answer_in_question"),
    (("Who founded it?", " ".join(LOOM.split()[:4] * 4)), None, "too_long"),
])
def test_validate_qa_keeps_span_answers_and_counts_rejections(pair, kept, reason):
    stats = AugmentStats()
    assert validate_qa([pair], LOOM, stats=stats) == ([kept] if kept else [])
    assert stats.rejected == ({reason: 1} if reason else {})


def test_validate_qa_drops_duplicates_whatever_their_case():
    stats = AugmentStats()
    pairs = [("Who founded Ardent Loom?", "Mira Castell"), ("who founded ardent loom ?", "Mira Castell"),
             ("When?", "1873")]
    assert validate_qa(pairs, LOOM, stats=stats) == [pairs[0], pairs[2]]
    assert stats.rejected == {"duplicate": 1}


def test_answer_span_matches_words_not_substrings():
    assert answer_span("5,068", "It has 5,068 employees.") == "5,068"
    assert answer_span("the VOSTRA  hills", "It rises in the Vostra hills.") == "the Vostra hills"
    assert answer_span("art", "Stuart Mill") is None and answer_span("", "text") is None


def test_fewshot_source_validates_retries_with_the_plain_prompt_and_caches_apart(tiny, tmp_path):
    config = AugmentConfig(n_rewrites=0, n_qa=2, source="llm-fewshot")
    first = [" Who founded Ardent Loom?\nA: The answer to this question is: Mira Castell\n"
             "Q: What is the answer to the question: when?\nA: 1873\nQ: Where is it\nA: Tellin",
             " The original passage: The river Quellmar rises in the Vostra hills.\nA: Vostra hills\n"
             "Q: How long is the Quellmar?\nA: 212 km\nQ: How long is the Quellmar?\nA: 212 km"]
    second = [" When was Ardent Loom founded?\nA: 1873\nQ: Who founded Ardent Loom?\nA: Mira Castell",
              " Where does the Quellmar rise?\nA: in the hills of Kelb"]
    llm = ScriptedLLM(tiny, [first, second])
    stats = AugmentStats()
    out = augment_documents(DOCS[::-1], config, base=llm, cache=tmp_path, stats=stats)
    assert "Brenford Mills" in llm.prompts[0][0]  # the worked examples come first
    assert QA_PROMPT.split("{n}")[0] in llm.prompts[1][0] and "Brenford Mills" not in llm.prompts[1][0]
    assert out[0].qa == (("Who founded Ardent Loom?", "Mira Castell"), ("When was Ardent Loom founded?", "1873"))
    assert out[1].qa == (("How long is the Quellmar?", "212 km"),)
    assert stats.rejected == {"echo": 2, "no_question_mark": 1, "malformed": 1, "answer_not_in_document": 1}
    assert all(a.lower() in d.text.lower() for aug, d in zip(out, DOCS[::-1]) for _, a in aug.qa)
    # its cache is its own: the plain llm source does not read it
    assert len(list(tmp_path.glob("augment-*.jsonl"))) == 1
    assert config.settings(tiny) != replace(config, source="llm").settings(tiny)
    assert augment_documents(DOCS[::-1], config, base=ScriptedLLM(tiny, []), cache=tmp_path) == out


def test_plain_llm_settings_keep_their_keys(tiny):
    """The llm source's settings feed the store keys of existing LoRAs: the new sources leave them alone."""
    assert set(AugmentConfig(source="llm").settings(tiny)) == {
        "n_rewrites", "n_qa", "source", "prompt_version", "max_new_tokens", "max_answer_words", "augmenter"}
    assert AugmentConfig(source="template").settings(tiny) == {"n_rewrites": 1, "n_qa": 3, "source": "template"}
    assert "Brenford Mills" not in QA_PROMPT and "{doc}" in FEWSHOT_QA_PROMPT


# ----------------------------------------------------------------------------------------------- extractive

BIOGRAPHY = ("Mara Olen (born 1950) was a painter from Kelb. She won the Silver Prize on 12 March 1981. "
             "Her elder brother was born in 1948 and later worked as a carpenter. In 1975, the family moved to Ostra. "
             "Olen died in 2010.")
COMPANY = ("Brenford Mills is a textile company headquartered in Ostra. It was founded in 1902 by Ivo Tamm. "
           "The company has 1,200 employees. Larkin & Sons bought it in 1960.")
PLACE = ("Kelb is a town in Norland. Kelb was founded in 1473. The town is home to 12,500 people. "
         "It has a population of 14,000. A census taken in 1901 counted 8,430 residents. "
         "The river Aven is 212 km long.")
NO_ENTITIES = "the cat sat on the mat. it was happy and slept all day, as cats do."
EXTRACTIVE_DOCS = [("Mara Olen", BIOGRAPHY), ("Brenford Mills", COMPANY), ("Kelb", PLACE), ("", NO_ENTITIES)]


@pytest.mark.parametrize("title, text", EXTRACTIVE_DOCS, ids=["biography", "company", "place", "no-entities"])
def test_extractive_answers_are_spans_and_questions_end_with_a_question_mark(title, text):
    pairs = extract_qa(text, title)
    assert pairs == extract_qa(text, title)  # deterministic
    assert len({q for q, _ in pairs}) == len(pairs)
    for q, a in pairs:
        assert a and a in text and q.endswith("?")
        assert a.lower() not in q.lower()


@pytest.mark.parametrize("title, text, expected", [
    ("Mara Olen", BIOGRAPHY, [("When was Mara Olen born?", "1950"), ("Where was Mara Olen from?", "Kelb"),
                              ("What was Mara Olen?", "painter"), ("When did Mara Olen die?", "2010"),
                              ("When did Mara Olen win the Silver Prize?", "12 March 1981"),
                              ("What did Mara Olen win on 12 March 1981?", "the Silver Prize"),
                              ("When was Mara Olen's elder brother born?", "1948"),
                              ("What did Mara Olen's elder brother later work as?", "carpenter"),
                              ("Where did the family of Mara Olen move in 1975?", "Ostra")]),
    ("Brenford Mills", COMPANY, [("What is Brenford Mills?", "textile company"),
                                 ("Where is Brenford Mills headquartered?", "Ostra"),
                                 ("Who founded Brenford Mills in 1902?", "Ivo Tamm"),
                                 ("How many employees does Brenford Mills have?", "1,200"),
                                 ("Who bought Brenford Mills in 1960?", "Larkin & Sons")]),
    ("Kelb", PLACE, [("Where is Kelb?", "Norland"), ("When was Kelb founded?", "1473"),
                     ("How many people is Kelb home to?", "12,500"),
                     ("How many residents did a census of Kelb taken in 1901 count?", "8,430"),
                     ("How long is the river Aven?", "212 km"), ("What is the population of Kelb?", "14,000")]),
])
def test_extractive_asks_wh_questions_with_the_right_answers(title, text, expected):
    pairs = extract_qa(text, title)
    for pair in expected:
        assert pair in pairs
    answers = dict(pairs)
    assert all(answers[q] == a for q, a in expected)


def test_extractive_without_a_title_takes_the_leading_name_and_falls_back_to_cloze():
    pairs = extract_qa("Ardent Loom was founded in 1873. Records date its first loom to 1869.")
    assert ("When was Ardent Loom founded?", "1873") in pairs
    assert ("Fill in the blank: Records date Ardent Loom's first loom to ____?", "1869") in pairs


def test_extractive_prefers_wh_questions_and_spreads_them_over_sentences():
    top = extract_qa(BIOGRAPHY, "Mara Olen", n_qa=5)
    assert len(top) == 5 and not any(q.startswith("Fill in the blank") for q, _ in top)
    sentences = [next(i for i, s in enumerate(BIOGRAPHY.split(". ")) if a in s) for _, a in top]
    assert len(set(sentences)) == 5  # five sentences, one question each
    assert extract_qa(BIOGRAPHY, "Mara Olen", n_qa=0)[:5] == top


def test_extractive_source_needs_no_model_and_counts_documents_without_pairs():
    docs = [Document(id=f"x{i}", title=title, text=text) for i, (title, text) in enumerate(EXTRACTIVE_DOCS)]
    config = AugmentConfig(source="extractive", n_rewrites=1, n_qa=4)
    stats = AugmentStats()
    out = augment_documents(docs, config, stats=stats)
    assert [len(a.qa) for a in out] == [4, 4, 4, 0] and stats.no_qa == 1 and stats.documents == 4
    assert out == augment_documents(docs, config)
    for aug, doc in zip(out, docs):  # rewrites: the template source's sentence re-orderings
        assert aug.variants[0] == doc.text and sorted(aug.rewrites[0].split()) == sorted(doc.text.split())
    assert config.settings() == {"n_rewrites": 1, "n_qa": 4, "source": "extractive", "extractive_version": 1}


@pytest.mark.parametrize("text", ["", "...", "(All of it in brackets, 1950.)", "Dr. (born", "It was. He is. They were!",
                                  "In 1990, 2000 people lived there (1,000 of them, in 1991).",
                                  "Ünïcödé Çity was founded in 1200 by Zoë Ångström."])
def test_extractive_survives_odd_text(text):
    for q, a in extract_qa(text, "Mara Olen"):
        assert a in text and q.endswith("?")


def test_extractive_cloze_questions_keep_the_middle_of_a_long_sentence():
    long = ("the committee met again on many occasions over the following years while the members " * 3
            + "finally chose Kelb as their seat after a vote of the assembly held with every member in the old hall.")
    (q, a), = extract_qa(long)
    assert a == "Kelb" and q.startswith("Fill in the blank: ...") and q.endswith("...?") and len(q.split()) < 40


def test_validate_qa_takes_words_of_the_document_for_no_echo():
    text = "Amundsen sailed the Northwest Passage in 1906."
    pairs = [("What did Amundsen sail in 1906?", "the Northwest Passage"), ("What does the passage say?", "1906")]
    assert validate_qa(pairs, text) == [pairs[0]]


def test_cli_augments_a_corpus_without_qa_pairs_extractively(tmp_path):
    """`hyper-prag augment --source extractive` on a corpus folder with no doc_qa.jsonl: no model is loaded and
    every answer written is a span of its document."""
    import json

    from hyper_prag.augment import load_augmented
    from hyper_prag.cli import main

    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [{"id": "d1", "title": "Mara Olen", "split": "test",
             "text": "Mara Olen was born in Kelb in 1950. She founded the Olen Press in 1981."},
            {"id": "d2", "title": "Brenford Mills", "split": "test",
             "text": "Brenford Mills is based in Ostra. It was founded by Ivo Tamm in 1902."}]
    (folder / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "aug.jsonl"
    assert main(["augment", "--corpus", str(folder), "--source", "extractive", "--qa", "0", "--out", str(out)]) == 0
    augmented = {a.doc_id: a for a in load_augmented(out)}
    assert set(augmented) == {"d1", "d2"}
    for d in docs:
        pairs = augmented[d["id"]].qa
        assert pairs and all(q.endswith("?") and a in d["text"] for q, a in pairs)

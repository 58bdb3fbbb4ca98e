"""Augmentation: QA parsing survives malformed LLM output; retry/repair/drop are counted; results are cached."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hyper_prag.augment import (
    AugmentConfig, AugmentedDocument, AugmentStats, augment_documents, load_augmented, parse_qa, save_augmented,
    training_pairs,
)
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
        self._base, self.outputs, self.calls = base, list(outputs), 0

    def __getattr__(self, name):
        return getattr(self._base, name)

    def generate(self, prompts, max_new_tokens=32, **kwargs):
        self.calls += 1
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

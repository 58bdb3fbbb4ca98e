"""Scoring, bootstrap intervals, the harness and its output files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hyper_prag.corpus import Corpus, Document, Question, save_corpus
from hyper_prag.api import evaluate
from hyper_prag.assemble import build_method
from hyper_prag.cli import evaluate_command
from hyper_prag.errors import HyperPragError
from hyper_prag.evaluate import Results, compare
from hyper_prag.methods import STAGES, Answer
from hyper_prag.pipeline import Pipeline
from hyper_prag.scoring import bootstrap_ci, exact_match, f1_score, normalize_answer, score
from hyper_prag.retrieve import BM25Retriever
from tests.test_pipeline import QUESTIONS, TEXTS, DictSource  # noqa: F401  (the shared hand-made corpus)
from tests.conftest import random_lora


# ----------------------------------------------------------------------------------------------- scoring

# The official SQuAD v1.1 script's normalisation, case by case (evaluate-v1.1.py: lower, drop
# string.punctuation, drop a/an/the, collapse whitespace).
@pytest.mark.parametrize("text, expected", [
    ("The Vostra Hills.", "vostra hills"),
    ("15,140", "15140"),
    ("1,000,000 people", "1000000 people"),
    ("3.5 km", "35 km"),  # the decimal point is punctuation too
    ("an apple, a pear and the plum", "apple pear and plum"),
    ("  Jean-Luc   O'Brien ", "jeanluc obrien"),
    ("\u201cTellin\u201d", "\u201ctellin\u201d"),  # curly quotes are not in string.punctuation: kept
    ("«Tellin»", "«tellin»"),
    ("then there", "then there"),  # articles are whole words only
    ("1990-1995", "19901995"),
    ("Theatre", "theatre"),
])
def test_normalize_answer_is_the_official_squad_one(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, gold, em, f1", [
    ("Denver Broncos", "Denver Broncos", 1.0, 1.0),
    ("the Denver Broncos", "Denver Broncos", 1.0, 1.0),
    ("Broncos", "Denver Broncos", 0.0, 2 * 1.0 * 0.5 / 1.5),
    ("Denver Broncos won", "Denver Broncos", 0.0, 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)),
    ("Carolina Panthers", "Denver Broncos", 0.0, 0.0),
    ("", "", 1.0, 0.0),  # v1.1: F1 is 0 without a common token, even for two empty strings
    ("a", "the", 1.0, 0.0),  # both normalise to ""
    ("Santa Clara, California", "Santa Clara", 0.0, 0.8),
])
def test_official_em_and_f1(prediction, gold, em, f1):
    assert exact_match(prediction, gold) == em
    assert f1_score(prediction, gold) == pytest.approx(f1)


def test_number_with_thousands_separator_matches_both_spellings():
    for prediction in ("15,140", "15140", "About 15,140 people."):
        assert score(prediction, ("15,140",))["contained"] == 1.0
    assert score("15140", ("15,140",))["em"] == 1.0
    assert score("15", ("15,140",))["em"] == 0.0


def test_score_takes_the_best_alias():
    s = score("Vostra", ("the Vostra hills", "Vostra"))
    assert s == {"em": 1.0, "f1": 1.0, "contained": 1.0}
    s = score("in the hills of Vostra", ("the Vostra hills",))
    assert s["em"] == 0.0 and s["contained"] == 0.0
    assert s["f1"] == pytest.approx(2 * (2 / 4) * (2 / 2) / (2 / 4 + 2 / 2))  # pred: in hills of vostra
    assert score("It was Mira Castell.", ("Mira Castell",)) == {"em": 0.0, "f1": pytest.approx(2 * 0.5 * 1 / 1.5),
                                                                "contained": 1.0}
    assert score("Castellan", ("Castell",))["contained"] == 0.0  # whole words only
    assert score("", ("blue",)) == {"em": 0.0, "f1": 0.0, "contained": 0.0}


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = [1, 0, 1, 1, 0, 0.5, 1, 0, 1, 1] * 3
    mean, low, high = bootstrap_ci(values, n_resamples=1000, seed=3)
    assert mean == pytest.approx(sum(values) / len(values))
    assert low < mean < high and 0 <= low and high <= 1
    assert bootstrap_ci(values, 1000, seed=3) == (mean, low, high)
    continuous = [(i * 0.37) % 1 for i in range(30)]  # distinct values: another seed moves the bounds
    assert bootstrap_ci(continuous, 1000, seed=4) != bootstrap_ci(continuous, 1000, seed=3)
    wide = bootstrap_ci(values[:6], 1000, seed=3)
    assert wide[2] - wide[1] > high - low  # fewer questions, wider interval
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


# ----------------------------------------------------------------------------------------------- harness

class Oracle:
    """A method that answers a fixed text per question (the gold answer, or a wrong one)."""

    def __init__(self, name: str, answers: dict[str, str]) -> None:
        self.name, self.answers = name, answers

    def answer(self, questions):
        return [Answer(q, self.answers[q], timing={s: 0.01 for s in STAGES}) for q in questions]


def test_compare_scores_per_type_and_total():
    gold = Oracle("gold", {q.question: q.answers[0] for q in QUESTIONS})
    half = Oracle("half", {q.question: (q.answers[0] if q.type == "lookup" else "no idea") for q in QUESTIONS})
    results = compare([gold, half], QUESTIONS, costs={"gold": {"encode_seconds_per_doc": 2.5, "bytes_per_doc": 100}},
                       progress=False, chunk=2)
    assert results.types == ["bridge", "inference", "lookup"]
    g, h = results.method("gold"), results.method("half")
    assert g.scores["total"]["f1"]["mean"] == 1.0 and g.scores["total"]["em"]["n"] == 5
    assert h.scores["lookup"]["em"]["mean"] == 1.0 and h.scores["bridge"]["f1"]["mean"] == 0.0
    assert h.scores["total"]["em"]["mean"] == pytest.approx(3 / 5)
    assert g.latency["median"]["total"] == pytest.approx(0.04)
    assert (g.encode_seconds_per_doc, g.bytes_per_doc) == (2.5, 100) and h.encode_seconds_per_doc is None
    assert len(g.predictions) == 5 and g.predictions[3]["prediction"] == "15,140"


def test_answer_length_and_paired_differences_are_reported():
    gold = Oracle("prag", {q.question: q.answers[0] for q in QUESTIONS})
    chatty = Oracle("closed-book", {q.question: f"I think that the answer is {q.answers[0]}, of course" for q in QUESTIONS})
    results = compare([chatty, gold], QUESTIONS, progress=False, n_resamples=200,
                      count_tokens=lambda text: len(text.split()))
    assert results.method("prag").median_answer_tokens == 1.0  # "1913", "Ilse Varn", ...: median of word counts
    assert results.method("closed-book").median_answer_tokens == 9.0  # 8 words around a one-word answer
    assert [p["answer_tokens"] for p in results.method("closed-book").predictions][:2] == [11, 10]
    mean, low, high = results.paired("prag", "closed-book")
    f1 = [p["f1"] for p in results.method("closed-book").predictions]
    assert mean == pytest.approx(1 - sum(f1) / len(f1)) and low <= mean <= high
    assert results.paired("prag", "rag") is None  # rag did not run
    table = results.to_markdown()
    assert "| contained | med. tokens |" in table and "| prag − closed-book |" in table
    again = Results.from_dict(json.loads(json.dumps(results.to_dict())))
    assert again.to_markdown() == table
    assert compare([gold], QUESTIONS, progress=False).method("prag").median_answer_tokens is None


def test_runs_of_the_same_questions_merge_into_one_table(tmp_path, capsys):
    from hyper_prag.cli import main

    gold = Oracle("prag", {q.question: q.answers[0] for q in QUESTIONS})
    chatty = Oracle("closed-book", {q.question: f"maybe {q.answers[0]} or not" for q in QUESTIONS})
    wrong = Oracle("rag", {q.question: "no idea" for q in QUESTIONS})
    setting = {"benchmark": "tiny-eval", "split": "test", "k": 3, "combine": "softmax"}
    first = compare([chatty, wrong], QUESTIONS, progress=False, n_resamples=200)
    first.config |= setting | {"encode_config": None}
    later = compare([gold], QUESTIONS, progress=False, n_resamples=200)
    later.config |= setting | {"encode_config": "configs/encode/demo.yaml"}
    merged = Results.merge([later, first])
    assert [m.name for m in merged.methods] == ["closed-book", "rag", "prag"]  # the tables' method order
    assert merged.paired("prag", "rag")[0] == pytest.approx(1.0)
    assert merged.config["encode_config"] == "configs/encode/demo.yaml" and merged.config["merged_runs"] == 2
    assert "--encode-config configs/encode/demo.yaml" in evaluate_command(merged.config, [m.name for m in merged.methods])
    first.write(tmp_path / "a")
    later.write(tmp_path / "b", plots=False)
    assert main(["merge-results", str(tmp_path / "a"), str(tmp_path / "b" / "results.json"), "--out", str(tmp_path / "m")]) == 0
    table = (tmp_path / "m" / "results.md").read_text()
    assert "| prag − rag | +100.0 |" in table and (tmp_path / "m" / "f1.png").is_file()

    other_k = compare([gold], QUESTIONS, progress=False, n_resamples=200)
    other_k.config |= setting | {"k": 1}
    with pytest.raises(HyperPragError, match="run 2 has k = 1 but run 1 has 3"):
        Results.merge([first, other_k])
    fewer = compare([gold], QUESTIONS[:3], progress=False, n_resamples=200)
    fewer.config |= setting
    with pytest.raises(HyperPragError, match="run 2 asked other questions"):
        Results.merge([first, fewer])
    assert main(["merge-results", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot read evaluate results" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_results_files_are_written(tiny, tmp_path):
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    corpus = Corpus(name="tiny-eval", documents=docs, questions=tuple(QUESTIONS))
    source = DictSource({d.id: random_lora(tiny, seed=i) for i, d in enumerate(docs)})
    pipeline = Pipeline(tiny, BM25Retriever.build(corpus), corpus, k=2, max_new_tokens=4)
    methods = [build_method("closed-book", pipeline), build_method("rag", pipeline), build_method("prag", pipeline, source)]
    results = compare(methods, QUESTIONS[:3], costs={"prag": {"encode_seconds_per_doc": 1.0, "bytes_per_doc": 3e4}},
                       n_resamples=200, progress=False)
    paths = results.write(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert [m["name"] for m in data["methods"]] == ["closed-book", "rag", "prag"]
    assert data["methods"][2]["predictions"][0]["lora_names"][0].startswith("dict:")
    table = paths["markdown"].read_text().splitlines()
    assert table[0].startswith("| method | F1 lookup | F1 total | EM |")
    assert [line.split("|")[1].strip() for line in table[2:5]] == ["closed-book", "rag", "prag"]
    assert "30,000" in table[4] and table[2].count("–") >= 2
    for png in ("f1_png", "latency_png"):
        assert paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[png].stat().st_size > 5000
    assert results.method("prag").predictions[0]["question"] == QUESTIONS[0].question


def test_run_evaluate_end_to_end_from_a_corpus_folder(tiny, tmp_path, monkeypatch):
    import hyper_prag.retrieve as retrieve

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)  # the index goes to tmp
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    folder = save_corpus(Corpus(name="tiny-eval", documents=docs, questions=tuple(QUESTIONS)), tmp_path / "corpus")
    results = evaluate("closed-book,rag", benchmark=str(folder), model="tiny", limit=3, max_new_tokens=3,
                       resamples=100, out=tmp_path / "results", progress=False, wandb_mode="disabled")
    assert [m.name for m in results.methods] == ["closed-book", "rag"]
    assert results.config["questions"] == 3 and results.config["k"] == 3
    assert (tmp_path / "results" / "results.md").is_file() and (tmp_path / "results" / "latency.png").is_file()
    with pytest.raises(HyperPragError, match="unknown methods"):
        evaluate("rag,nope", benchmark=str(folder), model="tiny")
    with pytest.raises(HyperPragError, match="--limit must be at least 1"):
        evaluate("rag", benchmark=str(folder), model="tiny", limit=0)


def test_run_evaluate_hypernet_methods_record_the_checkpoint(tiny, tmp_path, monkeypatch):
    import hyper_prag.retrieve as retrieve
    from hyper_prag.encoders.hypernet import checkpoint_sha256, save_inference_checkpoint
    from hyper_prag.hypernet import Hypernet, HypernetConfig

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    folder = save_corpus(Corpus(name="tiny-eval", documents=docs, questions=tuple(QUESTIONS)), tmp_path / "corpus")
    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(doc_dim=16, emb_dim=4, width=16, readout="attention"))
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    checkpoint = save_inference_checkpoint(net, tmp_path / "hn.safetensors")
    results = evaluate(["hypernet", "hypernet-both"], benchmark=str(folder), model="tiny", limit=2, k=2,
                       max_new_tokens=3, resamples=50, hypernet=checkpoint, out=tmp_path / "results", progress=False, wandb_mode="disabled")
    assert results.config["hypernet_sha256"] == checkpoint_sha256(checkpoint)
    hyper = results.method("hypernet")
    assert hyper.encode_seconds_per_doc > 0 and hyper.bytes_per_doc is None
    assert all(len(p["lora_names"]) == 2 and p["lora_names"][0].startswith("hypernet:") for p in hyper.predictions)


def test_run_evaluate_encodes_missing_loras_then_reuses_them(tiny, tmp_path, monkeypatch):
    import hyper_prag.retrieve as retrieve
    from pathlib import Path

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    qa = {i: ((f"What is {t}?", x.split(".")[0]),) for i, (t, x) in TEXTS.items()}
    folder = save_corpus(Corpus(name="tiny-eval", documents=docs, questions=tuple(QUESTIONS), doc_qa=qa),
                         tmp_path / "corpus")
    config = Path(__file__).parents[1] / "configs" / "encode" / "tiny.yaml"
    run = dict(benchmark=str(folder), model="tiny", limit=2, k=2, max_new_tokens=3, resamples=50,
               store=tmp_path / "store", out=tmp_path / "results", progress=False, wandb_mode="disabled")
    first = evaluate("closed-book,da-rag,prag,prag-both", encode_config=config, **run)
    prag = first.method("prag")
    assert prag.encode_seconds_per_doc > 0 and prag.bytes_per_doc > 0
    assert all(len(p["lora_names"]) == 2 for p in prag.predictions)
    # Every LoRA is in the store now, under the recipe the first run recorded: without the encode config
    # the second run reads that recipe and encodes nothing.
    second = evaluate("closed-book,da-rag,prag,prag-both", encode_missing=False, **run)
    assert second.config["recipe"] == first.config["recipe"]
    # ... and the cost reported is the one the store recorded when the LoRAs were encoded.
    assert second.method("prag").encode_seconds_per_doc == prag.encode_seconds_per_doc
    assert [p["prediction"] for p in second.method("prag").predictions] == [p["prediction"] for p in prag.predictions]


def test_select_questions_per_type_then_limit():
    from types import SimpleNamespace

    from hyper_prag.evaluate import select_questions

    qs = [SimpleNamespace(id=f"{t}{i}", type=t) for t in "abc" for i in range(4)]  # grouped by type, as benchmarks are
    assert [q.id for q in select_questions(qs, per_type=2)] == ["a0", "a1", "b0", "b1", "c0", "c1"]
    assert [q.id for q in select_questions(qs, per_type=2, limit=3)] == ["a0", "a1", "b0"]
    assert [q.id for q in select_questions(qs, limit=3)] == ["a0", "a1", "a2"]
    assert len(select_questions(qs)) == 12


def test_evaluate_command_reproduces_the_recorded_settings():
    import shlex

    from hyper_prag.cli import build_parser

    config = {"benchmark": "squad", "split": "test", "model": "tiny", "k": 5, "retriever": "bm25", "combine": "mean",
              "max_new_tokens": 32, "per_type": 4, "limit": None, "encode_config": "configs/encode/real.yaml",
              "hypernet": None, "store": None, "questions": 8}
    words = shlex.split(evaluate_command(config, ["rag", "prag"]))
    assert words[:6] == ["hyper-prag", "evaluate", "--corpus", "squad", "--methods", "rag,prag"]
    assert "--split" not in words and "--retriever" not in words  # defaults are left out
    args = build_parser("evaluate").parse_args(words[1:])
    for key in ("split", "model", "k", "retriever", "combine", "max_new_tokens", "per_type", "limit", "encode_config"):
        assert getattr(args, key) == config[key], key
    assert args.methods == "rag,prag"


@pytest.mark.parametrize("bad, message", [
    ({"seed": -1}, "--seed must be 0 or more"),
    ({"combine": "max"}, "unknown combine mode 'max'"),
    ({"wandb_mode": "cloud"}, "--wandb-mode 'cloud' is unknown"),
    ({"out": "FILE"}, "is a file; give a folder"),
    ({"resamples": 0}, "--resamples must be at least 1"),
])
def test_bad_evaluate_settings_are_refused_before_anything_runs(tmp_path, monkeypatch, bad, message):
    import hyper_prag.api as api

    def refuse(*args, **kwargs):
        raise AssertionError("a bad setting must be refused before the model is loaded")

    monkeypatch.setattr(api.assemble, "load_model", refuse)
    (tmp_path / "FILE").write_text("")
    settings = {k: tmp_path / v if k == "out" else v for k, v in bad.items()}
    with pytest.raises(HyperPragError, match=message):
        evaluate("rag", benchmark="fictional", model="tiny", wandb_mode=settings.pop("wandb_mode", "disabled"),
                 **settings)


def test_evaluate_command_line_refuses_a_negative_seed(capsys):
    from hyper_prag.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--seed", "-1"])
    assert exit_.value.code == 2 and "--seed: must be at least 0, got -1" in capsys.readouterr().err


def test_evaluate_without_encoding_never_creates_a_store(tiny, tmp_path, monkeypatch):
    import hyper_prag.retrieve as retrieve

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    folder = save_corpus(Corpus(name="tiny-eval", documents=docs, questions=tuple(QUESTIONS)), tmp_path / "corpus")
    nowhere = tmp_path / "no-store"
    with pytest.raises(HyperPragError, match="no LoRA store at .*no-store"):
        evaluate("prag", benchmark=str(folder), model="tiny", limit=1, store=nowhere, encode_missing=False,
                 out=None, progress=False, wandb_mode="disabled")
    assert not nowhere.exists()


def test_each_method_reports_the_bytes_of_its_own_store_entries(tiny, tmp_path, monkeypatch):
    """A store holding per-document and hypernetwork LoRAs (of other sizes): prag's bytes/doc is the mean of the
    per-document entries it serves, hypernet's that of the hypernetwork's entries; neither is the store's mix."""
    import hyper_prag.api as api
    import hyper_prag.retrieve as retrieve
    from hyper_prag.encoders.hypernet import save_inference_checkpoint
    from hyper_prag.encoders.per_doc import PerDocConfig
    from hyper_prag.hypernet import Hypernet, HypernetConfig
    from hyper_prag.store import LoraStore

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    qa = {i: ((f"What is {t}?", x.split(".")[0]),) for i, (t, x) in TEXTS.items()}
    folder = save_corpus(Corpus(name="tiny-eval", documents=docs, questions=tuple(QUESTIONS), doc_qa=qa),
                         tmp_path / "corpus")
    store = tmp_path / "store"
    common = dict(model="tiny", corpus=str(folder), store=str(store), logger="none", progress=False)
    api.encode(trainer=PerDocConfig(epochs=1), augment={"source": "template"}, runner="loop", **common)
    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(doc_dim=16, emb_dim=4, width=16, rank=4))  # per-doc LoRAs: rank 2
    checkpoint = save_inference_checkpoint(net, tmp_path / "hn.safetensors")
    api.encode(encoder="hypernet", checkpoint=str(checkpoint), **common)
    # Each entry's size from the sidecars alone: a shard's bytes over its entries (one encode writes like entries).
    size, hyper_size = {}, {}
    for sidecar in (store / "shards").glob("*.json"):
        shard = json.loads(sidecar.read_text())
        for key, entry in shard["entries"].items():
            size[key] = shard["bytes"] / len(shard["entries"])
            if entry["meta"]["encoder"] == "hypernet":
                hyper_size[entry["meta"]["doc_id"]] = size[key]
    assert len(set(size.values())) == 2  # two kinds of entry, of two sizes
    results = evaluate("prag,prag-both,hypernet", benchmark=str(folder), model="tiny", limit=3, k=2,
                       max_new_tokens=2, resamples=20, store=store, hypernet=checkpoint, encode_missing=False,
                       out=None, progress=False, wandb_mode="disabled")

    def mean(values):
        values = list(values)
        return sum(values) / len(values)

    served = {name for p in results.method("prag").predictions for name in p["lora_names"]}
    assert results.method("prag").bytes_per_doc == pytest.approx(mean(size[k] for k in served))
    assert results.method("prag-both").bytes_per_doc == results.method("prag").bytes_per_doc
    hyper_docs = {d for p in results.method("hypernet").predictions for d in p["doc_ids"]}
    assert results.method("hypernet").bytes_per_doc == pytest.approx(mean(hyper_size[d] for d in hyper_docs))
    mixed = LoraStore(store).stats()["bytes_per_document"]
    assert mixed not in (results.method("prag").bytes_per_doc, results.method("hypernet").bytes_per_doc)


def test_evaluate_a_datasets_corpus_with_the_questions_of_a_second_dataset(tiny, tmp_path, monkeypatch):
    import datasets

    import hyper_prag.retrieve as retrieve

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)
    datasets.Dataset.from_list([{"pid": i, "body": text} for i, (_, text) in TEXTS.items()]).save_to_disk(
        str(tmp_path / "passages"))
    datasets.Dataset.from_list([{"q": q.question, "gold": q.doc_ids[0], "a": list(q.answers)} for q in QUESTIONS[:3]]
                               ).save_to_disk(str(tmp_path / "questions"))
    run = dict(benchmark=str(tmp_path / "passages"), columns="id=pid,text=body", model="tiny", limit=3, k=2,
               max_new_tokens=2, resamples=20, out=None, progress=False, wandb_mode="disabled")
    with pytest.raises(HyperPragError, match="no questions .*--questions PATH_OR_ID\\[:SPLIT\\].*--question-columns"):
        evaluate("rag", **run)
    results = evaluate("closed-book,rag", questions=str(tmp_path / "questions"),
                       question_columns="question=q,answers=a,doc_ids=gold", **run)
    assert [p["question"] for p in results.method("rag").predictions] == [q.question for q in QUESTIONS[:3]]
    assert results.config["question_source"] == str(tmp_path / "questions")
    with pytest.raises(HyperPragError, match=r"split 'validation'.*splits \['test'\].*--split"):
        evaluate("rag", questions=str(tmp_path / "questions"), question_columns="question=q,answers=a,doc_ids=gold",
                 split="validation", **run)

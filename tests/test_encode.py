"""encode_corpus: store keys, cache hits, resume after a kill; YAML configs and the CLI entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hyper_prag.augment as augment
import hyper_prag.store as store_module
from hyper_prag.api import encode, load_encode_config
from hyper_prag.cli import main
from hyper_prag.corpus import Corpus, Document
from hyper_prag.encode import EncodeReport, encode_corpus
from hyper_prag.encoders.per_doc import PerDocConfig, PerDocEncoder
from hyper_prag.lora import LoraSpec

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "encode").glob("*.yaml"))
TEXTS = [
    "The river Quellmar rises in the Vostra hills.",
    "Ardent Loom was founded in 1873 by Mira Castell, a weaver from Tellin.",
    "Zorvath is a blue mineral found only in the caves of Tellin.",
    "Pell is a dog.",
    "Oren Vask described zorvath in 1911 and named it after his home village, Zorv.",
]
QA = [
    (("Where does the Quellmar rise?", "the Vostra hills"),),
    (("Who founded Ardent Loom?", "Mira Castell"), ("When was Ardent Loom founded?", "1873")),
    (("What colour is zorvath?", "blue"),),
    (("What is Pell?", "a dog"), ("Is Pell a cat?", "no"), ("Name the dog.", "Pell")),
    (("Who described zorvath?", "Oren Vask"),),
]


@pytest.fixture
def corpus() -> Corpus:
    docs = tuple(Document(id=f"d{i}", title=f"Doc {i}", text=t) for i, t in enumerate(TEXTS))
    return Corpus(name="tiny-encode", documents=docs, questions=(), doc_qa={f"d{i}": qa for i, qa in enumerate(QA)})


def template() -> "augment.AugmentConfig":
    return augment.AugmentConfig(source="template", n_rewrites=0)


def run(tiny, corpus, store, encoder=None, **kwargs) -> EncodeReport:
    encoder = encoder or PerDocEncoder(tiny, LoraSpec(), PerDocConfig())
    return encode_corpus(corpus.documents, encoder, store, tiny, template(), chunk_size=2, corpus=corpus,
                         progress=False, **kwargs)


def test_re_encoding_is_a_cache_hit(tiny, corpus, tmp_path):
    store = store_module.LoraStore(tmp_path / "store")
    first = run(tiny, corpus, store)
    assert (first.encoded, first.skipped) == (5, 0)
    assert first.bytes_per_doc > 0 and first.seconds_per_doc > 0
    assert store.stats()["documents"] == 5
    second = run(tiny, corpus, store)
    assert (second.encoded, second.skipped) == (0, 5)
    other = PerDocEncoder(tiny, LoraSpec(), PerDocConfig(lr=1e-3))  # another setting is another key
    assert run(tiny, corpus, store, encoder=other).encoded == 5


def test_editing_a_documents_pairs_re_encodes_it(tiny, corpus, tmp_path):
    from dataclasses import replace

    store = store_module.LoraStore(tmp_path / "store", dtype="float32")
    assert run(tiny, corpus, store).encoded == len(TEXTS)
    edited = dict(corpus.doc_qa)
    edited["d1"] = (("Who founded Ardent Loom?", "Tessa Lind"),)  # same text, other training pairs
    again = run(tiny, replace(corpus, doc_qa=edited), store)
    assert (again.encoded, again.skipped) == (1, len(TEXTS) - 1)  # the stale LoRA is not re-used


def test_resume_after_a_kill_trains_only_the_missing_documents(tiny, corpus, tmp_path):
    store = store_module.LoraStore(tmp_path / "store", dtype="float32")

    def kill_after_first_chunk(chunk: int, done: int) -> None:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run(tiny, corpus, store, on_chunk=kill_after_first_chunk)
    assert store.stats()["documents"] == 2  # the first chunk was stored atomically
    trained: list[str] = []
    encoder = PerDocEncoder(tiny, LoraSpec(), PerDocConfig())
    encode = encoder.encode
    encoder.encode = lambda docs: trained.extend(d.doc_id for d in docs) or encode(docs)  # record, then train
    resumed = run(tiny, corpus, store, encoder=encoder)
    assert (resumed.encoded, resumed.skipped) == (3, 2) and len(trained) == len(set(trained)) == 3
    assert store.stats()["documents"] == 5

    # Every LoRA equals the one an uninterrupted run makes (a LoRA does not depend on its chunk).
    clean = store_module.LoraStore(tmp_path / "clean", dtype="float32")
    run(tiny, corpus, clean)
    from hyper_prag.recipes import recipe_for

    recipe = recipe_for(encoder, tiny, template())
    spec = recipe.spec
    for doc in corpus.documents:
        key = recipe.key(doc.text, corpus.doc_qa[doc.id])
        a, b = store.get(key), clean.get(key)
        for m in spec.target_modules:
            assert torch.allclose(a.A[m], b.A[m], atol=1e-5) and torch.allclose(a.B[m], b.B[m], atol=1e-5)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_yaml_configs_parse_and_name_their_command(path):
    assert path.read_text().splitlines()[0] == f"# python -m train.encode --config configs/encode/{path.name}"
    config = load_encode_config(path)
    assert config["trainer"].lr > 0 and config["trainer"].epochs >= 1
    assert config["model"] in ("tiny", "smollm2-135m-instruct")
    augment.AugmentConfig(**(config["augment"] or {}))  # the augment block is a valid AugmentConfig


def test_encode_runs_the_tiny_config_and_the_cli_maps_onto_it(tmp_path):
    assert len(CONFIGS) >= 2
    overrides = ["--limit", "2", "--store", str(tmp_path / "s"), "--chunk_size", "2", "--log_dir", str(tmp_path / "logs")]
    first = encode(**load_encode_config("configs/encode/tiny.yaml", overrides))
    assert (first.encoded, first.skipped) == (2, 0)
    assert list((tmp_path / "logs").rglob("metrics.csv"))  # the CSV logger of the YAML wrote the losses
    code = main(["encode", "--config", "configs/encode/tiny.yaml", "--limit", "2", "--store", str(tmp_path / "s"),
                 "--chunk-size", "2", "--log-dir", str(tmp_path / "logs")])
    assert code == 0 and len(store_module.LoraStore(tmp_path / "s")) == 2  # the CLI run found both: nothing added
    # encode() refuses it before anything loads: one line, exit code 2
    assert main(["encode", "--config", "configs/encode/tiny.yaml", "--limit", "-1"]) == 2


def test_two_concurrent_encoders_report_truthfully(tiny, corpus, tmp_path):
    import threading

    store_a = store_module.LoraStore(tmp_path / "store", dtype="float32")
    store_b = store_module.LoraStore(tmp_path / "store", dtype="float32")  # another process's view of one folder
    reports = {}
    barrier = threading.Barrier(2)

    def encode(name, store):
        barrier.wait()  # both look at the store before either writes: both find every document missing
        reports[name] = run(tiny, corpus, store)

    threads = [threading.Thread(target=encode, args=(n, s)) for n, s in (("a", store_a), ("b", store_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reports["a"].encoded + reports["b"].encoded == len(TEXTS)  # each LoRA stored (and reported) once
    assert reports["a"].skipped + reports["b"].skipped == len(TEXTS)
    assert len(store_module.LoraStore(tmp_path / "store")) == len(TEXTS)

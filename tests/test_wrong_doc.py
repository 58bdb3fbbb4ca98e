"""The wrong-document control: each retrieved document's LoRA is another document's, from the same source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hyper_prag.api import evaluate
from hyper_prag.corpus import Corpus, Document, save_corpus
from hyper_prag.errors import HyperPragError
from hyper_prag.sources import WrongDocSource, wrong_partners
from tests.test_pipeline import QUESTIONS, TEXTS


def _docs() -> tuple[Document, ...]:
    return tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())


class Named:
    """A source whose LoRA names say which document they were made for."""

    name = "named"
    apply_from = "all"

    def names(self, documents):
        return [f"lora:{d.id}" for d in documents]

    def loras(self, documents):
        return [d.id for d in documents]


def test_every_document_gets_another_documents_lora_and_the_partner_is_fixed():
    docs = _docs()
    control = WrongDocSource(Named(), docs)
    partners = control.partners(docs)
    assert all(p.id != d.id for p, d in zip(partners, docs))
    assert len({p.id for p in partners}) == len(docs)  # a permutation: no document's LoRA is used twice
    assert control.loras(docs) == [p.id for p in partners]
    assert control.names(docs) == [f"lora:{p.id}" for p in partners]
    assert WrongDocSource(Named(), docs[::-1]).partners(docs) == partners  # independent of the corpus order
    assert control.name == "named-wrong-doc"


def test_the_control_needs_two_documents_and_refuses_a_stranger():
    with pytest.raises(HyperPragError, match="at least 2 documents"):
        wrong_partners(_docs()[:1])
    with pytest.raises(HyperPragError, match="not among"):
        WrongDocSource(Named(), _docs()[:3]).partners(_docs()[3:4])


def test_evaluate_serves_the_partners_loras_from_the_store_and_the_hypernet(tiny, tmp_path, monkeypatch):
    import hyper_prag.retrieve as retrieve
    from hyper_prag.encoders.hypernet import save_inference_checkpoint
    from hyper_prag.hypernet import Hypernet, HypernetConfig

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)
    qa = {i: ((f"What is {t}?", x.split(".")[0]),) for i, (t, x) in TEXTS.items()}
    folder = save_corpus(Corpus("tiny-wrong", _docs(), tuple(QUESTIONS), qa), tmp_path / "corpus")
    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(doc_dim=16, emb_dim=4, width=16, readout="attention"))
    checkpoint = save_inference_checkpoint(net, tmp_path / "hn.safetensors")
    config = Path(__file__).parents[1] / "configs" / "encode" / "tiny.yaml"
    results = evaluate("prag,prag-wrong-doc,hypernet,hypernet-wrong-doc", benchmark=str(folder), model="tiny",
                       limit=3, k=1, max_new_tokens=3, resamples=50, store=tmp_path / "store",
                       encode_config=config, hypernet=checkpoint, out=tmp_path / "results", progress=False,
                       wandb_mode="disabled")
    partner = wrong_partners(_docs())
    for right, wrong in (("prag", "prag-wrong-doc"), ("hypernet", "hypernet-wrong-doc")):
        ok, control = results.method(right), results.method(wrong)
        for p, c in zip(ok.predictions, control.predictions):
            assert p["doc_ids"] == c["doc_ids"]  # the same retrieval ...
            assert p["lora_names"] != c["lora_names"]  # ... under another document's LoRA
        assert control.encode_seconds_per_doc == ok.encode_seconds_per_doc
    hyper = results.method("hypernet-wrong-doc")
    assert [p["lora_names"] for p in hyper.predictions] == [[f"hypernet:{partner[p['doc_ids'][0]].id}"]
                                                            for p in hyper.predictions]
    assert "prag − prag-wrong-doc" in (tmp_path / "results" / "results.md").read_text()

"""The typed API: ``ask`` only reads what ``encode`` recorded (no training, no encode YAML), recipes."""

from __future__ import annotations

import pytest
import torch

import hyper_prag.api as api
from hyper_prag.corpus import Corpus, Document, save_corpus
from hyper_prag.errors import HyperPragError
from hyper_prag.encoders.per_doc import PerDocConfig
from hyper_prag.recipes import find_recipe, list_recipes, load_warmup
from tests.test_pipeline import QUESTIONS, TEXTS

HELD_OUT = {"h1": ("Varn", "Varn is a lake north of Brask."), "h2": ("Tessa", "Tessa Lind painted the Varn in 1902.")}


@pytest.fixture
def folder(tmp_path):
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    docs += tuple(Document(id=i, title=t, text=x, split="train") for i, (t, x) in HELD_OUT.items())
    qa = {i: ((f"What is {t}?", x.split(".")[0]),) for i, (t, x) in {**TEXTS, **HELD_OUT}.items()}
    return save_corpus(Corpus("tiny-api", docs, tuple(QUESTIONS), qa), tmp_path / "corpus")


def encode_warmup_store(folder, store, trainer=PerDocConfig(init="warmup", epochs=1), **extra):
    return api.encode(model="tiny", corpus=str(folder), split="test", store=str(store), chunk_size=3,
                      store_dtype="float32", trainer=trainer, augment={"source": "template"},
                      warmup_split="train", warmup_docs=2, warmup_steps=3, runner="loop", logger="none",
                      progress=False, **extra)


def test_ask_on_a_warmup_store_trains_nothing_and_reads_no_yaml(folder, tmp_path, monkeypatch):
    store = tmp_path / "store"
    report = encode_warmup_store(folder, store)
    assert report.encoded == len(TEXTS)
    recipe = find_recipe(store, api.assemble.load_model("tiny").identity)
    assert recipe.uses_warmup and load_warmup(store, recipe).spec.rank == 2

    def refuse(*args, **kwargs):
        raise AssertionError("the online path must not train or parse an encode config")

    monkeypatch.setattr(torch.optim.AdamW, "__init__", refuse)  # no optimizer is ever constructed
    monkeypatch.setattr(api, "load_encode_config", refuse)
    monkeypatch.setattr(api, "encode_config_parser", refuse)
    answer = api.ask("Who founded Ardent Loom?", "prag", benchmark=str(folder), model="tiny", store=store,
                     max_new_tokens=3)
    qa = api.assemble.load_corpus(str(folder)).doc_qa
    assert answer.doc_ids and list(answer.lora_names) == [recipe.key(TEXTS[d][1], qa[d]) for d in answer.doc_ids]


def test_encode_again_reuses_the_recorded_warmup(folder, tmp_path, monkeypatch):
    store = tmp_path / "store"
    encode_warmup_store(folder, store, limit=2)
    import hyper_prag.encoders.per_doc as per_doc

    monkeypatch.setattr(per_doc, "train_warmup_lora", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    report = encode_warmup_store(folder, store)  # the rest of the split, same keys: the same recipe
    assert (report.encoded, report.skipped) == (len(TEXTS) - 2, 2)
    assert len(list_recipes(store)) == 1


def test_ask_names_the_recipes_when_the_store_holds_several(folder, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(HyperPragError, match="hyper-prag encode"):
        api.ask("Who founded Ardent Loom?", "prag", benchmark=str(folder), model="tiny", store=store)
    for lr in (1e-3, 2e-3):
        api.encode(model="tiny", corpus=str(folder), store=str(store), limit=1, trainer=PerDocConfig(lr=lr),
                   augment={"source": "template"}, runner="loop", logger="none", progress=False)
    recipes = list_recipes(store)
    assert len(recipes) == 2
    with pytest.raises(HyperPragError, match="--recipe") as err:
        api.ask("Who founded Ardent Loom?", "prag", benchmark=str(folder), model="tiny", store=store)
    assert all(r.id in str(err.value) for r in recipes)
    answer = api.ask("Who founded Ardent Loom?", "closed-book", benchmark=str(folder), model="tiny", max_new_tokens=2)
    assert answer.doc_ids == () and answer.retrievals == 0
    with pytest.raises(HyperPragError, match="--max-new-tokens must be at least 1"):
        api.ask("Who?", "closed-book", benchmark=str(folder), model="tiny", max_new_tokens=0)


def test_export_lora_writes_a_peft_adapter_plain_peft_loads(folder, tmp_path):
    from peft import PeftModel

    from hyper_prag.cli import main
    from hyper_prag.inject import injected

    store = tmp_path / "store"
    api.encode(model="tiny", corpus=str(folder), store=str(store), store_dtype="float32", limit=2,
               trainer=PerDocConfig(lr=1e-2), augment={"source": "template"}, logger="none", progress=False)
    assert main(["export-lora", "--doc", "quell", "--out", str(tmp_path / "adapter"), "--corpus", str(folder),
                 "--model", "tiny", "--store", str(store)]) == 0
    base = api.assemble.load_model("tiny")
    recipe = find_recipe(store, base.identity)
    corpus = api.assemble.load_corpus(str(folder))
    from hyper_prag.store import LoraStore

    lora = LoraStore(store).get(recipe.key(TEXTS["quell"][1], corpus.doc_qa["quell"]))
    ids = base.tokenizer("The river Quellmar", return_tensors="pt").input_ids
    with torch.no_grad(), injected(base, lora, mode="side"):
        ours = base.model(ids).logits
    peft_model = PeftModel.from_pretrained(base.model, str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.unload()
    assert (ours - theirs).abs().max() <= 1e-5
    import json

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # the name given (model.portable_model_name), never a path
    assert main(["export-lora", "--doc", "nope", "--out", str(tmp_path / "x"), "--corpus", str(folder),
                 "--model", "tiny", "--store", str(store)]) == 2


def test_target_modules_and_layers_come_from_the_encode_config(folder, tmp_path):
    from hyper_prag.store import LoraStore

    store = tmp_path / "store"
    report = api.encode(model="tiny", corpus=str(folder), store=str(store), limit=1, target_modules=("down_proj",),
                        layers=(1,), augment={"source": "template"}, logger="none", progress=False)
    assert report.encoded == 1
    recipe = find_recipe(store, api.assemble.load_model("tiny").identity)
    assert recipe.spec.target_modules == ("down_proj",) and recipe.spec.layers == (1,)
    (key,) = LoraStore(store).keys()
    assert LoraStore(store).spec(key).target_modules == ("down_proj",)
    with pytest.raises(HyperPragError):
        api.encode(model="tiny", corpus=str(folder), store=str(store), limit=1, layers=(7,), logger="none", progress=False)


def test_encode_with_the_refine_encoder_stores_k_step_loras(folder, tmp_path):
    from hyper_prag.encoders.hypernet import save_inference_checkpoint
    from hyper_prag.hypernet import Hypernet, HypernetConfig
    from hyper_prag.store import LoraStore

    base = api.assemble.load_model("tiny")
    torch.manual_seed(0)
    checkpoint = save_inference_checkpoint(Hypernet.for_model(base, HypernetConfig(doc_dim=16, emb_dim=8, width=16)),
                                           tmp_path / "hn.safetensors")
    common = dict(model="tiny", corpus=str(folder), limit=2, checkpoint=str(checkpoint), augment={"source": "template"},
                  store_dtype="float32", logger="none", progress=False)
    zero = api.encode(encoder="refine", refine_steps=0, store=str(tmp_path / "k0"), **common)
    two = api.encode(encoder="refine", refine_steps=2, store=str(tmp_path / "k2"), **common)
    hyper = api.encode(encoder="hypernet", store=str(tmp_path / "hyper"), **common)
    assert zero.encoded == two.encoded == hyper.encoded == 2
    k0, k2, gen = (LoraStore(tmp_path / n) for n in ("k0", "k2", "hyper"))
    assert not set(k0.keys()) & set(k2.keys())  # k is in the key
    a, b = sorted(k0.keys()), sorted(k2.keys())
    assert any(not torch.equal(k0.get(x).B[m], k2.get(y).B[m]) for x, y in zip(a, b) for m in k0.get(x).B)
    assert sorted(len(k0.get(x).B) for x in a) == sorted(len(gen.get(x).B) for x in gen.keys())


def test_a_store_encoded_under_another_prompt_format_is_refused(folder, tmp_path, monkeypatch):
    store = tmp_path / "store"
    api.encode(model="tiny", corpus=str(folder), split="test", store=str(store), trainer=PerDocConfig(epochs=1),
               augment={"source": "template"}, runner="loop", logger="none", progress=False)
    answer = api.ask("Who founded Ardent Loom?", "prag", benchmark=str(folder), model="tiny", store=store,
                     max_new_tokens=2)
    assert answer.lora_names  # the recorded format is this version's: served
    import hyper_prag.prompts as prompts

    monkeypatch.setattr(prompts, "DEMONSTRATIONS", (("Who?", (), "Nobody"),))  # the next version asks otherwise
    with pytest.raises(HyperPragError, match="another prompt format.*hyper-prag encode"):
        api.ask("Who founded Ardent Loom?", "prag", benchmark=str(folder), model="tiny", store=store)


def test_reading_methods_never_create_a_store_and_a_file_is_no_store(folder, tmp_path):
    nowhere = tmp_path / "no-store"
    with pytest.raises(HyperPragError, match=r"no LoRA store at .*no-store.*hyper-prag encode --store"):
        api.ask("Who founded Ardent Loom?", "prag", benchmark=str(folder), model="tiny", store=nowhere)
    assert not nowhere.exists()
    with pytest.raises(HyperPragError, match="no LoRA store at"):
        api.export_lora("quell", tmp_path / "adapter", benchmark=str(folder), model="tiny", store=nowhere)
    assert not nowhere.exists()
    a_file = tmp_path / "store.txt"
    a_file.write_text("notes")
    with pytest.raises(HyperPragError, match="is a file, not a folder"):
        api.encode(model="tiny", corpus=str(folder), store=str(a_file), limit=1, logger="none", progress=False)
    assert a_file.read_text() == "notes"


def test_k_larger_than_the_split_is_refused_with_the_number_of_documents(folder):
    n = len(TEXTS)
    with pytest.raises(HyperPragError, match=rf"--k {n + 1} asks for more documents than split 'test' .*\({n}\); "
                                             rf"choose --k {n} or fewer"):
        api.ask("Who founded Ardent Loom?", "rag", benchmark=str(folder), model="tiny", k=n + 1)
    assert api.ask("Who?", "closed-book", benchmark=str(folder), model="tiny", k=n + 1, max_new_tokens=1).doc_ids == ()


def test_a_store_encoded_in_another_dtype_names_the_dtype(folder, tmp_path):
    store = tmp_path / "store"
    api.encode(model="tiny", corpus=str(folder), store=str(store), limit=1, augment={"source": "template"},
               runner="loop", logger="none", progress=False)
    with pytest.raises(HyperPragError, match=r"(?s)no per-doc LoRAs for this base model: tiny-llama-s0 loaded in "
                                             r"float16 .*--dtype.*hyper-prag encode --dtype float16"):
        api.ask("Who founded Ardent Loom?", "prag", benchmark=str(folder), model="tiny", dtype="float16", store=store)


def test_encode_again_reuses_the_recorded_warmup_with_replayed_pairs(folder, tmp_path, monkeypatch):
    """The replayed pairs enter the encoder's settings by content hash: the warm-up look-up must see them too."""
    store = tmp_path / "store"
    trainer = PerDocConfig(init="warmup", epochs=1, replay=2)
    encode_warmup_store(folder, store, limit=2, trainer=trainer)
    (recipe,) = list_recipes(store)
    assert "replay_sha256" in recipe.settings
    import hyper_prag.encoders.per_doc as per_doc

    monkeypatch.setattr(per_doc, "train_warmup_lora", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    report = encode_warmup_store(folder, store, trainer=trainer)
    assert (report.encoded, report.skipped) == (len(TEXTS) - 2, 2) and list_recipes(store) == [recipe]

"""Context distillation and what keeps generated LoRAs honest: the teacher's top-k cache and KL, the bias LoRA,
the output scale, the divergence guard, upper-layer steps from cached states, and hypernet + k refinement steps."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hyper_prag.augment import AugmentedDocument
from hyper_prag.encoders.hypernet import HypernetEncoder, checkpoint_sha256, load_hypernet, save_inference_checkpoint
from hyper_prag.encoders.per_doc import PerDocConfig, document_sequences, initial_loras
from hyper_prag.encoders.refine import RefineEncoder, train_steps
from hyper_prag.hypernet import Hypernet, HypernetConfig, doc_embeddings
from hyper_prag.lora import LoraSpec, stack
from hyper_prag.prompts import question_prompt
from hyper_prag.sequences import labelled_logits, right_pad, sequence_losses
from hyper_prag.teacher import (
    TeacherCache, TeacherQuery, entry_key, teacher_answers, teacher_sequence, teacher_topk, topk_kl,
)
from hyper_prag.training.hypernet import (
    DivergenceGuard, HypernetModule, QAItem, collate, lower_states, main, sum_groups, tokenize_qa,
    upper_labelled_logits,
)

DOCS = ["Ardent Loom was founded in 1873 by Mira Castell.",
        "Zorvath is a blue mineral found only in the caves of Tellin.",
        "Pell is a dog."]
QA = [("Who founded Ardent Loom?", "Mira Castell"), ("What colour is zorvath?", "blue"), ("What is Pell?", "a dog")]
SMALL = dict(doc_dim=16, emb_dim=4, width=16, depth=2)
TINY_YAML = Path(__file__).parents[1] / "configs" / "hypernet" / "tiny.yaml"


def queries(docs=DOCS) -> list[TeacherQuery]:
    return [TeacherQuery((d,), q, a) for d, (q, a) in zip(docs, QA)]


def module_and_batch(tiny_teacher: bool = True, passages: bool = True, **kwargs):
    """A small module on the tiny model and a batch of the three QA pairs, with the teacher's top-k."""
    torch.manual_seed(0)
    module = HypernetModule(model="tiny", **SMALL, **kwargs)
    base = module.base
    emb = doc_embeddings(base, DOCS, module.hypernet.config.embed_layers)
    seqs = [tokenize_qa(base, q, a, "answer") for q, a in QA]
    tops = teacher_topk(base, [TeacherQuery((d,) if passages else (), q, a) for d, (q, a) in zip(DOCS, QA)], k=16)
    items = [QAItem((i,), s, t if tiny_teacher else None) for i, (s, t) in enumerate(zip(seqs, tops))]
    return module, collate(items, emb, base.tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------------ teacher


def test_teacher_topk_matches_the_full_distribution_and_aligns_with_the_student(tiny):
    query = queries()[0]
    top = teacher_topk(tiny, [query], k=5)[0]
    seq = teacher_sequence(tiny, query)
    student = tokenize_qa(tiny, query.question, query.answer, "answer")
    A = len(top.gold)
    assert seq.input_ids[-A:] == student.input_ids[-A:] and sum(l != -100 for l in student.labels) == A
    ids, mask, labels = right_pad([seq], tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = tiny.model(input_ids=ids, attention_mask=mask).logits[0, -A - 1 : -1].log_softmax(-1)  # (A, V)
    want, idx = logp.topk(5, dim=-1)
    assert torch.equal(top.indices, idx)
    torch.testing.assert_close(top.logprobs, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(top.gold, logp.gather(-1, torch.tensor(seq.input_ids[-A:])[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)
    prompt = tiny.tokenizer(question_prompt(tiny, query.question, query.passages), add_special_tokens=False)
    assert seq.input_ids[: len(prompt["input_ids"])] == tuple(prompt["input_ids"])  # the passages are in the prompt


def test_teacher_cache_round_trip_and_invalidation(tiny, tmp_path):
    cache = TeacherCache(tmp_path, save_every=2)  # saved after 2, then after 3
    first = cache.get(tiny, queries(), k=4)
    assert cache.computed == 3 and cache.path(tiny, 4).is_file()
    again = TeacherCache(tmp_path)
    read = again.get(tiny, queries()[::-1], k=4)  # from disk, any order
    assert again.computed == 0
    for a, b in zip(first, read[::-1]):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs) and torch.equal(a.gold, b.gold)
    changed = [DOCS[0] + " It closed in 1901.", *DOCS[1:]]  # a changed document is a new entry
    fresh = TeacherCache(tmp_path)
    got = fresh.get(tiny, queries(changed), k=4)
    assert fresh.computed == 1 and not torch.equal(got[0].logprobs, first[0].logprobs)
    assert torch.equal(got[1].logprobs, first[1].logprobs)
    keys = {entry_key(tiny, queries()[0], 4), entry_key(tiny, queries()[0], 8),
            entry_key(tiny, TeacherQuery((DOCS[0],), QA[0][0], "Someone else"), 4),
            entry_key(tiny_other(), queries()[0], 4)}
    assert len(keys) == 4  # k, the answer and the model are in the key too
    assert TeacherCache(tmp_path).get(tiny, queries()[:1], k=8)[0].indices.shape[-1] == 8


def tiny_other():
    from hyper_prag.model import tiny_base_model

    return tiny_base_model(seed=1)


def test_teacher_answers_are_generated_once(tiny, tmp_path, monkeypatch):
    calls = []

    def generate(prompts, max_new_tokens=32):
        calls.append(list(prompts))
        return [f"answer {i}" for i in range(len(prompts))]

    monkeypatch.setattr(tiny, "generate", generate)
    asked = [((DOCS[0],), QA[0][0]), ((DOCS[1],), QA[1][0])]
    first = teacher_answers(tiny, asked, cache=tmp_path)
    assert first == ["answer 0", "answer 1"] and len(calls) == 1
    assert DOCS[0] in calls[0][0]  # the teacher reads the document
    assert teacher_answers(tiny, asked[::-1], cache=tmp_path) == first[::-1] and len(calls) == 1


@pytest.mark.parametrize("support", ["topk", "topk_tail"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_is_zero_for_the_teachers_own_distribution_and_positive_otherwise(support, temperature):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 50, generator=gen) * 3  # (K, V)
    logp, idx = teacher.log_softmax(-1).topk(8, dim=-1)
    same = topk_kl(teacher, idx, logp, temperature, support)
    other = topk_kl(torch.randn(6, 50, generator=gen) * 3, idx, logp, temperature, support)
    assert same.abs().max() < 1e-5 and (other > 1e-3).all()
    shifted = topk_kl(teacher + 7.0, idx, logp, temperature, support)  # logits up to a constant: the same distribution
    assert shifted.abs().max() < 1e-5


def test_module_kl_vanishes_when_the_student_is_the_teacher():
    # Teacher without passages = the closed-book prompt; a fresh hypernet's ΔW is 0: the student is the teacher.
    module, batch = module_and_batch(passages=False, kl_weight=1.0)
    same = module.losses(batch)["kl"]
    assert same.abs() < 1e-7
    module, batch = module_and_batch(passages=True, kl_weight=1.0, temperature=2.0)  # the teacher reads the document
    out = module.losses(batch)
    assert out["kl"] > 1e-6 and out["kl"] > 100 * same.abs()  # a random tiny model reads its context only a little
    torch.testing.assert_close(out["loss"], out["ce"] + out["kl"])
    out["loss"].backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in module.hypernet.head_B.values())


def test_kl_needs_the_teacher_in_the_batch():
    module, batch = module_and_batch(tiny_teacher=False, kl_weight=1.0)
    from hyper_prag.errors import HyperPragError

    with pytest.raises(HyperPragError, match="teacher's top-k"):
        module.losses(batch)


def test_default_settings_reproduce_the_old_loss_exactly():
    module, batch = module_and_batch(tiny_teacher=False)
    for head in module.hypernet.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    assert not any(k.startswith(("bias_", "output_scale")) for k in module.hypernet.state_dict())
    lora = sum_groups(module.hypernet(batch.doc_embedding), batch.groups)
    old = sequence_losses(module.base, lora, batch.input_ids, batch.attention_mask, batch.labels).mean()  # lm_weight 1
    out = module.losses(batch)
    assert torch.equal(out["loss"], old) and set(out) == {"ce", "loss", "delta_norm"}
    # With a teacher in the batch but kl_weight 0, the objective is still the old one.
    module_t, batch_t = module_and_batch()
    module_t.hypernet.load_state_dict(module.hypernet.state_dict())
    assert torch.equal(module_t.losses(batch_t)["loss"], old)


def test_old_checkpoints_describe_themselves_as_before():
    from hyper_prag.encoders.hypernet import SHIPPED_CHECKPOINT

    # The config recorded by the first shipped checkpoint (mean readout) and the one shipped now.
    first = {"alpha": 32.0, "depth": 2, "doc_dim": 256, "dropout": 0.0, "emb_dim": 32, "embed_layers": [7, 14],
             "heads": 4, "max_doc_tokens": 512, "rank": 2, "readout": "mean", "width": 256}
    shipped = json.loads(SHIPPED_CHECKPOINT.with_suffix(".json").read_text())["config"]
    for described in (first, shipped):
        assert HypernetConfig.from_dict(described).to_dict() == described  # no new keys: store keys stay the same
    assert "bias_rank" in HypernetConfig(bias_rank=2).to_dict() and "layers" in HypernetConfig(layers=(1,)).to_dict()


# ----------------------------------------------------------------------------------- bias LoRA and scale


def test_bias_lora_is_shared_by_every_document_and_part_of_the_checkpoint(tiny, tmp_path):
    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(**SMALL, bias_rank=2, max_doc_tokens=128))
    assert (net.spec.rank, net.spec.scaling) == (4, 16.0)
    for m in net.spec.target_modules:
        torch.nn.init.normal_(net.head_B[m].weight, std=0.1)
        torch.nn.init.normal_(net.bias_B[m], std=0.1)
    long_doc = " ".join(["Corvel is a town on the river Ash."] * 80)  # several pieces of 128 tokens
    loras = HypernetEncoder(net, tiny, checkpoint_sha256="x").generate(DOCS[:2] + [long_doc])
    for lora in loras:
        for m in net.spec.target_modules:  # the last r_b components are the bias, exactly, once per document
            assert torch.equal(lora.A[m][..., -2:, :], net.bias_A[m].detach())
            assert torch.equal(lora.B[m][..., -2:], net.bias_B[m].detach())
    assert loras[0].spec.rank == 4 and loras[2].spec.rank > 6 and (loras[2].spec.rank - 2) % 2 == 0
    assert not torch.equal(loras[0].A["up_proj"][..., :2, :], loras[1].A["up_proj"][..., :2, :])
    emb = doc_embeddings(tiny, DOCS[:2], net.config.embed_layers)
    both = net(emb)  # the forward gives the same LoRAs as the encoder (other batches: float rounding)
    torch.testing.assert_close(both.B["down_proj"][0], loras[0].B["down_proj"], rtol=1e-4, atol=1e-5)
    path = save_inference_checkpoint(net, tmp_path / "a.safetensors")
    loaded = load_hypernet(path, tiny)
    assert loaded.config.bias_rank == 2 and torch.equal(loaded(emb).B["up_proj"], both.B["up_proj"])
    with torch.no_grad():
        net.bias_B["up_proj"][0, 0, 0] += 1.0
    assert checkpoint_sha256(save_inference_checkpoint(net, tmp_path / "b.safetensors")) != checkpoint_sha256(path)


def test_output_scale_starts_the_generated_delta_near_zero(tiny):
    norms = []
    for scale in (1e-3, 2e-3):
        torch.manual_seed(0)
        net = Hypernet.for_model(tiny, HypernetConfig(**SMALL, output_scale_init=scale))
        lora = net(doc_embeddings(tiny, DOCS, net.config.embed_layers))
        norms.append(torch.stack([lora.delta(m).norm() for m in lora.spec.target_modules]))
    assert (norms[0] > 0).all() and (norms[0] < 1.0).all()
    torch.testing.assert_close(norms[1], 2 * norms[0], rtol=1e-4, atol=0)  # ΔW ∝ the learned scale
    assert net.output_scale.requires_grad


def test_init_from_a_checkpoint_without_bias_adds_a_fresh_bias(tiny, tmp_path):
    torch.manual_seed(0)
    start = HypernetModule(model="tiny", **SMALL)
    for head in start.hypernet.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    path = save_inference_checkpoint(start.hypernet, tmp_path / "start.safetensors")
    tuned = HypernetModule(model="tiny", **SMALL, bias_rank=1, init_from=str(path))
    state = tuned.hypernet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in start.hypernet.state_dict().items())
    assert all(b.abs().max() == 0 for b in tuned.hypernet.bias_B.values())
    from hyper_prag.errors import HyperPragError

    with pytest.raises(HyperPragError, match="architecture"):
        HypernetModule(model="tiny", **SMALL, layers=[1], init_from=str(path))


# ------------------------------------------------------------------------------ upper layers from cache


def test_upper_layers_from_cached_states_equal_the_full_forward(tiny):
    torch.manual_seed(0)
    module = HypernetModule(model="tiny", **SMALL, layers=[1], bias_rank=1, output_scale_init=0.5)
    assert module.hypernet.spec.layers == (1,)
    base = module.base
    seqs = [tokenize_qa(base, q, a, "answer") for q, a in QA]
    ids, mask, labels = right_pad(seqs, base.tokenizer.pad_token_id)
    emb = doc_embeddings(base, DOCS, module.hypernet.config.embed_layers)
    lora = module.hypernet(emb)  # (3, L=1, …)
    lower = lower_states(base, seqs, start=1)
    assert [len(h) for h in lower] == [len(s.input_ids) for s in seqs]
    batch = collate([QAItem((i,), s, None, h) for i, (s, h) in enumerate(zip(seqs, lower))], emb,
                    base.tokenizer.pad_token_id, lower_layer=1)
    for l in (None, lora):
        full, t1, o1 = labelled_logits(base, l, ids, mask, labels)
        upper, t2, o2 = upper_labelled_logits(base, l, batch.lower, 1, mask, labels)
        torch.testing.assert_close(upper, full, rtol=1e-5, atol=1e-5)
        assert torch.equal(t1, t2) and torch.equal(o1, o2)
    plain = collate([QAItem((i,), s) for i, s in enumerate(seqs)], emb, base.tokenizer.pad_token_id)
    torch.testing.assert_close(module.losses(batch)["loss"], module.losses(plain)["loss"], rtol=1e-5, atol=1e-6)
    assert len(base.model.model.layers) == base.num_layers  # restored


def test_datamodule_caches_lower_states_and_reads_a_split_without_doc_qa(tmp_path):
    from hyper_prag.corpus import Corpus, Document, Question, save_corpus
    from hyper_prag.training.hypernet import HypernetDataModule

    docs = [Document(f"t{i}", "", d, split="train") for i, d in enumerate(DOCS)]
    docs += [Document(f"v{i}", "", d.replace("1873", "1874"), split="val") for i, d in enumerate(DOCS)]
    questions = [Question(f"q{i}", q, (a,), "squad", (f"v{i}",), split="val") for i, (q, a) in enumerate(QA)]
    corpus = Corpus("squad-like", tuple(docs), tuple(questions), {f"t{i}": (pair,) for i, pair in enumerate(QA)})
    folder = save_corpus(corpus, tmp_path / "corpus")
    data = HypernetDataModule(model="tiny", corpus=str(folder), layers=[1], distill=True, teacher_topk=4,
                              teacher_cache=str(tmp_path / "teacher"), embedding_cache=str(tmp_path / "emb"),
                              lower_state_cache=str(tmp_path / "lower"),
                              batch_size=3)
    data.prepare_data()
    data.setup("fit")
    val = data.tables["val"]["items"]
    assert [it.rows for it in val] == [(0,), (1,), (2,)]  # SQuAD's val: no doc_qa, so the split's questions
    assert all(it.teacher.indices.shape[-1] == 4 and it.lower.shape[0] == len(it.sequence.input_ids) for it in val)
    batch = next(iter(data.val_dataloader()))
    assert batch.lower_layer == 1 and batch.lower.shape[:2] == batch.input_ids.shape
    assert batch.teacher_mask.sum() == sum(len(it.teacher.gold) for it in val)
    module = HypernetModule(model="tiny", **SMALL, layers=[1], kl_weight=1.0)
    module.validation_step(batch, 0)


# --------------------------------------------------------------------------------------------- the guard


def test_guard_stops_and_rolls_back_a_run_whose_delta_norm_explodes(tmp_path):
    cli = main(["fit", "--config", str(TINY_YAML), "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.embedding_cache", str(tmp_path / "emb"),
                "--model.output_scale_init", "1.0e6", "--trainer.max_steps", "6"])
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, DivergenceGuard))
    assert guard.reason and "max_delta_norm" in guard.reason
    assert cli.trainer.global_step < 6 and guard.good_step == 0
    for k, v in cli.model.hypernet.state_dict().items():  # rolled back to the weights the fit started from
        assert torch.equal(v, guard.good[k]), k
    described = json.loads((tmp_path / "divergence.json").read_text())
    assert described["rolled_back_to_step"] == 0 and "max_delta_norm" in described["reason"]
    rolled = load_hypernet(tmp_path / "last-good.ckpt", cli.model.base)
    assert torch.equal(rolled.output_scale, guard.good["output_scale"])


def test_guard_stops_after_patience_validations_above_closed_book():
    guard = DivergenceGuard(margin=0.1, patience=2)
    module = SimpleNamespace(hypernet=torch.nn.Linear(2, 2), last_delta_norm=1.0)
    saved = []
    trainer = SimpleNamespace(sanity_checking=False, global_step=0, should_stop=False, callback_metrics={},
                              default_root_dir="/nonexistent", is_global_zero=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d),
                              save_checkpoint=saved.append)
    guard.on_fit_start(trainer, module)
    for step, (loss, stop) in enumerate([(1.0, False), (1.5, False), (1.05, False), (1.5, False), (1.6, True)], 1):
        trainer.global_step = step * 10
        trainer.callback_metrics = {"val/loss": torch.tensor(loss), "val/loss_closed_book": torch.tensor(1.0)}
        guard.on_validation_end(trainer, module)
        assert trainer.should_stop == stop, step
    assert guard.good_step == 30 and "2 validation(s)" in guard.reason and saved


# -------------------------------------------------------------------------------------------- refinement


def refine_setup(tiny):
    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(**SMALL, bias_rank=1, max_doc_tokens=128))
    for m in net.spec.target_modules:
        torch.nn.init.normal_(net.head_B[m].weight, std=0.05)
    hyper = HypernetEncoder(net, tiny, checkpoint_sha256="abc")
    long_doc = " ".join(["Corvel is a town on the river Ash."] * 20)  # two pieces of 128 tokens
    texts = DOCS[:2] + [long_doc]
    pairs = QA[:2] + [("Where is Corvel?", "on the river Ash")]
    return hyper, [AugmentedDocument(f"d{i}", t, (), (pair,)) for i, (t, pair) in enumerate(zip(texts, pairs))]


def test_refine_with_zero_steps_is_the_generated_lora_bit_for_bit(tiny):
    hyper, docs = refine_setup(tiny)
    encoder = RefineEncoder(hyper, steps=0)
    assert not encoder.uses_augmentation and encoder.settings()["hypernet"]["checkpoint_sha256"] == "abc"
    for got, want in zip(encoder.encode(docs), hyper.generate([d.text for d in docs])):
        assert got.spec == want.spec
        assert all(torch.equal(got.A[m], want.A[m]) and torch.equal(got.B[m], want.B[m]) for m in want.spec.target_modules)
    assert RefineEncoder(hyper, steps=3).settings() != encoder.settings()  # k is in the store key
    # Training without the worked examples trains other sequences: it names itself in the key.
    off = RefineEncoder(hyper, steps=3, config=PerDocConfig(examples=False)).settings()
    assert off != RefineEncoder(hyper, steps=3).settings() and off["trainer"]["examples"] is False
    # So does training the QA pairs closed-book; the default layout leaves the key as it was.
    closed = RefineEncoder(hyper, steps=3, config=PerDocConfig(qa_context="none")).settings()
    assert closed != RefineEncoder(hyper, steps=3).settings() and closed["trainer"]["qa_context"] == "none"
    assert "qa_context" not in RefineEncoder(hyper, steps=3).settings()["trainer"]


def test_refine_steps_lower_the_per_document_loss(tiny):
    hyper, docs = refine_setup(tiny)
    config = PerDocConfig(lr=3e-3, loss_on="answer")
    encoder = RefineEncoder(hyper, steps=4, config=config)
    assert encoder.uses_augmentation
    start = hyper.generate([d.text for d in docs])
    assert start[2].spec.rank > start[0].spec.rank  # the long document's pieces: the bank pads it
    refined = encoder.encode(docs)
    assert [l.spec for l in refined] == [l.spec for l in start]  # the long document keeps its own rank
    for doc, before, after in zip(docs, start, refined):
        ids, mask, labels = right_pad(document_sequences(tiny, doc, config), tiny.tokenizer.pad_token_id)
        with torch.no_grad():
            lb = sequence_losses(tiny, stack([before] * len(ids)), ids, mask, labels).mean()
            la = sequence_losses(tiny, stack([after] * len(ids)), ids, mask, labels).mean()
        assert la < lb - 1e-3, (doc.doc_id, lb, la)
    # The baseline row with the same schedule: random init (per-document trainer's) + the same k steps.
    dims = {m: tiny.module_dims(m) for m in hyper.spec.target_modules}
    random = initial_loras([d.text for d in docs], LoraSpec().for_model(tiny), dims, PerDocConfig()).unbind()
    baseline, losses = train_steps(tiny, docs, random, 4, config)
    assert len(losses) == 4 and [l.spec for l in baseline] == [l.spec for l in random]


def test_teacher_lookups_use_the_recipe_key_pairs_hash_included(tiny, tmp_path, make_lora):
    """The per-document teacher LoRAs are found by the key ``encode`` stored them under (templated QA: its hash)."""
    from hyper_prag.augment import AugmentConfig
    from hyper_prag.corpus import Corpus, Document
    from hyper_prag.encoders.per_doc import PerDocEncoder
    from hyper_prag.recipes import recipe_for
    from hyper_prag.store import LoraStore, store_key
    from hyper_prag.training.hypernet_data import HypernetDataModule, teacher_recipe

    recipe = recipe_for(PerDocEncoder(tiny, LoraSpec(rank=2), PerDocConfig(lr=1e-3)), tiny, AugmentConfig(source="template"))
    docs = tuple(Document(f"t{i}", "", text, split="train") for i, text in enumerate(DOCS))
    corpus = Corpus("teachers", docs, (), {f"t{i}": (pair,) for i, pair in enumerate(QA)})
    key = {"augmentation": dict(recipe.augmentation), "encoder": dict(recipe.settings), "rank": 2, "alpha": 32.0}
    for doc in docs:
        pairs = corpus.doc_qa[doc.id]
        assert teacher_recipe(tiny, key).key(doc.text, pairs) == recipe.key(doc.text, pairs)
        assert recipe.key(doc.text, pairs) != store_key(doc.text, tiny.identity, recipe.spec, recipe.augmentation,
                                                        recipe.settings)  # the pairs' hash is in the key
    loras = [make_lora(tiny, i) for i in range(len(docs))]
    LoraStore(tmp_path, dtype="float32").put_many([(recipe.key(d.text, corpus.doc_qa[d.id]), lora, {"doc_id": d.id})
                                                   for d, lora in zip(docs, loras)])
    data = HypernetDataModule(model="tiny", teacher_store=str(tmp_path), teacher_key=key)
    teachers = data._teachers(tiny, corpus, list(docs))
    assert all(torch.equal(t.B["up_proj"], lora.B["up_proj"]) for t, lora in zip(teachers, loras))

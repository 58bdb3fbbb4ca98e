"""The per-document recipe study: the paper's YAML, the interference fixes of combine, and the study on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hyper_prag.api import load_encode_config
from hyper_prag.augment import AugmentConfig, AugmentedDocument
from hyper_prag.combine import combine, combine_renormalized, delta_norms, scale, softmax_weights
from hyper_prag.corpus import Corpus, Document, Question
from hyper_prag.encoders.per_doc import PerDocConfig, document_sequences
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import injected
from hyper_prag.prompts import fixed_head, question_prompt, training_sequence
from hyper_prag.sequences import IGNORE

from tests.conftest import random_lora

ROOT = Path(__file__).parents[1]


def _study_module():
    spec = importlib.util.spec_from_file_location("perdoc_recipe", ROOT / "benchmarks" / "perdoc_recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


study = _study_module()


# ------------------------------------------------------------------------------------------- paper.yaml

# Su et al., SIGIR 2025, "Parametric Retrieval Augmented Generation", §4 implementation details:
# LoRA rank 2 and alpha 32 on the FFN, lr 3e-4, 1 epoch, 1 rewrite and 3 QA pairs from the LLM itself,
# the causal-LM loss over the whole sequence d ⊕ q ⊕ a, and warm-up initialisation (better in its Table 2).
PAPER = {"rank": 2, "alpha": 32.0, "lr": 3e-4, "epochs": 1, "n_rewrites": 1, "n_qa": 3, "source": "llm",
         "loss_on": "all", "init": "warmup", "qa_context": "document"}


def test_paper_yaml_reproduces_the_papers_listing():
    path = ROOT / "configs" / "encode" / "paper.yaml"
    assert path.read_text().splitlines()[0] == "# python -m train.encode --config configs/encode/paper.yaml"
    config = load_encode_config(path)
    trainer, augment = config["trainer"], AugmentConfig(**config["augment"])
    found = {"rank": config["rank"], "alpha": config["alpha"], "lr": trainer.lr, "epochs": trainer.epochs,
             "n_rewrites": augment.n_rewrites, "n_qa": augment.n_qa, "source": augment.source,
             "loss_on": trainer.loss_on, "init": trainer.init, "qa_context": trainer.qa_context}
    assert found == PAPER
    assert config["encoder"] == "per-doc" and config["model"] == "smollm2-135m-instruct"


def test_demo_yaml_is_the_measured_closed_book_recipe_and_keys_apart_from_the_paper():
    demo, paper = (load_encode_config(ROOT / "configs" / "encode" / f"{name}.yaml") for name in ("demo", "paper"))
    trainer = demo["trainer"]
    assert (trainer.qa_context, trainer.examples, trainer.epochs, AugmentConfig(**demo["augment"]).n_qa) == ("none", False, 3, 0)
    assert trainer.settings()["qa_context"] == "none" and "qa_context" not in paper["trainer"].settings()


# --------------------------------------------------------------------------------- combine: the fixes


def _deltas(lora):
    return {m: lora.delta(m) for m in lora.spec.target_modules}  # m -> (L, d_out, d_in)


def test_scale_mean_and_sqrt_k_are_exact_multiples_of_the_sum(tiny):
    loras = [random_lora(tiny, seed=s) for s in range(3)]
    summed, mean = _deltas(combine(loras, "sum")), _deltas(combine(loras, "mean"))
    third, root = _deltas(scale(combine(loras, "sum"), 1 / 3)), _deltas(scale(combine(loras, "sum"), 1 / math.sqrt(3)))
    singles = [_deltas(lora) for lora in loras]
    for m in summed:
        assert torch.allclose(summed[m], sum(s[m] for s in singles), atol=1e-6)
        assert torch.allclose(mean[m], summed[m] / 3, atol=1e-7)
        assert torch.allclose(third[m], mean[m], atol=1e-7)  # 1/k scaling of the sum is the mean
        assert torch.allclose(root[m], summed[m] / math.sqrt(3), atol=1e-7)


def test_softmax_weights_give_the_weighted_sum(tiny):
    loras = [random_lora(tiny, seed=s) for s in range(3)]
    scores = [7.5, 3.0, 1.0]
    w = softmax_weights(scores)
    expected = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0).tolist()
    assert w == pytest.approx(expected) and sum(w) == pytest.approx(1.0) and w[0] > w[1] > w[2]
    assert softmax_weights(scores, temperature=1e6) == pytest.approx([1 / 3] * 3, abs=1e-5)
    got, singles = _deltas(combine(loras, "sum", w)), [_deltas(lora) for lora in loras]
    for m in got:
        assert torch.allclose(got[m], sum(wi * s[m] for wi, s in zip(w, singles)), atol=1e-6)
    with pytest.raises(HyperPragError):
        softmax_weights([1.0], temperature=0)


def test_delta_norms_equal_the_frobenius_norm_of_delta_w(tiny):
    lora = combine([random_lora(tiny, seed=1), random_lora(tiny, seed=2, rank=4)], "sum")
    for m, norms in delta_norms(lora).items():
        assert norms.shape == (len(lora.spec.layers),)
        assert torch.allclose(norms, torch.linalg.matrix_norm(lora.delta(m)), rtol=1e-4)


def test_renormalized_keeps_the_direction_and_takes_the_largest_single_norm(tiny):
    loras = [random_lora(tiny, seed=s) for s in range(3)]
    with torch.no_grad():
        for b in loras[2].B.values():
            b.mul_(5.0)  # one document's update is much larger than the others
    out = combine_renormalized(loras)
    summed = _deltas(combine(loras, "sum"))
    singles = [delta_norms(lora) for lora in loras]
    for m, delta in _deltas(out).items():
        goal = torch.stack([s[m] for s in singles]).amax(0)  # (L,)
        assert torch.allclose(torch.linalg.matrix_norm(delta), goal, rtol=1e-4)
        factor = goal / torch.linalg.matrix_norm(summed[m])  # (L,)
        assert torch.allclose(delta, summed[m] * factor[:, None, None], atol=1e-6)
    mean_target = combine_renormalized(loras, target="mean")
    for m, delta in _deltas(mean_target).items():
        assert torch.allclose(torch.linalg.matrix_norm(delta), torch.stack([s[m] for s in singles]).mean(0), rtol=1e-4)


def test_renormalizing_a_zero_update_leaves_it_zero(tiny):
    zero = random_lora(tiny, seed=0)
    zero = scale(zero, 0.0)
    out = combine_renormalized([zero, zero])
    assert all(torch.count_nonzero(d) == 0 for d in _deltas(out).values())


# ------------------------------------------------------------------------------ the study (tiny model)

DOCS = (
    Document("d-olen", "Mara Olen", "Mara Olen (1950) was a painter from Kelb. She won the Silver Prize in 1981."),
    Document("d-vask", "Oren Vask", "Oren Vask (1877) was a surveyor born in Tellin. He described zorvath in 1911."),
    Document("d-train", "Ilse Brand", "Ilse Brand (1901) was a weaver from Ardent.", split="train"),
)
QUESTIONS = (
    Question("q-olen", "In what year was Mara Olen born?", ("1950",), "lookup", ("d-olen",)),
    Question("q-vask", "What did Oren Vask do for a living?", ("surveyor",), "lookup", ("d-vask",)),
    Question("q-cmp", "Who was born first, Mara Olen or Oren Vask?", ("Oren Vask",), "compare", ("d-olen", "d-vask")),
)
DOC_QA = {
    "d-olen": (("What is the birth year of Mara Olen?", "1950"), ("What was Mara Olen's job?", "painter"),
               ("Which prize did Mara Olen win?", "the Silver Prize")),
    "d-vask": (("What is the birth year of Oren Vask?", "1877"), ("What did Oren Vask do?", "surveyor")),
    "d-train": (("What was Ilse Brand's job?", "weaver"),),
}


@pytest.fixture(scope="module")
def corpus():
    return Corpus("tiny-study", DOCS, QUESTIONS, DOC_QA)


def _recipes():
    fast = study.with_overrides(study.BASE, {"epochs": 1, "n_qa": 2})
    return {"base": ("base", fast), "loss_on=answer": ("loss_on", study.with_overrides(fast, {"loss_on": "answer"}))}


def test_plan_and_overrides():
    recipes = study.plan(study.BASE, ["lr", "modules"])
    assert list(recipes) == ["base", "lr=0.0003", "lr=0.003", "lr=0.01", "target_modules=down_proj",
                             "target_modules=gate_proj+up_proj"]  # lr=0.001 is the base itself
    assert recipes["lr=0.003"][1].trainer.lr == 3e-3 and recipes["lr=0.003"][1].rank == study.BASE.rank
    assert list(study.plan(study.BASE, ["lr=0.003", "loss_on"])) == ["base", "lr=0.003", "loss_on=answer"]
    combined = study.plan(study.BASE, [], [{"lr": 3e-3, "n_qa": 10}])
    assert combined["lr=0.003,n_qa=10"] == ("combined", study.with_overrides(study.BASE, {"lr": 3e-3, "n_qa": 10}))
    assert study.parse_override("target_modules=down_proj") == ("target_modules", ("down_proj",))
    assert study.parse_override("epochs=4") == ("epochs", 4) and study.parse_override("lr=3e-3") == ("lr", 3e-3)
    with pytest.raises(HyperPragError):
        study.parse_override("learning_rate=1")
    with pytest.raises(HyperPragError):
        study.plan(study.BASE, ["nonsense"])


def test_template_levels_past_the_pairs_held_are_dropped(corpus):
    two = study.with_overrides(study.BASE, {"n_qa": 2})
    recipes = study.plan(two, ["n_qa"])  # n_qa 10 and 20: the tiny docs hold at most 3 pairs
    kept, dropped = study.drop_duplicate_levels(recipes, corpus, DOCS[:2])
    assert list(kept) == ["base", "n_qa=10"] and dropped == {"n_qa=20": "n_qa=10"}
    kept, dropped = study.drop_duplicate_levels(study.plan(study.BASE, ["n_qa"]), corpus, DOCS[:2])
    assert list(kept) == ["base"] and dropped == {"n_qa=10": "base", "n_qa=20": "base"}  # base n_qa=3: all pairs


def test_study_questions_are_the_single_fact_ones(corpus):
    docs, questions = study.study_questions(corpus, 5)
    assert {q.id for q in questions} == {"q-olen", "q-vask"}
    assert [d.id for d in docs] == [q.doc_ids[0] for q in questions]


def test_study_runs_end_to_end_and_a_second_run_trains_nothing(tiny, corpus, tmp_path):
    docs, questions = study.study_questions(corpus, 2)
    kwargs = dict(chunk_size=2, batch_size=2, max_new_tokens=4, resamples=50, interference_recipe="best", k=2)
    first = study.run_study(tiny, corpus, docs, questions, _recipes(), tmp_path / "cache", **kwargs)
    rows = first["rows"]
    assert set(rows) == {"closed-book", "base", "loss_on=answer"}
    for label in ("base", "loss_on=answer"):
        row = rows[label]
        assert row["trained_now"] == 2 and row["cpu_s_per_doc"] > 0 and row["steps_per_doc"] == 2
        assert 0 <= row["f1"] <= 1 and len(row["f1_ci"]) == 2 and "f1" in row["wrong_doc"]
        assert isinstance(row["pareto"], bool)
    assert "delta_f1" in rows["loss_on=answer"] and "delta_f1" not in rows["base"]
    assert any(r["pareto"] for r in rows.values() if r.get("kind") == "recipe")
    inter = first["interference"]
    assert set(inter["rows"]) == {"oracle (own LoRA alone)", *study.FIXES}
    assert all(len(ids) == 2 and ids[0] == q.doc_ids[0] for q, ids in zip(questions, inter["companions"].values()))
    paths = study.write_outputs(first, tmp_path / "out")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert "| base" in paths[1].read_text() and json.loads(paths[0].read_text())["n"] == 2

    second = study.run_study(tiny, corpus, docs, questions, _recipes(), tmp_path / "cache", **kwargs)
    assert all(second["rows"][label]["trained_now"] == 0 for label in ("base", "loss_on=answer"))
    assert second["predictions_generated_now"] == 0  # the answers are cached too
    for label in ("base", "loss_on=answer"):  # the same LoRAs (read back from the store both times) and scores
        assert second["rows"][label]["per_question_f1"] == rows[label]["per_question_f1"]
        assert second["rows"][label]["cpu_s_per_doc"] == rows[label]["cpu_s_per_doc"]  # recorded cost, not re-timed


def test_target_modules_change_exactly_the_modules_named(tiny, corpus, tmp_path):
    docs, _ = study.study_questions(corpus, 2)
    recipe = study.with_overrides(study.BASE, {"epochs": 1, "n_qa": 1, "target_modules": ("down_proj",)})
    encoded = study.encode_recipe(tiny, corpus, recipe, docs, tmp_path, chunk_size=2)
    lora = encoded.loras[docs[0].id]
    assert lora.spec.target_modules == ("down_proj",) and set(lora.A) == set(lora.B) == {"down_proj"}
    assert torch.count_nonzero(lora.B["down_proj"]) > 0  # it trained
    before = {(layer, m): tiny.ffn_linear(layer, m).weight.detach().clone()
              for layer in range(tiny.num_layers) for m in ("gate_proj", "up_proj", "down_proj")}
    with injected(tiny, lora, mode="merged"):
        for (layer, m), weight in before.items():
            same = torch.equal(tiny.ffn_linear(layer, m).weight, weight)
            assert same == (m != "down_proj"), (layer, m)
    study.check_targets(tiny, ("o_proj", "down_proj"))  # attention projections are linears it adapts
    with pytest.raises(HyperPragError, match="not linears"):
        study.check_targets(tiny, ("qkv_proj",))


def test_answer_only_loss_masks_the_prompt(tiny):
    aug = AugmentedDocument("d", DOCS[0].text, (), (("What is the birth year of Mara Olen?", "1950"),))
    (answer_only,) = document_sequences(tiny, aug, PerDocConfig(loss_on="answer"))
    (whole,) = document_sequences(tiny, aug, PerDocConfig(loss_on="all"))
    assert answer_only.input_ids == whole.input_ids
    target = tiny.tokenizer("1950" + tiny.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    n = len(target)
    assert all(label == IGNORE for label in answer_only.labels[:-n])  # document, chat template and question
    assert list(answer_only.labels[-n:]) == target == list(answer_only.input_ids[-n:])
    # The paper's loss: every position, but the system turn and worked examples every sequence shares.
    head = len(tiny.tokenizer(fixed_head(tiny), add_special_tokens=False)["input_ids"])
    start = whole.input_ids.index(tiny.tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"][0])
    assert all(label == IGNORE for label in whole.labels[start:start + head])
    assert IGNORE not in whole.labels[:start] and IGNORE not in whole.labels[start + head:]
    assert whole.input_ids == tuple(tiny.tokenizer(  # pieces tokenised apart = the whole text tokenised at once
        "".join(training_sequence(tiny, DOCS[0].text, *aug.qa[0])), add_special_tokens=False)["input_ids"])


def test_examples_off_trains_on_the_question_alone_and_names_itself_in_the_key(tiny):
    aug = AugmentedDocument("d", DOCS[0].text, (), (("What is the birth year of Mara Olen?", "1950"),))
    (with_examples,) = document_sequences(tiny, aug, PerDocConfig())
    (without,) = document_sequences(tiny, aug, PerDocConfig(examples=False))
    text = tiny.tokenizer.decode(without.input_ids)
    assert "Bill Gates" not in text and "Mara Olen" in text and "1950" in text
    assert "Bill Gates" in tiny.tokenizer.decode(with_examples.input_ids)
    assert len(without.input_ids) < len(with_examples.input_ids)
    assert IGNORE not in without.labels  # nothing shared to mask: the whole sequence is learned (loss_on="all")
    # The default leaves the key as it was before the knob existed; switching it off names it.
    assert "examples" not in PerDocConfig().settings()
    assert PerDocConfig(examples=False).settings()["examples"] is False
    off = study.with_overrides(study.BASE, {"examples": False})
    assert off.id(tiny.identity) != study.BASE.id(tiny.identity)


def test_closed_book_qa_trains_the_text_then_each_pair_without_its_document(tiny):
    qa = (("What is the birth year of Mara Olen?", "1950"), ("What did Mara Olen do for a living?", "painter"))
    aug = AugmentedDocument("d", DOCS[0].text, ("A rewrite of the text about Mara Olen.",), qa)
    sequences = document_sequences(tiny, aug, PerDocConfig(qa_context="none"))
    assert len(sequences) == 2 + 2  # one plain-text sequence per variant, then one per pair
    texts = [tiny.tokenizer.decode(s.input_ids) for s in sequences]
    assert texts[0].startswith(DOCS[0].text.strip()) and texts[1].startswith("A rewrite")
    assert all(IGNORE not in s.labels for s in sequences[:2])  # the text itself: every token learned
    first_doc_words = DOCS[0].text.split()[:4]
    for (question, answer), sequence, text in zip(qa, sequences[2:], texts[2:]):
        assert question in text and answer in text and " ".join(first_doc_words) not in text
        # exactly the closed-book prompt asked at answer time, followed by the answer
        assert text.startswith(tiny.tokenizer.decode(tiny.tokenizer(question_prompt(tiny, question),
                                                                    add_special_tokens=False)["input_ids"]))
    answer_only = document_sequences(tiny, aug, PerDocConfig(qa_context="none", loss_on="answer"))
    n = len(tiny.tokenizer(f"1950{tiny.tokenizer.eos_token}", add_special_tokens=False)["input_ids"])
    assert [label for label in answer_only[2].labels if label != IGNORE] == list(answer_only[2].input_ids[-n:])
    # The default leaves the key as it was before the knob existed; the closed-book layout names itself.
    assert "qa_context" not in PerDocConfig().settings()
    assert PerDocConfig(qa_context="none").settings()["qa_context"] == "none"
    closed = study.with_overrides(study.BASE, {"qa_context": "none"})
    assert closed.id(tiny.identity) != study.BASE.id(tiny.identity)
    with pytest.raises(HyperPragError, match="qa_context"):
        PerDocConfig(qa_context="nothing")


def test_replay_trains_the_first_general_questions_closed_book_after_the_document_s_own(tiny, tmp_path):
    from hyper_prag.assemble import per_doc_from_recipe
    from hyper_prag.encoders.per_doc import REPLAY_QA, PerDocEncoder
    from hyper_prag.lora import LoraSpec
    from hyper_prag.recipes import Recipe

    qa = (("What is the birth year of Mara Olen?", "1950"),)
    aug = AugmentedDocument("d", DOCS[0].text, (), qa)
    for layout in ("none", "document"):
        plain = document_sequences(tiny, aug, PerDocConfig(qa_context=layout))
        replayed = document_sequences(tiny, aug, PerDocConfig(qa_context=layout, replay=2))
        assert len(replayed) == len(plain) + 2 and [s.input_ids for s in replayed[:len(plain)]] == \
            [s.input_ids for s in plain]  # the document's own sequences are untouched
        for (question, answer), sequence in zip(REPLAY_QA[:2], replayed[len(plain):]):
            text = tiny.tokenizer.decode(sequence.input_ids)
            assert text.startswith(tiny.tokenizer.decode(tiny.tokenizer(question_prompt(tiny, question),
                                                                        add_special_tokens=False)["input_ids"]))
            assert answer in text and "Mara Olen" not in text  # closed-book, about no document
    # Off by default and then absent from the key; on, it names the count and the pairs' content.
    assert "replay" not in PerDocConfig().settings()
    spec = LoraSpec(rank=2, target_modules=("down_proj",))
    on = PerDocEncoder(tiny, spec, PerDocConfig(replay=2)).settings()
    assert on["replay"] == 2 and on["replay_sha256"] != PerDocEncoder(tiny, spec, PerDocConfig(replay=3)).settings()[
        "replay_sha256"] and "replay_sha256" not in PerDocEncoder(tiny, spec, PerDocConfig()).settings()
    # A recorded recipe rebuilds the same trainer (its content hash is not a trainer field).
    recipe = Recipe("per-doc", tiny.identity, spec.for_model(tiny), {"source": "template"}, on)
    assert per_doc_from_recipe(tiny, recipe, tmp_path).encoder.settings() == on
    with pytest.raises(HyperPragError, match="replay"):
        PerDocConfig(replay=len(REPLAY_QA) + 1)


def test_replay_loss_on_answer_learns_only_the_replayed_answers(tiny, tmp_path):
    from hyper_prag.assemble import per_doc_from_recipe
    from hyper_prag.encoders.per_doc import REPLAY_QA, PerDocEncoder
    from hyper_prag.lora import LoraSpec
    from hyper_prag.recipes import Recipe
    from hyper_prag.sequences import IGNORE

    aug = AugmentedDocument("d", DOCS[0].text, (), (("What is the birth year of Mara Olen?", "1950"),))
    config = PerDocConfig(qa_context="none", replay=2, replay_loss_on="answer")
    every = document_sequences(tiny, aug, PerDocConfig(qa_context="none", replay=2))
    answer_only = document_sequences(tiny, aug, config)
    assert [s.input_ids for s in answer_only] == [s.input_ids for s in every]
    assert [s.labels for s in answer_only[:-2]] == [s.labels for s in every[:-2]]  # the document's own: untouched
    for (_, answer), sequence in zip(REPLAY_QA[:2], answer_only[-2:]):
        learned = [t for t in sequence.labels if t != IGNORE]
        assert answer in tiny.tokenizer.decode(learned) and len(learned) < len(sequence.labels) / 3
        assert list(sequence.labels[-len(learned):]) == learned  # the learned tokens are the sequence's end
    # In the key only when changed, and a recorded recipe rebuilds it.
    assert "replay_loss_on" not in PerDocConfig(replay=2).settings()
    spec = LoraSpec(rank=2, target_modules=("down_proj",))
    settings = PerDocEncoder(tiny, spec, config).settings()
    assert settings["replay_loss_on"] == "answer"
    assert settings != PerDocEncoder(tiny, spec, PerDocConfig(qa_context="none", replay=2)).settings()
    recipe = Recipe("per-doc", tiny.identity, spec.for_model(tiny), {"source": "template"}, settings)
    assert per_doc_from_recipe(tiny, recipe, tmp_path).encoder.settings() == settings
    with pytest.raises(HyperPragError, match="replay_loss_on"):
        PerDocConfig(replay_loss_on="question")


def test_spread_replay_stands_evenly_among_the_document_s_sequences_which_end_the_epoch(tiny, tmp_path):
    from hyper_prag.encoders.per_doc import PerDocEncoder, spread
    from hyper_prag.lora import LoraSpec

    assert spread(list("abcdefghi"), list("1234")) == list("a1bc2de3fg4hi")
    assert spread(list("ab"), list("12")) == list("1a2b") and spread(list("ab"), []) == list("ab")
    qa = tuple((f"What is fact {i} of Mara Olen?", str(1950 + i)) for i in range(5))
    aug = AugmentedDocument("d", DOCS[0].text, (), qa)
    for layout in ("none", "document"):
        end = document_sequences(tiny, aug, PerDocConfig(qa_context=layout, replay=3))
        spread_ = document_sequences(tiny, aug, PerDocConfig(qa_context=layout, replay=3, replay_position="spread"))
        own, replayed = end[:-3], end[-3:]
        assert sorted(s.input_ids for s in spread_) == sorted(s.input_ids for s in end)
        assert [s for s in spread_ if s not in replayed] == own and spread_[-1] == own[-1] and spread_[0] == own[0]
    settings = PerDocEncoder(tiny, LoraSpec(rank=2), PerDocConfig(replay=3, replay_position="spread")).settings()
    assert settings["replay_position"] == "spread" and "replay_position" not in PerDocConfig(replay=3).settings()
    # Without replayed pairs neither replay knob changes a LoRA, so neither changes the key.
    assert PerDocConfig(replay_position="spread", replay_loss_on="answer").settings() == PerDocConfig().settings()
    with pytest.raises(HyperPragError, match="replay_position"):
        PerDocConfig(replay_position="start")


def test_both_sources_merge_template_and_llm_pairs(tiny, corpus, monkeypatch):
    made = {"template": (("What was Mara Olen's job?", "painter"),), "llm": (("Who is Mara Olen?", "a painter"),
                                                                             ("What was Mara Olen's job?", "painter"))}

    def fake(docs, config, base=None, corpus=None, cache=None):
        rewrites = ("llm rewrite",) if config.source == "llm" else ("template rewrite",)
        return [AugmentedDocument(d.id, d.text, rewrites[: config.n_rewrites], made[config.source]) for d in docs]

    monkeypatch.setattr(study, "augment_documents", fake)
    recipe = study.with_overrides(study.BASE, {"source": "both", "n_rewrites": 1})
    (aug,) = study.augment_for(recipe, DOCS[:1], tiny, corpus, Path("unused"))
    assert aug.qa == (("What was Mara Olen's job?", "painter"), ("Who is Mara Olen?", "a painter"))  # no duplicate
    assert aug.rewrites == ("llm rewrite", "template rewrite")
    settings = study.augmentation_settings(recipe, tiny)
    assert settings["source"] == "both" and settings["llm"]["augmenter"] == tiny.identity


VAL_DOCS = (Document("d-kell", "Ada Kell", "Ada Kell (1933) was a baker from Orn. She opened a shop in 1960.", split="val"),
            Document("d-rusk", "Bo Rusk", "Bo Rusk (1912) was a sailor from Hale. He crossed the Tarn Sea in 1940.",
                     split="val"))
VAL_QUESTIONS = (Question("q-kell", "What was Ada Kell's job?", ("baker",), "lookup", ("d-kell",), split="val"),
                 Question("q-rusk", "Where was Bo Rusk from?", ("Hale",), "lookup", ("d-rusk",), split="val"))
SENTINEL = ("What is the templated sentinel?", "sentinel")  # a doc_qa pair no LLM-free or LLM source can write


def test_split_draws_its_own_documents_and_the_source_levels_read_no_templated_pairs(tiny, corpus, tmp_path,
                                                                                     monkeypatch):
    both = Corpus("tiny-val", DOCS + VAL_DOCS, QUESTIONS + VAL_QUESTIONS,
                  {**DOC_QA, **{d.id: (SENTINEL,) for d in VAL_DOCS}})
    docs, questions = study.study_questions(both, 5, split="val")
    assert {d.id for d in docs} == {"d-kell", "d-rusk"} and {q.id for q in questions} == {"q-kell", "q-rusk"}
    assert {d.id for d in study.study_questions(both, 5)[0]} == {"d-olen", "d-vask"}  # test stays the default

    base = study.with_overrides(study.BASE, dict([study.parse_override("source=extractive"), ("n_qa", 0), ("epochs", 1)]))
    recipes = study.plan(base, ["n_qa=3", "lr=1e-2"], [{"source": "llm-fewshot", "n_qa": 3}])
    assert {label: factor for label, (factor, _) in recipes.items()} == {
        "base": "base", "n_qa=3": "n_qa", "lr=0.01": "lr", "source=llm-fewshot,n_qa=3": "combined"}
    assert "extractive" in [level["source"] for level in study.FACTORS["source"]]
    kept, dropped = study.drop_duplicate_levels(study.plan(base, ["n_qa"]), both, docs)
    assert list(kept) == ["base"] and dropped == {"n_qa=10": "base", "n_qa=20": "base"}  # fewer pairs written
    with pytest.raises(HyperPragError, match="n_qa"):
        study.with_overrides(base, {"source": "llm-fewshot"})  # n_qa 0 would ask the LLM for no pair
    with pytest.raises(HyperPragError, match="source"):
        study.with_overrides(base, {"source": "gold"})

    seen = []
    real = study.augment_documents
    monkeypatch.setattr(study, "augment_documents",
                        lambda docs, config, base=None, corpus=None, cache=None:
                        seen.append((config.source, corpus)) or real(docs, config, base, corpus, cache))
    encoded = study.encode_recipe(tiny, both, base, docs, tmp_path, chunk_size=2)
    assert seen and all(source == "extractive" and c is None for source, c in seen)  # doc_qa never handed over
    assert all(encoded.meta[d.id]["qa_pairs"] > 0 for d in docs)
    (aug,) = study.augment_for(base, docs[:1], tiny, both, tmp_path)
    assert aug.qa and SENTINEL not in aug.qa and all(a in docs[0].text for _, a in aug.qa)
    template = study.augment_for(study.with_overrides(base, {"source": "template"}), docs[:1], tiny, both, tmp_path)
    assert template[0].qa == (SENTINEL,)  # the template source is the one that reads them
    assert study.main(["--plan", "--split", "val", "--base", "source=extractive,n_qa=0",
                       "--factors", "lr=1e-2", "--extra", "source=llm-fewshot,n_qa=3"])["recipes"] == [
        "base", "lr=0.01", "source=llm-fewshot,n_qa=3"]


def test_real_yaml_is_the_measured_own_corpus_recipe_and_own_corpus_extractive_agrees():
    real, own = (load_encode_config(ROOT / "configs" / "encode" / f"{name}.yaml") for name in ("real", "own-corpus-extractive"))
    trainer, augment = real["trainer"], AugmentConfig(**real["augment"])
    assert (augment.source, augment.n_qa, augment.n_rewrites) == ("extractive", 3, 1)  # no templated pair
    assert (trainer.lr, trainer.epochs, trainer.qa_context, trainer.examples) == (3e-3, 3, "none", False)
    assert own["trainer"] == trainer and AugmentConfig(**own["augment"]) == augment
    assert {k: v for k, v in real.items() if k not in ("trainer", "augment")} == \
        {k: v for k, v in own.items() if k not in ("trainer", "augment")}

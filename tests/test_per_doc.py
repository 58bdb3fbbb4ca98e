"""Per-document trainer: batched bank == each document alone, == the PEFT reference loop; schedule; warm-up.

(The Lightning runner of ``hyper_prag/training/encode.py`` gives the same LoRAs as the loop: tests/test_train_encode.py.)"""

from __future__ import annotations

import pytest
import torch

from hyper_prag.augment import AugmentedDocument
from hyper_prag.encoders.peft_reference import train_reference
from hyper_prag.encoders.per_doc import (
    PerDocConfig, PerDocEncoder, document_sequences, initial_loras, step_schedule, train_bank, train_warmup_lora,
)
from hyper_prag.errors import HyperPragError
from hyper_prag.lora import LoraSpec, stack
from hyper_prag.model import weights_fingerprint
from hyper_prag.prompts import training_sequence
from hyper_prag.sequences import IGNORE, tokenize

# Four documents with different lengths and different numbers of sequences (3, 1, 2, 5).
DOCS = [
    "The river Quellmar rises in the Vostra hills and flows north for 212 km to the Sea of Ambrel.",
    "Ardent Loom was founded in 1873 by Mira Castell.",
    "Zorvath is a blue mineral found only in the caves of Tellin. It glows faintly when wet and was first "
    "described in 1911 by the surveyor Oren Vask, who named it after his home village.",
    "Pell is a dog.",
]
QA = [
    [("Where does the Quellmar rise?", "the Vostra hills"), ("How long is the Quellmar?", "212 km"),
     ("Where does the Quellmar end?", "the Sea of Ambrel")],
    [("Who founded Ardent Loom?", "Mira Castell")],
    [("What colour is zorvath?", "blue"), ("Who described zorvath?", "Oren Vask")],
    [("What is Pell?", "a dog"), ("Is Pell a cat?", "no"), ("Name the dog.", "Pell"), ("What animal?", "dog"),
     ("Who is a dog?", "Pell")],
]


def sequences(base, config):
    return [[tokenize(base, *training_sequence(base, d, q, a), config.loss_on, config.max_length)
             for q, a in qa] for d, qa in zip(DOCS, QA)]


def dims_of(base, spec):
    return {m: base.module_dims(m) for m in spec.target_modules}


def setup(base, config):
    spec = LoraSpec().for_model(base)
    dims = {m: base.module_dims(m) for m in spec.target_modules}
    return spec, sequences(base, config), initial_loras(DOCS, spec, dims, config)


def max_diff(x, i, y, j, spec):
    return max(max((x.A[m][i] - y.A[m][j]).abs().max().item(), (x.B[m][i] - y.B[m][j]).abs().max().item())
               for m in spec.target_modules)


@pytest.mark.parametrize("loss_on", ["all", "answer"])
def test_batched_bank_equals_each_document_alone(tiny, loss_on):
    config = PerDocConfig(epochs=2, weight_decay=0.01, loss_on=loss_on)
    spec, seqs, initial = setup(tiny, config)
    together, losses = train_bank(tiny, seqs, initial, config)
    assert [len(step) for step in losses] == [4, 4, 3, 3, 2, 2, 1, 1, 1, 1]  # 2 epochs of (3, 1, 2, 5)
    for n in range(len(DOCS)):
        alone, _ = train_bank(tiny, [seqs[n]], initial_loras([DOCS[n]], spec, dims_of(tiny, spec), config), config)
        assert max_diff(together, n, alone, 0, spec) <= 1e-4
        assert max_diff(together, n, initial, n, spec) > 1e-5  # it did train


def test_peft_reference_agrees_and_restores_the_base_model(tiny):
    config = PerDocConfig(epochs=1, weight_decay=0.01)
    spec, seqs, initial = setup(tiny, config)
    fingerprint = weights_fingerprint(tiny.model)
    types = [type(layer.mlp.up_proj) for layer in tiny.model.model.layers]
    ours, losses = train_bank(tiny, seqs, initial, config)
    reference, ref_losses = train_reference(tiny, seqs, initial.unbind(), spec, config)
    for n in range(len(DOCS)):
        assert abs(ref_losses[n][0] - losses[0][n].item()) <= 1e-4  # first-step loss, every document
        assert max_diff(ours, n, stack(reference), n, spec) <= 1e-4  # final LoRAs
    assert weights_fingerprint(tiny.model) == fingerprint
    assert [type(layer.mlp.up_proj) for layer in tiny.model.model.layers] == types
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_paper_padding_changes_the_cost_not_the_lora(tiny):
    # The paper's TrainingData pads every sequence to 3,000 tokens; masked padding after the real tokens
    # of a causal model leaves the loss, and so the trained LoRA, unchanged.
    config = PerDocConfig(epochs=1)
    spec, seqs, initial = setup(tiny, config)
    plain, plain_losses = train_reference(tiny, seqs[:2], initial.unbind()[:2], spec, config)
    padded, padded_losses = train_reference(tiny, seqs[:2], initial.unbind()[:2], spec, config, pad_to=256)
    for n in range(2):
        assert plain_losses[n] == pytest.approx(padded_losses[n], abs=1e-4)
        assert max_diff(stack(plain), n, stack(padded), n, spec) <= 1e-4


def test_base_model_stays_frozen_and_unchanged(tiny):
    config = PerDocConfig()
    _, seqs, initial = setup(tiny, config)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    train_bank(tiny, seqs[:2], stack(initial.unbind()[:2]), config)
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert all(not lin._forward_hooks for layer in tiny.model.model.layers for lin in layer.mlp.children())


def test_schedule_pads_each_step_to_its_longest_and_marks_last_steps(tiny):
    config = PerDocConfig()
    _, seqs, _ = setup(tiny, config)
    steps = step_schedule(seqs, epochs=1, pad_id=tiny.tokenizer.pad_token_id)
    assert [s.rows.tolist() for s in steps] == [[0, 1, 2, 3], [0, 2, 3], [0, 3], [3], [3]]
    assert [s.finished.tolist() for s in steps] == [[1], [2], [0], [], [3]]
    for t, step in enumerate(steps):
        lengths = [len(seqs[n][t].input_ids) for n in step.rows.tolist()]
        assert step.input_ids.shape[1] == max(lengths)  # dynamic padding
        assert step.attention_mask.sum(1).tolist() == lengths
        assert (step.labels[step.attention_mask == 0] == IGNORE).all()


def test_answer_only_loss_masks_the_prefix(tiny):
    prefix, target = training_sequence(tiny, DOCS[1], *QA[1][0])
    everything = tokenize(tiny, prefix, target, "all", 3000)
    answer = tokenize(tiny, prefix, target, "answer", 3000)
    n_answer = len(tiny.tokenizer(target, add_special_tokens=False)["input_ids"])
    assert everything.input_ids == answer.input_ids
    assert list(everything.labels) == list(everything.input_ids)
    assert answer.labels[-n_answer:] == answer.input_ids[-n_answer:]
    assert set(answer.labels[:-n_answer]) == {IGNORE}
    short = tokenize(tiny, prefix, target, "all", 16)
    assert short.input_ids == everything.input_ids[-16:]


def test_warmup_initialisation_starts_every_document_from_the_warmup_lora(tiny):
    spec = LoraSpec().for_model(tiny)
    held = [AugmentedDocument(doc_id=f"h{i}", text=d, rewrites=(), qa=tuple(qa)) for i, (d, qa) in enumerate(zip(DOCS, QA))]
    warmup = train_warmup_lora(tiny, spec, held, PerDocConfig(), max_steps=4)
    assert max(b.abs().max().item() for b in warmup.B.values()) > 0  # trained away from B = 0
    config = PerDocConfig(init="warmup")
    start = initial_loras(DOCS[:2], spec, dims_of(tiny, spec), config, warmup)
    for n in range(2):
        assert all(torch.equal(start.A[m][n], warmup.A[m]) and torch.equal(start.B[m][n], warmup.B[m])
                   for m in spec.target_modules)
    with pytest.raises(HyperPragError, match="warm-up"):
        initial_loras(DOCS[:2], spec, dims_of(tiny, spec), config, None)


def test_random_init_depends_on_the_document_not_its_chunk(tiny):
    config = PerDocConfig()
    spec = LoraSpec().for_model(tiny)
    dims = dims_of(tiny, spec)
    a = initial_loras(DOCS, spec, dims, config)
    b = initial_loras(DOCS[::-1], spec, dims, config)
    assert torch.equal(a.A["up_proj"][0], b.A["up_proj"][3])
    assert not torch.equal(a.A["up_proj"][0], a.A["up_proj"][1])
    assert all((t == 0).all() for t in a.B.values())


def test_document_without_qa_pairs_trains_on_its_text(tiny):
    # The LLM's augmentation can leave a document with no parseable QA pair; it is still encoded.
    config = PerDocConfig(loss_on="answer")
    aug = AugmentedDocument(doc_id="bare", text=DOCS[1], rewrites=("Mira Castell founded Ardent Loom in 1873.",), qa=())
    seqs = document_sequences(tiny, aug, config)
    assert len(seqs) == 2  # one per variant
    assert tiny.tokenizer.decode(seqs[0].input_ids).startswith(DOCS[1])
    assert all(label != IGNORE for s in seqs for label in s.labels)  # the whole text is the target
    spec = LoraSpec().for_model(tiny)
    lora = PerDocEncoder(tiny, spec, config).encode([aug])[0]
    assert max(b.abs().max().item() for b in lora.B.values()) > 0  # it trained

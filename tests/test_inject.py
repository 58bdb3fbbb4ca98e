import pytest
import torch

from hyper_prag.combine import combine
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import injected, merge_memory
from hyper_prag.lora import Lora, stack
from tests.conftest import random_lora, token_batch

TEXTS = ["The river Quellmar rises in the Vostra hills.", "Who founded Ardent Loom?", "A third, longer sample text here."]


def logits(base, batch):
    with torch.no_grad():
        return base.model(**batch).logits  # (N, T, V)


def weights(base):
    return {k: v.clone() for k, v in base.model.state_dict().items()}


def test_batched_equals_separate_single_forwards(tiny):
    batch = token_batch(tiny, TEXTS)
    loras = [random_lora(tiny, seed=s) for s in range(3)]
    with injected(tiny, stack(loras), mode="batched"):
        together = logits(tiny, batch)
    for n, lora in enumerate(loras):
        one = {k: v[n : n + 1] for k, v in batch.items()}
        with injected(tiny, lora, mode="side"):
            alone = logits(tiny, one)
        assert (together[n : n + 1] - alone).abs().max().item() <= 1e-5


def test_lora_changes_output_and_zero_b_changes_nothing(tiny):
    batch = token_batch(tiny, TEXTS)
    plain = logits(tiny, batch)
    lora = random_lora(tiny, seed=0)
    with injected(tiny, lora):
        assert (logits(tiny, batch) - plain).abs().max() > 1e-4
    zero_b = Lora(lora.spec, lora.A, {m: torch.zeros_like(b) for m, b in lora.B.items()})
    for mode in ("side", "merged"):
        with injected(tiny, zero_b, mode=mode):
            assert torch.equal(logits(tiny, batch), plain)


def test_side_equals_merged(tiny):
    batch = token_batch(tiny, TEXTS)
    lora = random_lora(tiny, seed=4)
    with injected(tiny, lora, mode="side"):
        side = logits(tiny, batch)
    with injected(tiny, lora, mode="merged"):
        merged = logits(tiny, batch)
    assert (side - merged).abs().max().item() <= 1e-5


@pytest.mark.parametrize("restore", ["copy", "subtract"])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # a large ΔW makes many subtractions inexact
def test_merge_then_unmerge_restores_weights_bit_exactly(tiny, restore, scale):
    lora = random_lora(tiny, seed=5)
    lora = Lora(lora.spec, lora.A, {m: b * scale for m, b in lora.B.items()})
    before = weights(tiny)
    with injected(tiny, lora, mode="merged", restore=restore):
        changed = weights(tiny)
    after = weights(tiny)
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("scale", [0.01, 30.0])
def test_merged_mode_holds_about_one_layer_of_delta(tiny, scale):
    lora = random_lora(tiny, seed=5)
    lora = Lora(lora.spec, lora.A, {m: b * scale for m, b in lora.B.items()})
    before = weights(tiny)
    lean, copy = merge_memory(tiny, lora, restore="subtract"), merge_memory(tiny, lora, restore="copy")
    assert all(torch.equal(before[k], v) for k, v in weights(tiny).items())
    assert copy.kept_bytes == copy.touched_weight_bytes  # a copy of every touched weight
    assert lean.all_deltas_bytes == 6 * lean.layer_delta_bytes  # 3 modules × 2 layers: what merging all at once holds
    if scale < 1:  # |ΔW| << |W|: few inexact subtractions, saved as (int32 index, float32 value)
        assert 0.0 < lean.inexact_fraction < 0.1
        assert lean.kept_bytes <= lean.touched_weight_bytes * lean.inexact_fraction * 2 + 6 * 8
    else:  # ΔW dwarfs W: copies are smaller, and taken instead
        assert lean.inexact_fraction > 0.5 and lean.kept_bytes <= copy.kept_bytes + 6 * 8
    # Peak: the ΔW of one layer, one temporary of its size and a bool mask, plus what is kept.
    assert lean.peak_extra_bytes <= 2.25 * lean.layer_delta_bytes + lean.kept_bytes
    assert copy.peak_extra_bytes <= 2 * copy.layer_delta_bytes + copy.kept_bytes


@pytest.mark.parametrize("mode", ["side", "merged", "batched"])
def test_model_restored_when_body_raises(tiny, mode):
    before = weights(tiny)
    batch = token_batch(tiny, TEXTS[:1])
    plain = logits(tiny, batch)
    lora = random_lora(tiny, seed=6, batch=1 if mode == "batched" else None)
    with pytest.raises(RuntimeError, match="boom"):
        with injected(tiny, lora, mode=mode):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in weights(tiny).items())
    assert torch.equal(logits(tiny, batch), plain)
    assert all(not lin._forward_hooks for layer in tiny.model.model.layers for lin in layer.mlp.children())


def test_merge_refuses_non_finite(tiny):
    lora = random_lora(tiny, seed=7)
    lora.B["up_proj"][0, 0, 0] = float("nan")
    before = weights(tiny)
    with pytest.raises(HyperPragError, match="non-finite"):
        with injected(tiny, lora, mode="merged"):
            pass
    assert all(torch.equal(before[k], v) for k, v in weights(tiny).items())


def test_batch_size_mismatch_is_clear(tiny):
    batch = token_batch(tiny, TEXTS)
    with pytest.raises(HyperPragError, match="one LoRA per sample"):
        with injected(tiny, random_lora(tiny, seed=0, batch=2), mode="batched"):
            logits(tiny, batch)
    with pytest.raises(HyperPragError, match="batched"):
        with injected(tiny, random_lora(tiny, seed=0), mode="batched"):
            pass


def test_sum_of_loras_equals_summed_deltas(tiny):
    batch = token_batch(tiny, TEXTS)
    loras = [random_lora(tiny, seed=s, rank=r) for s, r in ((1, 2), (2, 2), (3, 4))]
    combined = combine(loras, mode="sum")
    assert combined.spec.rank == 8
    for m in combined.spec.target_modules:
        expected = sum(lora.delta(m) for lora in loras)
        assert (combined.delta(m) - expected).abs().max().item() <= 1e-6
    with injected(tiny, combined):
        via_combine = logits(tiny, batch)
    # Applying each ΔW added together, by merging all three into the weights one after another.
    with injected(tiny, loras[0], mode="merged"), injected(tiny, loras[1], mode="merged"), \
            injected(tiny, loras[2], mode="merged"):
        via_merges = logits(tiny, batch)
    assert (via_combine - via_merges).abs().max().item() <= 1e-4


def test_mean_and_weights(tiny):
    loras = [random_lora(tiny, seed=s) for s in (1, 2)]
    mean = combine(loras, mode="mean")
    weighted = combine(loras, mode="sum", weights=[0.25, 2.0])
    for m in mean.spec.target_modules:
        assert (mean.delta(m) - (loras[0].delta(m) + loras[1].delta(m)) / 2).abs().max() <= 1e-6
        assert (weighted.delta(m) - (0.25 * loras[0].delta(m) + 2.0 * loras[1].delta(m))).abs().max() <= 1e-6
    with pytest.raises(HyperPragError):
        combine(loras, mode="sum", weights=[1.0])


def test_gradients_reach_generated_lora_tensors(tiny):
    batch = token_batch(tiny, TEXTS)
    bank = random_lora(tiny, seed=8, batch=3)
    for t in (*bank.A.values(), *bank.B.values()):
        t.requires_grad_(True)
    combined_inputs = [random_lora(tiny, seed=s) for s in (9, 10)]
    for lora in combined_inputs:
        for t in (*lora.A.values(), *lora.B.values()):
            t.requires_grad_(True)
    with injected(tiny, bank, mode="batched"):
        loss = tiny.model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    for m in bank.spec.target_modules:
        assert bank.A[m].grad is not None and bank.A[m].grad.abs().sum() > 0
        assert bank.B[m].grad.abs().sum() > 0
    with injected(tiny, combine(combined_inputs)):
        tiny.model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(lora.B[m].grad.abs().sum() > 0 for lora in combined_inputs for m in lora.spec.target_modules)
    assert all(p.grad is None for p in tiny.model.parameters())

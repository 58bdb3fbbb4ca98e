"""The fastweight readout: the document's own layer states shape every LoRA; the margin term; activated training."""

from __future__ import annotations

import pytest
import torch

from hyper_prag.errors import HyperPragError
from hyper_prag.hypernet import Hypernet, HypernetConfig, doc_token_states, pad_states, polar
from hyper_prag.training.hypernet import HypernetDataModule, HypernetModule

DOCS = ["Jasper Drozen wrote The Nynyn Variations in 1901.", "Lake Orvel was drained in 1876 by the mayor of Brill."]


def _net(tiny, **kw) -> Hypernet:
    torch.manual_seed(0)
    return Hypernet.for_model(tiny, HypernetConfig(readout="fastweight", rank=4, **kw))


def _inputs(tiny, net):
    states = doc_token_states(tiny, DOCS, net.config.embed_layers, inputs=True)  # each (T_i, L · hidden)
    return pad_states(states)


def test_polar_sets_singular_values_to_one():
    x = torch.randn(3, 6, 6)
    q = polar(x, steps=30)
    assert torch.allclose(q @ q.transpose(-1, -2), torch.eye(6).expand(3, 6, 6), atol=1e-3)
    assert torch.equal(polar(torch.zeros(2, 4, 4)), torch.zeros(2, 4, 4))


def test_fastweight_starts_at_zero_and_keeps_the_lora_contract(tiny):
    net = _net(tiny)
    states, mask = _inputs(tiny, net)
    lora = net(states, mask)
    assert lora.batch_size == 2 and lora.spec.rank == 4
    lora.unbind()[0].validate(dims={m: tiny.module_dims(m) for m in lora.spec.target_modules})
    assert all(float(b.detach().abs().max()) == 0.0 for b in lora.B.values())  # B₁ = 0: ΔW = 0 at initialisation
    assert net.config.embed_layers == tuple(range(tiny.num_layers))  # it reads the adapted layers' own inputs


def test_fastweight_lora_depends_on_its_document_from_the_first_step(tiny):
    net = _net(tiny)
    for b in net.fw_B.values():  # one step's worth of B₁: the document-independent factor
        b.data.normal_(0, 0.05)
    states, mask = _inputs(tiny, net)
    lora = net(states, mask)
    for m in lora.spec.target_modules:
        delta = [lora.spec.scaling * lora.B[m][i] @ lora.A[m][i] for i in range(2)]  # (L, d_out, d_in) each
        assert not torch.allclose(delta[0], delta[1], atol=1e-4)
    # Padding changes nothing: the first document alone gives its LoRA of the batch.
    alone = net(*pad_states([doc_token_states(tiny, DOCS[:1], net.config.embed_layers, inputs=True)[0]]))
    assert torch.allclose(alone.A["down_proj"][0], lora.A["down_proj"][0], atol=1e-4)


def test_fastweight_projections_start_from_the_layers_attention(tiny):
    net = _net(tiny)
    k_proj = tiny.model.model.layers[1].self_attn.k_proj.weight
    _, S, Vh = torch.linalg.svd(k_proj.float(), full_matrices=False)
    assert torch.allclose(net.fw_key[1], S[:4, None] * Vh[:4], atol=1e-5)


def test_fastweight_checks_its_settings(tiny):
    with pytest.raises(HyperPragError, match="shift"):
        _net(tiny, shift=2)
    with pytest.raises(HyperPragError, match="apply_from"):
        _net(tiny, apply_from="everywhere")
    # A non-default field enters the description (and so the store key); defaults leave old keys as they were.
    assert _net(tiny, shift=1).config.to_dict()["shift"] == 1
    assert "shift" not in HypernetConfig().to_dict() and "apply_from" not in HypernetConfig().to_dict()


@pytest.mark.parametrize("layers", [None, [1]])
def test_activated_training_gives_the_all_positions_loss_for_a_zero_lora(layers):
    """One batch, two applications: with ΔW = 0 (B₁ = 0) the cached-head loss equals the full forward's; the
    margin term is the hinge on own vs another document's CE and trains the readout."""
    losses = {}
    for apply_from in ("all", "question"):
        module = HypernetModule(model="tiny", readout="fastweight", rank=4, layers=layers, apply_from=apply_from,
                                margin_weight=1.0, margin=0.5)
        data = HypernetDataModule(model="tiny", readout="fastweight", layers=layers, apply_from=apply_from,
                                  batch_size=8, max_train_docs=12, max_val_pairs=8)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        out = module.losses(batch)
        losses[apply_from] = out
        assert float(out["margin"]) == pytest.approx(0.5, abs=1e-4)  # own = other at ΔW = 0: the full margin
        out["loss"].backward()
        assert float(module.hypernet.fw_B["down_proj"].grad.abs().sum()) > 0
    assert float(losses["question"]["ce"]) == pytest.approx(float(losses["all"]["ce"]), abs=1e-4)


# ------------------------------------------------------------------------------------------- gradient readout


def test_gradient_readout_with_identity_transform_is_the_scaled_gradient(tiny):
    from hyper_prag.augment import AugmentedDocument
    from hyper_prag.encoders.gradient import GradientConfig, GradientEncoder, gradient_factors
    from hyper_prag.prompts import fixed_head, qa_sequence
    from hyper_prag.sequences import right_pad, sequence_losses, tokenize

    aug = AugmentedDocument("d", DOCS[0], qa=(("Who wrote The Nynyn Variations?", "Jasper Drozen"),
                                               ("When was it written?", "1901")))
    config = GradientConfig(rank=64, step=0.5, apply_from="all", text=False)
    encoder = GradientEncoder(tiny, config)
    lora = encoder.encode([aug])[0]
    # The true gradient of the mean QA loss w.r.t. each adapted weight, by autograd on the weight itself.
    seqs = [tokenize(tiny, *qa_sequence(tiny, q, a), "answer", unlearned=fixed_head(tiny)) for q, a in aug.qa]
    ids, mask, labels = right_pad(seqs, tiny.tokenizer.pad_token_id)
    deltas = {}
    for m in lora.spec.target_modules:
        for i, layer in enumerate(lora.spec.layers):
            w = tiny.ffn_linear(layer, m).weight
            w.requires_grad_(True)
            loss = sequence_losses(tiny, None, ids, mask, labels).mean()
            (g,) = torch.autograd.grad(loss, w)
            w.requires_grad_(False)
            got = lora.spec.scaling * lora.B[m][i] @ lora.A[m][i]  # (d_out, d_in)
            assert torch.allclose(got, -0.5 * g, atol=1e-5 * float(g.abs().max()) + 1e-7), (m, layer)


def test_gradient_readout_depends_on_its_document_and_keeps_the_contract(tiny):
    from hyper_prag.augment import AugmentedDocument
    from hyper_prag.encoders.gradient import GradientConfig, GradientEncoder

    docs = [AugmentedDocument("a", DOCS[0], qa=(("Who wrote The Nynyn Variations?", "Jasper Drozen"),)),
            AugmentedDocument("b", DOCS[1], qa=(("When was Lake Orvel drained?", "1876"),))]
    encoder = GradientEncoder(tiny, GradientConfig(rank=4))
    a, b = encoder.encode(docs)
    a.validate(dims={m: tiny.module_dims(m) for m in a.spec.target_modules})
    assert a.spec.rank == 4 and not torch.allclose(a.A["down_proj"], b.A["down_proj"])
    assert encoder.settings()["apply_from"] == "question"

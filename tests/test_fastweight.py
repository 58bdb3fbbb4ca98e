"""The fastweight readout: the document's own layer states shape every LoRA; the margin term; activated training."""

from __future__ import annotations

import pytest
import torch

from hyper_prag.encoders.hypernet import save_inference_checkpoint
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


def _delta(lora, i: int, m: str = "down_proj"):
    return lora.spec.scaling * lora.B[m][i] @ lora.A[m][i]  # (L, d_out, d_in)


def test_fastweight_cores_are_independent_blocks_of_rank_cores_times_r(tiny):
    """Two cores: rank 2r, each core the single-core readout of its own key/value rows, ΔW their sum."""
    net = _net(tiny, cores=2)
    for b in net.fw_B.values():
        b.data.normal_(0, 0.05)
    states, mask = _inputs(tiny, net)
    lora = net(states, mask)
    assert lora.spec.rank == 8 and net.generated_spec.rank == 8 and lora.spec.scaling == _net(tiny).spec.scaling
    lora.unbind()[1].validate(dims={m: tiny.module_dims(m) for m in lora.spec.target_modules})
    parts = []
    for i in range(2):  # core i alone, as a one-core net holding its rows
        one = _net(tiny)
        rows = slice(4 * i, 4 * i + 4)
        with torch.no_grad():
            one.fw_key.copy_(net.fw_key[:, rows])
            one.fw_value.copy_(net.fw_value[:, rows])
            for m in one.fw_A:
                one.fw_A[m].copy_(net.fw_A[m][:, rows])
                one.fw_B[m].copy_(net.fw_B[m][..., rows])
        parts.append(one(states, mask))
    for d in range(2):
        assert torch.allclose(_delta(lora, d), _delta(parts[0], d) + _delta(parts[1], d), atol=1e-5)
    with pytest.raises(HyperPragError, match="cores"):
        Hypernet.for_model(tiny, HypernetConfig(readout="mean", cores=2))
    assert net.config.to_dict()["cores"] == 2 and "cores" not in HypernetConfig().to_dict()


def test_growing_cores_starts_from_the_trained_nets_loras(tmp_path):
    kw = dict(model="tiny", readout="fastweight", rank=4, apply_from="question")
    trained = HypernetModule(**kw)
    for b in trained.hypernet.fw_B.values():
        b.data.normal_(0, 0.05)
    path = save_inference_checkpoint(trained.hypernet, tmp_path / "one-core")
    grown = HypernetModule(**kw, cores=2, init_from=str(path))
    net = grown.hypernet
    states, mask = pad_states(doc_token_states(grown.base, DOCS, net.config.embed_layers, inputs=True))
    before, after = trained.hypernet(states, mask), net(states, mask)
    assert after.spec.rank == 8
    for d in range(2):
        assert torch.allclose(_delta(before, d), _delta(after, d), atol=1e-5)  # added cores: B₁ = 0
    assert float(net.fw_key[:, 4:].detach().sub(trained.hypernet.fw_key.detach()).abs().max()) > 0  # their own key directions
    with pytest.raises(HyperPragError, match="cores may grow"):
        HypernetModule(**{**kw, "rank": 2}, cores=2, init_from=str(path))


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


def test_tiny_fit_grows_a_one_core_checkpoint_to_two_cores(tmp_path):
    """The CLI path: a one-core run's checkpoint starts a two-core run (init_from), whose export keeps rank 2r."""
    from pathlib import Path

    from hyper_prag.encoders.hypernet import export_hypernet, load_hypernet
    from hyper_prag.training.hypernet import main, shared_base

    config = Path(__file__).parents[1] / "configs" / "hypernet" / "tiny.yaml"
    common = ["--config", str(config), "--model.readout", "fastweight", "--data.embedding_cache", str(tmp_path / "emb")]
    main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "one"),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "one")])
    one = sorted((tmp_path / "one").rglob("last.ckpt"))[0]
    main(["fit", *common, "--model.cores", "2", "--model.init_from", str(one),
          "--trainer.default_root_dir", str(tmp_path / "two"), "--trainer.logger.init_args.save_dir", str(tmp_path / "two")])
    two = sorted((tmp_path / "two").rglob("last.ckpt"))[0]
    base = shared_base("tiny")
    start, grown = load_hypernet(one, base), load_hypernet(export_hypernet(two, tmp_path / "export"), base)
    assert grown.config.cores == 2 and grown.spec.rank == 2 * start.spec.rank
    r = start.config.rank
    assert float(grown.fw_B["down_proj"][..., r:].detach().abs().sum()) > 0  # the added core trained from B₁ = 0


def test_frozen_cores_keep_the_grown_nets_first_core_while_the_added_one_trains(tmp_path):
    kw = dict(model="tiny", readout="fastweight", rank=4, apply_from="question", margin_weight=1.0)
    trained = HypernetModule(**kw)
    for b in trained.hypernet.fw_B.values():
        b.data.normal_(0, 0.05)
    path = save_inference_checkpoint(trained.hypernet, tmp_path / "one-core")
    grown = HypernetModule(**kw, cores=2, init_from=str(path), frozen_cores=1, lr=1e-2)
    before = {n: p.detach().clone() for n, p in grown.hypernet.named_parameters()}
    data = HypernetDataModule(model="tiny", readout="fastweight", apply_from="question", batch_size=8,
                              max_train_docs=12, max_val_pairs=8, embedding_cache=str(tmp_path / "emb"))
    data.setup("fit")
    grown.trainer = type("T", (), {"max_steps": 10})()
    optimizer = grown.configure_optimizers()["optimizer"]
    for batch, _ in zip(data.train_dataloader(), range(2)):
        optimizer.zero_grad()
        grown.losses(batch)["loss"].backward()
        optimizer.step()
    after = dict(grown.hypernet.named_parameters())
    assert torch.equal(after["fw_B.down_proj"][..., :4], before["fw_B.down_proj"][..., :4])
    assert torch.equal(after["fw_key"][:, :4], before["fw_key"][:, :4])
    assert not torch.equal(after["fw_B.down_proj"][..., 4:], before["fw_B.down_proj"][..., 4:])
    with pytest.raises(HyperPragError, match="frozen_cores"):
        HypernetModule(**kw, frozen_cores=1)

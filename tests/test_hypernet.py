"""Hypernetwork: LoRA contract, zero initial ΔW, gradient flow through the injected LLM, one step lowers the
loss, factor-based distances, checkpoints (round trip, wrong base refused), YAMLs parse, a tiny fit runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hyper_prag.combine import combine
from hyper_prag.errors import HyperPragError
from hyper_prag.encoders.hypernet import (
    HypernetEncoder, checkpoint_sha256, export_hypernet, load_hypernet, save_inference_checkpoint,
)
from hyper_prag.hypernet import EmbeddingCache, Hypernet, HypernetConfig, doc_embeddings, doc_token_states, pad_states
from hyper_prag.inject import injected
from hyper_prag.lora import stack
from hyper_prag.model import tiny_base_model
from hyper_prag.sequences import IGNORE, labelled_logits
from hyper_prag.training.hypernet import (
    HypernetDataModule, HypernetModule, QAItem, collate, delta_distance, delta_norm, lr_factor, main, shared_base,
    sum_groups, tokenize_qa,
)

from .conftest import random_lora, token_batch

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "hypernet").glob("*.yaml"))
SMALL = HypernetConfig(doc_dim=16, emb_dim=4, width=16, depth=2)
SMALL_ATTENTION = HypernetConfig(doc_dim=16, emb_dim=4, width=16, depth=2, readout="attention", heads=4)
DOCS = ["Ardent Loom was founded in 1873 by Mira Castell.",
        "Zorvath is a blue mineral found only in the caves of Tellin.",
        "Pell is a dog."]
QA = [("Who founded Ardent Loom?", "Mira Castell"), ("What colour is zorvath?", "blue"), ("What is Pell?", "a dog")]


def data_base():
    return shared_base("tiny")


def small_module(**kwargs) -> HypernetModule:
    torch.manual_seed(0)
    return HypernetModule(model="tiny", doc_dim=16, emb_dim=4, width=16, depth=2, **kwargs)


def fixed_batch(module: HypernetModule):
    base = module.base
    layers = module.hypernet.config.embed_layers
    emb = doc_token_states(base, DOCS, layers) if module.hypernet.reads_tokens else doc_embeddings(base, DOCS, layers)
    items = [QAItem((i,), tokenize_qa(base, q, a, "answer")) for i, (q, a) in enumerate(QA)]
    return collate(items, emb, base.tokenizer.pad_token_id)


def test_generated_lora_matches_contract(tiny):
    net = Hypernet.for_model(tiny, SMALL)
    emb = doc_embeddings(tiny, DOCS, net.config.embed_layers)  # (3, E)
    assert emb.shape == (3, len(net.config.embed_layers) * tiny.model.config.hidden_size)
    lora = net(emb)
    assert lora.batch_size == 3
    lora.validate({m: tiny.module_dims(m) for m in tiny.target_modules})
    assert lora.spec.base_model == tiny.identity and lora.spec.layers == tuple(range(tiny.num_layers))
    assert (lora.spec.rank, lora.spec.alpha) == (2, 32.0)
    for single in lora.unbind():
        single.validate({m: tiny.module_dims(m) for m in tiny.target_modules})
    # One LoRA per document: each depends on its own document only, not on the others in the batch.
    alone = net(emb[1:2])
    for m in lora.spec.target_modules:
        torch.testing.assert_close(lora.A[m][1], alone.A[m][0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(lora.A[m][0], lora.A[m][1])


def test_initial_delta_is_zero_and_changes_nothing(tiny):
    net = Hypernet.for_model(tiny, SMALL)
    lora = net(doc_embeddings(tiny, DOCS, net.config.embed_layers))
    assert all(lora.delta(m).abs().max() == 0 for m in lora.spec.target_modules)
    assert all(lora.A[m].abs().max() > 0 for m in lora.spec.target_modules)  # A is generated; B starts at 0
    batch = token_batch(tiny, DOCS)
    with torch.no_grad():
        plain = tiny.model(**batch).logits
        with injected(tiny, lora, mode="batched"):
            patched = tiny.model(**batch).logits
    assert torch.equal(plain, patched)


def test_doc_embedding_stops_early_and_equals_full_forward(tiny):
    emb = doc_embeddings(tiny, DOCS, [0])  # only layer 0 runs
    tiny.tokenizer.padding_side = "right"
    batch = tiny.tokenizer(DOCS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hidden = tiny.model.model(**batch, output_hidden_states=True).hidden_states[1]  # after layer 0
        h = tiny.model.model.norm(hidden)
        mask = batch["attention_mask"][..., None].float()
        want = (h * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-5)
    assert len(tiny.model.model.layers) == tiny.num_layers  # restored


def test_embedding_cache_reuses_rows(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path)
    first = cache.get(tiny, DOCS[:2], [0, 1])
    path = cache.path(tiny, [0, 1], 512)
    mtime = path.stat().st_mtime_ns
    again = EmbeddingCache(tmp_path).get(tiny, list(reversed(DOCS[:2])), [0, 1])  # from disk, no recompute
    assert path.stat().st_mtime_ns == mtime
    torch.testing.assert_close(again, first.flip(0))
    torch.testing.assert_close(first, doc_embeddings(tiny, DOCS[:2], [0, 1]))


@pytest.mark.parametrize("readout", ["mean", "attention"])
def test_gradients_reach_hypernet_through_injected_llm(readout):
    module = small_module(readout=readout)
    batch = fixed_batch(module)
    module.losses(batch)["loss"].backward()
    # B starts at 0, so the first gradient reaches the B heads only (as for LoRA's B = 0 init) ...
    assert all(h.weight.grad.abs().sum() > 0 for h in module.hypernet.head_B.values())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.hypernet.trunk.parameters())
    torch.optim.SGD(module.hypernet.parameters(), lr=1.0).step()
    module.zero_grad()
    module.losses(batch)["loss"].backward()
    # ... and once B is non-zero, through A into the trunk and the doc/layer/module embeddings.
    names = ("trunk", "doc_proj", "layer_emb", "module_emb", "head_A")
    names += ("key", "value", "slot_emb", "token_norm") if readout == "attention" else ()
    for name in names:
        grads = [p.grad for p in getattr(module.hypernet, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    if readout == "attention":
        assert module.hypernet.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.base.model.parameters())  # the base LLM stays frozen


@pytest.mark.parametrize("readout", ["mean", "attention"])
def test_one_optimizer_step_lowers_the_loss(readout):
    module = small_module(readout=readout)
    batch = fixed_batch(module)
    optimizer = torch.optim.AdamW(module.hypernet.parameters(), lr=1e-3)
    before = module.losses(batch)["loss"]
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = module.losses(batch)["loss"]
    assert after < before - 1e-4


def test_attention_readout_contract_zero_init_and_padding(tiny):
    net = Hypernet.for_model(tiny, SMALL_ATTENTION)
    states = doc_token_states(tiny, DOCS, net.config.embed_layers)
    lengths = [len(tiny.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    assert [tuple(s.shape) for s in states] == [(n, net.embed_dim) for n in lengths]
    # The token states' mean is the pooled embedding of the mean readout.
    torch.testing.assert_close(torch.stack([s.mean(0) for s in states]),
                               doc_embeddings(tiny, DOCS, net.config.embed_layers), rtol=1e-5, atol=1e-5)
    padded, mask = pad_states(states)
    assert padded.shape == (3, max(lengths), net.embed_dim) and mask.sum(1).tolist() == lengths
    lora = net(padded, mask)
    lora.validate({m: tiny.module_dims(m) for m in tiny.target_modules})
    assert lora.batch_size == 3 and (lora.spec.rank, lora.spec.alpha) == (2, 32.0)
    assert all(lora.delta(m).abs().max() == 0 for m in lora.spec.target_modules)  # B heads start at 0
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    batched = net(padded, mask)
    for i, s in enumerate(states):  # padding never leaks into a document's LoRA
        alone = net(s[None], None)
        for m in lora.spec.target_modules:
            torch.testing.assert_close(batched.A[m][i], alone.A[m][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batched.B[m][i], alone.B[m][0], rtol=1e-4, atol=1e-5)
    with pytest.raises(HyperPragError, match="token states"):
        net(doc_embeddings(tiny, DOCS, net.config.embed_layers))  # pooled input for a token readout
    with pytest.raises(HyperPragError, match="readout"):
        Hypernet.for_model(tiny, HypernetConfig(readout="max"))
    with pytest.raises(HyperPragError, match="multiple of heads"):
        Hypernet.for_model(tiny, HypernetConfig(readout="attention", doc_dim=10, heads=4))


def test_token_state_cache_round_trip_and_encoder(tiny, tmp_path):
    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, SMALL_ATTENTION)
    for head in net.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    cache = EmbeddingCache(tmp_path)
    layers = net.config.embed_layers
    first = cache.get(tiny, DOCS, layers, tokens=True)
    path = cache.path(tiny, layers, 512, tokens=True)
    assert path.is_file() and path != cache.path(tiny, layers, 512)
    again = EmbeddingCache(tmp_path).get(tiny, DOCS[::-1], layers, tokens=True)  # from disk
    assert all(torch.equal(a, b) for a, b in zip(again, first[::-1]))
    for got, want in zip(first, doc_token_states(tiny, DOCS, layers)):  # stored as bfloat16
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    plain = HypernetEncoder(net, tiny, checkpoint_sha256="x", batch_size=2).generate(DOCS)
    cached = HypernetEncoder(net, tiny, checkpoint_sha256="x", batch_size=2, cache=cache).generate(DOCS)
    for a, b in zip(plain, cached):
        assert a.batch_size is None
        torch.testing.assert_close(a.B["down_proj"], b.B["down_proj"], rtol=0.05, atol=1e-3)
    path = save_inference_checkpoint(net, tmp_path / "hn")
    loaded = load_hypernet(path, tiny)
    assert loaded.reads_tokens and loaded.config == net.config
    padded, mask = pad_states(doc_token_states(tiny, DOCS, layers))
    assert torch.equal(loaded(padded, mask).A["up_proj"], net(padded, mask).A["up_proj"])


def test_init_from_copies_weights_and_refuses_another_architecture(tmp_path):
    trained = small_module()
    for head in trained.hypernet.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    path = save_inference_checkpoint(trained.hypernet, tmp_path / "start.safetensors")
    tuned = small_module(init_from=str(path))
    for name, value in trained.hypernet.state_dict().items():
        assert torch.equal(tuned.hypernet.state_dict()[name], value), name
    with pytest.raises(HyperPragError, match="architecture"):
        small_module(init_from=str(path), readout="attention")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cosine = [lr_factor(step, warmup=10, total=110, schedule="cosine", floor=0.1) for step in range(120)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0) and cosine[10] == pytest.approx(1.0)
    assert cosine[60] == pytest.approx(0.55) and cosine[110] == pytest.approx(0.1) and cosine[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert [lr_factor(s, 10, 110, "constant", 0.1) for s in (5, 10, 500)] == [0.6, 1.0, 1.0]
    module = small_module(schedule="cosine")
    module.trainer = pl.Trainer(max_time="00:00:01:00", logger=False, enable_checkpointing=False)  # max_steps -1
    with pytest.raises(HyperPragError, match="max_steps"):
        module.configure_optimizers()


def test_delta_distance_and_norm_match_materialised_delta(tiny):
    student, teacher = random_lora(tiny, 1, batch=2), random_lora(tiny, 2, rank=4, alpha=8.0, batch=2)
    got = delta_distance(student, teacher)  # (2,)
    want = torch.stack([((student.delta(m) - teacher.delta(m)) ** 2).sum((-1, -2)).mean(-1)
                        for m in student.spec.target_modules]).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    norms = torch.stack([student.delta(m).norm(dim=(-1, -2)).mean(-1) for m in student.spec.target_modules]).mean(0)
    torch.testing.assert_close(delta_norm(student), norms, rtol=1e-4, atol=1e-6)
    assert delta_distance(student, student).abs().max() < 1e-3 * want.min()


def test_per_document_lora_distillation_terms():
    module = small_module(delta_weight=0.5, lora_kl_weight=2.0)
    batch = fixed_batch(module)
    with pytest.raises(HyperPragError, match="per-document LoRAs"):
        module.losses(batch)
    batch.teacher_lora = stack([random_lora(module.base, i) for i in range(3)])
    out = module.losses(batch)
    assert out["delta"] > 0 and out["lora_kl"] > 0
    torch.testing.assert_close(out["loss"], out["ce"] + 0.5 * out["delta"] + 2.0 * out["lora_kl"])
    batch.teacher_lora = module.hypernet(batch.doc_embedding).detach()  # teacher == student: both terms vanish
    out = module.losses(batch)
    assert out["delta"].abs() < 1e-6 and out["lora_kl"].abs() < 1e-5


def test_sum_groups_is_the_online_sum_combination(tiny):
    loras = [random_lora(tiny, i) for i in range(3)]
    groups = torch.tensor([[2, 0], [1, -1], [0, 2]])  # (N=3, K=2); -1 = no second document
    summed = sum_groups(stack(loras), groups)
    assert summed.batch_size == 3 and summed.spec.rank == 4 and summed.spec.scaling == loras[0].spec.scaling
    for n, rows in enumerate(groups.tolist()):
        want = combine([loras[r] for r in rows if r >= 0], mode="sum")
        for m in want.spec.target_modules:
            torch.testing.assert_close(summed.delta(m)[n], want.delta(m), rtol=1e-5, atol=1e-6)
    single = sum_groups(stack(loras), torch.tensor([[1], [1]]))
    assert single.spec == loras[0].spec and torch.equal(single.A["up_proj"][0], loras[1].A["up_proj"])


def test_multi_document_questions_train_under_summed_loras(tmp_path):
    data = HypernetDataModule(model="tiny", max_train_docs=40, max_val_pairs=4, batch_size=6, questions=True,
                              embedding_cache=str(tmp_path))
    data.setup("fit")
    items = data.tables["train"]["items"]
    multi = [it for it in items if len(it.rows) > 1]
    assert multi and all(len(it.rows) == 1 for it in items if it not in multi)
    from hyper_prag.benchmark import load_or_make_default

    corpus = load_or_make_default()
    docs = corpus.split("train").documents[:40]
    for item in multi:  # every multi-document item is a benchmark question over these documents
        q = next(q for q in corpus.split("train").questions if q.doc_ids == tuple(docs[r].id for r in item.rows))
        assert item.sequence == tokenize_qa(data_base(), q.question, q.answers[0], "answer")
    chosen = multi[:2] + items[:2]
    batch = collate(chosen, data.tables["train"]["embeddings"], data.pad_id)
    assert batch.groups.shape == (4, max(len(it.rows) for it in multi[:2])) and (batch.groups[2:, 1:] == -1).all()
    assert len(batch.doc_rows) == len(set(r for it in chosen for r in it.rows))
    module = small_module()
    for head in module.hypernet.head_B.values():
        torch.nn.init.normal_(head.weight, std=0.1)
    # The training loss of each sequence is its loss under the online sum of its documents' generated LoRAs.
    per_doc = module.hypernet(batch.doc_embedding).unbind()
    for n, item in enumerate(chosen):
        one = collate([item], data.tables["train"]["embeddings"], data.pad_id)
        want = combine([per_doc[u] for u in batch.groups[n].tolist() if u >= 0], mode="sum")
        logits, targets, _ = labelled_logits(module.base, stack([want]), one.input_ids, one.attention_mask, one.labels)
        got = module.losses(one)["ce"]
        torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, targets), rtol=1e-4, atol=1e-5)
    module.validation_step(batch, 0)  # the wrong-document control rolls whole groups


def test_datamodule_never_uses_test_documents(tmp_path):
    with pytest.raises(HyperPragError, match="test"):
        HypernetDataModule(val_split="test")
    data = HypernetDataModule(model="tiny", max_train_docs=6, max_val_pairs=5, batch_size=4,
                              embedding_cache=str(tmp_path))
    data.setup("fit")
    from hyper_prag.benchmark import load_or_make_default

    corpus = load_or_make_default()
    assert data.tables["train"]["docs"] == 6 and len(data.tables["val"]["items"]) == 5
    assert data.tables["val"]["docs"] == len(corpus.split("val").documents)
    batch = next(iter(data.train_dataloader()))
    assert batch.input_ids.shape[0] == 4 and (batch.labels != IGNORE).any(1).all()
    # Only answer tokens carry a loss: every position of qa_sequence's prompt is IGNORE.
    from hyper_prag.prompts import qa_sequence

    doc = corpus.split("train").documents[0]
    q, a = corpus.doc_qa[doc.id][0]
    seq = tokenize_qa(data_base(), q, a, "answer")
    ids, labels = list(seq.input_ids), list(seq.labels)
    prompt = len(data_base().tokenizer(qa_sequence(data_base(), q, a)[0], add_special_tokens=False)["input_ids"])
    assert labels[:prompt] == [IGNORE] * prompt and IGNORE not in labels[prompt:] and len(labels) == len(ids) > prompt
    first = data.tables["train"]["items"][0]
    assert first.rows == (0,) and first.sequence == seq and first.teacher is None and first.lower is None


def test_inference_checkpoint_round_trip_and_wrong_base(tiny, tmp_path):
    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, SMALL)
    for head in net.head_B.values():  # non-zero outputs so the comparison means something
        torch.nn.init.normal_(head.weight, std=0.1)
    path = save_inference_checkpoint(net, tmp_path / "hn", extra={"metrics": {"val/loss": 1.0}})
    loaded = load_hypernet(tmp_path / "hn", tiny)
    emb = doc_embeddings(tiny, DOCS, net.config.embed_layers)
    a, b = net(emb), loaded(emb)
    for m in net.spec.target_modules:
        assert torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m]) and a.delta(m).abs().max() > 0
    assert checkpoint_sha256(tmp_path / "hn") == checkpoint_sha256(path)
    again = save_inference_checkpoint(loaded, tmp_path / "again", extra={"metrics": {"val/loss": 1.0}})
    assert again.read_bytes() == path.read_bytes()  # same weights, same file: the sha256 is the identity
    single = save_inference_checkpoint(net, tmp_path / "flat" / "hn.safetensors")  # the shipped, flat layout
    assert (tmp_path / "flat" / "hn.json").is_file() and torch.equal(load_hypernet(single, tiny)(emb).B["down_proj"],
                                                                     a.B["down_proj"])
    with pytest.raises(HyperPragError, match="base model"):
        load_hypernet(path, tiny_base_model(seed=1))
    (tmp_path / "flat" / "hn.json").unlink()  # a bare weights file is checked by the hash in its own header ...
    assert torch.equal(load_hypernet(single, tiny)(emb).B["down_proj"], a.B["down_proj"])
    tensors, metadata = load_file(str(single)), safe_open(str(single), framework="pt").metadata()
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[:16] += 1e30  # flipped high bits in a few values
    save_file(tensors, str(single), metadata=metadata)
    with pytest.raises(HyperPragError, match="hash in their own header"):
        load_hypernet(single, tiny)
    described = json.loads(metadata["hypernet"])
    del described["tensors_sha256"]  # an older export with its JSON lost: nothing to verify it against
    save_file(load_file(str(path)), str(single), metadata={"hypernet": json.dumps(described)})
    with pytest.raises(HyperPragError, match="export-hypernet"):
        load_hypernet(single, tiny)
    single.write_bytes(single.read_bytes()[:100])  # ... and a truncated file is refused
    with pytest.raises(HyperPragError, match="truncated or corrupted"):
        load_hypernet(single, tiny)


def test_weights_that_do_not_match_their_recorded_sha256_are_refused(tiny, tmp_path):
    net = Hypernet.for_model(tiny, SMALL)
    path = save_inference_checkpoint(net, tmp_path / "hn")
    assert json.loads((tmp_path / "hn" / "config.json").read_text())["weights_sha256"] == checkpoint_sha256(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0  # same shapes, same description: a valid file with other weights
    save_file(tensors, str(path), metadata=metadata)
    for checkpoint in (tmp_path / "hn", path):
        with pytest.raises(HyperPragError, match="modified or corrupted after export"):
            load_hypernet(checkpoint, tiny)
    with pytest.raises(HyperPragError, match="modified or corrupted after export"):
        HypernetEncoder.from_checkpoint(tmp_path / "hn", tiny)


def test_exported_checkpoint_files_get_the_umask_s_permissions(tiny, tmp_path):
    """What export-hypernet writes is for others to read: 0644 under umask 022 (a temp file from mkstemp is 0600)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_inference_checkpoint(Hypernet.for_model(tiny, SMALL), tmp_path / "hn")
    finally:
        os.umask(old)
    for written in (path, path.parent / "config.json"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written
    assert [p.name for p in (tmp_path / "hn").iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_checkpoint_resolves_by_benchmark_or_shipped_name(tmp_path, monkeypatch):
    from hyper_prag.encoders import hypernet as module

    fictional = tmp_path / "hypernet-fictional.safetensors"
    fictional.write_bytes(b"weights")
    monkeypatch.setattr(module, "SHIPPED_CHECKPOINTS", {"fictional": fictional, "squad": tmp_path / "absent.safetensors"})
    assert module.resolve_checkpoint(None, "fictional") == fictional
    assert module.resolve_checkpoint("fictional", "squad") == fictional  # a name picks that one on any benchmark
    assert module.resolve_checkpoint(tmp_path / "mine", "fictional") == tmp_path / "mine"  # a path is taken as given
    with pytest.raises(HyperPragError, match="no hypernetwork checkpoint is shipped for benchmark 'my_corpus'.*fictional"):
        module.resolve_checkpoint(None, "my_corpus")
    with pytest.raises(HyperPragError, match="no hypernetwork checkpoint is shipped for benchmark 'squad'"):
        module.resolve_checkpoint(None, "squad")
    with pytest.raises(HyperPragError, match="squad hypernetwork is not shipped.*train_hypernets_gpu.sh"):
        module.resolve_checkpoint("squad", "fictional")


def test_every_shipped_checkpoint_matches_its_recorded_sha256():
    from hyper_prag.encoders.hypernet import SHIPPED_CHECKPOINTS, file_sha256

    for path in SHIPPED_CHECKPOINTS.values():
        if path.is_file():
            described = json.loads(path.with_suffix(".json").read_text())
            assert file_sha256(path) == described["weights_sha256"], path.name
            assert path.stat().st_size <= 30e6


class _RunsCode:
    """Unpickling this calls ``exec``: what a crafted checkpoint does to run code on whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_crafted_ckpt_is_refused_before_its_code_runs(tiny, tmp_path):
    marker = tmp_path / "marker"
    payload = {"state_dict": {}, "hyper_prag_hypernet": {"evil": _RunsCode(marker)}}
    zipped, legacy = tmp_path / "zip.ckpt", tmp_path / "legacy.ckpt"
    torch.save(payload, zipped)  # torch's zip format
    legacy.write_bytes(pickle.dumps(payload, protocol=2))  # a bare pickle (torch.load reads those too)
    for crafted in (zipped, legacy):
        with pytest.raises(HyperPragError, match="refused"):
            load_hypernet(crafted, tiny)
        with pytest.raises(HyperPragError, match="refused"):
            export_hypernet(crafted, tmp_path / "out", base=tiny)
        with pytest.raises(HyperPragError, match="refused"):
            HypernetEncoder.from_checkpoint(crafted, tiny)
        from hyper_prag.cli import main as cli

        assert cli(["export-hypernet", str(crafted), str(tmp_path / "cli-out")]) == 2  # one error line, no traceback
    assert not marker.exists() and not (tmp_path / "out").exists()
    pickle.loads(legacy.read_bytes())  # the payload is live: plain unpickling runs it
    assert marker.read_text() == "ran"


def test_garbage_or_foreign_ckpt_gives_a_clear_error(tiny, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(HyperPragError, match="garbage.ckpt"):
        load_hypernet(garbage, tiny)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(HyperPragError, match="empty.ckpt"):
        load_hypernet(empty, tiny)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, foreign)  # plain data, but no hypernet in it
    with pytest.raises(HyperPragError, match="not a hypernet training checkpoint"):
        load_hypernet(foreign, tiny)
    bad_description = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_prag_hypernet": {"spec": 3}}, bad_description)
    with pytest.raises(HyperPragError, match="invalid description"):
        load_hypernet(bad_description, tiny)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_yaml_parses_through_the_cli(config, capsys):
    assert config.read_text().startswith(f"# python -m train.hypernet fit --config configs/hypernet/{config.name}")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "HypernetModule" not in capsys.readouterr().err


@pytest.mark.parametrize("readout", ["mean", "attention"])
def test_tiny_fit_checkpoint_export_and_encoder(tmp_path, tiny, readout):
    config = Path(__file__).parents[1] / "configs" / "hypernet" / "tiny.yaml"
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--model.readout", readout,
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.embedding_cache", str(tmp_path / "emb")])
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, list(tmp_path.rglob("*"))
    metrics = (ckpts[0].parents[1] / "metrics.csv").read_text()
    assert "val/loss" in metrics and "train/ce" in metrics
    out = export_hypernet(ckpts[0], tmp_path / "export")
    assert out.stat().st_size < 30e6
    from hyper_prag.cli import main as cli

    csv = ckpts[0].parents[1] / "metrics.csv"
    assert cli(["export-hypernet", str(ckpts[0]), str(tmp_path / "cli.safetensors"), "--metrics", str(csv),
                "--command", "python -m train.hypernet fit --config configs/hypernet/tiny.yaml", "--note", "debug"]) == 0
    described = json.loads((tmp_path / "cli.json").read_text())
    assert described["training_commands"] == ["python -m train.hypernet fit --config configs/hypernet/tiny.yaml"]
    assert described["note"] == "debug"
    assert [row["step"] for row in described["validation_curve"]] == [1, 3] and "val/loss" in described["validation_curve"][0]
    encoder = HypernetEncoder.from_checkpoint(tmp_path / "export", tiny)
    assert encoder.settings()["checkpoint_sha256"] == checkpoint_sha256(out) and not encoder.uses_augmentation
    from hyper_prag.corpus import Document  # encode() reads only .text (the hypernet uses no augmentation)

    loras = encoder.encode([Document(id=str(i), title="", text=t) for i, t in enumerate(DOCS)])
    assert len(loras) == 3 and loras[0].batch_size is None
    loras[0].validate({m: tiny.module_dims(m) for m in tiny.target_modules})
    ckpt_net, exported = load_hypernet(ckpts[0], tiny), load_hypernet(out, tiny)
    assert exported.config.readout == readout
    emb, mask = encoder.embed(DOCS)
    assert torch.equal(ckpt_net(emb, mask).B["up_proj"], exported(emb, mask).B["up_proj"])
    assert torch.equal(exported(emb, mask).B["up_proj"], torch.stack([l.B["up_proj"] for l in loras]))


@pytest.mark.slow
def test_shipped_checkpoint_loads_on_smollm2():
    from hyper_prag.encoders.hypernet import SHIPPED_CHECKPOINT
    from hyper_prag.model import load_base_model

    assert SHIPPED_CHECKPOINT.stat().st_size <= 30e6
    base = load_base_model()
    encoder = HypernetEncoder.from_checkpoint(SHIPPED_CHECKPOINT, base)
    loras = encoder.generate(DOCS[:2])
    for lora in loras:
        lora.validate({m: base.module_dims(m) for m in base.target_modules})
        config = encoder.hypernet.config
        assert lora.spec.base_model == base.identity and (lora.spec.rank, lora.spec.alpha) == (config.rank,
                                                                                                config.alpha)
    assert delta_norm(stack(loras)).min() > 0
    with pytest.raises(HyperPragError, match="base model"):
        load_hypernet(SHIPPED_CHECKPOINT, tiny_base_model())

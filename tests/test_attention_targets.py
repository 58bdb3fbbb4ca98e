"""LoRAs on the attention projections (q/k/v/o_proj of ``self_attn``) besides the FFN linears: the one module
lookup, grouped-query widths, both injectors, PEFT export and import, the store, and the hypernet's
``target_modules``; FFN specs and old hypernet configs serialise exactly as before."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hyper_prag.errors import HyperPragError
from hyper_prag.hypernet import Hypernet, HypernetConfig, doc_token_states, pad_states
from hyper_prag.inject import injected
from hyper_prag.lora import Lora, LoraSpec, export_peft, import_peft, init_lora
from hyper_prag.model import ATTENTION_MODULES, FFN_MODULES, module_path
from tests.conftest import token_batch

TEXTS = ["The river Quellmar rises in the Vostra hills.", "Who founded Ardent Loom?"]
DOCS = ["Jasper Drozen wrote The Nynyn Variations in 1901.", "Lake Orvel was drained in 1876 by the mayor of Brill."]


def attention_lora(base, modules: tuple[str, ...], seed: int = 0, rank: int = 2) -> Lora:
    """A random LoRA (non-zero A and B) on ``modules`` of every layer of ``base``."""
    spec = LoraSpec(rank=rank, target_modules=modules).for_model(base)
    gen = torch.Generator().manual_seed(seed)
    lora = init_lora(spec, {m: base.module_dims(m) for m in spec.target_modules}, generator=gen)
    for b in lora.B.values():
        b.normal_(0.0, 0.05, generator=gen)
    return lora


def logits(base, batch):
    with torch.no_grad():
        return base.model(**batch).logits  # (N, T, V)


# ------------------------------------------------------------------------------------------- the module lookup


def test_every_target_module_has_one_path_and_its_widths(tiny):
    assert module_path("o_proj") == "self_attn.o_proj" and module_path("down_proj") == "mlp.down_proj"
    assert module_path("gate_up_proj") == "mlp.gate_up_proj"
    assert tiny.linear_modules == FFN_MODULES + ATTENTION_MODULES
    assert tiny.target_modules == FFN_MODULES  # the default targets stay the FFN
    config = tiny.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert config.num_key_value_heads < config.num_attention_heads  # the tiny model has grouped-query attention
    kv = config.num_key_value_heads * head_dim
    assert tiny.module_dims("q_proj") == (config.hidden_size, config.num_attention_heads * head_dim)
    assert tiny.module_dims("k_proj") == tiny.module_dims("v_proj") == (config.hidden_size, kv)
    assert tiny.module_dims("o_proj") == (config.num_attention_heads * head_dim, config.hidden_size)
    assert tiny.linear(1, "o_proj") is tiny.model.model.layers[1].self_attn.o_proj


def test_a_module_the_model_lacks_is_refused_with_what_it_has(tiny):
    with pytest.raises(HyperPragError, match=r"its FFN linears are \['gate_proj', 'up_proj', 'down_proj'\] and its "
                                             r"attention linears \['q_proj', 'k_proj', 'v_proj', 'o_proj'\]"):
        tiny.module_dims("qkv_proj")
    with pytest.raises(HyperPragError, match=r"attention linears \['q_proj', 'k_proj', 'v_proj', 'o_proj'\]"):
        LoraSpec(target_modules=("dense",)).for_model(tiny)
    with pytest.raises(HyperPragError, match="no target module hyper-prag knows"):
        module_path("dense_h_to_4h")


# ------------------------------------------------------------------------------------------- the injectors


@pytest.mark.parametrize("module", ["o_proj", "k_proj"])
def test_attention_lora_changes_logits_and_is_removed_exactly(tiny, module):
    batch = token_batch(tiny, TEXTS)
    plain = logits(tiny, batch)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    lora = attention_lora(tiny, (module,), seed=1)
    assert lora.A[module].shape[-1] == tiny.module_dims(module)[0] and lora.B[module].shape[-2] == tiny.module_dims(module)[1]
    out = {}
    for mode in ("side", "merged"):
        with injected(tiny, lora, mode=mode):
            out[mode] = logits(tiny, batch)
            if mode == "merged":
                changed = sorted(k for k, v in tiny.model.state_dict().items() if not torch.equal(before[k], v))
                assert changed == [f"model.layers.{i}.self_attn.{module}.weight" for i in range(tiny.num_layers)]
        assert (out[mode] - plain).abs().max().item() > 1e-4  # the LoRA does something
        assert torch.equal(logits(tiny, batch), plain)  # and is gone after the block
        assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert (out["side"] - out["merged"]).abs().max().item() <= 1e-5
    assert all(not layer.self_attn.get_submodule(module)._forward_hooks for layer in tiny.model.model.layers)


def test_ffn_and_attention_targets_mix_in_one_lora(tiny):
    batch = token_batch(tiny, TEXTS)
    lora = attention_lora(tiny, ("down_proj", "o_proj"), seed=2)
    with injected(tiny, lora, mode="side"):
        side = logits(tiny, batch)
    with injected(tiny, lora, mode="merged"):
        merged = logits(tiny, batch)
    assert (side - merged).abs().max().item() <= 1e-5


def test_per_document_bank_on_o_proj_equals_the_peft_reference(tiny):
    from hyper_prag.encoders.peft_reference import train_reference
    from hyper_prag.encoders.per_doc import PerDocConfig, initial_loras, train_bank
    from hyper_prag.lora import stack
    from hyper_prag.model import weights_fingerprint
    from hyper_prag.prompts import training_sequence
    from hyper_prag.sequences import tokenize

    config = PerDocConfig(epochs=1, lr=1e-2)
    spec = LoraSpec(target_modules=("o_proj",)).for_model(tiny)
    qa = [[("Who wrote The Nynyn Variations?", "Jasper Drozen")], [("When was Lake Orvel drained?", "1876")]]
    seqs = [[tokenize(tiny, *training_sequence(tiny, d, q, a), config.loss_on, config.max_length) for q, a in pairs]
            for d, pairs in zip(DOCS, qa)]
    initial = initial_loras(DOCS, spec, {"o_proj": tiny.module_dims("o_proj")}, config)
    fingerprint = weights_fingerprint(tiny.model)
    ours, _ = train_bank(tiny, seqs, initial, config)
    reference = stack(train_reference(tiny, seqs, initial.unbind(), spec, config)[0])
    assert set(ours.A) == {"o_proj"} and float(ours.B["o_proj"].abs().max()) > 0  # it trained the o_proj LoRA
    for t, r in ((ours.A["o_proj"], reference.A["o_proj"]), (ours.B["o_proj"], reference.B["o_proj"])):
        assert (t.detach() - r).abs().max().item() <= 1e-4
    assert weights_fingerprint(tiny.model) == fingerprint


@pytest.mark.parametrize("name", ["phi3", "qwen2", "gemma2"])
def test_o_proj_on_other_architectures_agrees_with_peft(tmp_path, name):
    """Phi-3 fuses q/k/v into qkv_proj (only o_proj is separate); Qwen2's q/k/v carry biases; Gemma 2 sets its own
    head_dim, so o_proj's d_in is heads · head_dim, not hidden."""
    peft = pytest.importorskip("peft")
    from hyper_prag.model import load_base_model
    from tests.test_architectures import ARCHITECTURES, save_tiny

    config_name, model_name, extra = ARCHITECTURES[name]
    base = load_base_model(save_tiny(tmp_path / name, config_name, model_name, **extra), device="cpu", dtype="float32")
    attention = ("o_proj",) if name == "phi3" else ATTENTION_MODULES
    assert base.linear_modules == base.target_modules + attention
    if name == "phi3":
        with pytest.raises(HyperPragError, match=r"attention linears \['o_proj'\]"):
            LoraSpec(target_modules=("q_proj",)).for_model(base)
    config = base.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert base.module_dims("o_proj") == (config.num_attention_heads * head_dim, config.hidden_size)
    lora = attention_lora(base, ("o_proj",), seed=5)
    batch = token_batch(base, TEXTS)
    with injected(base, lora, mode="side"):
        side = logits(base, batch)
    with injected(base, lora, mode="merged"):
        merged = logits(base, batch)
    peft_model = peft.PeftModel.from_pretrained(base.model, str(export_peft(lora, tmp_path / "adapter")))
    try:
        theirs = logits(peft_model, batch)
    finally:
        peft_model.unload()
    assert (side - theirs).abs().max().item() <= 1e-5 and (merged - theirs).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------- PEFT and the store


def test_peft_export_of_an_o_proj_lora_loads_in_peft_with_same_logits(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    lora = attention_lora(tiny, ("o_proj",), seed=3)
    folder = export_peft(lora, tmp_path / "adapter", base_model_name_or_path=tiny.name)
    from safetensors.torch import load_file

    keys = sorted(load_file(str(folder / "adapter_model.safetensors")))
    assert keys == sorted(f"base_model.model.model.layers.{i}.self_attn.o_proj.lora_{w}.weight"
                          for i in range(tiny.num_layers) for w in "AB")
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["o_proj"]
    batch = token_batch(tiny, TEXTS)
    with injected(tiny, lora):
        ours = logits(tiny, batch)
    peft_model = peft.PeftModel.from_pretrained(tiny.model, str(folder))
    try:
        theirs = logits(peft_model, batch)
    finally:
        peft_model.unload()  # take PEFT's modules back out of the shared fixture model
    assert (ours - theirs).abs().max().item() <= 1e-5
    back = import_peft(folder, base_model=tiny.identity)
    assert back.spec == lora.spec
    assert all(torch.equal(back.A[m], lora.A[m]) and torch.equal(back.B[m], lora.B[m]) for m in lora.spec.target_modules)


def test_store_round_trip_of_an_o_proj_lora_is_exact(tiny, tmp_path):
    from hyper_prag.store import LoraStore, store_key

    lora = attention_lora(tiny, ("o_proj",), seed=4)
    key = store_key("A document.", tiny.identity, lora.spec, {"n_qa": 3}, {"name": "per_doc"})
    store = LoraStore(tmp_path / "store", dtype="float32")  # the exact dtype (the default rounds)
    store.put(key, lora, {"doc_id": "d1"})
    back = LoraStore(tmp_path / "store").get(key, base_model=tiny.identity)
    assert back.spec == lora.spec and back.spec.target_modules == ("o_proj",)
    assert torch.equal(back.A["o_proj"], lora.A["o_proj"]) and torch.equal(back.B["o_proj"], lora.B["o_proj"])
    ffn = replace(lora.spec, target_modules=FFN_MODULES)
    assert store_key("A document.", tiny.identity, ffn, {"n_qa": 3}, {"name": "per_doc"}) != key


def test_an_ffn_spec_serialises_and_keys_as_before(tiny):
    from hyper_prag.store import store_key

    spec = replace(LoraSpec(rank=4, alpha=8.0, target_modules=("down_proj", "up_proj"), layers=(1,)).for_model(tiny),
                   base_model="llama-0123456789abcdef")
    assert spec.to_json() == ('{"alpha": 8.0, "base_model": "llama-0123456789abcdef", "layers": [1], "rank": 4, '
                              '"target_modules": ["down_proj", "up_proj"]}')
    key = store_key("A document.", "llama-0123456789abcdef", spec, {"n_qa": 3}, {"name": "per_doc"})
    assert key == "a70c7c628cffc196adfa08c372675248ba4da7c28f143579e267a9798c4ed640"


# ------------------------------------------------------------------------------------------- the hypernet


def _fastweight(tiny, **kw) -> Hypernet:
    torch.manual_seed(0)
    return Hypernet.for_model(tiny, HypernetConfig(readout="fastweight", rank=4, **kw))


def test_fastweight_on_o_proj_gives_each_document_its_own_o_proj_lora(tiny):
    net = _fastweight(tiny, target_modules=("o_proj",))
    assert net.spec.target_modules == ("o_proj",) and set(net.fw_A) == set(net.fw_B) == {"o_proj"}
    for b in net.fw_B.values():  # one step's worth of B₁
        b.data.normal_(0, 0.05)
    states, mask = pad_states(doc_token_states(tiny, DOCS, net.config.embed_layers, inputs=True))
    lora = net(states, mask)
    assert set(lora.A) == set(lora.B) == {"o_proj"}
    one, two = lora.unbind()
    one.validate(dims={"o_proj": tiny.module_dims("o_proj")})
    assert not torch.allclose(one.delta("o_proj"), two.delta("o_proj"), atol=1e-4)
    batch = token_batch(tiny, TEXTS[:1])
    plain = logits(tiny, batch)
    with injected(tiny, one.detach(), mode="merged"):
        assert (logits(tiny, batch) - plain).abs().max().item() > 1e-5
    assert net.config.to_dict()["target_modules"] == ["o_proj"]


def test_hypernet_target_modules_default_leaves_old_configs_unchanged(tiny):
    old = {"alpha": 32.0, "apply_from": "question", "depth": 2, "doc_dim": 256, "dropout": 0.0, "emb_dim": 32,
           "embed_layers": [1], "heads": 4, "layers": [1], "max_doc_tokens": 512, "rank": 4, "readout": "fastweight",
           "width": 256}
    assert HypernetConfig.from_dict(old).to_dict() == old
    assert "target_modules" not in HypernetConfig().to_dict()
    described = _fastweight(tiny, layers=(1,), apply_from="question").describe()
    described.pop("base_model")
    described["spec"].pop("base_model")
    assert described == {  # what this hypernet described before target_modules existed
        "config": old, "dims": {"down_proj": [128, 64], "gate_proj": [64, 128], "up_proj": [64, 128]},
        "embed_dim": 64, "format": "hyper-prag-hypernet/1", "num_parameters": 2816,
        "spec": {"alpha": 32.0, "layers": [1], "rank": 4, "target_modules": ["gate_proj", "up_proj", "down_proj"]}}
    chosen = HypernetConfig(target_modules=("o_proj", "down_proj"))
    assert HypernetConfig.from_dict(chosen.to_dict()) == chosen
    # Naming the FFN linears in the model's order is the default itself: the same network and description.
    assert HypernetConfig(target_modules=FFN_MODULES).for_model(tiny) == HypernetConfig().for_model(tiny)


def test_mean_readout_and_checkpoint_round_trip_on_o_proj(tiny, tmp_path):
    from hyper_prag.encoders.hypernet import load_hypernet, save_inference_checkpoint
    from hyper_prag.hypernet import doc_embeddings

    torch.manual_seed(0)
    net = Hypernet.for_model(tiny, HypernetConfig(doc_dim=16, emb_dim=4, width=16, depth=1, target_modules=("o_proj",),
                                                  output_scale_init=1e-2))
    emb = doc_embeddings(tiny, DOCS, net.config.embed_layers)  # (2, E)
    lora = net(emb)
    assert set(lora.A) == {"o_proj"} and lora.A["o_proj"].shape == (2, tiny.num_layers, 2, tiny.module_dims("o_proj")[0])
    back = load_hypernet(save_inference_checkpoint(net, tmp_path / "hn.safetensors"), tiny)
    assert back.config == net.config and back.spec.target_modules == ("o_proj",)
    again = back(emb)
    assert torch.equal(again.A["o_proj"], lora.A["o_proj"]) and torch.equal(again.B["o_proj"], lora.B["o_proj"])


def test_delta_term_refuses_teachers_on_other_modules(tiny):
    from hyper_prag.training.hypernet import delta_distance
    from tests.conftest import random_lora

    student = attention_lora(tiny, ("o_proj",))
    student = Lora(student.spec, {m: a[None] for m, a in student.A.items()}, {m: b[None] for m, b in student.B.items()})
    teacher = random_lora(tiny, seed=0, batch=1)
    with pytest.raises(HyperPragError, match="set delta_weight to 0"):
        delta_distance(student, teacher)


def test_tiny_fit_with_the_fastweight_readout_on_o_proj(tmp_path):
    from hyper_prag.encoders.hypernet import export_hypernet, load_hypernet
    from hyper_prag.training.hypernet import main, shared_base

    config = Path(__file__).parents[1] / "configs" / "hypernet" / "tiny.yaml"
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--model.readout", "fastweight",
          "--model.target_modules", "[o_proj]",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.embedding_cache", str(tmp_path / "emb")])
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpts, list(tmp_path.rglob("*"))
    net = load_hypernet(export_hypernet(ckpts[0], tmp_path / "export"), shared_base("tiny"))
    assert net.spec.target_modules == ("o_proj",) and net.config.target_modules == ("o_proj",)
    assert float(net.fw_B["o_proj"].detach().abs().sum()) > 0  # B₁ moved from 0: the steps trained the o_proj factors

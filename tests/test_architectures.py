"""Other Hugging Face causal LMs as base models: tiny random ones built in code and saved to a folder.

Each loads through ``load_base_model(folder)``, takes a random LoRA through the injector (side and
merged) and through PEFT (our export, loaded by plain ``PeftModel.from_pretrained``), with the same
logits; low-precision models give finite logits while LoRA tensors stay float32. Architectures the
injector cannot adapt are refused with a message naming what is missing.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel

from hyper_prag.errors import HyperPragError
from hyper_prag.inject import injected
from hyper_prag.lora import LoraSpec, export_peft, import_peft
from hyper_prag.model import FFN_MODULES, FUSED_FFN_MODULES, load_base_model, load_tokenizer
from tests.conftest import random_lora

TEXTS = ["Parametric knowledge lives in the FFN.", "Who founded Ardent Loom?"]
# name -> (config class, model class, extra config arguments)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def save_tiny(folder, config_name: str, model_name: str, seed: int = 0, **extra):
    """Builds a 2-layer, width-64 random model with the SmolLM2 tokenizer and saves both to ``folder``."""
    tokenizer = load_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request, tmp_path_factory):
    config_name, model_name, extra = ARCHITECTURES[request.param]
    folder = save_tiny(tmp_path_factory.mktemp(request.param), config_name, model_name, **extra)
    return request.param, folder, load_base_model(folder, device="cpu", dtype="float32")


def _batch(base):
    base.tokenizer.padding_side = "right"
    return base.tokenizer(TEXTS, return_tensors="pt", padding=True)


def _logits(base, batch):
    with torch.no_grad():
        return base.model(**batch).logits  # (N, T, V)


def test_loads_with_its_ffn_layout(arch):
    name, _, base = arch
    assert base.identity.startswith(base.model.config.model_type + "-")
    assert base.target_modules == (FUSED_FFN_MODULES if name == "phi3" else FFN_MODULES)
    spec = LoraSpec().for_model(base)  # the default spec adapts every FFN linear of any supported model
    assert spec.target_modules == base.target_modules and spec.layers == (0, 1)
    if name == "phi3":
        assert base.module_dims("gate_up_proj") == (64, 2 * 128)


def test_side_merged_and_peft_agree(arch, tmp_path):
    _, _, base = arch
    batch = _batch(base)
    plain = _logits(base, batch)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    lora = random_lora(base, seed=3)
    with injected(base, lora, mode="side"):
        side = _logits(base, batch)
    with injected(base, lora, mode="merged"):
        merged = _logits(base, batch)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert (side - plain).abs().max().item() > 1e-4  # the LoRA does something
    folder = export_peft(lora, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(base.model, str(folder))
    try:
        theirs = _logits(peft_model, batch)
    finally:
        peft_model.unload()  # take PEFT's modules back out of the shared model
    assert (side - theirs).abs().max().item() <= 1e-5
    assert (merged - theirs).abs().max().item() <= 1e-5
    back = import_peft(folder, base_model=base.identity)
    assert back.spec == lora.spec
    assert all(torch.equal(back.A[m], lora.A[m]) and torch.equal(back.B[m], lora.B[m]) for m in lora.spec.target_modules)


@pytest.mark.parametrize("config_name,model_name", [("LlamaConfig", "LlamaForCausalLM"), ("Phi3Config", "Phi3ForCausalLM")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_models_give_finite_logits_and_keep_lora_fp32(tmp_path, config_name, model_name, dtype):
    folder = save_tiny(tmp_path / "m", config_name, model_name)
    full = load_base_model(folder, device="cpu", dtype="float32")
    base = load_base_model(folder, device="cpu", dtype=dtype)
    assert base.dtype == getattr(torch, dtype)
    assert base.identity == full.identity  # the identity is the checkpoint's, whatever the runtime dtype
    batch = _batch(base)
    lora = random_lora(base, seed=5)
    kept = {m: (lora.A[m].clone(), lora.B[m].clone()) for m in lora.spec.target_modules}
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    with injected(full, lora, mode="side"):
        reference = _logits(full, batch)
    for mode in ("side", "merged"):
        with injected(base, lora, mode=mode):
            out = _logits(base, batch)
        assert out.dtype == base.dtype and torch.isfinite(out).all()
        assert (out.float() - reference).abs().max().item() < 0.5  # near the float32 result
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    for m, (a, b) in kept.items():
        assert lora.A[m].dtype == lora.B[m].dtype == torch.float32
        assert torch.equal(lora.A[m], a) and torch.equal(lora.B[m], b)
    bank = random_lora(base, seed=6, batch=2)
    for t in (*bank.A.values(), *bank.B.values()):
        t.requires_grad_(True)
    with injected(base, bank, mode="batched"):
        loss = base.model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
               for t in (*bank.A.values(), *bank.B.values()))


def test_unsupported_architectures_are_refused_clearly(tmp_path):
    tokenizer = load_tokenizer()
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
    neox.save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    with pytest.raises(HyperPragError, match=r"gpt_neox.*no decoder layers at model\.model\.layers.*gpt_neox, lm_head"):
        load_base_model(tmp_path / "neox", device="cpu")
    save_tiny(tmp_path / "mixtral", "MixtralConfig", "MixtralForCausalLM", num_local_experts=2)
    with pytest.raises(HyperPragError, match="mixture-of-experts FFN"):
        load_base_model(tmp_path / "mixtral", device="cpu")


def test_encode_per_doc_and_by_hypernet_then_ask(arch, tmp_path):
    """The whole offline + online path on each architecture: per-doc and hypernet encoding into a store, ask."""
    from hyper_prag.api import ask, encode
    from hyper_prag.corpus import Corpus, Document, save_corpus
    from hyper_prag.encoders.hypernet import save_inference_checkpoint
    from hyper_prag.encoders.per_doc import PerDocConfig
    from hyper_prag.hypernet import Hypernet, HypernetConfig
    from hyper_prag.store import LoraStore
    from tests.test_pipeline import QUESTIONS, TEXTS as DOCS

    name, folder, base = arch
    docs = tuple(Document(i, t, x) for i, (t, x) in DOCS.items())
    qa = {i: ((f"What is {t}?", x.split(".")[0]),) for i, (t, x) in DOCS.items()}
    corpus = save_corpus(Corpus(f"arch-{name}", docs, tuple(QUESTIONS), qa), tmp_path / "corpus")
    common = dict(model=str(folder), device="cpu", dtype="float32", corpus=str(corpus), logger="none", progress=False)
    per_doc = encode(store=str(tmp_path / "store"), trainer=PerDocConfig(lr=1e-2), augment={"source": "template"},
                     chunk_size=3, **common)
    assert per_doc.encoded == len(docs)
    torch.manual_seed(0)
    net = Hypernet.for_model(base, HypernetConfig(doc_dim=16, emb_dim=8, width=16, depth=1))
    checkpoint = save_inference_checkpoint(net, tmp_path / "hn.safetensors")
    hyper = encode(encoder="hypernet", checkpoint=str(checkpoint), store=str(tmp_path / "hyper-store"), **common)
    assert hyper.encoded == len(docs) and len(LoraStore(tmp_path / "hyper-store")) == len(docs)
    answer = ask("Who founded Ardent Loom?", "prag", benchmark=str(corpus), model=str(folder), device="cpu",
                 dtype="float32", store=tmp_path / "store", k=2, max_new_tokens=3)
    assert len(answer.lora_names) == 2 and answer.doc_ids[0] == "loom"
    generated = ask("Who founded Ardent Loom?", "hypernet-both", benchmark=str(corpus), model=str(folder),
                    device="cpu", dtype="float32", hypernet=checkpoint, k=2, max_new_tokens=3)
    assert [n.split(":")[1] for n in generated.lora_names] == list(generated.doc_ids)

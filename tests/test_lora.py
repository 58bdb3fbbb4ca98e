import json

import pytest
import torch
from peft import PeftModel

from hyper_prag.errors import HyperPragError
from hyper_prag.inject import injected
from hyper_prag.lora import (Lora, LoraSpec, check_base_model, export_peft, import_peft, load_lora, save_lora, stack,
                             zeros)
from tests.conftest import random_lora, token_batch


def test_spec_json_round_trip():
    spec = LoraSpec(rank=4, alpha=8.0, layers=(0, 3), base_model="llama-x")
    assert LoraSpec.from_json(spec.to_json()) == spec
    assert spec.scaling == 2.0


def test_bound_spec_covers_all_layers(tiny):
    spec = LoraSpec().for_model(tiny)
    assert spec.layers == (0, 1) and spec.base_model == tiny.identity


def test_shapes_follow_contract(tiny):
    lora = random_lora(tiny, seed=0, rank=3)
    d_in, d_out = tiny.module_dims("down_proj")
    assert lora.A["down_proj"].shape == (2, 3, d_in)
    assert lora.B["down_proj"].shape == (2, d_out, 3)
    assert lora.delta("down_proj").shape == (2, d_out, d_in)
    batch = random_lora(tiny, seed=0, batch=5)
    assert batch.batch_size == 5 and batch.A["up_proj"].shape[:2] == (5, 2)
    assert len(batch.unbind()) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_round_trip_is_exact(tiny, tmp_path, dtype):
    lora = random_lora(tiny, seed=1).to(dtype=dtype)
    path = save_lora(lora, tmp_path / "doc.safetensors")
    back = load_lora(path, dtype=None)
    assert back.spec == lora.spec
    for m in lora.spec.target_modules:
        assert back.A[m].dtype == dtype
        assert torch.equal(back.A[m], lora.A[m]) and torch.equal(back.B[m], lora.B[m])


def test_truncated_file_raises_clear_error(tiny, tmp_path):
    path = save_lora(random_lora(tiny, seed=1), tmp_path / "doc.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HyperPragError, match="truncated or corrupted"):
        load_lora(path)


def test_wrong_shapes_raise_clear_error(tiny, tmp_path):
    lora = random_lora(tiny, seed=1)
    bad = Lora(lora.spec, dict(lora.A), dict(lora.B))
    bad.A["gate_proj"] = bad.A["gate_proj"][:, :1]  # rank 1 against a rank-2 spec
    with pytest.raises(HyperPragError, match="wrong shapes"):
        bad.validate()
    save_lora(bad, tmp_path / "bad.safetensors")
    with pytest.raises(HyperPragError, match="wrong shapes"):
        load_lora(tmp_path / "bad.safetensors")


def test_missing_file_and_foreign_file(tmp_path):
    with pytest.raises(HyperPragError, match="does not exist"):
        load_lora(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HyperPragError, match="not a hyper-prag LoRA"):
        load_lora(tmp_path / "other.safetensors")


def test_lora_for_other_base_model_is_refused(tiny):
    from hyper_prag.model import tiny_base_model

    other = tiny_base_model(seed=1)
    assert other.identity != tiny.identity
    lora = random_lora(other, seed=0)
    with pytest.raises(HyperPragError, match="made for base model"):
        check_base_model(lora, tiny.identity)
    with pytest.raises(HyperPragError, match="made for base model"):
        with injected(tiny, lora):
            pass


def test_stack_refuses_mixed_specs(tiny):
    with pytest.raises(HyperPragError):
        stack([random_lora(tiny, 0, rank=2), random_lora(tiny, 1, rank=3)])


def test_peft_export_loads_in_peft_with_same_logits(tiny, tmp_path):
    lora = random_lora(tiny, seed=3)
    folder = export_peft(lora, tmp_path / "adapter", base_model_name_or_path=tiny.name)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2
    batch = token_batch(tiny, ["Parametric knowledge lives in the FFN.", "Hello"])
    with torch.no_grad(), injected(tiny, lora):
        ours = tiny.model(**batch).logits
    peft_model = PeftModel.from_pretrained(tiny.model, str(folder))
    try:
        with torch.no_grad():
            theirs = peft_model(**batch).logits
    finally:
        peft_model.unload()  # take PEFT's modules back out of the shared fixture model
    assert (ours - theirs).abs().max().item() <= 1e-5
    back = import_peft(folder, base_model=tiny.identity)
    for m in lora.spec.target_modules:
        assert torch.equal(back.A[m], lora.A[m]) and torch.equal(back.B[m], lora.B[m])


def test_peft_export_files_get_the_umask_s_permissions(tiny, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        folder = export_peft(random_lora(tiny, seed=3), tmp_path / "adapter", base_model_name_or_path="someone/model")
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


def test_zeros_has_no_delta(tiny):
    spec = LoraSpec().for_model(tiny)
    lora = zeros(spec, {m: tiny.module_dims(m) for m in spec.target_modules})
    assert all(lora.delta(m).abs().max() == 0 for m in spec.target_modules)


def test_default_spec_and_its_store_key_are_unchanged(tiny):
    from dataclasses import replace

    from hyper_prag.store import store_key

    spec = replace(LoraSpec().for_model(tiny), base_model="llama-0123456789abcdef")
    assert spec.to_json() == ('{"alpha": 32.0, "base_model": "llama-0123456789abcdef", "layers": [0, 1], "rank": 2, '
                              '"target_modules": ["gate_proj", "up_proj", "down_proj"]}')
    key = store_key("A document.", "llama-0123456789abcdef", spec, {"n_qa": 3}, {"name": "per_doc"})
    assert key == "c9db8d810577c7fa1d941566687331dc87c49e73a63a0c286c5bcd9f8645825b"


def test_spec_binding_checks_modules_layers_and_rank(tiny):
    spec = LoraSpec(rank=3, target_modules=("down_proj",), layers=(1,)).for_model(tiny)
    assert spec.layers == (1,) and spec.target_modules == ("down_proj",)
    assert LoraSpec(layers=(1, 0)).for_model(tiny).layers == (0, 1)
    for bad, match in [(LoraSpec(layers=(0, 2)), r"layers \[0, 2\].*0\.\.1"), (LoraSpec(layers=(1, 1)), "distinct"),
                       (LoraSpec(target_modules=("qkv_proj",)), r"FFN linears \['gate_proj', 'up_proj', 'down_proj'\]"),
                       (LoraSpec(target_modules=()), "choose distinct modules"), (LoraSpec(rank=0), "rank"),
                       (LoraSpec(alpha=-1.0), "alpha")]:
        with pytest.raises(HyperPragError, match=match):
            bad.for_model(tiny)


def test_layer_and_module_subset_is_honoured_everywhere(tiny, tmp_path):
    from hyper_prag.lora import init_lora

    spec = LoraSpec(rank=3, alpha=6.0, target_modules=("down_proj",), layers=(1,)).for_model(tiny)
    lora = init_lora(spec, {"down_proj": tiny.module_dims("down_proj")}, generator=torch.Generator().manual_seed(0))
    assert lora.A["down_proj"].shape == (1, 3, tiny.module_dims("down_proj")[0]) and set(lora.A) == {"down_proj"}
    lora.B["down_proj"].normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    batch = token_batch(tiny, ["Parametric knowledge lives in the FFN."])
    with torch.no_grad(), injected(tiny, lora, mode="merged"):
        changed = [k for k, v in tiny.model.state_dict().items() if not torch.equal(before[k], v)]
        merged = tiny.model(**batch).logits
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    with torch.no_grad(), injected(tiny, lora, mode="side"):
        side = tiny.model(**batch).logits
    folder = export_peft(lora, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny.model, str(folder))
    try:
        with torch.no_grad():
            theirs = peft_model(**batch).logits
    finally:
        peft_model.unload()
    assert (side - theirs).abs().max().item() <= 1e-5 and (merged - theirs).abs().max().item() <= 1e-5
    assert import_peft(folder, base_model=tiny.identity).spec == lora.spec


def test_peft_rank_and_alpha_patterns_are_honoured(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.0,
                        rank_pattern={"down_proj": 4}, alpha_pattern={"up_proj": 8, "layers.1.mlp.gate_proj": 4})
    peft_model = get_peft_model(tiny.model, config)
    try:
        gen = torch.Generator().manual_seed(0)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.05, generator=gen)
        batch = token_batch(tiny, ["Parametric knowledge lives in the FFN.", "Hello"])
        with torch.no_grad():
            theirs = peft_model(**batch).logits
        peft_model.save_pretrained(tmp_path / "patterned")
    finally:
        peft_model.unload()
    lora = import_peft(tmp_path / "patterned", base_model=tiny.identity)
    assert lora.spec.rank == 4 and lora.spec.scaling == 16.0
    with torch.no_grad(), injected(tiny, lora):
        ours = tiny.model(**batch).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    with torch.no_grad(), injected(tiny, lora, mode="merged"):
        assert (tiny.model(**batch).logits - theirs).abs().max().item() <= 1e-5

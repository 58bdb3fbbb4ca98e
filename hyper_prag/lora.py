"""The LoRA contract: one tensor-dict type, made by both encoders, stored, combined and injected.

For every target module m (the FFN's ``gate_proj``, ``up_proj``, ``down_proj``, the default; Phi-3's
fused ``gate_up_proj`` is one module of its own; or an attention projection ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``) and every adapted layer l, the frozen weight W (d_out, d_in) of that linear
is used as::

    W' = W + ΔW,   ΔW = (alpha / r) · B[m][l] @ A[m][l]

    x (…, d_in) ──► W ─────────────────────────► + ──► y (…, d_out)
                └─► A[m][l] (r, d_in) ─► B[m][l] (d_out, r) ─► · alpha/r ─┘

Shapes (the one convention, as in text-to-lora)::

    A[m]: (L, r, d_in)        B[m]: (L, d_out, r)          # one LoRA
    A[m]: (N, L, r, d_in)     B[m]: (N, L, d_out, r)       # a batch of N LoRAs (one per sample)

where L = ``len(spec.layers)`` and row i of the L axis belongs to layer ``spec.layers[i]``.
A :class:`LoraSpec` carries rank, alpha, target modules, layers and the identity of the base model
the LoRA was made for (see :func:`hyper_prag.model.model_identity`).

Files are safetensors (never pickle): tensors ``A.<module>`` / ``B.<module>`` plus the spec as JSON
metadata. PEFT's key names appear only in :func:`export_peft` / :func:`import_peft`, so any document
LoRA loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from hyper_prag.errors import HyperPragError
from hyper_prag.io import atomic_write_bytes

FORMAT_VERSION = "hyper-prag-lora/1"


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA is: its rank, scaling, where it goes, and which base model it belongs to."""

    rank: int = 2  # r (paper: 2)
    alpha: float = 32.0  # scaling numerator; ΔW = alpha / r · B @ A (paper: 32)
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # FFN linears (paper §3.2), or q/k/v/o_proj
    layers: tuple[int, ...] = ()  # decoder layers adapted (a subset); () = every layer, until bound to a model
    base_model: str = ""  # identity of the base model (hyper_prag.model.model_identity)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoraSpec":
        data = json.loads(text)
        return cls(
            rank=int(data["rank"]), alpha=float(data["alpha"]), target_modules=tuple(data["target_modules"]),
            layers=tuple(int(layer) for layer in data["layers"]), base_model=str(data["base_model"]),
        )

    def for_model(self, base) -> "LoraSpec":
        """Returns this spec bound to a :class:`~hyper_prag.model.BaseModel`, checked against that model.

        The target modules must be linears of the model's decoder layers (``base.linear_modules``: its
        FFN linears, then the attention projections it has as separate linears). On a model with a
        fused ``gate_up_proj`` (Phi-3) the pair ``gate_proj`` + ``up_proj`` means that one linear, so
        the default spec adapts every FFN linear of any supported model. ``layers`` is a subset of
        decoder-layer indices (sorted on binding; ``()`` means every layer).

        Raises:
            HyperPragError: a rank below 1, a non-positive alpha, no or unknown target modules, or
                layer indices that repeat or lie outside the model.
        """
        if self.rank < 1:
            raise HyperPragError(f"LoRA rank must be at least 1, got {self.rank}.")
        if not self.alpha > 0 or self.alpha == float("inf"):
            raise HyperPragError(f"LoRA alpha must be a positive number, got {self.alpha}.")
        available = tuple(base.linear_modules)
        modules = list(self.target_modules)
        if "gate_up_proj" in available and ("gate_proj" in modules or "up_proj" in modules):
            if not ("gate_proj" in modules and "up_proj" in modules):
                raise HyperPragError(f"base model {base.name} fuses gate_proj and up_proj into one linear, "
                                     "gate_up_proj; target gate_up_proj (or both gate_proj and up_proj).")
            modules[modules.index("gate_proj")] = "gate_up_proj"
            modules.remove("up_proj")
        unknown = [m for m in modules if m not in available]
        if not modules or unknown or len(set(modules)) != len(modules):
            attention = [m for m in available if m not in base.target_modules]
            raise HyperPragError(f"LoRA target modules {list(self.target_modules)} do not fit base model {base.name}: "
                                 f"choose distinct modules among its FFN linears {list(base.target_modules)} and its "
                                 f"attention linears {attention}.")
        n = base.num_layers
        layers = tuple(sorted(int(layer) for layer in self.layers)) or tuple(range(n))
        if len(set(layers)) != len(layers) or not all(0 <= layer < n for layer in layers):
            raise HyperPragError(f"LoRA layers {list(self.layers)} do not fit base model {base.name}: give distinct "
                                 f"decoder-layer indices in 0..{n - 1} (or none for every layer).")
        return replace(self, target_modules=tuple(modules), layers=layers, base_model=base.identity)


@dataclass
class Lora:
    """One LoRA (or a batch of N LoRAs) as plain tensors, following the module docstring's shapes."""

    spec: LoraSpec
    A: dict[str, Tensor]  # module -> (L, r, d_in) or (N, L, r, d_in)
    B: dict[str, Tensor]  # module -> (L, d_out, r) or (N, L, d_out, r)

    @property
    def batch_size(self) -> int | None:
        """N for a batch of LoRAs, ``None`` for a single LoRA."""
        first = self.A[self.spec.target_modules[0]]
        return first.shape[0] if first.dim() == 4 else None

    def delta(self, module: str) -> Tensor:
        """Returns ΔW of one module for every layer: (L, d_out, d_in), or (N, L, d_out, d_in)."""
        return self.spec.scaling * (self.B[module] @ self.A[module])  # (…, L, d_out, r) @ (…, L, r, d_in)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Lora":
        """Returns a copy of the tensors on ``device`` / in ``dtype``."""
        return Lora(
            self.spec,
            {m: t.to(device=device, dtype=dtype) for m, t in self.A.items()},
            {m: t.to(device=device, dtype=dtype) for m, t in self.B.items()},
        )

    def detach(self) -> "Lora":
        return Lora(self.spec, {m: t.detach() for m, t in self.A.items()}, {m: t.detach() for m, t in self.B.items()})

    def unbind(self) -> list["Lora"]:
        """Splits a batch of N LoRAs into N single LoRAs (views, no copy)."""
        if self.batch_size is None:
            raise HyperPragError("unbind() needs a batch of LoRAs (tensors with a leading N axis).")
        return [
            Lora(self.spec, {m: t[i] for m, t in self.A.items()}, {m: t[i] for m, t in self.B.items()})
            for i in range(self.batch_size)
        ]

    def num_bytes(self) -> int:
        """Bytes of tensor data."""
        return sum(t.numel() * t.element_size() for t in (*self.A.values(), *self.B.values()))

    def validate(self, dims: dict[str, tuple[int, int]] | None = None, source: str = "LoRA") -> None:
        """Checks the tensors against the shape contract, raising :class:`HyperPragError` if they differ.

        Args:
            dims: optional ``module -> (d_in, d_out)`` of the base model, to also check widths.
            source: where the LoRA came from, for the error message.
        """
        spec, L = self.spec, len(self.spec.layers)
        for m in spec.target_modules:
            if m not in self.A or m not in self.B:
                raise HyperPragError(f"{source}: module '{m}' of the spec has no A/B tensors; re-encode the document.")
            a, b = self.A[m], self.B[m]
            lead = a.shape[:-3]
            ok = (
                a.dim() in (3, 4) and b.dim() == a.dim() and b.shape[:-3] == lead
                and a.shape[-3] == L and b.shape[-3] == L and a.shape[-2] == spec.rank and b.shape[-1] == spec.rank
            )
            if dims is not None and ok:
                d_in, d_out = dims[m]
                ok = a.shape[-1] == d_in and b.shape[-2] == d_out
            if not ok:
                want = f"A (L={L}, r={spec.rank}, d_in), B (L={L}, d_out, r={spec.rank})"
                if dims is not None:
                    want = f"A ({L}, {spec.rank}, {dims[m][0]}), B ({L}, {dims[m][1]}, {spec.rank})"
                raise HyperPragError(
                    f"{source}: wrong shapes for '{m}': A {tuple(a.shape)}, B {tuple(b.shape)}; expected {want}. "
                    "The file does not match its spec or this base model; re-encode the document."
                )


def lora_sha256(lora: Lora) -> str:
    """sha256 of a single LoRA's float32 values, module by module in its spec's order (A then B).

    The identity of a LoRA's content: a warm-up LoRA enters the store keys it initialises by this hash.
    """
    digest = hashlib.sha256()
    for m in lora.spec.target_modules:
        digest.update(lora.A[m].detach().float().cpu().numpy().tobytes())
        digest.update(lora.B[m].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_base_model(lora: Lora, identity: str, source: str = "LoRA") -> None:
    """Raises :class:`HyperPragError` unless ``lora`` was made for the base model ``identity``."""
    if lora.spec.base_model != identity:
        raise HyperPragError(
            f"{source} was made for base model '{lora.spec.base_model}' but the loaded base model is "
            f"'{identity}'. A LoRA only works with the exact model it was trained for: re-encode the "
            "documents with this base model (hyper-prag encode), or load the model the LoRA was made for."
        )


def zeros(spec: LoraSpec, dims: dict[str, tuple[int, int]], batch: int | None = None,
          dtype: torch.dtype = torch.float32) -> Lora:
    """Returns a LoRA whose A and B are all zeros (ΔW = 0), e.g. to be filled by an encoder.

    Args:
        spec: a bound spec (layers set).
        dims: ``module -> (d_in, d_out)``.
        batch: N for a batch of LoRAs, ``None`` for one.
        dtype: tensor dtype.
    """
    lead = (batch,) if batch is not None else ()
    L, r = len(spec.layers), spec.rank
    A = {m: torch.zeros(*lead, L, r, dims[m][0], dtype=dtype) for m in spec.target_modules}
    B = {m: torch.zeros(*lead, L, dims[m][1], r, dtype=dtype) for m in spec.target_modules}
    return Lora(spec, A, B)


def init_lora(spec: LoraSpec, dims: dict[str, tuple[int, int]], batch: int | None = None,
              generator: torch.Generator | None = None) -> Lora:
    """Returns the standard LoRA initialisation: A ~ Kaiming-uniform(a=√5) as in PEFT, B = 0 (so ΔW = 0).

    Args:
        spec: a bound spec.
        dims: ``module -> (d_in, d_out)``.
        batch: N for a batch of LoRAs, ``None`` for one.
        generator: RNG for reproducible initialisation.
    """
    lora = zeros(spec, dims, batch)
    for m, a in lora.A.items():
        bound = 1.0 / (dims[m][0] ** 0.5)  # kaiming_uniform_(a=sqrt(5)) on (r, d_in) gives U(-1/sqrt(d_in), +)
        a.uniform_(-bound, bound, generator=generator)
    return lora


def save_lora(lora: Lora, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Writes one LoRA to a safetensors file atomically (temp file, then rename).

    Args:
        lora: a single (unbatched) LoRA.
        path: target ``.safetensors`` file.
        dtype: optional storage dtype (e.g. ``torch.bfloat16``); default keeps the tensors' dtype.

    Returns:
        The path written.
    """
    path = Path(path)
    if lora.batch_size is not None:
        raise HyperPragError("save_lora() takes one LoRA; unbind() a batch and save each.")
    tensors = {f"A.{m}": t for m, t in lora.A.items()} | {f"B.{m}": t for m, t in lora.B.items()}
    tensors = {k: t.detach().to("cpu", dtype=dtype or t.dtype).contiguous() for k, t in tensors.items()}
    # Bytes through a plain open(): the umask's permissions (0644); safetensors' save_file writes 0600.
    atomic_write_bytes(path, save(tensors, metadata={"format": FORMAT_VERSION, "spec": lora.spec.to_json()}))
    return path


def load_lora(path: str | Path, dtype: torch.dtype | None = torch.float32) -> Lora:
    """Reads a LoRA written by :func:`save_lora`, checking it against the shape contract.

    Args:
        path: a ``.safetensors`` LoRA file.
        dtype: dtype of the returned tensors (``None`` keeps the stored dtype).

    Returns:
        The :class:`Lora`.

    Raises:
        HyperPragError: missing, truncated or corrupted file, or tensors that contradict the spec.
    """
    path = Path(path)
    if not path.is_file():
        raise HyperPragError(f"LoRA file {path} does not exist.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise HyperPragError(f"LoRA file {path} is truncated or corrupted ({err}); delete it and re-encode.") from err
    if metadata.get("format") != FORMAT_VERSION or "spec" not in metadata:
        raise HyperPragError(f"{path} is not a hyper-prag LoRA file (format {metadata.get('format')!r}); "
                             "for a PEFT adapter folder use import_peft().")
    spec = LoraSpec.from_json(metadata["spec"])
    A = {k[2:]: v.to(dtype or v.dtype) for k, v in tensors.items() if k.startswith("A.")}
    B = {k[2:]: v.to(dtype or v.dtype) for k, v in tensors.items() if k.startswith("B.")}
    lora = Lora(spec, A, B)
    lora.validate(source=f"LoRA file {path}")
    return lora


def _peft_module(layer: int, module: str) -> str:
    """The module's name in the model, e.g. ``model.layers.3.self_attn.o_proj``, as PEFT's keys and patterns see it."""
    from hyper_prag.model import module_path  # here, not at the top: the store's writer processes stay light

    return f"model.layers.{layer}.{module_path(module)}"


def _peft_key(layer: int, module: str, which: str) -> str:
    return f"base_model.model.{_peft_module(layer, module)}.lora_{which}.weight"


def export_peft(lora: Lora, folder: str | Path, base_model_name_or_path: str = "") -> Path:
    """Writes a LoRA as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    PEFT computes ΔW = lora_alpha / r · lora_B @ lora_A with lora_A (r, d_in), lora_B (d_out, r):
    exactly our convention, so the tensors are copied per layer unchanged.

    Args:
        lora: a single LoRA.
        folder: output folder (created).
        base_model_name_or_path: recorded in the config: the hub id ``AutoPeftModelForCausalLM`` loads the base
            model from (:func:`hyper_prag.model.portable_model_name` gives it; ``PeftModel.from_pretrained``,
            handed the base model, does not read it), not a path of this machine.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = lora.spec
    tensors = {}
    for m in spec.target_modules:
        for i, layer in enumerate(spec.layers):
            tensors[_peft_key(layer, m, "A")] = lora.A[m][i].detach().float().cpu().contiguous()  # (r, d_in)
            tensors[_peft_key(layer, m, "B")] = lora.B[m][i].detach().float().cpu().contiguous()  # (d_out, r)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
        "target_modules": list(spec.target_modules), "layers_to_transform": list(spec.layers),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    # Through a plain open(): the umask's permissions (0644) for a folder meant to be shared; save_file writes 0600.
    atomic_write_bytes(folder / "adapter_model.safetensors",
                       save(tensors, metadata={"format": "pt", "hyper_prag_spec": spec.to_json()}))
    atomic_write_bytes(folder / "adapter_config.json", json.dumps(config, indent=2).encode())
    return folder


def _peft_pattern(patterns: dict, key: str):
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first pattern matching the end of the module name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return None


def import_peft(folder: str | Path, base_model: str) -> Lora:
    """Reads a PEFT LoRA adapter folder on a Llama-style model's FFN or attention linears into our contract.

    ``rank_pattern`` and ``alpha_pattern`` (per-module rank and alpha) are honoured exactly: the
    imported LoRA has the largest rank R of the adapter and alpha = ``lora_alpha`` · R / ``r``, so its
    scaling s equals the adapter's default scaling; a module of rank r_m < R gets zero rows in A and
    zero columns in B, and its B is multiplied by s_m / s where s_m = alpha_m / r_m. The product
    s · B A is then each module's own ΔW (the rescaling of B rounds once per element).

    Args:
        folder: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model: identity of the base model the adapter was trained on (PEFT does not record it).

    Returns:
        The :class:`Lora` (float32).

    Raises:
        HyperPragError: an unreadable folder, rsLoRA/DoRA, transposed weights (``fan_in_fan_out``),
            tensors that do not cover every target module in the same layers, or a target module that is
            neither an FFN linear nor an attention projection.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:
        raise HyperPragError(f"{folder} is not a readable PEFT adapter folder ({err}).") from err
    if config.get("use_rslora") or config.get("use_dora"):
        raise HyperPragError(f"{folder}: rsLoRA/DoRA adapters are not plain LoRAs and cannot be imported.")
    if config.get("fan_in_fan_out"):
        raise HyperPragError(f"{folder}: fan_in_fan_out adapters (Conv1D models such as GPT-2) cannot be imported.")
    targets = config["target_modules"]
    targets = tuple(targets) if isinstance(targets, list) else (targets,)
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in tensors if ".layers." in k})
    r0, alpha0 = int(config["r"]), float(config["lora_alpha"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    A: dict[str, Tensor] = {}
    B: dict[str, Tensor] = {}
    try:
        for m in targets:
            A[m] = [tensors[_peft_key(l, m, "A")].float() for l in layers]  # each (r_m, d_in)
            B[m] = [tensors[_peft_key(l, m, "B")].float() for l in layers]  # each (d_out, r_m)
    except KeyError as err:
        raise HyperPragError(f"{folder}: adapter tensors do not cover every target module in every layer "
                             f"(missing {err}).") from err
    rank = max(a.shape[0] for m in targets for a in A[m])
    scaling = alpha0 / r0  # the adapter's default scaling, kept as ours
    for m in targets:
        for i, layer in enumerate(layers):
            a, b = A[m][i], B[m][i]
            key = _peft_module(layer, m)
            r_m = int(_peft_pattern(rank_pattern, key) or r0)
            alpha_m = float(_peft_pattern(alpha_pattern, key) or alpha0)
            if a.shape[0] != r_m or b.shape[-1] != r_m:
                raise HyperPragError(f"{folder}: {key} has rank {a.shape[0]} but its config says {r_m}; the adapter "
                                     "config does not match its tensors.")
            if alpha_m / r_m != scaling:
                b = b * (alpha_m / r_m / scaling)  # (d_out, r_m)
            A[m][i] = torch.cat([a, a.new_zeros(rank - r_m, a.shape[1])])  # (R, d_in)
            B[m][i] = torch.cat([b, b.new_zeros(b.shape[0], rank - r_m)], dim=1)  # (d_out, R)
    alpha = alpha0 if rank == r0 else alpha0 * rank / r0
    spec = LoraSpec(rank=rank, alpha=alpha, target_modules=targets, layers=tuple(layers), base_model=base_model)
    try:
        lora = Lora(spec, {m: torch.stack(A[m]) for m in targets}, {m: torch.stack(B[m]) for m in targets})
    except RuntimeError as err:  # widths differ between layers
        raise HyperPragError(f"{folder}: adapter tensors of one module differ in shape between layers ({err}).") from err
    lora.validate(source=f"PEFT adapter {folder}")
    return lora


def stack(loras: list[Lora]) -> Lora:
    """Stacks N single LoRAs with one spec into a batch: A (N, L, r, d_in), B (N, L, d_out, r)."""
    if not loras:
        raise HyperPragError("stack() needs at least one LoRA.")
    spec = loras[0].spec
    for other in loras[1:]:
        if other.spec != spec:
            raise HyperPragError(f"cannot stack LoRAs with different specs: {spec} vs {other.spec}.")
    return Lora(
        spec,
        {m: torch.stack([lora.A[m] for lora in loras]) for m in spec.target_modules},
        {m: torch.stack([lora.B[m] for lora in loras]) for m in spec.target_modules},
    )

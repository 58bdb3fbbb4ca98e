"""The hypernetwork: a document → its LoRA in one forward pass (amortized parametric encoding).

Beyond the paper (its f_φ trains one LoRA per document); anchored on DyPRAG's "parameter
translator" and text-to-lora's hyper-modulator. For document d::

    d ──► frozen base LLM, decoder layers ≤ max(embed_layers) ──► per-token final-norm
      ──► mean over d's tokens, concatenated over embed_layers ──► doc_embedding e (E,)

    for every adapted layer l and target module m (the FFN linears, or ``target_modules``, e.g. ``o_proj``):
        [proj(LN(e)) ⊕ layer_emb[l] ⊕ module_emb[m]] ──► trunk (MLP) ──► h (width,)
        A[m][l] = head_A[m](h) / √d_in     (r, d_in)
        B[m][l] = g · head_B[m](h)         (d_out, r)      g = 1, head_B zero-initialised: the first LoRA is ΔW = 0
                                                           or g a learned scalar from output_scale_init ≈ 0

That is ``readout="mean"`` (the default): one pooled vector per document. ``readout="attention"`` keeps
every token's states and gives each (module m, layer l, slot s) a learned query; slots 0..r-1 make the
rows of A, slots r..2r-1 the columns of B, each read from the tokens it attends to::

    read[m, l, s] = MultiHeadAttention(query[m, l, s], keys/values = proj(LN(token states of d)))
    [read ⊕ proj(LN(e)) ⊕ module_emb[m] ⊕ layer_emb[l] ⊕ slot_emb[s]] ──► trunk ──► head_A[m] | head_B[m]

so a rank-1 component can carry one specific span of the document (a name, a year) instead of the
average of all of them.

``readout="fastweight"`` (after Generative Adapter's outer-product adapter) needs no pooled vector and no trunk:
the document shapes every LoRA from initialisation. For each adapted layer l, with H_l the layer's normalised
input states over the document's T tokens (what its own attention projections read)::

    K = H_l W_kᵀ,  V = H_l W_vᵀ              (T, r)    W_k, W_v (r, hidden) start as the top-r directions of
                                                      the layer's k_proj / v_proj, then train
    C_l = polar(K_{t}ᵀ V_{t+shift} / √T)      (r, r)    singular values set to 1 (Newton–Schulz)
                                                      (``cores`` c: c such cores, block-diagonal, rank c·r)
    A[m][l] = C_l A₁[m][l]   (r, d_in)       B[m][l] = B₁[m][l]   (d_out, r)    A₁ random, B₁ = 0 at the start

so ΔW = s · B₁ C_l A₁: linear attention from the question's states to the document's, put in the weights, at
the store's rank r. Its input is per-token states of the adapted layers (``embed_layers`` = ``layers``).

``apply_from`` records where the LoRAs act, in training and when served: every position (``all``) or from the
question's text onward (``question``: the prompt head is read by the base model, :mod:`hyper_prag.activated`).

A **bias LoRA** (``bias_rank`` > 0; Doc-to-LoRA's learned, document-independent part) is concatenated along
the rank with every generated LoRA::

    A[m] = [A_gen[m]; A_bias[m]]  (L, r + r_b, d_in)      B[m] = [B_gen[m], B_bias[m]]  (L, d_out, r + r_b)
    ΔW = s · (B_gen A_gen + B_bias A_bias),   s = alpha / r  (the rank-r scaling is kept; alpha is rescaled)

It trains with the hypernet and is the same for every document, so what every answer needs (format, style)
can go there and the generated part must carry what differs between documents: the content. It is part of
every LoRA the hypernet emits (training, the encoder, the store) and of its checkpoint.

``layers`` restricts the generated LoRA to a subset of decoder layers (default: all). With LoRAs on the upper
layers only, the hidden states below the lowest adapted layer do not depend on the LoRA, so training can
compute them once (``hyper_prag/training/hypernet.py``). ``target_modules`` chooses the linears it adapts
(default: the base model's FFN linears); e.g. ``("o_proj",)`` puts every readout's LoRA on the attention output
projection, where Generative Adapter puts its adapter. The fastweight core C_l still reads layer l's input
states; only A₁, B₁ take the chosen linear's widths.

The output is a :class:`~hyper_prag.lora.Lora` batch (A: (N, L, r + r_b, d_in), B: (N, L, d_out, r + r_b))
with the same scaling s = alpha / r as per-document LoRAs, bound to the base model's identity; nothing
downstream knows which encoder made it. The base LLM is frozen; only the hypernet trains
(``hyper-prag train hypernet fit``, ``hyper_prag/training/hypernet.py``).

Doc embeddings only need the base model up to the deepest chosen layer (early layers: cheap
encoding), and are cached on disk by (base identity, layers, max tokens, kind, sha256 of the text).

This module is the network definition: config, doc embeddings and the ``nn.Module``. Using a trained
one is :mod:`hyper_prag.encoders.hypernet`: the ``HypernetEncoder``, and the checkpoint files
(save, load, export of a training checkpoint), which record :meth:`Hypernet.describe`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from torch import Tensor, nn

from hyper_prag.activated import APPLY_FROM
from hyper_prag.combine import combine
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import layers_cut
from hyper_prag.io import atomic_file
from hyper_prag.lora import Lora, LoraSpec
from hyper_prag.model import BaseModel
from hyper_prag.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = "hyper-prag-hypernet/1"  # recorded by Hypernet.describe() in every checkpoint file
READOUTS = ("mean", "attention", "fastweight")


def default_embed_layers(num_layers: int) -> tuple[int, ...]:
    """Decoder layers pooled into the doc embedding by default: those at 1/4 and 1/2 depth (30 → (7, 14)).

    Early layers keep encoding cheap (the forward stops at the deepest one); mid layers already
    carry the entity/attribute content the FFN LoRA must inject.
    """
    return tuple(sorted({max(0, round(num_layers * f) - 1) for f in (0.25, 0.5)}))


@dataclass(frozen=True)
class HypernetConfig:
    """Architecture of a hypernet (all of it enters the checkpoint and the encoder's store key)."""

    embed_layers: tuple[int, ...] = ()  # decoder layers mean-pooled into the doc embedding; (): default_embed_layers
    max_doc_tokens: int = 512  # document tokens read at once (longer documents are read piece by piece)
    doc_dim: int = 256  # width of the projected doc embedding
    emb_dim: int = 32  # width of the learned layer and module embeddings
    width: int = 256  # trunk width
    depth: int = 2  # trunk linear layers
    rank: int = 2  # LoRA rank r (paper: 2)
    alpha: float = 32.0  # LoRA alpha (paper: 32); ΔW = alpha / r · B A
    dropout: float = 0.0  # trunk dropout (training only)
    readout: str = "mean"  # "mean": one pooled doc vector; "attention": slot queries attend over the doc's tokens
    heads: int = 4  # attention heads of the token readout (readout="attention"; doc_dim must divide by it)
    # Fields below were added after the first shipped checkpoint. At their defaults they change nothing and
    # are left out of to_dict(), so older checkpoints describe (and key the store) exactly as before.
    layers: tuple[int, ...] = ()  # decoder layers the generated LoRA adapts; (): all of them
    bias_rank: int = 0  # rank of the learned document-independent bias LoRA concatenated to each output; 0: none
    output_scale_init: float | None = None  # learned scalar g on the generated B, starting here (e.g. 1e-3);
    #                                         None: g = 1 fixed and head_B zero-initialised
    shift: int = 0  # fastweight: keys from token t, values from token t + shift (1: next-token associations)
    apply_from: str = "all"  # where the LoRAs act, in training and when served: "all" positions or from the "question"
    target_modules: tuple[str, ...] = ()  # linears the generated LoRA adapts, e.g. ("o_proj",); (): the FFN linears
    cores: int = 1  # fastweight: independent r×r cores per layer, each from its own key/value pair (LoRA rank cores·r)

    @property
    def generated_rank(self) -> int:
        """Rank of the generated LoRA: ``rank``, times ``cores`` for the fastweight readout."""
        return self.rank * self.cores

    def for_model(self, base: BaseModel) -> "HypernetConfig":
        """Returns this config with ``embed_layers`` filled in for ``base`` and checked."""
        layers = tuple(self.embed_layers) or default_embed_layers(base.num_layers)
        if self.readout not in READOUTS:
            raise HyperPragError(f"hypernet readout {self.readout!r} is unknown; choose one of {READOUTS}.")
        if self.apply_from not in APPLY_FROM:
            raise HyperPragError(f"apply_from {self.apply_from!r} is unknown; choose one of {APPLY_FROM}.")
        if self.readout == "fastweight":
            # The fastweight readout reads each adapted layer's own input states: embed_layers are the adapted layers.
            layers = tuple(self.layers) or tuple(range(base.num_layers))
            if self.shift not in (0, 1):
                raise HyperPragError(f"fastweight shift must be 0 or 1, got {self.shift}.")
        if self.cores < 1 or (self.cores > 1 and self.readout != "fastweight"):
            raise HyperPragError(f"cores {self.cores}: use cores >= 1, and cores > 1 only with readout 'fastweight'.")
        if self.readout == "attention" and self.doc_dim % self.heads:
            raise HyperPragError(f"doc_dim {self.doc_dim} must be a multiple of heads {self.heads}.")
        for name, chosen in (("embed_layers", layers), ("layers", self.layers)):
            bad = [l for l in chosen if not 0 <= l < base.num_layers]
            if bad:
                raise HyperPragError(f"{name} {bad} do not exist in {base.name} ({base.num_layers} layers); "
                                     f"choose layers in 0..{base.num_layers - 1}.")
        if self.bias_rank < 0 or self.rank < 1:
            raise HyperPragError(f"hypernet rank must be >= 1 and bias_rank >= 0, got {self.rank} and {self.bias_rank}.")
        # Checked and spelled as the model names them (Phi-3: gate_proj + up_proj is its gate_up_proj); the FFN
        # linears in the model's own order are the default, () (the same network, so the same description and key).
        modules = LoraSpec(target_modules=self.target_modules).for_model(base).target_modules if self.target_modules else ()
        return replace(self, embed_layers=tuple(sorted(set(layers))), layers=tuple(sorted(set(self.layers))),
                       target_modules=() if modules == base.target_modules else tuple(modules))

    def to_dict(self) -> dict:
        data = {**asdict(self), "embed_layers": list(self.embed_layers), "layers": list(self.layers),
                "target_modules": list(self.target_modules)}
        return {k: v for k, v in data.items() if k not in _LATER or v != _LATER[k]}

    @classmethod
    def from_dict(cls, data: dict) -> "HypernetConfig":
        return cls(**{**data, "embed_layers": tuple(data.get("embed_layers", ())), "layers": tuple(data.get("layers", ())),
                      "target_modules": tuple(data.get("target_modules", ()))})


_LATER = {"layers": [], "bias_rank": 0, "output_scale_init": None, "shift": 0,
          "apply_from": "all", "target_modules": [], "cores": 1}  # later fields at their no-op defaults


# ------------------------------------------------------------------------------------------ doc embedding


def text_hash(text: str) -> str:
    """sha256 of a document's text (the embedding cache key)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _layer_states(base: BaseModel, texts: Sequence[str], layers: Sequence[int], max_tokens: int,
                  batch_size: int, inputs: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Per batch of documents: their tokens' hidden states of ``layers``, concatenated.

    Only decoder layers 0 … max(layers) run. By default each layer's output, passed through the model's final
    RMSNorm (so the few "massive activation" dimensions of the residual stream do not dominate); with
    ``inputs`` each layer's normalised input (its ``input_layernorm`` output: what its attention projections read).

    The model is held (:func:`~hyper_prag.inject.layers_cut`) while its layer list is cut short, so a thread
    injecting or generating meanwhile never sees the shortened model.

    Yields:
        ``(states (n, T, len(layers) · hidden) float32, mask (n, T) float32)``, right-padded.
    """
    if any(not t.strip() for t in texts):
        raise HyperPragError("cannot encode an empty document; remove it from the corpus.")
    decoder = base.model.model
    tok = base.tokenizer
    with layers_cut(base, slice(0, max(layers) + 1)) as full:  # stop after the deepest chosen layer
        captured: dict[int, Tensor] = {}
        where = [full[l].input_layernorm if inputs else full[l] for l in layers]
        hooks = [w.register_forward_hook(lambda mod, args, out, l=l: captured.__setitem__(l, out))
                 for l, w in zip(layers, where)]
        try:
            for i in tqdm(range(0, len(texts), batch_size), desc="document states", unit="batch",
                          disable=len(texts) <= batch_size):
                batch = tok(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, padding_side="right",
                            truncation=True, max_length=max_tokens, add_special_tokens=False).to(base.device)
                decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                outs = [captured[l][0] if isinstance(captured[l], tuple) else captured[l] for l in layers]
                states = [(o if inputs else decoder.norm(o)).to(torch.float32) for o in outs]  # each (n, T, H)
                yield torch.cat(states, dim=-1), batch["attention_mask"].to(torch.float32)  # (n, T, E), (n, T)
        finally:
            for hook in hooks:
                hook.remove()


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``states`` ``(n, T, E)`` over the tokens where ``mask`` ``(n, T)`` is 1 → ``(n, E)``."""
    mask = mask.unsqueeze(-1).to(states.dtype)  # (n, T, 1)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def doc_embeddings(base: BaseModel, texts: Sequence[str], layers: Sequence[int], max_tokens: int = 512,
                   batch_size: int = 16) -> Tensor:
    """Mean-pooled hidden states of ``layers`` over each document's tokens (the ``readout="mean"`` input).

    Args:
        base: the frozen base model.
        texts: document texts (no chat template, no special tokens).
        layers: decoder layer indices; their pooled states are concatenated in this order.
        max_tokens: tokens read per document.
        batch_size: documents per forward pass.

    Returns:
        ``(N, len(layers) · hidden)`` float32 on CPU.
    """
    out = []
    for states, mask in _layer_states(base, texts, layers, max_tokens, batch_size):
        out.append(masked_mean(states, mask).cpu())  # (n, E)
    return torch.cat(out)  # (N, E)


@torch.no_grad()
def doc_token_states(base: BaseModel, texts: Sequence[str], layers: Sequence[int], max_tokens: int = 512,
                     batch_size: int = 16, inputs: bool = False) -> list[Tensor]:
    """Every token's hidden states of ``layers`` (the ``readout="attention"`` input), one tensor per document;
    with ``inputs`` each layer's normalised input instead (the ``readout="fastweight"`` input).

    Returns:
        ``N`` float32 CPU tensors ``(T_i, len(layers) · hidden)``, T_i = the document's token count (≤ max_tokens).
    """
    out: list[Tensor] = []
    for states, mask in _layer_states(base, texts, layers, max_tokens, batch_size, inputs):
        out += [row[: int(m.sum())].cpu() for row, m in zip(states, mask)]
    return out


def pad_states(states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pads per-document token states ``(T_i, E)`` into ``(N, T, E)`` float32 with a ``(N, T)`` mask (1 = token)."""
    T = max(len(s) for s in states)
    out = torch.zeros(len(states), T, states[0].shape[-1])  # (N, T, E)
    mask = torch.zeros(len(states), T)  # (N, T)
    for i, s in enumerate(states):
        out[i, : len(s)], mask[i, : len(s)] = s.to(torch.float32), 1.0
    return out, mask


class EmbeddingCache:
    """Doc embeddings on disk, one safetensors file per (base identity, layers, max tokens, kind), keyed by text sha256.

    Two kinds: pooled ``(E,)`` float32 rows (``readout="mean"``) and per-token ``(T_i, E)`` bfloat16 states
    (``readout="attention"``; half the bytes, and the readout normalises its input first).
    """

    def __init__(self, root: str | Path | None = None) -> None:
        """
        Args:
            root: cache folder; default ``cache_dir("doc_embeddings")``.
        """
        self.root = Path(root) if root is not None else cache_dir("doc_embeddings")
        self._loaded: dict[Path, dict[str, Tensor]] = {}

    def path(self, base: BaseModel, layers: Sequence[int], max_tokens: int, tokens: bool = False,
             inputs: bool = False) -> Path:
        kind = "-inputs" if inputs else "-tokens" if tokens else ""
        return self.root / f"{base.identity}-L{'_'.join(map(str, layers))}-T{max_tokens}{kind}.safetensors"

    @staticmethod
    def _read(path: Path) -> dict[str, Tensor]:
        try:
            return load_file(str(path)) if path.is_file() else {}
        except (SafetensorError, OSError) as err:
            log.warning("embedding cache %s unreadable (%s): recomputing", path, err)
            return {}

    def _table(self, path: Path) -> dict[str, Tensor]:
        if path not in self._loaded:
            self._loaded[path] = self._read(path)
        return self._loaded[path]

    def get(self, base: BaseModel, texts: Sequence[str], layers: Sequence[int], max_tokens: int = 512,
            batch_size: int = 16, tokens: bool = False, inputs: bool = False) -> Tensor | list[Tensor]:
        """Doc embeddings of ``texts``, computing (and saving) only the ones not cached yet.

        ``inputs``: per-token normalised layer inputs (the fastweight readout's; implies ``tokens``).

        Returns:
            ``(N, E)`` pooled embeddings, or with ``tokens`` a list of ``N`` per-token ``(T_i, E)`` bfloat16 states.
        """
        tokens = tokens or inputs
        path = self.path(base, layers, max_tokens, tokens, inputs)
        table = self._table(path)
        keys = [text_hash(t) for t in texts]
        todo = {k: t for k, t in zip(keys, texts) if k not in table}
        if todo:
            start = time.perf_counter()
            if tokens:
                fresh = [s.to(torch.bfloat16) for s in doc_token_states(base, list(todo.values()), layers, max_tokens,
                                                                          batch_size, inputs)]  # each (T_i, E)
            else:
                fresh = list(doc_embeddings(base, list(todo.values()), layers, max_tokens, batch_size))  # each (E,)
            table.update({k: row.clone() for k, row in zip(todo, fresh)})
            log.info("doc embeddings: computed %d in %.1f s (%d cached)", len(todo), time.perf_counter() - start,
                     len(texts) - len(todo))
            # Several processes (the ranks of a distributed run) may write this file at once: each writes a
            # whole new file and renames it into place, so a reader sees one complete file or another, and
            # rows another process saved since we loaded are kept (one lost to a race is recomputed later).
            table.update({k: v for k, v in self._read(path).items() if k not in table})
            with atomic_file(path) as tmp:
                save_file({k: v.contiguous() for k, v in table.items()}, str(tmp))
        if tokens:
            return [table[k] for k in keys]  # N × (T_i, E)
        return torch.stack([table[k] for k in keys])  # (N, E)


# ---------------------------------------------------------------------------------------------- the net


def polar(x: Tensor, steps: int = 12) -> Tensor:
    """The orthogonal polar factor U Vᵀ of each ``(…, r, r)`` matrix (its singular values set to 1), by
    Newton–Schulz iteration X ← 1.5 X − 0.5 X Xᵀ X from X / ‖X‖_F: differentiable without an SVD, whose
    gradient diverges where two singular values meet. A singular value σ/‖X‖_F grows by ≈ 1.5× a step, so
    those above ~1e-2 of the largest reach 1 within the steps; a zero matrix stays zero."""
    x = x / x.flatten(-2).norm(dim=-1).clamp(min=1e-12)[..., None, None]  # (…, r, r) singular values ≤ 1
    for _ in range(steps):
        x = 1.5 * x - 0.5 * x @ x.transpose(-1, -2) @ x
    return x



class Hypernet(nn.Module):
    """Maps doc embeddings to a batch of N LoRAs for one base model (see the module docstring).

    Input: ``(N, E)`` pooled embeddings (``readout="mean"``) or ``(N, T, E)`` token states with a
    ``(N, T)`` mask (``readout="attention"``).
    """

    def __init__(self, config: HypernetConfig, spec: LoraSpec, dims: dict[str, tuple[int, int]], embed_dim: int) -> None:
        """
        Args:
            config: architecture (``embed_layers`` already bound, see :meth:`HypernetConfig.for_model`).
            spec: the LoRA spec the outputs follow, bound to the base model (layers, identity); its rank is
                ``config.rank + config.bias_rank`` (the generated part, then the bias part).
            dims: ``module -> (d_in, d_out)`` of the base model's target modules.
            embed_dim: E, the doc embedding width (``len(embed_layers) · hidden``).
        """
        super().__init__()
        if not spec.layers or not spec.base_model:
            raise HyperPragError("Hypernet needs a LoRA spec bound to a base model (LoraSpec.for_model(base)).")
        if (spec.rank != config.generated_rank + config.bias_rank or (config.layers and spec.layers != config.layers)
                or (config.target_modules and spec.target_modules != config.target_modules)):
            raise HyperPragError(f"hypernet spec (rank {spec.rank}, layers {spec.layers}, modules {spec.target_modules}) "
                                 f"contradicts its config (rank {config.generated_rank} + bias_rank {config.bias_rank}, layers "
                                 f"{config.layers or 'all'}, modules {config.target_modules or 'the FFN'}); "
                                 "the checkpoint is corrupted: re-export it.")
        self.config, self.spec, self.dims, self.embed_dim = config, spec, dict(dims), embed_dim
        L, M, r = len(spec.layers), len(spec.target_modules), config.rank
        # The generated part alone: rank r (cores · r) at the spec's scaling s = alpha / r (the bias part shares s).
        self.generated_spec = replace(spec, rank=config.generated_rank, alpha=spec.scaling * config.generated_rank)
        if config.bias_rank:
            rb = config.bias_rank
            # Standard LoRA init (as PEFT's): A ~ U(±1/√d_in), B = 0, so the bias adds nothing at the start.
            self.bias_A = nn.ParameterDict({m: nn.Parameter((torch.rand(L, rb, dims[m][0]) * 2 - 1) / dims[m][0] ** 0.5)
                                            for m in spec.target_modules})  # m -> (L, r_b, d_in)
            self.bias_B = nn.ParameterDict({m: nn.Parameter(torch.zeros(L, dims[m][1], rb))
                                            for m in spec.target_modules})  # m -> (L, d_out, r_b)
        if config.readout == "fastweight":
            if embed_dim % L:
                raise HyperPragError(f"fastweight states of width {embed_dim} do not split over {L} adapted layers.")
            hidden, cr = embed_dim // L, config.generated_rank
            # Key/value projections of each layer's input states (set from the layer's own k_proj/v_proj by
            # init_from_base), and the document-independent outer factors: A₁ as a LoRA's A, B₁ = 0 (ΔW = 0 at first).
            # With c cores, rows [i·r, (i+1)·r) of each belong to core i.
            self.fw_key = nn.Parameter(torch.randn(L, cr, hidden) / hidden ** 0.5)  # (L, c·r, hidden)
            self.fw_value = nn.Parameter(torch.randn(L, cr, hidden) / hidden ** 0.5)  # (L, c·r, hidden)
            self.fw_A = nn.ParameterDict({m: nn.Parameter((torch.rand(L, cr, dims[m][0]) * 2 - 1) / dims[m][0] ** 0.5)
                                          for m in spec.target_modules})  # m -> (L, c·r, d_in)
            self.fw_B = nn.ParameterDict({m: nn.Parameter(torch.zeros(L, dims[m][1], cr))
                                          for m in spec.target_modules})  # m -> (L, d_out, c·r)
            if config.output_scale_init is not None:
                self.output_scale = nn.Parameter(torch.tensor(float(config.output_scale_init)))
            return
        self.doc_norm = nn.LayerNorm(embed_dim)
        self.doc_proj = nn.Linear(embed_dim, config.doc_dim)
        self.layer_emb = nn.Embedding(L, config.emb_dim)
        self.module_emb = nn.Embedding(M, config.emb_dim)
        d = config.doc_dim + 2 * config.emb_dim
        if config.readout == "attention":
            # 2r slots per (module, layer): r rows of A, r columns of B; each slot's learned query reads the tokens.
            S = 2 * r
            self.token_norm = nn.LayerNorm(embed_dim)
            self.key = nn.Linear(embed_dim, config.doc_dim)
            self.value = nn.Linear(embed_dim, config.doc_dim)
            self.queries = nn.Parameter(torch.randn(M * L * S, config.doc_dim) / config.doc_dim ** 0.5)
            self.slot_emb = nn.Embedding(S, config.emb_dim)
            d += config.doc_dim + config.emb_dim
        blocks: list[nn.Module] = []
        for _ in range(config.depth):
            blocks += [nn.Linear(d, config.width), nn.SiLU(), nn.Dropout(config.dropout)]
            d = config.width
        self.trunk = nn.Sequential(*blocks, nn.LayerNorm(config.width))
        per_slot = 1 if config.readout == "attention" else r  # an attention slot makes one rank-1 vector
        self.head_A = nn.ModuleDict({m: nn.Linear(config.width, per_slot * dims[m][0]) for m in spec.target_modules})
        self.head_B = nn.ModuleDict({m: nn.Linear(config.width, dims[m][1] * per_slot) for m in spec.target_modules})
        if config.output_scale_init is None:
            for head in self.head_B.values():  # ΔW = 0 at initialisation, like B = 0 in standard LoRA
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        else:
            # Doc-to-LoRA's small output scale: head_B keeps its default init, so gradients reach the trunk from
            # the first step, while the generated ΔW starts ≈ 0 (∝ g) and grows only as fast as g learns to.
            self.output_scale = nn.Parameter(torch.tensor(float(config.output_scale_init)))

    @classmethod
    def for_model(cls, base: BaseModel, config: HypernetConfig = HypernetConfig()) -> "Hypernet":
        """Builds a freshly initialised hypernet for ``base``."""
        config = config.for_model(base)
        total = config.generated_rank + config.bias_rank
        spec = LoraSpec(rank=total, alpha=config.alpha / config.rank * total,
                        target_modules=config.target_modules or base.target_modules, layers=config.layers).for_model(base)
        dims = {m: base.module_dims(m) for m in spec.target_modules}
        net = cls(config, spec, dims, embed_dim=len(config.embed_layers) * base.model.config.hidden_size)
        if config.readout == "fastweight":
            net.init_from_base(base)
        return net

    @torch.no_grad()
    def init_from_base(self, base: BaseModel) -> None:
        """Sets the fastweight key/value projections of each adapted layer from that layer's own k_proj / v_proj:
        their top right singular directions, scaled by the singular values (the directions of the layer's
        input its attention keys and values read most strongly): core i takes directions i·r … (i+1)·r − 1."""
        r = self.config.generated_rank
        for i, layer in enumerate(self.spec.layers):
            attention = base.model.model.layers[layer].self_attn
            for target, proj in ((self.fw_key, attention.k_proj), (self.fw_value, attention.v_proj)):
                _, S, Vh = torch.linalg.svd(proj.weight.detach().float(), full_matrices=False)  # Vh (k, hidden)
                k = min(r, len(S))
                target[i, :k] = (S[:k, None] * Vh[:k]).to(target)  # (k, hidden)

    def bias_lora(self) -> Lora | None:
        """The document-independent bias LoRA alone (rank ``bias_rank``, scaling s), or ``None`` without one."""
        if not self.config.bias_rank:
            return None
        rb = self.config.bias_rank
        spec = replace(self.spec, rank=rb, alpha=self.spec.scaling * rb)
        return Lora(spec, dict(self.bias_A), dict(self.bias_B))

    def add_bias(self, generated: Lora) -> Lora:
        """Concatenates the bias LoRA to generated LoRAs (single or batched, any rank, scaling s): ΔW_gen + ΔW_bias.

        Returns:
            ``generated`` itself without a bias LoRA, else the rank ``r' + r_b`` LoRA (same leading axes).
        """
        bias = self.bias_lora()
        if bias is None:
            return generated
        if generated.spec.scaling != bias.spec.scaling:
            raise HyperPragError("add_bias() needs generated LoRAs at the hypernet's scaling alpha / r.")
        lead = generated.A[self.spec.target_modules[0]].shape[:-3]  # () or (N,)
        A = {m: torch.cat([a, bias.A[m].to(a).expand(*lead, *bias.A[m].shape)], dim=-2)
             for m, a in generated.A.items()}  # (…, L, r' + r_b, d_in)
        B = {m: torch.cat([b, bias.B[m].to(b).expand(*lead, *bias.B[m].shape)], dim=-1)
             for m, b in generated.B.items()}  # (…, L, d_out, r' + r_b)
        rank = generated.spec.rank + bias.spec.rank
        return Lora(replace(generated.spec, rank=rank, alpha=generated.spec.scaling * rank), A, B)

    def document_lora(self, pieces: Sequence[Lora], name: str = "a document") -> Lora:
        """One document's LoRA from the generated LoRAs of its consecutive pieces, with the bias LoRA added once.

        A document longer than ``max_doc_tokens`` is read piece by piece. Each piece's LoRA has the size of
        the one window the hypernet was trained on; their sum grows with the piece count P (a 36-piece
        document's sum drowned the model's answers), their mean keeps that size for any P::

            ΔW = (1/P) Σ_p ΔW_p + ΔW_bias      (rank concatenation, :func:`~hyper_prag.combine.combine`)

        A one-piece document gets exactly its piece's LoRA (plus the bias). A warning names a split document.

        Args:
            pieces: single LoRAs from :meth:`forward` with ``bias=False`` (rank r each), in document order.
            name: the document, for the warning (its id, or the start of its text).

        Returns:
            A single LoRA of rank P · r (+ r_b), on the pieces' device.
        """
        if not pieces:
            raise HyperPragError("document_lora() needs the LoRA of at least one piece.")
        if len(pieces) > 1:
            log.warning("%s is longer than the hypernet's %d-token window: read in %d pieces, their LoRAs averaged",
                        name, self.config.max_doc_tokens, len(pieces))
        parts, weights = list(pieces), [1.0 / len(pieces)] * len(pieces)
        bias = self.bias_lora()
        if bias is not None:
            parts.append(bias.to(pieces[0].A[self.spec.target_modules[0]].device))
            weights.append(1.0)
        return parts[0] if len(parts) == 1 else combine(parts, "sum", weights)

    @property
    def reads_tokens(self) -> bool:
        """True if the input is per-token states ``(N, T, E)`` + mask, not pooled ``(N, E)`` embeddings."""
        return self.config.readout in ("attention", "fastweight")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, doc_embedding: Tensor, mask: Tensor | None = None, bias: bool = True) -> Lora:
        """Generates one LoRA per document.

        Args:
            doc_embedding: ``(N, E)`` from :func:`doc_embeddings`, or for ``readout="attention"`` ``(N, T, E)``
                from :func:`doc_token_states` + :func:`pad_states`.
            mask: ``(N, T)``, 1 at real tokens (``readout="attention"``; ``None``: every token is real).
            bias: append the bias LoRA (``spec``: rank r + r_b); ``False``: the generated part alone
                (``generated_spec``: rank r), e.g. to average a long document's pieces before adding the bias once
                (:meth:`document_lora`).

        Returns:
            A batched :class:`Lora`: A[m] (N, L, r (+ r_b), d_in), B[m] (N, L, d_out, r (+ r_b)), differentiable.
        """
        want = "(N, T, {0}) token states" if self.reads_tokens else "(N, {0})"
        if doc_embedding.dim() != (3 if self.reads_tokens else 2) or doc_embedding.shape[-1] != self.embed_dim:
            raise HyperPragError(f"hypernet ({self.config.readout} readout) expects doc embeddings {want.format(self.embed_dim)}, "
                                 f"got {tuple(doc_embedding.shape)}; compute them with the hypernet's embed_layers on its "
                                 "base model (HypernetEncoder.embed).")
        if self.config.readout == "fastweight":
            lora = self._fastweight(doc_embedding, mask)
        else:
            lora = self._from_tokens(doc_embedding, mask) if self.reads_tokens else self._from_pooled(doc_embedding)
        if self.config.output_scale_init is not None:
            lora = Lora(lora.spec, lora.A, {m: self.output_scale * b for m, b in lora.B.items()})  # B = g · head_B(h)
        return self.add_bias(lora) if bias else lora

    def _from_pooled(self, doc_embedding: Tensor) -> Lora:
        """The mean readout: the pooled document with module and layer embeddings through the trunk and heads."""
        spec, N, r = self.generated_spec, doc_embedding.shape[0], self.config.rank
        L, M = len(spec.layers), len(spec.target_modules)
        doc = self.doc_proj(self.doc_norm(doc_embedding))  # (N, doc_dim)
        x = torch.cat([
            doc[:, None, None, :].expand(N, M, L, -1),
            self.module_emb.weight[None, :, None, :].expand(N, M, L, -1),
            self.layer_emb.weight[None, None, :, :].expand(N, M, L, -1),
        ], dim=-1)  # (N, M, L, doc_dim + 2·emb)
        h = self.trunk(x)  # (N, M, L, width)
        A, B = {}, {}
        for i, m in enumerate(spec.target_modules):
            d_in, d_out = self.dims[m]
            A[m] = self.head_A[m](h[:, i]).view(N, L, r, d_in) / d_in ** 0.5  # (N, L, r, d_in), ~Kaiming scale
            B[m] = self.head_B[m](h[:, i]).view(N, L, d_out, r)  # (N, L, d_out, r)
        return Lora(spec, A, B)

    def _from_tokens(self, states: Tensor, mask: Tensor | None) -> Lora:
        """The attention readout: every (module, layer, slot) query attends over the document's tokens.

        Slot s < r makes row s of A, slot r + s column s of B, each from [its attended token summary ⊕ the
        pooled document ⊕ module, layer and slot embeddings] through the shared trunk and its module's head.
        """
        spec, config, r = self.generated_spec, self.config, self.config.rank
        N, T, _ = states.shape
        L, M, S, D, H = len(spec.layers), len(spec.target_modules), 2 * r, config.doc_dim, config.heads
        mask = torch.ones(N, T, device=states.device) if mask is None else mask.to(states.device, torch.float32)
        doc = self.doc_proj(self.doc_norm(masked_mean(states, mask)))  # (N, D): the mean readout's input
        x = self.token_norm(states)  # (N, T, E)
        k = self.key(x).view(N, T, H, D // H).transpose(1, 2)  # (N, H, T, D/H)
        v = self.value(x).view(N, T, H, D // H).transpose(1, 2)  # (N, H, T, D/H)
        q = self.queries.view(M * L * S, H, D // H).transpose(0, 1).unsqueeze(0).expand(N, -1, -1, -1)  # (N, H, MLS, D/H)
        attend = mask.bool()[:, None, None, :]  # (N, 1, 1, T)
        read = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)  # (N, H, MLS, D/H)
        read = read.transpose(1, 2).reshape(N, M, L, S, D)  # (N, M, L, S, D)
        x = torch.cat([
            read,
            doc[:, None, None, None, :].expand(N, M, L, S, -1),
            self.module_emb.weight[None, :, None, None, :].expand(N, M, L, S, -1),
            self.layer_emb.weight[None, None, :, None, :].expand(N, M, L, S, -1),
            self.slot_emb.weight[None, None, None, :, :].expand(N, M, L, S, -1),
        ], dim=-1)  # (N, M, L, S, 2·D + 3·emb)
        h = self.trunk(x)  # (N, M, L, S, width)
        A, B = {}, {}
        for i, m in enumerate(spec.target_modules):
            d_in, _ = self.dims[m]
            A[m] = self.head_A[m](h[:, i, :, :r]) / d_in ** 0.5  # (N, L, r, d_in)
            B[m] = self.head_B[m](h[:, i, :, r:]).transpose(-1, -2)  # (N, L, d_out, r)
        return Lora(spec, A, B)

    def _fastweight(self, states: Tensor, mask: Tensor | None) -> Lora:
        """The fastweight readout: per adapted layer, a normalised outer product of the document's own states.

        With H the layer's normalised input over the document's T tokens, K = H W_kᵀ and V = H W_vᵀ (r columns,
        W_k / W_v started from the layer's k_proj / v_proj), the document's r×r core is
        C = polar(K_{≤T−shift}ᵀ V_{≥shift} / √T) (all singular values set to 1) and, for every module m,

            ΔW = s · B₁[m] · C · A₁[m]        stored as  A = C A₁[m]  (r, d_in),  B = B₁[m]  (d_out, r)

        so the document enters every LoRA from initialisation; B₁ starts at 0, so does ΔW. With ``cores`` c > 1,
        C is block-diagonal: c independent r×r cores, each from its own r columns of K and V (rank c·r).
        """
        spec, r, shift = self.generated_spec, self.config.rank, self.config.shift
        N, T, _ = states.shape
        L = len(spec.layers)
        mask = torch.ones(N, T, device=states.device) if mask is None else mask.to(states.device, torch.float32)
        H = states.view(N, T, L, -1).transpose(1, 2)  # (N, L, T, hidden)
        H = H * mask[:, None, :, None]  # padding contributes nothing
        keys = H @ self.fw_key.transpose(-1, -2)[None]  # (N, L, T, r)
        values = H @ self.fw_value.transpose(-1, -2)[None]  # (N, L, T, r)
        if shift:
            keys, values = keys[:, :, :-shift], values[:, :, shift:]  # token t's key, token t + shift's value
        count = mask.sum(1).clamp(min=1)[:, None, None, None, None]  # (N, 1, 1, 1, 1)
        c = self.config.cores
        keys = keys.unflatten(-1, (c, r)).transpose(2, 3)  # (N, L, c, T', r): core i reads its own key/value pair
        values = values.unflatten(-1, (c, r)).transpose(2, 3)
        core = polar(keys.transpose(-1, -2) @ values / count.sqrt())  # (N, L, c, r, r)
        A = {m: (core @ self.fw_A[m].unflatten(1, (c, r))[None]).flatten(2, 3)
             for m in spec.target_modules}  # (N, L, c·r, d_in): block-diagonal cores times A₁
        B = {m: self.fw_B[m][None].expand(N, -1, -1, -1) for m in spec.target_modules}  # (N, L, d_out, c·r)
        return Lora(spec, A, B)

    def describe(self) -> dict:
        """Config, spec and base identity as JSON-able data (what the inference checkpoint records)."""
        return {"format": FORMAT_VERSION, "config": self.config.to_dict(), "spec": json.loads(self.spec.to_json()),
                "dims": {m: list(d) for m, d in self.dims.items()}, "embed_dim": self.embed_dim,
                "base_model": self.spec.base_model, "num_parameters": self.num_parameters()}

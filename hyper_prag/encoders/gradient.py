"""The gradient readout (MEND-style): a document's LoRA from one forward and backward pass of the frozen model.

For an adapted linear W (d_in → d_out) of layer l, the loss of the document's sequences (its text as a
causal-LM target, and each of its QA pairs as a closed-book question) has the gradient

    ∇_W L = Σ_t δ_t x_tᵀ = Dᵀ X         x_t: the linear's input at token t (X: (T, d_in))
                                        δ_t: dL/d(output) at token t  (D: (T, d_out))

a sum of per-token rank-1 factors (eric-mitchell/mend, ``algs/mend.py``). The readout maps them to the LoRA

    ΔW_l = −η · exp(λ_l) · Σ_t g_δ(δ_t) g_x(x_t)ᵀ,     g(v) = v + U (V v)   (U = 0: identity at the start)

with one learned log step λ_l per layer (0 at the start) and small identity-initialised transforms per layer and
module; at stage 0 (no training) ΔW = −η ∇_W L, one scaled gradient step. ΔW is then cut to the stored rank r by
its top-r singular directions (exactly, through QR of the two factor matrices: no (d_out, d_in) matrix is formed):

    Dᵀ = Q_D R_D,  Xᵀ = Q_X R_X,  R_D R_Xᵀ = U S Vᵀ   →   B = −η e^λ Q_D U_r S_r^½ / s,  A = S_r^½ V_rᵀ Q_Xᵀ

(s = alpha / r, the store's scaling, so s B A = ΔW's best rank-r approximation).

With ``apply_from="question"`` the QA sequences run after the cached prompt head (:mod:`hyper_prag.activated`):
the LoRA acts, and so has a gradient, only from the question on, as it is served. The encode cost is one
forward/backward pass over the document and its pairs (no optimizer, no steps), measured by
``benchmarks/readout_gates.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyper_prag.activated import APPLY_FROM, after_head, from_head_end, head_cache
from hyper_prag.errors import HyperPragError
from hyper_prag.inject import model_lock
from hyper_prag.lora import Lora, LoraSpec
from hyper_prag.model import BaseModel
from hyper_prag.prompts import fixed_head, format_id, qa_sequence
from hyper_prag.sequences import TokenSequence, labelled_positions, per_sample_mean, right_pad, tokenize
from hyper_prag.sequences import check_after_head

if TYPE_CHECKING:
    from hyper_prag.augment import AugmentedDocument

Factors = dict[tuple[int, str], tuple[Tensor, Tensor]]  # (layer, module) -> (X (T, d_in), D (T, d_out))


@dataclass(frozen=True)
class GradientConfig:
    """Settings of the gradient readout (all of them enter the store key)."""

    rank: int = 8  # stored LoRA rank: the top-r singular directions of ΔW
    alpha: float = 32.0  # LoRA alpha; ΔW = alpha / rank · B A
    step: float = 1.0  # η, the step size of stage 0 (tuned on validation documents)
    layers: tuple[int, ...] = ()  # decoder layers adapted; (): all
    apply_from: str = "question"  # where the LoRA acts (and so where its gradient is taken): "all" or "question"
    text: bool = True  # the document's own text as a causal-LM sequence beside its QA pairs
    max_tokens: int = 512  # document tokens read

    def __post_init__(self) -> None:
        if self.rank < 1 or self.step <= 0 or self.apply_from not in APPLY_FROM:
            raise HyperPragError(f"gradient readout needs rank >= 1, step > 0 and apply_from in {APPLY_FROM}; "
                                 f"got rank {self.rank}, step {self.step}, apply_from {self.apply_from!r}.")


class GradientReadout(nn.Module):
    """The learned part: a log step per layer and identity-initialised low-rank transforms g_x, g_δ per
    (layer, module). At initialisation it maps the factors to −η ∇_W L exactly."""

    def __init__(self, spec: LoraSpec, dims: dict[str, tuple[int, int]], step: float, width: int = 8) -> None:
        super().__init__()
        self.spec, self.step = spec, step
        L = len(spec.layers)
        self.log_step = nn.Parameter(torch.zeros(L))  # λ_l
        self.down = nn.ParameterDict()  # V: (L, width, d)
        self.up = nn.ParameterDict()  # U: (L, d, width), zero: g = identity
        for m in spec.target_modules:
            for side, d in (("x", dims[m][0]), ("d", dims[m][1])):
                self.down[f"{m}_{side}"] = nn.Parameter(torch.randn(L, width, d) / d ** 0.5)
                self.up[f"{m}_{side}"] = nn.Parameter(torch.zeros(L, d, width))

    def transform(self, v: Tensor, module: str, side: str, i: int) -> Tensor:
        """g(v) = v + U (V v) for the rows ``v`` ``(T, d)`` of layer index ``i``."""
        key = f"{module}_{side}"
        return v + (v @ self.down[key][i].transpose(0, 1)) @ self.up[key][i].transpose(0, 1)  # (T, d)

    def forward(self, factors: Factors) -> Lora:
        """One LoRA (rank ``spec.rank``, scaling s) from one document's gradient factors."""
        spec, r = self.spec, self.spec.rank
        A, B = {}, {}
        for m in spec.target_modules:
            rows_A, rows_B = [], []
            for i, layer in enumerate(spec.layers):
                X, D = factors[(layer, m)]
                X, D = self.transform(X, m, "x", i), self.transform(D, m, "d", i)  # (T, d_in), (T, d_out)
                a, b = low_rank(D, X, r)  # ΔW ≈ b a = Dᵀ X, (r, d_in), (d_out, r)
                scale = -self.step * torch.exp(self.log_step[i]) / spec.scaling
                rows_A.append(a)
                rows_B.append(scale * b)
            A[m], B[m] = torch.stack(rows_A), torch.stack(rows_B)  # (L, r, d_in), (L, d_out, r)
        return Lora(spec, A, B)


def low_rank(D: Tensor, X: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` factors of Dᵀ X (D: (T, d_out), X: (T, d_in)) without forming it.

    Returns:
        ``(a (rank, d_in), b (d_out, rank))`` with ``b @ a`` = the truncated SVD of Dᵀ X (zero-padded when
        Dᵀ X has lower rank).
    """
    Qd, Rd = torch.linalg.qr(D.transpose(0, 1).float())  # (d_out, k), (k, T)
    Qx, Rx = torch.linalg.qr(X.transpose(0, 1).float())  # (d_in, k'), (k', T)
    U, S, Vh = torch.linalg.svd(Rd @ Rx.transpose(0, 1), full_matrices=False)  # core (k, k')
    k = min(rank, len(S))
    root = S[:k].clamp(min=0).sqrt()  # (k,)
    b = Qd @ (U[:, :k] * root)  # (d_out, k)
    a = (root[:, None] * Vh[:k]) @ Qx.transpose(0, 1)  # (k, d_in)
    if k < rank:
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
    return a, b


def gradient_factors(base: BaseModel, aug: "AugmentedDocument", spec: LoraSpec, config: GradientConfig) -> Factors:
    """(X, D) of every adapted linear for one document: one forward and backward of the frozen model.

    The loss is the mean over the document's sequences of each sequence's mean CE on its labelled tokens (its
    text: every token; a QA pair: the answer), as the per-document trainer weighs them.
    """
    eos = base.tokenizer.eos_token or ""
    head = head_cache(base, fixed_head(base)) if config.apply_from == "question" else None
    unlearned = fixed_head(base)
    qa = [tokenize(base, *qa_sequence(base, q, a), "answer", unlearned=unlearned) for q, a in aug.qa]
    text = [tokenize(base, "", f"{aug.text.strip()}{eos}", "all", config.max_tokens)] if config.text else []
    if not qa and not text:
        raise HyperPragError(f"document {aug.doc_id!r} has no QA pair and text=False: nothing to take a gradient of.")
    groups = [(seqs, cached) for seqs, cached in ((text, None), (qa, head)) if seqs]
    n = sum(len(seqs) for seqs, _ in groups)
    inputs: dict[tuple[int, str], Tensor] = {}
    grads: dict[tuple[int, str], Tensor] = {}

    def capture(key):
        def hook(module, args, output):
            x = args[0]
            inputs[key] = x.detach().reshape(-1, x.shape[-1])  # (N·T, d_in)
            output.register_hook(lambda g: grads.__setitem__(key, g.detach().reshape(-1, g.shape[-1])))
        return hook

    X_all: dict[tuple[int, str], list[Tensor]] = {}
    D_all: dict[tuple[int, str], list[Tensor]] = {}
    with model_lock(base):
        handles = [base.linear(layer, m).register_forward_hook(capture((layer, m)))
                   for layer in spec.layers for m in spec.target_modules]
        try:
            # One backward per forward (the text, then the QA pairs after the head), so each captured input meets
            # its own gradient; each is weighted by its share of the mean over all n sequences.
            for seqs, cached in groups:
                inputs.clear()
                grads.clear()
                (_losses(base, seqs, cached).sum() / n).backward()
                for key, X in inputs.items():
                    D = grads[key]
                    keep = D.abs().sum(-1) > 0  # tokens that carry a gradient (padding and unread ones do not)
                    X_all.setdefault(key, []).append(X[keep])
                    D_all.setdefault(key, []).append(D[keep])
        finally:
            for h in handles:
                h.remove()
    return {key: (torch.cat(X_all[key]), torch.cat(D_all[key])) for key in X_all}


def _losses(base: BaseModel, sequences: Sequence[TokenSequence], head) -> Tensor:
    """Per-sequence mean CE, differentiable in the activations (the frozen weights get no gradient)."""
    ids, mask, labels = right_pad(list(sequences), base.tokenizer.pad_token_id)
    ids, mask, labels = ids.to(base.device), mask.to(base.device), labels.to(base.device)
    decoder = base.model.model
    if head is None:
        emb = decoder.embed_tokens(ids).requires_grad_(True)  # activations carry gradients from here
        h = decoder(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state
        logits, targets, owner = labelled_positions(base, h, labels)
    else:
        check_after_head(head, ids, labels)
        P = head.length
        emb = decoder.embed_tokens(ids[:, P:]).requires_grad_(True)
        h = decoder(inputs_embeds=emb, attention_mask=mask,
                    **after_head(head, len(ids), emb.shape[1], ids.device)).last_hidden_state  # (N, T − P, H)
        logits, targets, owner = labelled_positions(base, from_head_end(head, h), labels[:, P - 1:])
    return per_sample_mean(F.cross_entropy(logits, targets, reduction="none"), owner, len(ids))  # (N,)


class GradientEncoder:
    """The :class:`~hyper_prag.encoders.Encoder` of the gradient readout: one forward/backward per document."""

    name = "gradient"
    uses_augmentation = True  # its QA pairs are part of the loss whose gradient is read

    def __init__(self, base: BaseModel, config: GradientConfig = GradientConfig(),
                 readout: GradientReadout | None = None) -> None:
        self.base, self.config = base, config
        total = config.rank
        self.spec = LoraSpec(rank=total, alpha=config.alpha, layers=config.layers).for_model(base)
        dims = {m: base.module_dims(m) for m in self.spec.target_modules}
        self.readout = readout or GradientReadout(self.spec, dims, config.step)

    @property
    def apply_from(self) -> str:
        return self.config.apply_from

    def settings(self) -> dict:
        """Encoder identity (enters the store key); a trained readout would add its weights' sha256."""
        return {"name": self.name, **asdict(self.config), "layers": list(self.spec.layers), "format": format_id()}

    def encode(self, documents: Sequence["AugmentedDocument"]) -> list[Lora]:
        """One LoRA per document (stage 0 unless the readout was trained), detached, on the CPU."""
        out = []
        for aug in documents:
            factors = gradient_factors(self.base, aug, self.spec, self.config)
            with torch.no_grad():
                lora = self.readout(factors)
            out.append(lora.to(device=torch.device("cpu"), dtype=torch.float32))
        return out


__all__ = ["GradientConfig", "GradientEncoder", "GradientReadout", "gradient_factors", "low_rank"]

"""The paper's per-document loop on PEFT: the reference the batched trainer is checked and timed against.

One ``peft.get_peft_model`` wraps the base model once; for every document its LoRA weights are reset
(to the same initial values the batched trainer uses), a fresh AdamW is made, and the document's
sequences train one at a time (batch size 1, no padding) with Hugging Face's own causal-LM loss
(``model(input_ids, labels=labels).loss``), epoch after epoch::

    for doc in documents:                   # sequential, as in the paper's code
        reset LoRA; optimizer = AdamW(...)
        for epoch: for seq in doc: loss(seq).backward(); optimizer.step(); zero_grad()

``pad_to`` reproduces the paper's data pipeline exactly: its ``TrainingData`` right-pads every
sequence to ``max_length=3000`` tokens (attention mask 0, label -100 on the padding), so each step
costs a 3,000-token forward and backward whatever the sequence's length. The loss, and so the
trained LoRA, is the same as without padding (padding is masked and sits after the real tokens of
a causal model); only the cost differs. ``None`` (default) trains on the unpadded sequence.

The base model is restored afterwards (``unload()``: PEFT's layers are replaced by the original
linears), also when training raises. The trained weights are read straight from PEFT's
``lora_A`` / ``lora_B`` modules into our :class:`~hyper_prag.lora.Lora` contract (same convention:
lora_A (r, d_in), lora_B (d_out, r), ΔW = alpha/r · B A).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor

from hyper_prag.encoders.per_doc import PerDocConfig
from hyper_prag.lora import Lora, LoraSpec
from hyper_prag.model import BaseModel, module_path
from hyper_prag.sequences import IGNORE, TokenSequence


def _lora_modules(peft_model, spec: LoraSpec) -> dict[tuple[str, int], object]:
    """(module, layer) -> the PEFT LoRA layer wrapping that linear (FFN or attention, :func:`module_path`)."""
    layers = peft_model.base_model.model.model.layers
    return {(m, layer): layers[layer].get_submodule(module_path(m)) for m in spec.target_modules for layer in spec.layers}


def train_reference(base: BaseModel, sequences: Sequence[Sequence[TokenSequence]], initial: Sequence[Lora],
                    spec: LoraSpec, config: PerDocConfig = PerDocConfig(), pad_to: int | None = None
                    ) -> tuple[list[Lora], list[list[float]]]:
    """Trains one LoRA per document sequentially with PEFT, the way the paper's code does.

    Args:
        base: the frozen base model (wrapped by PEFT for the duration, then restored).
        sequences: per document, its tokenized sequences (the batched trainer's exact data).
        initial: per document, its starting LoRA (single, unbatched).
        spec: the bound LoRA spec.
        config: lr, epochs, weight decay (the loss mask is already in the sequences' labels).
        pad_to: right-pad every sequence to this many tokens, as the paper's code does (3,000);
            ``None``: no padding.

    Returns:
        ``(loras, losses)``: one trained LoRA per document (float32, CPU) and each document's per-step losses.
    """
    peft_config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                             layers_to_transform=list(spec.layers), lora_dropout=0.0, bias="none")
    was_training = base.model.training
    peft_model = get_peft_model(base.model, peft_config)
    loras, losses = [], []
    try:
        modules = _lora_modules(peft_model, spec)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        device, pad_id = base.device, base.tokenizer.pad_token_id
        for seqs, start in zip(sequences, initial):
            with torch.no_grad():  # reset the adapter to this document's initial LoRA (not a training step)
                for (m, layer), module in modules.items():
                    i = spec.layers.index(layer)
                    module.lora_A["default"].weight.copy_(start.A[m][i])  # (r, d_in)
                    module.lora_B["default"].weight.copy_(start.B[m][i])  # (d_out, r)
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            doc_losses = []
            for _ in range(config.epochs):
                for seq in seqs:
                    pad = max(0, (pad_to or 0) - len(seq.input_ids))
                    ids = torch.tensor([list(seq.input_ids) + [pad_id] * pad], device=device)  # (1, T)
                    labels = torch.tensor([list(seq.labels) + [IGNORE] * pad], device=device)  # (1, T)
                    mask = torch.tensor([[1] * len(seq.input_ids) + [0] * pad], device=device)  # (1, T)
                    loss: Tensor = peft_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    doc_losses.append(loss.item())
            A = {m: torch.stack([modules[(m, l)].lora_A["default"].weight.detach().float().cpu().clone()
                                 for l in spec.layers]) for m in spec.target_modules}  # (L, r, d_in)
            B = {m: torch.stack([modules[(m, l)].lora_B["default"].weight.detach().float().cpu().clone()
                                 for l in spec.layers]) for m in spec.target_modules}  # (L, d_out, r)
            loras.append(Lora(spec, A, B))
            losses.append(doc_losses)
    finally:
        peft_model.unload()  # puts the original nn.Linear modules back into base.model
        base.model.requires_grad_(False)
        base.model.train(was_training)
    return loras, losses


__all__ = ["train_reference"]

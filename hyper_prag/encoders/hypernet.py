"""The amortized encoder: a trained hypernetwork as an :class:`~hyper_prag.encoders.Encoder`, and its checkpoint files.

The network itself (architecture, doc embeddings, forward pass) is :mod:`hyper_prag.hypernet`; it is
trained by ``hyper-prag train hypernet fit`` (``hyper_prag/training/hypernet.py``). This module is everything the
library does with a trained one::

    texts ──► doc embeddings (frozen LLM, cached) ──► Hypernet ──► one Lora per document    (HypernetEncoder)

Checkpoint files:

* the **inference checkpoint** (what ships in ``hyper_prag/checkpoints/``):
  ``hypernet.safetensors`` (float32 weights, the description as metadata) + ``config.json``
  (description, ``weights_sha256``, training facts) in a folder, or ``NAME.safetensors`` + ``NAME.json``.
  The weights file's sha256 is the encoder's identity in every store key, so :func:`load_hypernet`
  refuses weights that do not hash to the ``weights_sha256`` their JSON records;
* the **Lightning training checkpoint** (``.ckpt``) that ``fit`` writes: read with
  ``torch.load(weights_only=True)`` (tensors and plain containers only; a pickle that would import or
  run anything else is refused before it runs); :func:`export_hypernet` turns it into an inference
  checkpoint (``hyper-prag export-hypernet``).

Both refuse a checkpoint made for another base model.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from hyper_prag.encoders import split_text
from hyper_prag.errors import HyperPragError
from hyper_prag.hypernet import (
    FORMAT_VERSION, EmbeddingCache, Hypernet, HypernetConfig, doc_embeddings, doc_token_states, pad_states,
)
from hyper_prag.io import atomic_write_bytes
from hyper_prag.lora import Lora, LoraSpec
from hyper_prag.model import BaseModel
from hyper_prag.store import entry_sha256

if TYPE_CHECKING:
    from hyper_prag.augment import AugmentedDocument

log = logging.getLogger(__name__)

WEIGHTS_FILE = "hypernet.safetensors"
CONFIG_FILE = "config.json"
CKPT_KEY = "hyper_prag_hypernet"  # the hypernet's description inside a Lightning .ckpt (written by training)
# The shipped checkpoint for the default base model (SmolLM2-135M-Instruct), trained by configs/hypernet/smollm2.yaml.
SHIPPED_CHECKPOINT = Path(__file__).parents[1] / "checkpoints" / "hypernet-smollm2.safetensors"
# Checkpoints for the default base model by the benchmark whose train split made them; a name here is also
# accepted wherever a checkpoint path is (``--hypernet squad``). A missing file is not shipped yet.
SHIPPED_CHECKPOINTS: dict[str, Path] = {
    "fictional": SHIPPED_CHECKPOINT,
    "squad": SHIPPED_CHECKPOINT.with_name("hypernet-smollm2-squad.safetensors"),
}


def resolve_checkpoint(checkpoint: str | Path | None, benchmark: str | Path | None = None) -> Path:
    """The hypernetwork checkpoint file or folder meant by ``checkpoint``.

    Args:
        checkpoint: a path, a name of :data:`SHIPPED_CHECKPOINTS`, or ``None``: the shipped checkpoint
            trained on ``benchmark``.
        benchmark: the benchmark the LoRAs are for (a name of :data:`SHIPPED_CHECKPOINTS` or a corpus folder).

    Raises:
        HyperPragError: a name that is not shipped, or no checkpoint given and none shipped for ``benchmark``.
    """
    def shipped() -> str:  # for the messages only
        return ", ".join(f"{name} ({path.name})" for name, path in SHIPPED_CHECKPOINTS.items() if path.is_file()) or "none"

    if checkpoint is None:
        name = str(benchmark) if benchmark is not None else None
        if name in SHIPPED_CHECKPOINTS and SHIPPED_CHECKPOINTS[name].is_file():
            return SHIPPED_CHECKPOINTS[name]
        raise HyperPragError(f"no hypernetwork checkpoint is shipped for benchmark {name!r}: pass a trained "
                             f"checkpoint's path (--hypernet / --checkpoint PATH) or the name of a shipped one: "
                             f"{shipped()}.")
    if str(checkpoint) in SHIPPED_CHECKPOINTS:
        path = SHIPPED_CHECKPOINTS[str(checkpoint)]
        if not path.is_file():
            raise HyperPragError(f"the {checkpoint} hypernetwork is not shipped in this version ({path} is missing): "
                                 f"train it (scripts/train_hypernets_gpu.sh) and pass its path, or use one of: "
                                 f"{shipped()}.")
        return path
    return Path(checkpoint)


# ----------------------------------------------------------------------------------- checkpoint files


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes (the checkpoint identity in the store key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _paths(checkpoint: str | Path) -> tuple[Path, Path]:
    """``(weights file, JSON description)`` of an inference checkpoint folder or ``NAME.safetensors`` file."""
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / WEIGHTS_FILE, path / CONFIG_FILE


def save_inference_checkpoint(hypernet: Hypernet, folder: str | Path, extra: dict | None = None) -> Path:
    """Writes the shippable checkpoint: float32 weights (config in the metadata) + a JSON description.

    Args:
        hypernet: the trained hypernet.
        folder: output folder (gets ``hypernet.safetensors`` + ``config.json``), or a ``NAME.safetensors``
            file path (gets ``NAME.json`` beside it).
        extra: more JSON-able facts for the JSON file (training config, metrics, base model name).

    Returns:
        The path of the weights file.
    """
    path, config_path = _paths(folder)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    meta = hypernet.describe()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in hypernet.state_dict().items()}
    # One metadata entry (the description carries "format"): safetensors writes several entries in a
    # per-process hash order, and the file's sha256 is the checkpoint identity in store keys.
    # The description carries the tensors' own hash, so the weights file alone is verifiable.
    described = {**meta, "tensors_sha256": entry_sha256(tensors)}
    # Bytes through a plain open(): the umask's permissions (0644); safetensors' save_file writes 0600.
    atomic_write_bytes(path, save(tensors, metadata={"hypernet": json.dumps(described, sort_keys=True)}))
    config_path.write_text(json.dumps({**meta, "weights_sha256": file_sha256(path), **(extra or {})},
                                      indent=2, sort_keys=True))
    return path


_REEXPORT = "re-export it from its training checkpoint (hyper-prag export-hypernet CKPT OUT)"


def _build(meta: dict, state: dict[str, Tensor], base: BaseModel, source: str) -> Hypernet:
    try:
        spec = LoraSpec.from_json(json.dumps(meta["spec"]))
        config = HypernetConfig.from_dict(meta["config"])
        dims = {m: tuple(d) for m, d in meta["dims"].items()}
        embed_dim = int(meta["embed_dim"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise HyperPragError(f"hypernet checkpoint {source} has an invalid description ({err!r}); it is corrupted "
                             f"or not a hyper-prag hypernet: {_REEXPORT}.") from err
    if spec.base_model != base.identity:
        raise HyperPragError(
            f"hypernet checkpoint {source} was trained for base model '{spec.base_model}' but the loaded base "
            f"model is '{base.identity}' ({base.name}). A hypernet only works with the exact model it was trained "
            "for: load that model, or train a hypernet for this one (hyper-prag train hypernet fit --config ...)."
        )
    net = Hypernet(config, spec, dims, embed_dim)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise HyperPragError(f"hypernet checkpoint {source} does not match its own config ({err}); it is corrupted: "
                             f"{_REEXPORT}.") from err
    return net.eval()


def read_training_checkpoint(path: str | Path) -> dict:
    """Reads a Lightning ``.ckpt`` written by hypernet training, without running code from it.

    ``torch.load(weights_only=True)`` rebuilds only tensors and plain containers; a pickle that refers to
    any other callable (as a crafted file would, to run code while loading) is refused before it runs.

    Args:
        path: the ``.ckpt`` file.

    Returns:
        The checkpoint dict; it holds the hypernet's description under ``"hyper_prag_hypernet"`` and its weights
        under ``"state_dict"``.

    Raises:
        HyperPragError: unreadable, not a checkpoint, holds anything but plain data, or no hypernet in it.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler runs nothing, and fails on garbage with any error type
        text = str(err)
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
            reason = next((line.split("WeightsUnpickler error:")[1].split(" was not")[0].strip()
                           for line in text.splitlines() if "WeightsUnpickler error:" in line), "unsupported content")
            raise HyperPragError(
                f"{path} is refused: loading it would build objects other than tensors and plain containers, which "
                f"can run code ({reason[:160]}). Only load .ckpt files written by `hyper-prag train hypernet fit`."
            ) from err
        raise HyperPragError(f"{path} is not a readable hypernet training checkpoint ({type(err).__name__}: "
                             f"{text[:200]}); pass a .ckpt written by `hyper-prag train hypernet fit`.") from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(CKPT_KEY), dict) \
            or not isinstance(ckpt.get("state_dict"), dict):
        raise HyperPragError(f"{path} is not a hypernet training checkpoint (no hypernet description or weights); "
                             "pass a .ckpt written by `hyper-prag train hypernet fit`.")
    return ckpt


def _load(checkpoint: str | Path, base: BaseModel) -> tuple[Hypernet, str]:
    """:func:`load_hypernet`, and the sha256 of the file the hypernet was read from."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise HyperPragError(f"hypernet checkpoint {path} does not exist; pass the folder shipped in "
                             "hyper_prag/checkpoints/ or a .ckpt from training.")
    sha256 = file_sha256(path)
    if path.suffix == ".ckpt":
        ckpt = read_training_checkpoint(path)
        state = {k.removeprefix("hypernet."): v for k, v in ckpt["state_dict"].items() if k.startswith("hypernet.")}
        return _build(ckpt[CKPT_KEY], state, base, str(path)), sha256
    described = path.with_suffix(".json")
    if not described.is_file() and path.name == WEIGHTS_FILE:
        described = path.parent / CONFIG_FILE  # the folder layout
    if described.is_file():
        try:
            recorded = json.loads(described.read_text()).get("weights_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise HyperPragError(f"the description {described} of hypernet checkpoint {path} is corrupted ({err}); "
                                 f"restore both files from the same export, or {_REEXPORT}.") from err
        if recorded is not None and recorded != sha256:
            raise HyperPragError(
                f"hypernet weights {path} have sha256 {sha256[:16]}…, but {described.name} records "
                f"{str(recorded)[:16]}…: the weights were modified or corrupted after export, or the two files come "
                "from different exports. Restore both files from the same export (hyper-prag export-hypernet)."
            )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise HyperPragError(f"hypernet checkpoint {path} is truncated or corrupted ({err}): {_REEXPORT}.") from err
    try:
        meta = json.loads(metadata.get("hypernet", "{}"))
    except json.JSONDecodeError as err:
        raise HyperPragError(f"hypernet checkpoint {path} has a corrupted description ({err}): {_REEXPORT}.") from err
    found = metadata.get("format", meta.get("format") if isinstance(meta, dict) else None)  # older files: both
    if found != FORMAT_VERSION:
        raise HyperPragError(f"{path} is not a hyper-prag hypernet checkpoint (format {found!r}); pass one that "
                             f"`hyper-prag export-hypernet` wrote, or {_REEXPORT}.")
    inner = meta.get("tensors_sha256")
    if inner is None and not described.is_file():
        raise HyperPragError(f"hypernet checkpoint {path} has no description beside it ({described.name}) and no "
                             "hash of its own, so its weights cannot be verified; restore the JSON from the same "
                             "export, or re-export it (hyper-prag export-hypernet CKPT OUT).")
    if inner is not None and entry_sha256(state) != inner:
        raise HyperPragError(f"hypernet weights {path} do not match the hash in their own header: they were modified "
                             "or corrupted after export; re-export them (hyper-prag export-hypernet CKPT OUT).")
    return _build(meta, state, base, str(path)), sha256


def load_hypernet(checkpoint: str | Path, base: BaseModel) -> Hypernet:
    """Loads a hypernet for ``base`` from an inference checkpoint (folder or ``.safetensors``) or a Lightning ``.ckpt``.

    Args:
        checkpoint: a folder holding ``hypernet.safetensors``, that file itself, or a ``.ckpt`` written by
            ``hyper-prag train hypernet fit``.
        base: the loaded base model; must be the one the hypernet was trained for.

    Returns:
        The :class:`~hyper_prag.hypernet.Hypernet` in eval mode on CPU.

    Raises:
        HyperPragError: missing/corrupted file, weights that do not match the ``weights_sha256`` of their JSON,
            a ``.ckpt`` holding more than plain data, or a checkpoint trained for another base model.
    """
    return _load(checkpoint, base)[0]


def checkpoint_sha256(checkpoint: str | Path) -> str:
    """sha256 of the weights file a checkpoint path refers to (folder → its ``hypernet.safetensors``)."""
    path = Path(checkpoint)
    return file_sha256(path / WEIGHTS_FILE if path.is_dir() else path)


# ---------------------------------------------------------------------------------------------- export


def export_hypernet(ckpt: str | Path, out: str | Path, extra: dict | None = None, base: BaseModel | None = None
                    ) -> Path:
    """Turns a Lightning training checkpoint into the shippable inference checkpoint.

    Args:
        ckpt: ``.ckpt`` written during ``hyper-prag train hypernet fit``.
        out: output folder (``hypernet.safetensors`` + ``config.json``) or ``NAME.safetensors`` (+ ``NAME.json``).
        extra: more facts for the JSON (e.g. the validation curve, training commands, a note).
        base: the base model it was trained for; ``None``: the one named in the checkpoint's hyper-parameters.

    Returns:
        The weights file written.
    """
    meta = read_training_checkpoint(ckpt)
    hparams = dict(meta.get("hyper_parameters") or {})
    if base is None:
        from hyper_prag.model import load_base_model, tiny_base_model

        model = hparams.get("model", "tiny")
        base = tiny_base_model() if model == "tiny" else load_base_model(model)
    hypernet = load_hypernet(ckpt, base)
    info = {"base_model_name": base.name, "module_hparams": hparams, "global_step": meta.get("global_step"),
            "source_checkpoint": Path(ckpt).name, **(extra or {})}
    return save_inference_checkpoint(hypernet, out, json.loads(json.dumps(info, default=str)))


def validation_curve(metrics_csvs: Sequence[str | Path]) -> list[dict]:
    """The ``val/*`` rows of Lightning CSV logs (several: one per resumed run, in order), one dict per step."""
    curve: list[dict] = []
    for path in metrics_csvs:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                values = {k: float(v) for k, v in row.items() if k.startswith("val/") and v}
                if values:
                    curve.append({"step": int(row["step"]), **values})
    return curve


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hyper-prag export-hypernet``."""
    parser.add_argument("ckpt", type=Path, help="Lightning .ckpt from `hyper-prag train hypernet fit`")
    parser.add_argument("out", type=Path, help="output folder for hypernet.safetensors + config.json, or NAME.safetensors")
    parser.add_argument("--metrics", type=Path, nargs="*", default=[],
                        help="the run's CSV logs (metrics.csv; one per resumed phase, in order): recorded as the validation curve")
    parser.add_argument("--command", action="append", default=[], dest="commands",
                        help="a command that trained it (repeat for resumed phases): recorded as training_commands")
    parser.add_argument("--note", default=None, help="free text recorded in the JSON (what the metrics mean, caveats)")


def run_export_hypernet(args: argparse.Namespace) -> Path:
    """Runs ``hyper-prag export-hypernet CKPT OUT [--metrics CSV ...] [--command CMD ...] [--note TEXT]``."""
    extra = {"validation_curve": validation_curve(args.metrics)} if args.metrics else {}
    extra |= {"training_commands": args.commands} if args.commands else {}
    extra |= {"note": args.note} if args.note else {}
    path = export_hypernet(args.ckpt, args.out, extra)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


# --------------------------------------------------------------------------------------------- encoder


class HypernetEncoder:
    """The amortized encoder: one hypernet forward per chunk of documents, no augmentation, no training.

    Implements :class:`hyper_prag.encoders.Encoder`.
    """

    name = "hypernet"
    uses_augmentation = False

    def __init__(self, hypernet: Hypernet, base: BaseModel, checkpoint_sha256: str, batch_size: int = 32,
                 cache: EmbeddingCache | None = None) -> None:
        """
        Args:
            hypernet: a trained hypernet for ``base``.
            base: the frozen base model (computes the doc embeddings).
            checkpoint_sha256: identity of the hypernet's weights (enters the store key).
            batch_size: documents per embedding forward.
            cache: optional doc-embedding cache.
        """
        if hypernet.spec.base_model != base.identity:
            raise HyperPragError(f"hypernet was trained for base model '{hypernet.spec.base_model}', not "
                                 f"'{base.identity}'; load the matching checkpoint.")
        self.hypernet, self.base, self.sha256 = hypernet.eval(), base, checkpoint_sha256
        self.batch_size, self.cache = batch_size, cache
        self.spec = hypernet.spec

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, base: BaseModel, **kwargs) -> "HypernetEncoder":
        """Loads ``checkpoint`` (see :func:`load_hypernet`) and wraps it as an encoder."""
        hypernet, sha256 = _load(checkpoint, base)
        return cls(hypernet.to(base.device), base, sha256, **kwargs)

    def settings(self) -> dict:
        """Encoder identity: name, checkpoint sha256, architecture, and how a long document's pieces are joined
        (their mean; stores written when they were summed hold other LoRAs under the old keys)."""
        return {"name": self.name, "checkpoint_sha256": self.sha256, **self.hypernet.config.to_dict(),
                "pieces": "mean"}

    def embed(self, texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """The hypernet's input for ``texts`` (through the cache if one is set).

        Returns:
            ``(doc_embedding, mask)``: pooled ``(N, E)`` and ``None``, or for the attention readout padded
            token states ``(N, T, E)`` and their ``(N, T)`` mask.
        """
        config, tokens = self.hypernet.config, self.hypernet.reads_tokens
        inputs = config.readout == "fastweight"  # each adapted layer's own input states
        args = (self.base, texts, config.embed_layers, config.max_doc_tokens, self.batch_size)
        if self.cache is not None:
            emb = self.cache.get(*args, tokens=tokens, inputs=inputs)
        else:
            emb = doc_token_states(*args, inputs=inputs) if tokens else doc_embeddings(*args)
        return pad_states(emb) if tokens else (emb, None)

    @property
    def window(self) -> int:
        """Tokens of a document the hypernetwork reads at once; longer documents are read piece by piece."""
        return int(self.hypernet.config.max_doc_tokens)

    @torch.no_grad()
    def generate(self, texts: Sequence[str], names: Sequence[str] | None = None) -> list[Lora]:
        """One LoRA per document text (float32, CPU).

        A text longer than :attr:`window` tokens is cut into pieces (:func:`~hyper_prag.encoders.split_text`);
        its LoRA is the mean of the pieces' LoRAs (:meth:`~hyper_prag.hypernet.Hypernet.document_lora`: rank
        concatenation, each piece weighted 1/P), so no part of it goes unread and its size stays that of one
        window; a warning names the document. The bias LoRA (``bias_rank`` > 0) is added once per document.

        Args:
            texts: the documents' texts.
            names: what the warning about a split document calls each one (e.g. its id); default: its opening.
        """
        if not texts:
            return []
        names = list(names) if names is not None else [f"the document {t[:40]!r}…" for t in texts]
        pieces = [split_text(self.base, text, self.window) for text in texts]
        flat = [p for ps in pieces for p in ps]
        device = next(self.hypernet.parameters()).device
        loras: list[Lora] = []
        for i in range(0, len(flat), self.batch_size):
            emb, mask = self.embed(flat[i : i + self.batch_size])  # (n, E) | (n, T, E) + (n, T)
            lora = self.hypernet(emb.to(device), None if mask is None else mask.to(device), bias=False)
            loras += lora.to("cpu").detach().unbind()
        out, start = [], 0
        for ps, name in zip(pieces, names):
            out.append(self.hypernet.document_lora(loras[start : start + len(ps)], name).to("cpu").detach())
            start += len(ps)
        return out

    def encode(self, documents: Sequence["AugmentedDocument"]) -> list[Lora]:
        """One LoRA per document, reading only ``doc.text`` (augmentation is not used).

        Args:
            documents: (augmented) documents.

        Returns:
            One single LoRA per document, in order.
        """
        ids = [getattr(doc, "doc_id", None) or getattr(doc, "id", "?") for doc in documents]  # a plain Document too
        return self.generate([doc.text for doc in documents], [f"document {i!r}" for i in ids])


__all__ = ["HypernetEncoder", "load_hypernet", "save_inference_checkpoint", "checkpoint_sha256", "file_sha256",
           "read_training_checkpoint", "export_hypernet", "validation_curve", "add_export_arguments",
           "run_export_hypernet", "SHIPPED_CHECKPOINT", "SHIPPED_CHECKPOINTS", "resolve_checkpoint", "WEIGHTS_FILE", "CONFIG_FILE"]

"""Recipes: what ``encode`` records in a LoRA store so that the online path only reads.

A store key (:func:`hyper_prag.store.store_key`) hashes a document's text (and, with templated
augmentation, the content of its question-answer pairs) with everything else that made its LoRA: the
base model's identity, the LoRA spec, the augmentation settings and the encoder's settings (per-document: the trainer's hyper-parameters and, with warm-up initialisation, the sha256
of the warm-up LoRA; hypernetwork: the checkpoint's sha256). Everything but the text is one
:class:`Recipe`. ``encode`` writes its recipe into the store, beside the LoRAs it made::

    <store>/recipes/<recipe id>.json                 the recipe (id = sha256 of its key inputs)
    <store>/recipes/<recipe id>.warmup.safetensors   the warm-up LoRA, float32 (warm-up recipes only)

``ask`` and ``evaluate`` read the recipe back and compute the same keys, so they never parse an
encode config nor train a warm-up LoRA; ``evaluate`` can also rebuild the encoder from the recipe
(trainer settings, augmentation, warm-up LoRA) to encode retrieved documents that are missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hyper_prag.errors import HyperPragError
from hyper_prag.lora import Lora, LoraSpec, load_lora, lora_sha256, save_lora
from hyper_prag.store import StoreIssue, canonical_json, store_key, store_writes

log = logging.getLogger(__name__)

RECIPE_FORMAT = "hyper-prag-recipe/1"
RECIPES_DIR = "recipes"
# Encoder settings that name content by its hash (the warm-up LoRA, the replayed pairs): in the key, not trainer fields.
CONTENT_HASHES = ("warmup_sha256", "replay_sha256")


@dataclass(frozen=True)
class Recipe:
    """Everything but the document text that enters a store key, plus how to redo it."""

    encoder: str  # "per-doc" | "hypernet"
    base_identity: str  # hyper_prag.model.model_identity of the base model
    spec: LoraSpec  # bound to the base model (layers filled in)
    augmentation: Mapping[str, Any]  # augmentation settings in the key ({} for the hypernetwork)
    settings: Mapping[str, Any]  # encoder.settings(): trainer hyper-parameters, warm-up / checkpoint sha256
    augment: Mapping[str, Any] | None = None  # AugmentConfig fields (per-doc), to augment again
    provenance: Mapping[str, Any] = field(default_factory=dict)  # how it was made (not in the key)

    def key(self, text: str, pairs: Sequence[Sequence[str]] | None = None) -> str:
        """The store key of the LoRA this recipe makes for a document.

        Args:
            text: the document's text.
            pairs: the corpus's own (question, answer) pairs of the document (``Corpus.doc_qa``). With
                templated augmentation they are the training data, so their content enters the key: a
                document whose pairs were edited gets a new key and is encoded again.
        """
        augmentation = dict(self.augmentation)
        if pairs and augmentation.get("source") == "template":
            augmentation["pairs_sha256"] = hashlib.sha256(canonical_json([list(p) for p in pairs]).encode()).hexdigest()
        return store_key(text, self.base_identity, self.spec, augmentation, self.settings)

    @property
    def id(self) -> str:
        """16 hex digits of the sha256 over the key inputs: equal ids, equal keys."""
        spec = {"rank": self.spec.rank, "alpha": self.spec.alpha, "modules": list(self.spec.target_modules),
                "layers": list(self.spec.layers)}
        payload = canonical_json({"encoder": self.encoder, "base": self.base_identity, "spec": spec,
                              "augmentation": dict(self.augmentation), "settings": dict(self.settings)})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def uses_warmup(self) -> bool:
        return "warmup_sha256" in self.settings

    def describe(self) -> str:
        """One line for listings and error messages."""
        keep = {k: v for k, v in self.settings.items() if k not in ("name", *CONTENT_HASHES)}
        return (f"{self.id} {self.encoder} r={self.spec.rank} alpha={self.spec.alpha:g} {canonical_json(keep)} "
                f"augmentation={canonical_json(dict(self.augmentation))}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECIPE_FORMAT, "id": self.id, "encoder": self.encoder, "base_identity": self.base_identity,
                "spec": json.loads(self.spec.to_json()), "augmentation": dict(self.augmentation),
                "settings": dict(self.settings), "augment": dict(self.augment) if self.augment is not None else None,
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        return cls(encoder=data["encoder"], base_identity=data["base_identity"],
                   spec=LoraSpec.from_json(json.dumps(data["spec"])), augmentation=dict(data["augmentation"]),
                   settings=dict(data["settings"]), augment=data.get("augment"),
                   provenance=dict(data.get("provenance") or {}))


def recipe_for(encoder: Any, base: Any, augment_config: Any = None, spec: LoraSpec | None = None,
               provenance: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe an encoder writes under.

    Args:
        encoder: an ``Encoder`` (``name``, ``uses_augmentation``, ``settings()``, optionally ``spec``).
        base: the base model (its ``identity``; the spec is bound to it).
        augment_config: the ``AugmentConfig`` (used when ``encoder.uses_augmentation``).
        spec: the LoRA spec; defaults to ``encoder.spec``.
        provenance: how the recipe was made (recorded, not part of the key).
    """
    uses = bool(encoder.uses_augmentation) and augment_config is not None
    if encoder.uses_augmentation and augment_config is None:
        raise HyperPragError(f"encoder '{encoder.name}' trains on augmented documents: pass an AugmentConfig.")
    spec = (spec or getattr(encoder, "spec", None) or LoraSpec()).for_model(base)
    return Recipe(encoder=encoder.name, base_identity=base.identity, spec=spec,
                  augmentation=augment_config.settings() if uses else {}, settings=encoder.settings(),
                  augment=asdict(augment_config) if uses else None, provenance=dict(provenance or {}))


def _folder(store_root: str | Path) -> Path:
    return Path(store_root) / RECIPES_DIR


def warmup_path(store_root: str | Path, recipe: Recipe) -> Path:
    return _folder(store_root) / f"{recipe.id}.warmup.safetensors"


def record_recipe(store_root: str | Path, recipe: Recipe, warmup: Lora | None = None) -> Path:
    """Writes ``recipe`` (and its warm-up LoRA) into the store; idempotent.

    A recipe file of the same id that cannot be used (truncated, edited by hand) is written again: its id
    names the key inputs this run has in hand, so the new file is the one that was meant.

    Args:
        store_root: the LoRA store folder.
        recipe: the recipe of an encode run.
        warmup: the warm-up LoRA (required when the recipe uses one).

    Returns:
        The recipe's JSON file.
    """
    from hyper_prag.io import atomic_write_text

    if recipe.uses_warmup and warmup is None and not warmup_path(store_root, recipe).is_file():
        raise HyperPragError("a warm-up recipe needs its warm-up LoRA to be recorded with it.")
    folder = _folder(store_root)
    path = folder / f"{recipe.id}.json"
    recorded = path.is_file()  # the same id: the same key inputs, recorded already
    if recorded:
        _, why = _read_recipe(path)
        if why:
            log.warning("the recipe file %s %s; writing it again from this encode run (its LoRAs keep their keys)",
                        path, why)
            recorded = False
    with store_writes(store_root, "record the recipe in"):
        folder.mkdir(parents=True, exist_ok=True)
        if warmup is not None and not warmup_path(store_root, recipe).is_file():
            save_lora(warmup.detach().to("cpu"), warmup_path(store_root, recipe))  # float32: its hash is in the key
        if not recorded:
            atomic_write_text(path, json.dumps(recipe.to_dict(), indent=2, default=str) + "\n")
    return path


_RECIPE_FIX = ("Re-run the `hyper-prag encode` command that made it: it writes the recipe again and re-uses every "
               "LoRA already stored (their keys do not change); or delete it if no encode run of yours made it.")


def _read_recipe(path: Path) -> tuple[Recipe | None, str]:
    """A recipe file parsed: ``(recipe, "")``, or ``(None, why it cannot be used)``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        recipe = Recipe.from_dict(data)
    except OSError as err:
        return None, f"is unreadable ({err.strerror or err})"
    except ValueError as err:  # also UnicodeDecodeError
        return None, f"is not valid JSON ({err}): it was truncated or edited by hand"
    except (KeyError, TypeError, AttributeError, HyperPragError) as err:
        return None, f"is not a recipe ({type(err).__name__}: {err}): it was edited by hand"
    if recipe.id != path.stem:  # the file name is the id of the key inputs it was written with
        return None, f"holds the key inputs of recipe {recipe.id}, not of {path.stem}: it was edited by hand"
    return recipe, ""


def check_recipes(store_root: str | Path) -> list[StoreIssue]:
    """Every recorded recipe that ``ask`` and ``encode`` cannot use (unparseable, or a warm-up recipe whose warm-up
    LoRA is missing or changed), each with what to do; for ``hyper-prag store verify`` and ``gc``."""
    issues = []
    folder = _folder(store_root)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        recipe, why = _read_recipe(path)
        if recipe is not None and recipe.uses_warmup:
            try:
                load_warmup(store_root, recipe)
            except HyperPragError as err:
                why = str(err)
        if why:
            issues.append(StoreIssue(str(path), why if recipe is not None else f"recipe file {why}. {_RECIPE_FIX}"))
    return issues


def list_recipes(store_root: str | Path, base_identity: str | None = None, encoder: str | None = None) -> list[Recipe]:
    """The recipes recorded in a store, optionally only those of one base model and encoder (sorted by id)."""
    folder = _folder(store_root)
    out: list[Recipe] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        recipe, why = _read_recipe(path)
        if recipe is None:
            log.warning("skipping the recipe file %s: it %s. %s", path, why, _RECIPE_FIX)
            continue
        if (base_identity is None or recipe.base_identity == base_identity) and (encoder is None or recipe.encoder == encoder):
            out.append(recipe)
    return out


def find_recipe(store_root: str | Path, base_identity: str, encoder: str = "per-doc",
                recipe_id: str | None = None) -> Recipe:
    """The one recipe the online path reads keys with.

    Args:
        store_root: the LoRA store folder.
        base_identity: the base model's identity (a recipe of another model never matches).
        encoder: ``per-doc`` or ``hypernet``.
        recipe_id: a recipe id (or a prefix of one); ``None``: the store's only recipe for this model.

    Raises:
        HyperPragError: no recipe, an ambiguous choice, or an unknown id; the message lists the recipes.
    """
    found = list_recipes(store_root, base_identity, encoder)
    if recipe_id is not None:
        found = [r for r in found if r.id.startswith(recipe_id)]
    listing = "".join(f"\n  {r.describe()}" for r in list_recipes(store_root, base_identity, encoder))
    if not found:
        what = f"recipe {recipe_id!r}" if recipe_id else f"{encoder} LoRAs"
        folder = _folder(store_root)
        broken = [p.name for p in sorted(folder.glob("*.json")) if _read_recipe(p)[0] is None] if folder.is_dir() else []
        hint = (f" It also holds {len(broken)} unusable recipe files ({', '.join(broken)}; `hyper-prag store verify` "
                "says why): delete them and re-run the encode commands that made them." if broken else "")
        raise HyperPragError(f"the LoRA store {store_root} holds no {what} for base model {base_identity}: encode "
                             f"documents first with `hyper-prag encode` (same model and store).{hint}{listing}")
    if len(found) > 1:
        raise HyperPragError(f"the LoRA store {store_root} holds {len(found)} {encoder} recipes for this base model; "
                             f"choose one with --recipe ID:{listing}")
    return found[0]


def load_warmup(store_root: str | Path, recipe: Recipe) -> Lora:
    """The warm-up LoRA recorded with a warm-up recipe, checked against the sha256 in its settings."""
    path = warmup_path(store_root, recipe)
    if not path.is_file():
        raise HyperPragError(f"recipe {recipe.id} in {store_root} has no recorded warm-up LoRA ({path}); "
                             "re-run `hyper-prag encode` with the same config to record it.")
    lora = load_lora(path)
    if lora_sha256(lora) != recipe.settings.get("warmup_sha256"):
        raise HyperPragError(f"the warm-up LoRA {path} does not match recipe {recipe.id}: it was changed or "
                             "corrupted; delete it and re-run `hyper-prag encode` with the same config.")
    return lora

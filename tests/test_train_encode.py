"""hyper_prag/training/encode.py: the lightning.Trainer runner trains the very LoRAs of the library's loop; its CLI's ``runner``
key; the library never imports (nor ships) the training package."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import torch
from setuptools import find_packages

from hyper_prag.encoders.per_doc import PerDocConfig, fit_steps, initial_loras, train_bank
from hyper_prag.lora import LoraSpec
from hyper_prag.prompts import training_sequence
from hyper_prag.sequences import tokenize
from hyper_prag.store import LoraStore
from hyper_prag.training.encode import lightning_runner, run

ROOT = Path(__file__).parents[1]
DOCS = [
    "The river Quellmar rises in the Vostra hills and flows north for 212 km to the Sea of Ambrel.",
    "Ardent Loom was founded in 1873 by Mira Castell.",
    "Pell is a dog.",
]
QA = [
    [("Where does the Quellmar rise?", "the Vostra hills"), ("How long is the Quellmar?", "212 km")],
    [("Who founded Ardent Loom?", "Mira Castell")],
    [("What is Pell?", "a dog"), ("Is Pell a cat?", "no"), ("Name the dog.", "Pell")],
]


class RecordingLogger:
    """Stands in for a Lightning logger: records what the bank logs."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.rows.append((step, metrics))


def test_lightning_runner_trains_bit_identical_loras_to_the_loop(tiny):
    # Both runners make the same calls on the same bank in the same order (zero_grad, loss, backward, AdamW step,
    # read-out) in float32 on one device, so every LoRA is equal bit for bit, not merely close.
    config = PerDocConfig(epochs=2, weight_decay=0.01)
    spec = LoraSpec().for_model(tiny)
    seqs = [[tokenize(tiny, *training_sequence(tiny, d, q, a), config.loss_on, config.max_length) for q, a in qa]
            for d, qa in zip(DOCS, QA)]
    initial = initial_loras(DOCS, spec, {m: tiny.module_dims(m) for m in spec.target_modules}, config)
    logs = {"loop": RecordingLogger(), "lightning": RecordingLogger()}
    loop, loop_losses = train_bank(tiny, seqs, initial, config, fit=fit_steps, logger=logs["loop"], step_offset=7)
    trained, lightning_losses = train_bank(tiny, seqs, initial, config, fit=lightning_runner(),
                                           logger=logs["lightning"], step_offset=7)
    assert len(loop_losses) == len(lightning_losses) == 6  # 2 epochs of (2, 1, 3) sequences
    assert all(torch.equal(a, b) for a, b in zip(loop_losses, lightning_losses))
    for m in spec.target_modules:
        assert torch.equal(loop.A[m], trained.A[m]) and torch.equal(loop.B[m], trained.B[m])
        assert not torch.equal(loop.B[m], initial.B[m])  # it trained
    assert logs["loop"].rows == logs["lightning"].rows and logs["loop"].rows[0][0] == 7  # global steps continue


def test_runner_key_picks_the_runner_and_both_store_the_same_loras(tmp_path):
    stores = {}
    for runner in ("lightning", "loop"):
        store = tmp_path / runner
        report = run(["--config", str(ROOT / "configs" / "encode" / "tiny.yaml"), "--limit", "3", "--chunk_size", "2",
                      "--store", str(store), "--store_dtype", "float32", "--logger", "none", "--progress", "false",
                      "--runner", runner])
        assert (report.encoded, report.skipped) == (3, 0)
        stores[runner] = LoraStore(store)
    assert sorted(stores["lightning"].keys()) == sorted(stores["loop"].keys())  # the runner is in no store key
    for key in stores["loop"].keys():
        a, b = stores["lightning"].get(key), stores["loop"].get(key)
        assert all(torch.equal(a.A[m], b.A[m]) and torch.equal(a.B[m], b.B[m]) for m in a.spec.target_modules)


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (lazy imports in functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_or_ships_the_training_package():
    sources = sorted((ROOT / "hyper_prag").rglob("*.py"))
    assert len(sources) > 20
    for path in sources:
        bad = {name for name in _imported_modules(path) if name == "train" or name.startswith("train.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = find_packages(str(ROOT), include=find["include"])
    assert "hyper_prag" in shipped and "hyper_prag.encoders" in shipped
    assert not [p for p in shipped if p == "train" or p.startswith(("train.", "tests", "benchmarks"))]

"""The package's layers, read from the source: no import circle, no import of a higher layer from a lower one.

Every ``import`` counts, also the lazy ones inside functions and those under ``TYPE_CHECKING``: a
circle that only type checkers or a late call walk is still a circle for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "hyper_prag"

# module -> layer; a module may import modules of its own layer or below (never above), and no circles.
LAYERS: dict[str, int] = {
    # the contract and the machine
    "errors": 0, "paths": 0, "io": 0,
    "lora": 1, "model": 1,
    # stages that know nothing of the online path
    "corpus": 2, "benchmark": 2, "realdata": 2, "store": 2, "retrieve": 2, "combine": 2, "inject": 2,
    "prompts": 2, "methods": 2, "scoring": 2, "augment": 2, "sequences": 2, "teacher": 2, "activated": 2,
    "clauses": 0, "extractive": 1,  # text only: sentences read, questions written
    # encoders and what encode records
    "encoders": 3, "encoders.per_doc": 3, "encoders.hypernet": 3, "encoders.peft_reference": 3, "hypernet": 3,
    "encoders.refine": 3, "encoders.gradient": 3,
    "recipes": 3,
    "encode": 4, "sources": 4, "pipeline": 4,
    "dynamic": 5, "plots": 5,
    "evaluate": 6,
    "assemble": 7, "tracking": 7,
    "api": 8,
    "demo": 9, "cli": 9, "__init__": 9,
    "flags": 1,  # flag spelling and --config names (paths)
    # the trainers: Lightning modules, data modules and their command lines (cli runs them)
    "training": 9, "training.hypernet": 9, "training.hypernet_data": 9, "training.encode": 9,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every ``hyper_prag`` module (and ``train``) that a file imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "train" or name.startswith("train."):
                found.add("train")
            elif name.startswith("hyper_prag."):
                found.add(name.removeprefix("hyper_prag."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports(path):
            if imported == "train":
                targets.add("train")
            # "encoders.per_doc.PerDocEncoder" -> the longest prefix that is a module
            parts = imported.split(".")
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in modules:
                    targets.add(".".join(parts[:n]))
                    break
        edges[name] = targets - {name}
    return edges


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_no_module_imports_a_higher_layer_or_train():
    wrong = [(a, b) for a, targets in graph().items() for b in targets
             if b == "train" or LAYERS.get(b, 99) > LAYERS.get(a, -1)]
    assert not wrong, f"imports that reach up (module -> imported): {wrong}"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import circles: {cycles}"


@pytest.mark.parametrize("text, expected", [
    ("from hyper_prag.pipeline import Pipeline\nimport hyper_prag.store\n", {"pipeline", "pipeline.Pipeline", "store"}),
    ("def f():\n    from train.hypernet import main\n", {"train"}),
])
def test_the_import_reader_sees_lazy_imports(tmp_path, text, expected):
    path = tmp_path / "m.py"
    path.write_text(text)
    assert imports(path) == expected


@pytest.mark.parametrize("verb", ["encode", "augment", "index", "ask", "evaluate", "demo"])
def test_every_model_loading_verb_takes_device_and_dtype(verb, capsys):
    from hyper_prag.cli import main

    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = capsys.readouterr().out
    assert "--device" in text and "--dtype" in text and "--local-files-only" in text

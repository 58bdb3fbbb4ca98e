"""The F1 cost of storing per-document LoRAs as int8 instead of bf16, measured through the harness.

    .venv/bin/python benchmarks/int8_cost.py results/demo        # after `hyper-prag demo` (or evaluate)

Reads a finished ``hyper-prag evaluate`` / ``hyper-prag demo`` run (its ``results.json``), copies every
LoRA its ``prag`` rows applied from the bf16 store it used into a temporary int8 store (per-row absmax
quantization, :func:`hyper_prag.store.quantize_int8`), then runs the same questions through the same
harness twice, ``prag`` and ``prag-both`` reading the bf16 store and the int8 store, with ``--no-encode``.
Prints F1 / EM per store, the per-question agreement of the answers, and bytes per document.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path


def copy_recipes(src: Path, dst: Path) -> None:
    """Copies the recipes (and warm-up LoRAs) recorded in one store into another."""
    import shutil

    from hyper_prag.recipes import RECIPES_DIR

    if (src / RECIPES_DIR).is_dir():
        shutil.copytree(src / RECIPES_DIR, dst / RECIPES_DIR, dirs_exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder of a finished evaluate/demo run (results.json)")
    parser.add_argument("--methods", default="prag,prag-both")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from hyper_prag.api import evaluate, recorded_settings
    from hyper_prag.assemble import default_store_path
    from hyper_prag.store import LoraStore

    done = json.loads((args.results / "results.json").read_text())
    config = done["config"]
    keys = sorted({k for m in done["methods"] if m["name"].startswith("prag")
                   for p in m["predictions"] for k in p["lora_names"]})
    if not keys:
        raise SystemExit(f"{args.results} has no prag rows with applied LoRAs")
    source = LoraStore(config.get("store") or default_store_path(config["model"]))
    # the same run, with the store chosen below
    settings = recorded_settings({**config, "store": None}) | {"encode_missing": False}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="int8-store-") as tmp:
        int8 = LoraStore(Path(tmp) / "store", dtype="int8")
        int8.put_many([(k, source.get(k), source.meta(k)) for k in keys])
        copy_recipes(source.root, int8.root)  # the int8 store answers under the same recipe's keys
        for name, store in (("bf16", source.root), ("int8", int8.root)):
            runs[name] = evaluate(args.methods, **settings, store=store, out=f"{tmp}/{name}")
        bytes_per_doc = {"bf16": source.stats()["bytes_per_document"], "int8": int8.stats()["bytes_per_document"]}
    print(f"\n{len(keys)} LoRAs, {done['config']['questions']} questions of {config['benchmark']}")
    for method in args.methods.split(","):
        a, b = runs["bf16"].method(method), runs["int8"].method(method)
        same = sum(x["prediction"] == y["prediction"] for x, y in zip(a.predictions, b.predictions))
        f1 = {n: r.method(method).scores["total"]["f1"]["mean"] for n, r in runs.items()}
        em = {n: r.method(method).scores["total"]["em"]["mean"] for n, r in runs.items()}
        print(f"{method:10s} F1 bf16 {100 * f1['bf16']:.1f} int8 {100 * f1['int8']:.1f} (Δ {100 * (f1['int8'] - f1['bf16']):+.1f}); "
              f"EM bf16 {100 * em['bf16']:.1f} int8 {100 * em['int8']:.1f}; identical answers {same}/{len(a.predictions)}")
    print(f"bytes per document: bf16 {bytes_per_doc['bf16']:,.0f}, int8 {bytes_per_doc['int8']:,.0f}")


if __name__ == "__main__":
    main()

"""Encoding cost per document, side by side: per-document LoRA training vs the hypernetwork's forward pass.

    .venv/bin/python benchmarks/encode_cost.py                                  # SmolLM2, 12 test docs
    .venv/bin/python benchmarks/encode_cost.py --per-doc-config demo real --docs 12 --out results/encode_cost.json
    .venv/bin/python benchmarks/encode_cost.py --model tiny --checkpoint CKPT --docs 4   # smoke test

On the same fictional test documents, in one process:

* **per-document** (:class:`~hyper_prag.encoders.per_doc.PerDocEncoder`), once per ``--per-doc-config``
  (a shipped encode config's name or a YAML): augmentation (that config's source) + training, chunks of
  the config's ``chunk_size``, documents sorted by length;
* **hypernetwork** (:class:`~hyper_prag.encoders.hypernet.HypernetEncoder`, the shipped checkpoint by
  default): every document in one call (batched; the median of ``--repeats`` calls) and one document
  per call (the median over the documents), after one warm-up call.

Each is timed in wall seconds and in this process's CPU seconds (``time.process_time``: the work done,
which other jobs on the machine change far less than the wall time); the ratios per-document / hypernet
are reported for both. Model load is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypernet_vs_perdoc import begin, write_json  # noqa: E402


def timed(fn) -> tuple[object, float, float]:
    """``fn()``, its wall seconds and its CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def per_doc_cost(base, corpus, docs, config_path: Path) -> dict:
    """Augmentation + per-document training of ``docs`` with the settings of one encode YAML, built as
    ``hyper-prag encode`` builds it. A warm-up LoRA (``init: warmup``, the paper's recipe) is trained once
    per corpus before any document: timed apart (``warmup_*_s``), not in the per-document figures."""
    from hyper_prag.api import load_encode_config
    from hyper_prag.assemble import per_doc_from_config
    from hyper_prag.augment import augment_documents

    config = load_encode_config(config_path)
    (per_doc, warmup_wall, warmup_cpu) = timed(lambda: per_doc_from_config(base, corpus, config))
    encoder, augment = per_doc.encoder, per_doc.augment_config
    chunk = int(config["chunk_size"])  # the encode schema's default when a YAML omits it

    def run():
        augmented = augment_documents(docs, augment, base=base, corpus=corpus)
        order = sorted(range(len(docs)), key=lambda i: len(docs[i].text))  # chunk by length: little padding
        for c in range(0, len(order), chunk):
            encoder.encode([augmented[i] for i in order[c : c + chunk]])

    _, wall, cpu = timed(run)
    row = {"config": str(config_path), "chunk_size": chunk, "augmentation": augment.settings(),
           "init": encoder.config.init, "wall_s_per_doc": wall / len(docs), "cpu_s_per_doc": cpu / len(docs)}
    if encoder.config.init == "warmup":
        row |= {"warmup_wall_s": warmup_wall, "warmup_cpu_s": warmup_cpu}
    return row


def hypernet_cost(base, docs, checkpoint: Path, repeats: int) -> dict:
    """The hypernetwork's LoRAs for ``docs``: batched (median of ``repeats`` calls) and one document per call."""
    from hyper_prag.encoders.hypernet import HypernetEncoder

    encoder = HypernetEncoder.from_checkpoint(checkpoint, base)
    texts = [d.text for d in docs]
    encoder.generate(texts[:2])  # warm-up (first-call allocations), not timed
    batched = [timed(lambda: encoder.generate(texts))[1:] for _ in range(repeats)]
    single = [timed(lambda t=t: encoder.generate([t]))[1:] for t in texts]
    return {"checkpoint": str(checkpoint), "readout": encoder.hypernet.config.readout,
            "wall_s_per_doc_batched": statistics.median(w for w, _ in batched) / len(docs),
            "cpu_s_per_doc_batched": statistics.median(c for _, c in batched) / len(docs),
            "wall_s_per_doc_single": statistics.median(w for w, _ in single),
            "cpu_s_per_doc_single": statistics.median(c for _, c in single)}


def main(argv: list[str] | None = None) -> dict:
    from hyper_prag.encoders.hypernet import SHIPPED_CHECKPOINT

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (must match the checkpoint)")
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT, help="hypernetwork checkpoint")
    parser.add_argument("--per-doc-config", nargs="+", default=["demo"],
                        help="encode configs (shipped names or YAML paths) of the per-document rows")
    parser.add_argument("--docs", type=int, default=12, help="fictional test documents")
    parser.add_argument("--repeats", type=int, default=5, help="batched hypernet calls (their median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args, argv = begin(parser, argv)

    from hyper_prag import assemble
    from hyper_prag.paths import config_file

    base = assemble.load_model(args.model)
    corpus = assemble.load_corpus("fictional")
    docs = list(corpus.split("test").documents[: args.docs])
    result: dict = {"command": "python benchmarks/encode_cost.py " + " ".join(argv), "documents": len(docs),
                    "threads": torch.get_num_threads()}
    result["hypernet"] = hypernet = hypernet_cost(base, docs, args.checkpoint, args.repeats)
    rows = []
    for name in args.per_doc_config:
        row = per_doc_cost(base, corpus, docs, config_file(name, "encode"))
        for clock in ("wall", "cpu"):
            for mode in ("batched", "single"):
                row[f"{clock}_ratio_over_hypernet_{mode}"] = (row[f"{clock}_s_per_doc"]
                                                              / hypernet[f"{clock}_s_per_doc_{mode}"])
        rows.append(row)
        result["per_doc"] = rows
        write_json(result, args.out)  # after every row: a later config that fails loses none of them
    return result


if __name__ == "__main__":
    main()

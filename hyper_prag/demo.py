"""``hyper-prag demo`` (what ``make demo`` runs): the whole job, end to end, on a small slice.

1. Loads SmolLM2-135M-Instruct from the packaged GGUF (converted once, cached).
2. Takes a slice of the fictional benchmark's *test* documents (facts no model can know) and the
   test questions answerable from that slice, and saves it as a corpus folder.
3. Runs :func:`hyper_prag.api.evaluate` on it with every method: the harness builds the BM25 index, augments
   and encodes the retrieved documents per document into the LoRA store (paper §3.2), generates the
   hypernetwork's LoRAs with the shipped checkpoint, answers every question with every method, and
   prints the comparison table; results.json/results.md and the F1 and latency plots are written.

Everything is cached: a second run re-uses the converted model, the augmentations and the store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hyper_prag.corpus import Corpus, save_corpus
from hyper_prag.errors import HyperPragError
from hyper_prag.evaluate import Results
from hyper_prag.methods import METHOD_NAMES, parse_methods
from hyper_prag.paths import cache_dir

log = logging.getLogger(__name__)

DEMO_DOCS = 12  # test documents in the demo slice
DEMO_PER_TYPE = 3  # questions per question type
DEMO_ENCODE_CONFIG = "configs/encode/demo.yaml"  # per-document settings of the demo's LoRAs


def shipped_checkpoint() -> Path | None:
    """The hypernetwork checkpoint shipped in the package for SmolLM2, if there is one."""
    from hyper_prag.encoders.hypernet import SHIPPED_CHECKPOINT

    return SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.is_file() else None


def demo_slice(corpus: Corpus, n_docs: int, per_type: int) -> Corpus:
    """A self-contained slice of the test split: ``n_docs`` documents and up to ``per_type`` questions of
    each type whose supporting documents all lie in the slice (so retrieval runs over the slice).

    Args:
        corpus: the full benchmark.
        n_docs: documents in the slice.
        per_type: questions kept per question type.

    Returns:
        The slice, named ``<benchmark>-demo``.
    """
    test = corpus.split("test")
    by_type: dict[str, list] = {}
    for q in test.questions:
        by_type.setdefault(q.type, []).append(q)
    chosen_docs: dict[str, None] = {}
    questions = []
    # Take questions round-robin over types while their documents still fit in the slice.
    for i in range(max(len(v) for v in by_type.values())):
        for qtype in sorted(by_type):
            qs = by_type[qtype]
            if i >= len(qs) or sum(q.type == qtype for q in questions) >= per_type:
                continue
            new = [d for d in qs[i].doc_ids if d not in chosen_docs]
            if len(chosen_docs) + len(new) <= n_docs:
                chosen_docs.update(dict.fromkeys(new))
                questions.append(qs[i])
    docs = [test.document(d) for d in chosen_docs]
    return Corpus(f"{corpus.name}-demo", tuple(docs), tuple(questions),
                  {d.id: corpus.doc_qa[d.id] for d in docs if d.id in corpus.doc_qa})


def run_demo(docs: int = DEMO_DOCS, per_type: int = DEMO_PER_TYPE, methods: str | Sequence[str] = METHOD_NAMES,
             hypernet: str | Path | None = None, encode_config: str | Path | None = DEMO_ENCODE_CONFIG,
             out: str | Path = "results/demo", **tracking: Any) -> Results:
    """Runs the demo: slice the benchmark, then the harness with every method.

    Args:
        docs: test documents in the slice.
        per_type: questions per question type.
        methods: the methods to compare (default: all).
        hypernet: hypernetwork checkpoint (default: the shipped one; without one the hypernet methods are skipped).
        encode_config: per-document encoding settings (the encode defaults if the file is missing).
        out: folder for the table, JSON and plots.
        tracking: ``wandb_project`` / ``wandb_mode`` / ``wandb_dir`` of :func:`hyper_prag.api.evaluate`.

    Returns:
        The harness :class:`~hyper_prag.evaluate.Results`.
    """
    from hyper_prag.api import evaluate
    from hyper_prag.benchmark import load_or_make_default

    corpus = demo_slice(load_or_make_default(), docs, per_type)
    if not corpus.questions:
        raise HyperPragError("the demo slice has no questions; raise --docs.")
    folder = save_corpus(corpus, cache_dir("data") / corpus.name)
    names = parse_methods(methods)
    checkpoint = hypernet or shipped_checkpoint()
    if checkpoint is None and any(m.startswith("hypernet") for m in names):
        log.warning("no hypernetwork checkpoint shipped or given: skipping the hypernet methods")
        names = [m for m in names if not m.startswith("hypernet")]
    config = encode_config if encode_config and Path(encode_config).is_file() else None
    log.info("demo: %d documents, %d questions, methods %s", len(corpus.documents), len(corpus.questions), names)
    return evaluate(names, benchmark=str(folder), split="test", hypernet=checkpoint, encode_config=config, out=out,
                    **tracking)

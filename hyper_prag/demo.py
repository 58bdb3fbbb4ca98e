"""``hyper-prag demo`` (what ``make demo`` runs): the whole job, end to end, on a small slice.

1. Loads SmolLM2-135M-Instruct from the packaged GGUF (converted once, cached).
2. Takes a slice of the fictional benchmark's *test* documents (facts no model can know) and the
   test questions answerable from that slice, and saves it as a corpus folder.
3. Runs :func:`hyper_prag.api.evaluate` on it: the harness builds the BM25 index, encodes the retrieved
   documents per document into the LoRA store (paper §3.2), generates the hypernetwork's LoRAs with the
   shipped checkpoint, and answers every question with the static methods and the wrong-document controls;
   the slowest methods (DA-RAG's long prompts, FLARE and DRAGIN's repeated generation) answer a subset of a
   few questions per type, with standard RAG beside them as their reference.
4. Prints the per-document vs amortized comparison first (:func:`report`), then every method's table;
   ``demo.md``, results.json/results.md and the plots are written to ``out`` (the subset's to ``out/subset``).

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
from hyper_prag.methods import parse_methods
from hyper_prag.paths import cache_dir

log = logging.getLogger(__name__)

DEMO_DOCS = 40  # test documents in the demo slice
DEMO_PER_TYPE = 3  # questions of each type but lookups (every lookup on the slice's documents is asked)
DEMO_ENCODE_CONFIG = "demo"  # per-document settings of the demo's LoRAs (a shipped encode config)
# Every question: the methods of the comparison and their wrong-document controls.
DEMO_METHODS: tuple[str, ...] = ("closed-book", "rag", "prag", "prag-wrong-doc", "prag-both", "hypernet",
                                 "hypernet-wrong-doc", "hypernet-both")
# A few questions per type: the methods that cost most per question, with standard RAG as their reference.
DEMO_SUBSET_METHODS: tuple[str, ...] = ("rag", "da-rag", "flare", "dragin")
DEMO_SUBSET_PER_TYPE = 3
LOOKUP = "lookup"  # the question type parametric injection is for: one fact of one document


def shipped_checkpoint() -> Path | None:
    """The hypernetwork checkpoint shipped in the package for SmolLM2, if there is one."""
    from hyper_prag.encoders.hypernet import SHIPPED_CHECKPOINT

    return SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.is_file() else None


def demo_slice(corpus: Corpus, n_docs: int, per_type: int) -> Corpus:
    """A self-contained slice of the test split: ``n_docs`` documents, ``per_type`` questions of each type but
    lookups, and every lookup on the slice's documents (retrieval runs over the slice, so every question's
    documents are in it).

    The other types' questions are taken first, each time the one needing the fewest documents not yet in the
    slice (ties: benchmark order); the rest of the documents are the next ones with a lookup question. So for
    a given encoding cost (documents) the slice asks as many single-fact lookups as it can.

    Args:
        corpus: the full benchmark.
        n_docs: documents in the slice.
        per_type: questions kept of each type but lookups.

    Returns:
        The slice, named ``<benchmark>-demo``.

    Raises:
        HyperPragError: ``n_docs`` leaves no room for a lookup.
    """
    test = corpus.split("test")
    chosen: dict[str, None] = {}
    others = []
    for qtype in sorted({q.type for q in test.questions} - {LOOKUP}):
        pool = [q for q in test.questions if q.type == qtype]
        for _ in range(per_type):
            fits = [q for q in pool if len(chosen) + sum(d not in chosen for d in q.doc_ids) <= n_docs]
            if not fits:
                break
            best = min(fits, key=lambda q: sum(d not in chosen for d in q.doc_ids))  # min keeps the first of ties
            pool.remove(best)
            others.append(best)
            chosen.update(dict.fromkeys(best.doc_ids))
    lookups = [q for q in test.questions if q.type == LOOKUP]
    for q in lookups:
        if len(chosen) >= n_docs:
            break
        chosen.update(dict.fromkeys(q.doc_ids))
    asked = [q for q in lookups if all(d in chosen for d in q.doc_ids)]
    if not asked:
        raise HyperPragError(f"--docs {n_docs} leaves no document for a lookup question; raise --docs or lower "
                             "--per-type.")
    docs = [test.document(d) for d in chosen]
    return Corpus(f"{corpus.name}-demo", tuple(docs), tuple(asked + others),
                  {d.id: corpus.doc_qa[d.id] for d in docs if d.id in corpus.doc_qa})


def run_demo(docs: int = DEMO_DOCS, per_type: int = DEMO_PER_TYPE, methods: str | Sequence[str] = DEMO_METHODS,
             subset_methods: str | Sequence[str] = DEMO_SUBSET_METHODS, subset_per_type: int = DEMO_SUBSET_PER_TYPE,
             hypernet: str | Path | None = None, encode_config: str | Path | None = DEMO_ENCODE_CONFIG,
             out: str | Path = "results/demo", **tracking: Any) -> tuple[Results, Results | None]:
    """Runs the demo: slice the benchmark, then the harness.

    Args:
        docs: test documents in the slice (what the per-document encoder trains on: its main cost).
        per_type: questions of each type but lookups (every lookup on the slice's documents is asked).
        methods: the methods that answer every question.
        subset_methods: the methods that answer ``subset_per_type`` questions of each type (``""``: none).
        subset_per_type: questions per type of the subset.
        hypernet: hypernetwork checkpoint (default: the shipped one; without one the hypernet methods are skipped).
        encode_config: per-document encoding settings: a YAML file or a shipped encode config's name.
        out: folder for ``demo.md``, the table, JSON and plots (the subset's in ``out/subset``).
        tracking: ``wandb_project`` / ``wandb_mode`` / ``wandb_dir`` of :func:`hyper_prag.api.evaluate`.

    Returns:
        The harness :class:`~hyper_prag.evaluate.Results` of every question, and of the subset (or ``None``).
    """
    from hyper_prag.api import evaluate
    from hyper_prag.benchmark import load_or_make_default
    from hyper_prag.paths import config_file

    corpus = demo_slice(load_or_make_default(), docs, per_type)
    folder = save_corpus(corpus, cache_dir("data") / corpus.name)
    names = parse_methods(methods)
    subset = parse_methods(subset_methods) if subset_methods else []
    checkpoint = hypernet or shipped_checkpoint()
    if checkpoint is None and any(m.startswith("hypernet") for m in names):
        log.warning("no hypernetwork checkpoint shipped or given: skipping the hypernet methods")
        names = [m for m in names if not m.startswith("hypernet")]
    config = config_file(encode_config, "encode") if encode_config else None
    log.info("demo: %d documents, %d questions, methods %s; %s on %d questions per type", len(corpus.documents),
             len(corpus.questions), names, subset, subset_per_type)
    digest = demo_config_sha256(docs, per_type, names, config, checkpoint, subset, subset_per_type)
    results = evaluate(names, benchmark=str(folder), split="test", hypernet=checkpoint, encode_config=config,
                       out=out, **tracking)
    results.config["demo_config_sha256"] = digest
    results.write(out, plots=False)  # results.json and results.md again, with the demo's configuration hash
    extra = None
    if subset:
        extra = evaluate(subset, benchmark=str(folder), split="test", per_type=subset_per_type,
                         encode_config=config, out=Path(out) / "subset", **tracking)
    (Path(out) / "demo.md").write_text(report(results, extra), encoding="utf-8")
    return results, extra


def demo_config_sha256(docs: int = DEMO_DOCS, per_type: int = DEMO_PER_TYPE, methods: Sequence[str] = DEMO_METHODS,
                       encode_config: str | Path | None = DEMO_ENCODE_CONFIG, hypernet: str | Path | None = None,
                       subset_methods: Sequence[str] = DEMO_SUBSET_METHODS,
                       subset_per_type: int = DEMO_SUBSET_PER_TYPE) -> str:
    """A hash of everything that decides what the demo prints: the slice, the methods, the per-document
    settings (the encode YAML's bytes) and the hypernetwork (its weights hash). The README's demo table records
    it, so a test notices when the demo and the README drift apart.

    Args:
        docs, per_type, methods, subset_methods, subset_per_type: as :func:`run_demo`.
        encode_config: the per-document YAML, a file or a shipped name (``None``: the encode defaults).
        hypernet: the checkpoint (``None``: the shipped one).
    """
    import hashlib
    import json

    from hyper_prag.encoders.hypernet import checkpoint_sha256
    from hyper_prag.paths import config_file

    yaml = config_file(encode_config, "encode").read_bytes() if encode_config else b""
    checkpoint = hypernet or shipped_checkpoint()
    weights = checkpoint_sha256(checkpoint) if checkpoint is not None else None
    described = json.dumps({"docs": docs, "per_type": per_type, "methods": list(methods),
                            "subset": [list(subset_methods), subset_per_type],
                            "encode_config": hashlib.sha256(yaml).hexdigest(), "hypernet": weights}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- report

# The encoder comparison the demo leads with: (method, what its LoRAs are, the prompt carries the documents).
ENCODER_ROWS: tuple[tuple[str, str], ...] = (
    ("prag", "per-document: a LoRA trained on each document"),
    ("prag-wrong-doc", "per-document, another document's LoRA (control)"),
    ("hypernet", "amortized: a hypernetwork's LoRA, one forward pass"),
    ("hypernet-wrong-doc", "amortized, another document's LoRA (control)"),
    ("closed-book", "no LoRA, no document"),
    ("prag-both", "per-document LoRA + the documents in the prompt"),
    ("hypernet-both", "amortized LoRA + the documents in the prompt"),
    ("rag", "no LoRA, the documents in the prompt"),
)
# The differences that say whether a LoRA carries its document: (method, reference).
ENCODER_PAIRS: tuple[tuple[str, str], ...] = (
    ("prag", "prag-wrong-doc"), ("prag", "closed-book"), ("hypernet", "hypernet-wrong-doc"),
    ("hypernet", "closed-book"), ("hypernet", "prag"), ("prag-both", "rag"), ("hypernet-both", "rag"),
)


def encoder_table(results: Results) -> str:
    """The comparison the project exists for, as Markdown: per-document vs amortized LoRAs with the
    wrong-document controls, on quality (lookups and all questions), encoding seconds and bytes per document;
    then the paired differences that decide whether a LoRA carries its document."""
    from hyper_prag.scoring import TOTAL

    ran = {m.name: m for m in results.methods}
    n_lookups = sum(p["type"] == LOOKUP for p in results.methods[0].predictions) if results.methods else 0
    n_all = len(results.methods[0].predictions) if results.methods else 0

    def f1(m, group: str) -> str:
        cell = m.scores.get(group, {}).get("f1")
        if not cell or cell["n"] == 0:
            return "–"
        return f"{100 * cell['mean']:.1f} [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"

    lines = [f"| LoRAs | method | F1 lookups ({n_lookups} q) | F1 all ({n_all} q) | encode s/doc | bytes/doc |",
             "|---|---|---|---|---|---|"]
    for name, what in ENCODER_ROWS:
        if name in ran:
            m = ran[name]
            enc = "–" if m.encode_seconds_per_doc is None else f"{m.encode_seconds_per_doc:.2f}"
            size = "–" if m.bytes_per_doc is None else f"{m.bytes_per_doc:,.0f}"
            lines.append(f"| {what} | {name} | {f1(m, LOOKUP)} | {f1(m, TOTAL)} | {enc} | {size} |")
    pairs = [(a, b, results.paired(a, b, qtype=LOOKUP), results.paired(a, b)) for a, b in ENCODER_PAIRS]
    pairs = [p for p in pairs if p[3] is not None]
    if pairs:
        lines += ["", "| paired ΔF1 (same questions) | lookups | all |", "|---|---|---|"]

        def cell(d):
            return "–" if d is None else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"

        lines += [f"| {a} − {b} | {cell(lk)} | {cell(al)} |" for a, b, lk, al in pairs]
    lines += ["", "F1 in %, mean [95% bootstrap CI]; encode s/doc: offline seconds per document (the hypernetwork's: "
                  "one forward pass, paid online); bytes/doc: LoRA store bytes per document (the hypernetwork stores "
                  "none)."]
    return "\n".join(lines) + "\n"


def report(results: Results, subset: Results | None = None) -> str:
    """What ``hyper-prag demo`` prints: the encoder comparison first, then every method's table (and the
    subset's, for the methods that answered only a few questions per type)."""
    text = ("## Per-document vs amortized encoding\n\n" + encoder_table(results)
            + "\n## Every method, every question\n\n" + results.to_markdown())
    if subset is not None:
        n = len(subset.methods[0].predictions) if subset.methods else 0
        text += f"\n## The slowest methods, on {n} of the questions\n\n" + subset.to_markdown()
    return text

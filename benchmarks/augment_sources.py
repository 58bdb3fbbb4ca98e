"""Augmentation sources side by side: how many QA pairs each keeps per document, and how good they are.

    .venv/bin/python benchmarks/augment_sources.py --sources template extractive --docs 100   # no LLM, seconds
    .venv/bin/python benchmarks/augment_sources.py                                   # all four, SmolLM2 generates

The same documents for every source: ``--docs`` validation documents of the default fictional benchmark,
evenly spaced over the split so that every entity kind (person, place, organisation, work) is in.
Per source:

- pairs kept per document and the documents left with none;
- answer in document: the share of kept pairs whose answer is a span of its document (case and
  spacing aside; :func:`hyper_prag.augment.answer_span`);
- = gold answer: the share of kept pairs whose answer is one of the benchmark's templated answers for
  the document, and gold recall: the share of templated answers that some kept pair has (the
  benchmark's doc_qa covers every fact a document states, distractors included);
- cloze: the share of "Fill in the blank" questions; rejections by reason (``AugmentStats``);
- seconds per document (LLM sources: generation on ``--device``, with a fresh augmentation cache unless
  ``--cache`` names one).

Writes ``--out`` (JSON: metrics, the run's stats and the example documents) and prints a Markdown table
plus ``--examples`` documents with their extractive pairs, to check the questions by eye.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from hyper_prag.augment import AugmentConfig, AugmentedDocument, AugmentStats, answer_span, augment_documents
from hyper_prag.corpus import Corpus, Document

SOURCES = ("template", "extractive", "llm", "llm-fewshot")


def pick_documents(corpus: Corpus, split: str, n: int) -> list[Document]:
    """``n`` documents of a split, evenly spaced over it (the split lists one entity kind after another)."""
    docs = list(corpus.split(split).documents)
    if n >= len(docs):
        return docs
    return [docs[i * len(docs) // n] for i in range(n)]


def measure(augmented: list[AugmentedDocument], corpus: Corpus, stats: AugmentStats, seconds: float) -> dict:
    """The metrics of one source's augmentations (see the module docstring)."""
    pairs = [(aug, q, a) for aug in augmented for q, a in aug.qa]
    n_pairs = len(pairs)
    gold = {aug.doc_id: {a.lower() for _, a in corpus.doc_qa.get(aug.doc_id, ())} for aug in augmented}
    gold_total = sum(len(g) for g in gold.values())
    recalled = sum(len(gold[aug.doc_id] & {a.lower() for _, a in aug.qa}) for aug in augmented)
    rejected = dict(sorted(stats.rejected.items()))
    if stats.dropped_pairs:
        rejected["dropped_by_parser"] = stats.dropped_pairs
    return {
        "docs": len(augmented),
        "pairs": n_pairs,
        "pairs_per_doc": n_pairs / max(1, len(augmented)),
        "docs_without_pairs": sum(not aug.qa for aug in augmented),
        "answer_in_document": sum(answer_span(a, aug.text) is not None for aug, _, a in pairs) / max(1, n_pairs),
        "answer_is_gold": sum(a.lower() in gold[aug.doc_id] for aug, _, a in pairs) / max(1, n_pairs),
        "gold_recall": recalled / gold_total if gold_total else None,
        "cloze_share": sum(q.startswith("Fill in the blank") for _, q, _ in pairs) / max(1, n_pairs),
        "question_mark_share": sum(q.rstrip().endswith("?") for _, q, _ in pairs) / max(1, n_pairs),
        "rejected": rejected,
        "seconds_per_doc": seconds / max(1, len(augmented)),
        "stats": asdict(stats),
    }


def table(results: dict[str, dict]) -> str:
    header = ["source", "pairs/doc", "docs w/o pairs", "answer in doc", "= gold answer", "gold recall", "cloze",
              "rejected (by reason)", "s/doc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for source, r in results.items():
        rejected = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "-"
        recall = "-" if r["gold_recall"] is None else f"{r['gold_recall']:.3f}"
        lines.append(f"| {source} | {r['pairs_per_doc']:.2f} | {r['docs_without_pairs']} | "
                     f"{r['answer_in_document']:.3f} | {r['answer_is_gold']:.3f} | {recall} | {r['cloze_share']:.3f} | "
                     f"{rejected} | {r['seconds_per_doc']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--docs", type=int, default=100, help="validation documents (evenly spaced over the split)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--n-qa", type=int, default=3, help="QA pairs per document asked for (paper: 3; 0: all "
                        "the template / extractive source has)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="augmenting LLM of the llm sources")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=None, help="augmentation cache folder of the llm sources "
                        "(default: a fresh temporary one, so the generation is timed)")
    parser.add_argument("--examples", type=int, default=5, help="documents printed with their extractive pairs")
    parser.add_argument("--out", default=None, help="JSON output (default results/augment_sources/<sources>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hyper_prag.benchmark import load_or_make_default

    corpus = load_or_make_default()
    docs = pick_documents(corpus, args.split, args.docs)
    if not docs:
        print(f"split {args.split!r} of {corpus.name} has no documents", file=sys.stderr)
        return 2
    base = None
    if any(s.startswith("llm") for s in args.sources):
        from hyper_prag import assemble

        base = assemble.load_model(args.model, args.device)
    results: dict[str, dict] = {}
    examples: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for source in args.sources:
            missing = sum(not corpus.doc_qa.get(d.id) for d in docs)
            if source == "template" and missing:  # the template source needs a corpus that ships QA pairs
                print(f"skipping template: {missing} documents have no doc_qa", file=sys.stderr)
                continue
            config = AugmentConfig(source=source, n_rewrites=0, n_qa=args.n_qa)  # type: ignore[arg-type]
            stats = AugmentStats()
            start = time.perf_counter()
            augmented = augment_documents(docs, config, base=base, corpus=corpus, stats=stats,
                                          cache=Path(args.cache) if args.cache else Path(scratch) / source)
            results[source] = measure(augmented, corpus, stats, time.perf_counter() - start)
            examples[source] = [{"doc_id": a.doc_id, "text": a.text, "qa": [list(p) for p in a.qa]} for a in augmented]
    out = Path(args.out or f"results/augment_sources/{'-'.join(args.sources)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    step = max(1, len(docs) // max(1, args.examples))
    report = {"command": "python benchmarks/augment_sources.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "corpus": corpus.name, "split": args.split, "n_qa": args.n_qa, "doc_ids": [d.id for d in docs],
              "results": results, "documents": examples}
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    print(f"corpus `{corpus.name}`, split `{args.split}`: {len(docs)} documents, n_qa {args.n_qa}\n")
    print(table(results))
    source = "extractive" if "extractive" in examples else next(iter(examples), None)
    if source is not None and args.examples > 0:
        print(f"\nExamples ({source}):")
        for row in examples[source][::step][: args.examples]:
            print(f"\n{row['doc_id']}: {row['text']}")
            for q, a in row["qa"]:
                print(f"  Q: {q}\n  A: {a}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

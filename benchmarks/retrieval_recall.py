"""Retrieval recall@k per question type, BM25 vs dense, printed as a Markdown table.

    .venv/bin/python benchmarks/retrieval_recall.py                       # default fictional benchmark, test split
    .venv/bin/python benchmarks/retrieval_recall.py --corpus DIR --split all

recall@k: per question, the fraction of its supporting documents (``doc_ids``) in the top k,
averaged over questions. all@k: the share of questions whose supporting documents are *all* in
the top k (equal to recall@k for single-document questions; at k=1 it is 0 for two-document ones).
Indexes are built fresh (not read from the cache) so the build times are real.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict

from hyper_prag.corpus import Corpus, Question, load_corpus
from hyper_prag.retrieve import KINDS, BM25Retriever, DenseRetriever, Hit


def recall_rows(questions: list[Question], hits: list[list[Hit]], ks: list[int]) -> dict[str, dict[str, float]]:
    """Returns {question type (and "all"): {"n", "docs", "R@k", "all@k" for k in ks}}."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for q, per_query in zip(questions, hits, strict=True):
        ranked = [h.doc_id for h in per_query]
        gold = set(q.doc_ids)
        for group in (q.type, "all"):
            row = sums[group]
            row["n"] += 1
            row["docs"] += len(gold)
            for k in ks:
                found = len(gold & set(ranked[:k]))
                row[f"R@{k}"] += found / len(gold)
                row[f"all@{k}"] += float(found == len(gold))
    out = {}
    for group, row in sums.items():
        n = row["n"]
        out[group] = {"n": n, "docs": row["docs"] / n, **{key: v / n for key, v in row.items() if "@" in key}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=None, help="corpus folder (default: the default fictional benchmark)")
    parser.add_argument("--split", default="test", help="split to evaluate, or 'all' (default: test)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 3, 5])
    parser.add_argument("--device", default="cpu", help="torch device of the dense encoder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.corpus is None:
        from hyper_prag.benchmark import load_or_make_default

        corpus: Corpus = load_or_make_default()
    else:
        corpus = load_corpus(args.corpus)
    if args.split != "all":
        corpus = corpus.split(args.split)
    questions = list(corpus.questions)
    if not questions:
        print(f"corpus {corpus.name!r} (split {args.split}) has no questions", file=sys.stderr)
        return 2
    ks = sorted(set(args.ks))

    print(f"corpus `{corpus.name}`, split `{args.split}`: {len(corpus.documents)} documents, "
          f"{len(questions)} questions\n")
    header = ["retriever", "type", "n", "docs/q"] + [f"R@{k}" for k in ks] + [f"all@{k}" for k in ks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    timings = []
    for kind in args.kinds:
        start = time.perf_counter()
        retriever = BM25Retriever.build(corpus) if kind == "bm25" else DenseRetriever.build(corpus, device=args.device)
        built = time.perf_counter() - start
        start = time.perf_counter()
        hits = retriever.search([q.question for q in questions], k=max(ks))
        searched = time.perf_counter() - start
        timings.append(f"{kind}: build {built:.1f} s ({len(corpus.documents)} docs), "
                       f"search {searched:.2f} s ({1000 * searched / len(questions):.2f} ms/question)")
        rows = recall_rows(questions, hits, ks)
        for group in sorted(rows, key=lambda g: (g == "all", g)):
            row = rows[group]
            cells = [kind, group, str(int(row["n"])), f"{row['docs']:.2f}"]
            cells += [f"{row[f'R@{k}']:.3f}" for k in ks] + [f"{row[f'all@{k}']:.3f}" for k in ks]
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print("\n" + "\n".join(f"- {t}" for t in timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's efficiency claim, measured side by side: P-RAG vs standard RAG, and LoRA cost vs one token.

    .venv/bin/python benchmarks/efficiency.py                       # SmolLM2, 20 test questions, k=3
    .venv/bin/python benchmarks/efficiency.py --model tiny --questions 4   # smoke test, seconds

Su et al. (SIGIR 2025) argue that P-RAG answers faster than standard RAG because the k documents
are not in the prompt (a short prefill), and that loading + merging the k document LoRAs costs
little. This script measures both on the same questions in one process:

1. **Time per question**, P-RAG vs standard RAG, k documents retrieved by BM25, batch size 1 (the
   online setting), the two methods interleaved question by question (order alternating) so that
   machine load hits both alike; medians over the questions. Two regimes: ``natural`` (each
   method generates until its answer ends) and ``fixed`` (both forced to generate exactly
   ``--max-new-tokens`` tokens, which isolates prompt length + LoRA overhead from answer length).
   P-RAG runs with both injectors: ``merged`` (W += ΔW, restore after: a cost per question, none
   per token) and ``side`` (hooks: ~no cost per question, a small cost per token).
2. **Fetch + combine + apply the k LoRAs vs one generated token**: P-RAG's ``lora`` + ``apply``
   stages (store read, rank concatenation, injection and restore) against the marginal cost of one
   decoded token, measured as (t(T+1 tokens) − t(1 token)) / T on the P-RAG prompt.

LoRAs: with ``--store DIR`` the encoded LoRAs of the retrieved documents are read from that store
(keys from ``--encode-config``, as ``hyper-prag evaluate`` computes them). Without it, rank-2
LoRAs with random values are written into a temporary LoRA store (same shapes, dtype and store
path as encoded ones: the timing does not depend on the values; the answers do, so no accuracy
is reported here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyper_prag import assemble  # noqa: E402
from hyper_prag.assemble import build_method  # noqa: E402
from hyper_prag.lora import LoraSpec, init_lora  # noqa: E402
from hyper_prag.pipeline import Pipeline  # noqa: E402
from hyper_prag.recipes import Recipe  # noqa: E402
from hyper_prag.sources import StoreSource  # noqa: E402


def random_store_source(base, documents, root: Path, rank: int = 2):
    """Writes a random rank-``rank`` LoRA per document into a LoRA store at ``root``; returns its source."""
    from hyper_prag.store import LoraStore

    store = LoraStore(root)  # default storage dtype, as `hyper-prag encode` writes
    spec = LoraSpec(rank=rank).for_model(base)
    dims = {m: base.module_dims(m) for m in spec.target_modules}
    recipe = Recipe("random", base.identity, spec, {}, {"name": "random", "seed": 0})
    gen = torch.Generator().manual_seed(0)
    items = []
    for doc in documents:
        lora = init_lora(spec, dims, generator=gen)
        for b in lora.B.values():
            b.normal_(0.0, 1e-3, generator=gen)
        items.append((recipe.key(doc.text), lora, {"doc_id": doc.id}))
    store.put_many(items)
    return StoreSource(store, recipe)


def token_cost(base, prompts: list[str], tokens: int) -> float:
    """Median marginal seconds of one decoded token: (t(tokens+1) − t(1)) / tokens, batch size 1."""
    costs = []
    for prompt in prompts:
        t0 = time.perf_counter()
        base.generate([prompt], max_new_tokens=1, min_new_tokens=1)
        t1 = time.perf_counter()
        base.generate([prompt], max_new_tokens=tokens + 1, min_new_tokens=tokens + 1)
        t2 = time.perf_counter()
        costs.append(((t2 - t1) - (t1 - t0)) / tokens)
    return statistics.median(costs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="smollm2-135m-instruct | tiny | folder")
    parser.add_argument("--benchmark", default="fictional")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--store", default=None, help="LoRA store with the encoded LoRAs (default: random LoRAs)")
    parser.add_argument("--recipe", default=None, help="recorded recipe of --store to read (if it holds several)")
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = parser.parse_args(argv)

    from hyper_prag.retrieve import BM25Retriever

    base = assemble.load_model(args.model)
    corpus = assemble.load_corpus(args.benchmark).split(args.split)
    questions = [q.question for q in corpus.questions[: args.questions]]
    retriever = BM25Retriever.build(corpus)
    hits = retriever.search(questions, args.k)
    needed = [corpus.document(i) for i in dict.fromkeys(h.doc_id for row in hits for h in row)]
    tmp = tempfile.TemporaryDirectory(prefix="efficiency-store-")
    if args.store:
        store = assemble.open_store(args.store)
        source = StoreSource(store, assemble.per_doc_from_store(base, store.root, args.recipe), corpus.doc_qa)
        lora_kind = f"encoded ({args.store})"
    else:
        source = random_store_source(base, needed, Path(tmp.name))
        lora_kind = "random rank-2 in a temporary LoRA store"

    def pipe(mode: str, fixed: bool) -> Pipeline:
        extra = {"min_new_tokens": args.max_new_tokens} if fixed else {}
        return Pipeline(base, retriever, corpus, k=args.k, max_new_tokens=args.max_new_tokens, batch_size=1,
                        single_mode=mode, generation_kwargs=extra)  # type: ignore[arg-type]

    report: dict = {"model": args.model, "questions": len(questions), "k": args.k, "loras": lora_kind,
                    "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(), "regimes": {}}
    for regime in ("natural", "fixed"):
        fixed = regime == "fixed"
        methods = {"rag": build_method("rag", pipe("merged", fixed)),
                   "prag-merged": build_method("prag", pipe("merged", fixed), source),
                   "prag-side": build_method("prag", pipe("side", fixed), source)}
        for method in methods.values():  # warm-up: first-call allocations, store mmap, BM25
            method.answer(questions[:1])
        answers = {name: [] for name in methods}
        order = list(methods)
        for i, q in enumerate(tqdm(questions, desc=f"{regime} regime", unit="q")):
            for name in order if i % 2 == 0 else order[::-1]:  # interleaved, order alternating
                answers[name].append(methods[name].answer([q])[0])
        stats = {}
        for name, rows in answers.items():
            stats[name] = {
                "median_s": statistics.median(a.seconds for a in rows),
                **{f"median_{s}_s": statistics.median(a.timing[s] for a in rows) for s in rows[0].timing},
                "median_lora_plus_apply_s": statistics.median(a.timing["lora"] + a.timing["apply"] for a in rows),
            }
        report["regimes"][regime] = stats

    # The marginal cost of one generated token, on the P-RAG prompts (closed-book form, no LoRA).
    from hyper_prag.prompts import question_prompt

    prompts = [question_prompt(base, q) for q in questions[:5]]
    rag_prompts = [question_prompt(base, q, [corpus.document(h.doc_id).text for h in row])
                   for q, row in zip(questions, hits)]
    tok = token_cost(base, prompts, tokens=16)
    report["token_s"] = tok
    report["mean_prompt_tokens"] = {
        "rag": statistics.mean(len(base.tokenizer(p, add_special_tokens=False).input_ids) for p in rag_prompts),
        "prag": statistics.mean(len(base.tokenizer(question_prompt(base, q), add_special_tokens=False).input_ids)
                                for q in questions)}

    print(f"model {args.model}, {len(questions)} questions, k={args.k}, LoRAs: {lora_kind}, "
          f"{torch.get_num_threads()} threads")
    print(f"mean prompt tokens: RAG {report['mean_prompt_tokens']['rag']:.0f}, "
          f"P-RAG {report['mean_prompt_tokens']['prag']:.0f}")
    for regime, stats in report["regimes"].items():
        rag = stats["rag"]["median_s"]
        print(f"[{regime}] median s/question: RAG {rag:.3f}" + "".join(
            f", {n} {stats[n]['median_s']:.3f} (RAG/P-RAG = {rag / stats[n]['median_s']:.2f}x)"
            for n in ("prag-merged", "prag-side")))
        for n in ("rag", "prag-merged", "prag-side"):
            print(f"    {n:12s} " + ", ".join(f"{s} {1000 * stats[n][f'median_{s}_s']:.1f} ms"
                                               for s in ("retrieve", "lora", "apply", "generate")))
    print(f"one generated token: {1000 * tok:.1f} ms (marginal decode cost, P-RAG prompt, batch 1)")
    for n in ("prag-merged", "prag-side"):
        cost = report["regimes"]["fixed"][n]["median_lora_plus_apply_s"]
        print(f"fetch+combine+apply ({n}): {1000 * cost:.1f} ms = {cost / tok:.2f} tokens")
    fx = report["regimes"]["fixed"]
    side_overhead = (fx["prag-side"]["median_generate_s"] - fx["prag-merged"]["median_generate_s"]) / args.max_new_tokens
    report["side_overhead_per_token_s"] = side_overhead
    print(f"side-path overhead per generated token: {1000 * side_overhead:.2f} ms "
          f"({side_overhead / tok:.2f} tokens)")
    # Peak extra memory of merged mode for one question's combined LoRA (k documents), both restore strategies.
    from dataclasses import asdict

    from hyper_prag.inject import merge_memory

    combined = pipe("merged", False).combine(source.loras(needed[: args.k]))
    report["merge_memory"] = {mode: asdict(merge_memory(base, combined, mode)) for mode in ("subtract", "copy")}
    mib = 2**20
    for mode, mem in report["merge_memory"].items():
        print(f"merged mode ({mode} restore), rank-{combined.spec.rank} LoRA: peak extra {mem['peak_extra_bytes'] / mib:.1f} MiB, "
              f"kept {mem['kept_bytes'] / mib:.1f} MiB; one layer's ΔW {mem['layer_delta_bytes'] / mib:.1f} MiB, "
              f"every layer's ΔW at once {mem['all_deltas_bytes'] / mib:.1f} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    tmp.cleanup()
    return report


if __name__ == "__main__":
    main()

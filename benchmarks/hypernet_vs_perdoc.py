"""Hypernetwork LoRAs vs per-document LoRAs vs closed-book, on fictional-benchmark TEST documents.

    .venv/bin/python benchmarks/hypernet_vs_perdoc.py                     # SmolLM2, 30 test docs, shipped checkpoint
    .venv/bin/python benchmarks/hypernet_vs_perdoc.py --no-per-doc        # hypernet and closed-book only
    .venv/bin/python benchmarks/hypernet_vs_perdoc.py --docs 60 --out runs/hypernet_vs_perdoc.json
    .venv/bin/python benchmarks/hypernet_vs_perdoc.py --checkpoint A.safetensors B.ckpt   # two hypernets, one run
    .venv/bin/python benchmarks/hypernet_vs_perdoc.py --checkpoint FASTWEIGHT.ckpt --gradient-step 300 --docs 70

Documents are chosen through their questions: test questions are drawn round-robin over the question
types (seeded) and kept while the union of their supporting documents stays within ``--docs``; every
test question whose supporting documents all lie in that set is then asked. (The hypernet never saw a
test document: it trains on ``train`` and validates on ``val``.)

Measured:
* encoding cost per document: the hypernet (doc embedding + one forward, batched over all documents,
  and one document at a time) vs per-document LoRA training (``PerDocEncoder``, template augmentation,
  lr 1e-3 by default, chunks of 4), and their ratio. Model load is not timed.
* the gradient readout (``--gradient-step``; :mod:`hyper_prag.encoders.gradient`, stage 0) as another row;
* F1 / EM by question type, with bootstrap 95% CIs: each question asked through the online path
  (``Pipeline.answer_given``: its supporting documents instead of retrieved ones, no passages in the
  prompt, their LoRAs summed), greedy decoding; closed-book = the base model alone; control
  ``hypernet_wrong_doc`` = each document given the hypernet LoRA of another document; standard RAG
  (``rag``: the question's documents in the prompt) and "combine both" (``<encoder>+rag``: documents and
  LoRAs); paired differences (own − wrong document, − closed-book, combine − RAG) with bootstrap CIs.

The rows also go to one W&B run (offline by default; :mod:`hyper_prag.tracking`): F1 by row and by question
type, quality vs encoding cost per document, the refine curve (``--refine-steps``), the answers; in percent.

With several ``--checkpoint`` paths, the first is reported as ``hypernet`` and each other one as
``hypernet:<file stem>`` (with its own ``_wrong_doc`` control), all on the same questions.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from hyper_prag.corpus import Corpus
from hyper_prag.encoders.hypernet import SHIPPED_CHECKPOINT
from hyper_prag.evaluate import MethodResult, Results
from hyper_prag.lora import Lora
from hyper_prag.pipeline import Pipeline
from hyper_prag.scoring import bootstrap_ci
from hyper_prag.scoring import score as score_answer
from hyper_prag.scoring import summarize


def begin(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Parsed arguments (and the argv they came from), INFO logging, the seed set: how each benchmark here begins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    return args, argv


def write_json(result: dict, out: Path | None) -> str:
    """The result as indented JSON, printed and written to ``out`` (if given)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def choose(corpus, n_docs: int, seed: int, split: str = "test"):
    """Questions of ``split`` (round-robin over types) whose supporting documents fit in ``n_docs`` of its documents."""
    test = corpus.split(split)
    rng = random.Random(seed)
    by_type = defaultdict(list)
    for q in test.questions:
        by_type[q.type].append(q)
    for qs in by_type.values():
        rng.shuffle(qs)
    docs: list[str] = []
    cursors = {t: 0 for t in by_type}
    while len(docs) < n_docs and any(cursors[t] < len(by_type[t]) for t in by_type):
        for t in sorted(by_type):
            while cursors[t] < len(by_type[t]):
                q = by_type[t][cursors[t]]
                cursors[t] += 1
                new = [d for d in q.doc_ids if d not in docs]
                if len(docs) + len(new) <= n_docs:
                    docs += new
                    break
    chosen = set(docs)
    questions = [q for q in test.questions if set(q.doc_ids) <= chosen]
    return [test.document(d) for d in docs], questions


class TableSource:
    """A LoRA source over a fixed table of per-document LoRAs (generated or trained in this run)."""

    def __init__(self, name: str, table: dict[str, Lora], apply_from: str = "all") -> None:
        self.name, self.table, self.apply_from = name, table, apply_from  # apply_from: as its encoder trained them

    def loras(self, documents):
        return [self.table[d.id] for d in documents]

    def names(self, documents):
        return [f"{self.name}:{d.id}" for d in documents]


def answer(base, docs, questions, table: dict[str, Lora] | None, batch_size: int, max_new_tokens: int,
           apply_from: str = "all", context: str = "none") -> list[str]:
    """Greedy answers through the online path; question i uses the summed LoRA of its documents, or none.

    ``context="documents"`` also puts the question's documents in the prompt (standard RAG without a
    table; "combine both" with one)."""
    corpus = Corpus("hypernet-vs-perdoc", tuple(docs), tuple(questions))
    pipeline = Pipeline(base, None, corpus, max_new_tokens=max_new_tokens, batch_size=batch_size, single_mode="side",
                        combine_mode="sum")  # a question's documents, summed
    given = [[corpus.document(d) for d in q.doc_ids] for q in questions]
    source = TableSource("table", table, apply_from) if table is not None else None
    given = given if table is not None or context != "none" else [[]] * len(given)
    answers = pipeline.answer_given([q.question for q in questions], given, context, source)
    return [a.prediction for a in answers]


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of the per-question differences a − b with its bootstrap 95% CI."""
    mean, low, high = bootstrap_ci([x - y for x, y in zip(a, b)])
    return {"mean": mean, "low": low, "high": high}


def pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The paired comparisons (row, reference) of a run's rows: each table vs its wrong-document control and
    vs closed-book, each "combine both" row vs standard RAG, each amortized encoder vs per-document training."""
    out = []
    for m in methods:
        if f"{m}_wrong_doc" in methods:
            out.append((m, f"{m}_wrong_doc"))
        if m not in ("closed_book", "rag") and not m.endswith(("_wrong_doc", "+rag")):
            out.append((m, "closed_book"))
        if m.endswith("+rag"):
            out.append((m, "rag"))
        if m.startswith(("hypernet", "gradient")) and not m.endswith(("_wrong_doc", "+rag")) and "per_doc" in methods:
            out.append((m, "per_doc"))  # the amortized encoder against per-document training
    return out


def paired_differences(questions, predictions: dict[str, list[str]]) -> dict:
    """Paired F1 differences with bootstrap 95% CIs (all questions and lookups) of :func:`pairs`."""
    f1 = {m: [score_answer(p, q.answers)["f1"] for p, q in zip(preds, questions)] for m, preds in predictions.items()}
    lookups = [i for i, q in enumerate(questions) if q.type == "lookup"]
    out = {}
    for a, b in pairs(list(f1)):
        for label, idx in (("all", range(len(questions))), ("lookup", lookups)):
            if idx:
                out[f"{a} - {b}/{label}"] = paired([f1[a][i] for i in idx], [f1[b][i] for i in idx]) | {"n": len(idx)}
    return out


def score(questions, predictions, resamples: int = 1000) -> dict:
    """F1 / EM / contained (max over answer aliases), by question type and overall ("all"), with 95% CIs."""
    scored = [score_answer(p, q.answers) for q, p in zip(questions, predictions)]
    types = [q.type for q in questions]
    summary = summarize(scored, types, sorted(set(types)), n_resamples=resamples)
    return {("all" if t == "total" else t): {"n": cells["f1"]["n"],
                                             **{m: c["mean"] for m, c in cells.items()},
                                             **{f"{m}_ci": [c["low"], c["high"]] for m, c in cells.items()}}
            for t, cells in summary.items()}


def encode_seconds(result: dict, method: str) -> float | None:
    """Encoding seconds per document of a row: 0 for closed-book and RAG, its encoder's for a table and its
    "combine both" row, ``None`` for a wrong-document control (not an encoder of its own)."""
    if method in ("closed_book", "rag"):
        return 0.0
    entry = result.get(method.removesuffix("+rag"))
    if method.endswith("_wrong_doc") or not isinstance(entry, dict):
        return None
    return entry["ms_per_doc_batched"] / 1000 if "ms_per_doc_batched" in entry else entry.get("s_per_doc")


def as_results(questions, predictions: dict[str, list[str]], result: dict, resamples: int = 1000) -> Results:
    """The rows as harness :class:`~hyper_prag.evaluate.Results`, what :mod:`hyper_prag.tracking` logs: each
    row's answering time spread evenly over its questions (one stage, ``answer``), its encoding cost."""
    types = [q.type for q in questions]
    methods = []
    for name, preds in predictions.items():
        scored = [score_answer(p, q.answers) for q, p in zip(questions, preds)]
        seconds = result["scores"][name]["all"]["answer_seconds"]
        timing = {"answer": seconds / len(questions)}
        latency = {"median": {**timing, "total": timing["answer"]}, "mean": {**timing, "total": timing["answer"]}}
        methods.append(MethodResult(
            name=name, scores=summarize(scored, types, sorted(set(types)), n_resamples=resamples), latency=latency,
            memory={}, retrievals=0.0, encode_seconds_per_doc=encode_seconds(result, name), wall_seconds=seconds,
            predictions=[{"id": q.id, "type": q.type, "question": q.question, "answers": list(q.answers),
                          "prediction": p, "doc_ids": list(q.doc_ids), "lora_names": [], "retrievals": 0,
                          "timing": timing, **s} for q, p, s in zip(questions, preds, scored)]))
    config = {"benchmark": "fictional", "split": "test", "questions": len(questions), "n_resamples": resamples,
              "seed": 0, **{k: result[k] for k in ("command", "documents", "checkpoint")}}
    return Results(methods, sorted(set(types)), config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, nargs="*", default=[SHIPPED_CHECKPOINT],
                        help="hypernet checkpoint(s): folder, .safetensors or .ckpt (several: compared side by side)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (must match the checkpoint)")
    parser.add_argument("--docs", type=int, default=30, help="test documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-doc", action=argparse.BooleanOptionalAction, default=True,
                        help="also train per-document LoRAs (minutes on CPU)")
    parser.add_argument("--per-doc-config", type=Path, default=None,
                        help="an encode YAML (e.g. configs/encode/demo.yaml): its trainer, augment and LoRA settings "
                             "for the per-document rows instead of --per-doc-epochs / --per-doc-lr and template pairs")
    parser.add_argument("--per-doc-epochs", type=int, default=2, help="passes over each document's template QA")
    parser.add_argument("--per-doc-lr", type=float, default=1e-3,
                        help="per-document learning rate (paper: 3e-4, measured too weak for SmolLM2-135M here)")
    parser.add_argument("--chunk-size", type=int, default=4, help="documents per per-doc LoRA bank")
    parser.add_argument("--refine-steps", type=int, nargs="*", default=[],
                        help="k values: rows 'hypernet+k' (the first checkpoint's LoRA + k per-document steps) and "
                             "'random+k' (random init + the same k steps), e.g. --refine-steps 0 1 2 4 8")
    parser.add_argument("--gradient-step", type=float, default=None,
                        help="also the gradient readout at stage 0 with this step size η (chosen on val documents by "
                             "benchmarks/readout_gates.py), and its wrong-document control")
    parser.add_argument("--gradient-rank", type=int, default=8)
    parser.add_argument("--combine", action=argparse.BooleanOptionalAction, default=True,
                        help="also each encoder's 'combine both' row (its LoRAs and the documents in the prompt)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--wandb-project", default="hyper-prag", help="W&B project (the training runs' project)")
    parser.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default="offline",
                        help="W&B run of the comparison (offline by default: `wandb sync` uploads it later)")
    parser.add_argument("--wandb-dir", default="runs/wandb", help="folder that receives the W&B run")
    args, argv = begin(parser, argv)

    from hyper_prag import assemble
    from hyper_prag.encoders.hypernet import HypernetEncoder

    base = assemble.load_model(args.model)
    corpus = assemble.load_corpus("fictional")
    docs, questions = choose(corpus, args.docs, args.seed)
    result: dict = {"command": "python benchmarks/hypernet_vs_perdoc.py " + " ".join(argv),
                    "documents": len(docs), "questions": len(questions),
                    "question_types": dict(Counter(q.type for q in questions)),
                    "checkpoint": [str(c) for c in args.checkpoint]}

    texts = [d.text for d in docs]
    loras: dict[str, dict[str, Lora]] = {}
    applied: dict[str, str] = {}  # where each table's LoRAs act (hypernets: as trained; per-document: everywhere)
    for n, checkpoint in enumerate(args.checkpoint):
        name = "hypernet" if n == 0 else f"hypernet:{checkpoint.stem}"
        encoder = HypernetEncoder.from_checkpoint(checkpoint, base)
        encoder.generate(texts[:2])  # warm-up (first-call allocations), not timed
        start = time.perf_counter()
        hyper = encoder.generate(texts)
        ms = (time.perf_counter() - start) * 1000 / len(docs)
        one_ms = []
        for text in texts[:5]:
            start = time.perf_counter()
            encoder.generate([text])
            one_ms.append((time.perf_counter() - start) * 1000)
        result[name] = {"checkpoint": str(checkpoint), "ms_per_doc_batched": ms,
                        "ms_per_doc_single": sum(one_ms) / len(one_ms),
                        "num_parameters": encoder.hypernet.num_parameters(), **encoder.settings()}
        # Control: every document gets the hypernet LoRA of the *next* document. Its F1 is what the generated
        # LoRAs give without their own document's knowledge (answer format, corpus-wide priors).
        loras[name] = {d.id: lora for d, lora in zip(docs, hyper)}
        loras[f"{name}_wrong_doc"] = {d.id: lora for d, lora in zip(docs, hyper[1:] + hyper[:1])}
        applied[name] = applied[f"{name}_wrong_doc"] = encoder.hypernet.config.apply_from

    if args.gradient_step:
        from hyper_prag.augment import AugmentConfig, augment_documents
        from hyper_prag.encoders.gradient import GradientConfig, GradientEncoder

        augmented = augment_documents(docs, AugmentConfig(source="template"), base=base, corpus=corpus)
        gradient = GradientEncoder(base, GradientConfig(rank=args.gradient_rank, step=args.gradient_step))
        start = time.perf_counter()
        made = gradient.encode(augmented)
        result["gradient"] = {"s_per_doc": (time.perf_counter() - start) / len(docs), **gradient.settings()}
        loras["gradient"] = {d.id: lora for d, lora in zip(docs, made)}
        loras["gradient_wrong_doc"] = {d.id: lora for d, lora in zip(docs, made[1:] + made[:1])}
        applied["gradient"] = applied["gradient_wrong_doc"] = gradient.apply_from

    if args.per_doc:
        from hyper_prag.augment import AugmentConfig, augment_documents
        from hyper_prag.encoders.per_doc import PerDocConfig, PerDocEncoder
        from hyper_prag.lora import LoraSpec

        if args.per_doc_config is not None:  # an encode YAML's trainer, augmentation and LoRA shape
            recipe = yaml.safe_load(args.per_doc_config.read_text())
            trainer, augment = PerDocConfig(**recipe["trainer"]), AugmentConfig(**recipe["augment"])
            spec = LoraSpec(rank=recipe["rank"], alpha=recipe["alpha"], target_modules=tuple(recipe["target_modules"]),
                            layers=tuple(recipe["layers"]))
        else:
            trainer = PerDocConfig(lr=args.per_doc_lr, epochs=args.per_doc_epochs)
            augment, spec = AugmentConfig(source="template"), LoraSpec()
        augmented = augment_documents(docs, augment, base=base, corpus=corpus)
        per_doc = PerDocEncoder(base, spec.for_model(base), trainer)
        order = sorted(range(len(docs)), key=lambda i: len(docs[i].text))  # chunk by length: little padding
        trained: dict[str, Lora] = {}
        start = time.perf_counter()
        for c in range(0, len(order), args.chunk_size):
            idx = order[c : c + args.chunk_size]
            for i, lora in zip(idx, per_doc.encode([augmented[i] for i in idx])):
                trained[docs[i].id] = lora
        seconds = (time.perf_counter() - start) / len(docs)
        result["per_doc"] = {"s_per_doc": seconds, "chunk_size": args.chunk_size, "config": str(args.per_doc_config),
                             "augmentation": augment.settings(), **per_doc.settings(),
                             "qa_pairs_per_doc": sum(len(a.qa) for a in augmented) / len(augmented)}
        for name in [k for k in loras if not k.endswith("_wrong_doc")]:  # "hypernet", "hypernet:<stem>", "gradient"
            encode_s = result[name]["ms_per_doc_batched"] / 1000 if "ms_per_doc_batched" in result[name] \
                else result[name]["s_per_doc"]
            result[f"encode_cost_ratio_perdoc_over_{name}"] = seconds / encode_s
        loras["per_doc"] = trained

    if args.refine_steps:
        from hyper_prag.augment import AugmentConfig, augment_documents
        from hyper_prag.encoders.per_doc import PerDocConfig, initial_loras
        from hyper_prag.encoders.refine import RefineEncoder, train_steps
        from hyper_prag.lora import LoraSpec

        refine_config = PerDocConfig(lr=args.per_doc_lr)
        augmented = augment_documents(docs, AugmentConfig(source="template"), base=base, corpus=corpus)
        first = HypernetEncoder.from_checkpoint(args.checkpoint[0], base)
        spec = LoraSpec().for_model(base)
        dims = {m: base.module_dims(m) for m in spec.target_modules}
        for k in args.refine_steps:
            for row, make in (("hypernet", lambda idx: RefineEncoder(first, k, refine_config).encode(
                                  [augmented[i] for i in idx])),
                              ("random", lambda idx: train_steps(base, [augmented[i] for i in idx], initial_loras(
                                  [docs[i].text for i in idx], spec, dims, refine_config).unbind(), k, refine_config)[0]
                                  if k > 0 else list(initial_loras([docs[i].text for i in idx], spec, dims,
                                                                   refine_config).unbind()))):
                table: dict[str, Lora] = {}
                start = time.perf_counter()
                for c in range(0, len(docs), args.chunk_size):
                    idx = list(range(c, min(c + args.chunk_size, len(docs))))
                    table |= {docs[i].id: lora for i, lora in zip(idx, make(idx))}
                result[f"{row}+{k}"] = {"s_per_doc": (time.perf_counter() - start) / len(docs), "k": k,
                                        "lr": args.per_doc_lr}
                loras[f"{row}+{k}"] = table
                if row == "hypernet":  # served where the hypernet's own LoRAs act: k = 0 is the hypernet row
                    applied[f"{row}+{k}"] = first.hypernet.config.apply_from

    scores = {}
    predictions = {}
    # Rows: closed-book, standard RAG (the question's documents in the prompt), every table, and "combine both"
    # (documents in the prompt and their LoRAs) for every table that is not a control or a refine row.
    rows = [("closed_book", None, "none"), ("rag", None, "documents"), *((m, t, "none") for m, t in loras.items()),
            *((f"{m}+rag", t, "documents") for m, t in loras.items()
              if args.combine and not m.endswith("_wrong_doc") and "+" not in m)]
    for method, table, context in rows:
        start = time.perf_counter()
        preds = answer(base, docs, questions, table, args.batch_size, args.max_new_tokens,
                       applied.get(method.removesuffix("+rag"), "all"), context)
        scores[method] = score(questions, preds)
        scores[method]["all"]["answer_seconds"] = time.perf_counter() - start
        predictions[method] = preds
    result["scores"] = scores
    result["paired"] = paired_differences(questions, predictions)
    result["examples"] = [{"question": q.question, "answers": list(q.answers), "type": q.type,
                           **{m: p[i] for m, p in predictions.items()}} for i, q in enumerate(questions[:12])]
    from hyper_prag.tracking import log_results

    # The refine curve: F1 after k per-document steps from the hypernet's LoRA and from a random one.
    curves = {f"{row}+k": {k: f"{row}+{k}" for k in args.refine_steps} for row in ("hypernet", "random")
              if args.refine_steps}
    log_results(as_results(questions, predictions, result), curves=curves, pairs=pairs(list(predictions)),
                summary={k: v for k, v in result.items() if k.startswith("encode_cost_ratio")},
                project=args.wandb_project, group="hypernet_vs_perdoc", name="hypernet-vs-perdoc",
                job_type="benchmark", mode=args.wandb_mode, save_dir=args.wandb_dir)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

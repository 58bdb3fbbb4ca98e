"""Decision gates of the amortized readouts on fictional documents: own vs another document's LoRA.

    python benchmarks/readout_gates.py --docs 50 --gradient-steps 10 100 1000 --out results/readout_gates/gate0.json
    python benchmarks/readout_gates.py --docs 50 --checkpoint runs/hypernet-smollm2-fastweight/checkpoints/last.ckpt
    python benchmarks/readout_gates.py --docs 50 --checkpoint CKPT --scales 1 2 3   # serve-time ΔW multipliers

For each readout (a hypernet checkpoint of any readout, or the gradient readout at stage 0 with step size η), on
the questions of ``--split`` (default ``val``: recipes are chosen there, never on test) whose documents fit in
``--docs`` documents:

* answer CE (teacher-forced gold answer, nats per token) under the question's own documents' LoRAs (summed),
  under another document's LoRAs (the control that can fail: every document carries the LoRA of the next
  document in the list), and with no LoRA (closed-book);
* greedy F1 / EM through the online path (``Pipeline.answer_given``, no passages) under own and other LoRAs,
  with bootstrap 95% CIs, overall and per question type, and the paired own − other difference;
* encode seconds per document (the readout's whole path: states or gradient pass, and the LoRA).

Every LoRA is applied as its encoder trained it (``apply_from``). Prints and writes one JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypernet_vs_perdoc import answer, begin, choose, paired, score, write_json  # noqa: E402

from hyper_prag.activated import head_cache  # noqa: E402
from hyper_prag.combine import combine, pad_rank  # noqa: E402
from hyper_prag.lora import Lora, stack  # noqa: E402
from hyper_prag.prompts import fixed_head, qa_sequence  # noqa: E402
from hyper_prag.scoring import score as score_answer  # noqa: E402
from hyper_prag.sequences import labelled_logits, per_sample_mean, right_pad, tokenize  # noqa: E402


@torch.no_grad()
def answer_ce(base, questions, doc_lists, table: dict[str, Lora] | None, apply_from: str, batch: int = 8
              ) -> list[float]:
    """Mean CE of each question's first gold answer under the summed LoRAs of ``doc_lists[i]`` (or none)."""
    head = head_cache(base, fixed_head(base)) if apply_from == "question" else None
    seqs = [tokenize(base, *qa_sequence(base, q.question, q.answers[0]), "answer", unlearned=fixed_head(base))
            for q in questions]
    out: list[float] = []
    for i in range(0, len(seqs), batch):
        ids, mask, labels = right_pad(seqs[i : i + batch], base.tokenizer.pad_token_id)
        lora = None
        if table is not None:
            combined = [combine([table[d] for d in docs], "sum") for docs in doc_lists[i : i + batch]]
            rank, scaling = max(c.spec.rank for c in combined), combined[0].spec.scaling
            lora = stack([pad_rank(c, rank, scaling) for c in combined])
        logits, targets, owner = labelled_logits(base, lora, ids, mask, labels, head)
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        out += per_sample_mean(ce, owner, len(ids)).tolist()
    return out


def evaluate(name, base, docs, questions, table, apply_from, encode_s, args) -> dict:
    ids = [list(q.doc_ids) for q in questions]
    # The control: every document carries the LoRA of the next document in the list (another document's content).
    shifted = {d.id: table[docs[(i + 1) % len(docs)].id] for i, d in enumerate(docs)}
    ce_own = answer_ce(base, questions, ids, table, apply_from)
    ce_other = answer_ce(base, questions, ids, shifted, apply_from)
    own = answer(base, docs, questions, table, args.batch_size, args.max_new_tokens, apply_from)
    wrong = answer(base, docs, questions, shifted, args.batch_size, args.max_new_tokens, apply_from)
    f1 = lambda preds: [score_answer(p, q.answers)["f1"] for p, q in zip(preds, questions)]  # noqa: E731
    lookups = [i for i, q in enumerate(questions) if q.type == "lookup"]
    f_own, f_wrong = f1(own), f1(wrong)
    return {"readout": name, "apply_from": apply_from, "encode_s_per_doc": encode_s,
            "ce_own": sum(ce_own) / len(ce_own), "ce_other": sum(ce_other) / len(ce_other),
            "ce_other_minus_own": paired(ce_other, ce_own),
            "own": score(questions, own), "other_doc": score(questions, wrong),
            "f1_own_minus_other": paired(f_own, f_wrong),
            "lookup_f1_own_minus_other": paired([f_own[i] for i in lookups], [f_wrong[i] for i in lookups]),
            "examples": [{"q": q.question, "gold": q.answers[0], "own": o, "other": w}
                         for q, o, w in list(zip(questions, own, wrong))[:6]]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, nargs="*", default=[], help="hypernet checkpoints (.ckpt or exported)")
    parser.add_argument("--scales", type=float, nargs="*", default=[1.0],
                        help="serve-time multipliers of each hypernet LoRA's B (ΔW scaled by s), one row each")
    parser.add_argument("--gradient-steps", type=float, nargs="*", default=[], help="η of the gradient readout, stage 0")
    parser.add_argument("--gradient-rank", type=int, default=8)
    parser.add_argument("--gradient-layers", type=int, nargs="*", default=[], help="adapted layers (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args, argv = begin(parser, argv)

    from hyper_prag import assemble
    from hyper_prag.augment import AugmentConfig, augment_documents
    from hyper_prag.encoders.gradient import GradientConfig, GradientEncoder, gradient_factors
    from hyper_prag.encoders.hypernet import HypernetEncoder

    base = assemble.load_model(args.model)
    corpus = assemble.load_corpus("fictional")
    docs, questions = choose(corpus, args.docs, args.seed, args.split)
    result: dict = {"command": "python benchmarks/readout_gates.py " + " ".join(argv), "split": args.split,
                    "documents": len(docs), "questions": len(questions),
                    "question_types": dict(Counter(q.type for q in questions)), "threads": torch.get_num_threads()}
    closed = answer(base, docs, questions, None, args.batch_size, args.max_new_tokens, "none")
    ce_closed = answer_ce(base, questions, [[] for _ in questions], None, "question")
    result["closed_book"] = {"ce": sum(ce_closed) / len(ce_closed), **score(questions, closed)}
    rows = []
    texts = [d.text for d in docs]
    for checkpoint in args.checkpoint:
        encoder = HypernetEncoder.from_checkpoint(checkpoint, base)
        encoder.generate(texts[:2])  # warm-up, not timed
        start = time.perf_counter()
        loras = encoder.generate(texts)
        seconds = (time.perf_counter() - start) / len(docs)
        for s in args.scales:
            table = {d.id: lora if s == 1.0 else Lora(lora.spec, lora.A, {m: s * b for m, b in lora.B.items()})
                     for d, lora in zip(docs, loras)}
            name = f"hypernet:{encoder.hypernet.config.readout}:{checkpoint}" + ("" if s == 1.0 else f":scale={s:g}")
            rows.append(evaluate(name, base, docs, questions, table, encoder.hypernet.config.apply_from, seconds, args))
    if args.gradient_steps:
        augmented = augment_documents(docs, AugmentConfig(source="template"), base=base, corpus=corpus)
        config = GradientConfig(rank=args.gradient_rank, layers=tuple(args.gradient_layers))
        encoder = GradientEncoder(base, config)
        start = time.perf_counter()
        factors = [gradient_factors(base, aug, encoder.spec, config) for aug in augmented]  # the encode pass
        seconds = (time.perf_counter() - start) / len(docs)
        for step in args.gradient_steps:
            encoder.readout.step = step
            start = time.perf_counter()
            with torch.no_grad():
                table = {d.id: encoder.readout(f) for d, f in zip(docs, factors)}
            readout_s = (time.perf_counter() - start) / len(docs)
            rows.append(evaluate(f"gradient:step={step:g}", base, docs, questions, table, config.apply_from,
                                 seconds + readout_s, args))
    result["readouts"] = rows
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

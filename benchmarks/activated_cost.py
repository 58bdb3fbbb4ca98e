"""Time per question with the LoRA at every position vs from the question on (the prompt head's KV cached).

    python benchmarks/activated_cost.py --questions 24 --checkpoint runs/hypernet-smollm2-fastweight/checkpoints/last.ckpt

On fictional test lookups (one document each), through the online path (``Pipeline.answer_given``, batches of
``--batch-size``, greedy, ``--max-new-tokens``), each method answered twice in one process, alternating, and
timed ``--repeats`` times:

* closed-book: the whole prompt through ``model.generate`` (``prefix_cache=False``) vs decoding after the cached
  head (``prefix_cache=True``);
* P-RAG: per-document LoRAs trained here (``PerDocEncoder``, the default recipe of ``configs/encode/demo.yaml``)
  applied at every position vs from the question on;
* hypernet: the checkpoint's LoRAs applied at every position vs from the question on.

Reported: the median seconds per question of each (generate + apply), their ratio, and whether the answers agree.
One JSON on stdout (and ``--out``). Timings are medians of the repeats; compare ratios, not absolute seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypernet_vs_perdoc import TableSource, write_json  # noqa: E402

from hyper_prag.corpus import Corpus  # noqa: E402
from hyper_prag.pipeline import Pipeline  # noqa: E402


def timed(questions, pipeline: Pipeline, given, source) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = pipeline.answer_given([q.question for q in questions], given, "none", source)
    return (time.perf_counter() - start) / len(questions), [a.prediction for a in answers]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a hypernet checkpoint (its LoRAs are timed)")
    parser.add_argument("--per-doc", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    from hyper_prag import assemble

    base = assemble.load_model(args.model)
    corpus = assemble.load_corpus("fictional")
    test = corpus.split("test")
    questions = [q for q in test.questions if q.type == "lookup" and len(q.doc_ids) == 1][: args.questions]
    docs = list({d: test.document(d) for q in questions for d in q.doc_ids}.values())
    sub = Corpus("activated-cost", tuple(docs), tuple(questions))
    given = [[sub.document(d) for d in q.doc_ids] for q in questions]
    none = [[] for _ in questions]
    make = lambda cache: Pipeline(base, None, sub, max_new_tokens=args.max_new_tokens,  # noqa: E731
                                  batch_size=args.batch_size, combine_mode="sum", prefix_cache=cache)
    rows: dict[str, tuple] = {"closed_book": ((make(False), none, None), (make(True), none, None))}  # (pipeline, docs, source)
    if args.per_doc:
        from hyper_prag.augment import AugmentConfig, augment_documents
        from hyper_prag.encoders.per_doc import PerDocConfig, PerDocEncoder
        from hyper_prag.lora import LoraSpec

        # configs/encode/demo.yaml's trainer: lr 3e-3, 3 epochs, QA pairs closed-book, no worked examples.
        trainer = PerDocConfig(lr=3e-3, epochs=3, examples=False, qa_context="none")
        augmented = augment_documents(docs, AugmentConfig(source="template"), base=base, corpus=corpus)
        encoder = PerDocEncoder(base, LoraSpec().for_model(base), trainer)
        table = dict(zip((d.id for d in docs), encoder.encode(augmented)))
        rows["prag"] = ((make(False), given, TableSource("per-doc", table, "all")),
                        (make(False), given, TableSource("per-doc", table, "question")))
    if args.checkpoint is not None:
        from hyper_prag.encoders.hypernet import HypernetEncoder

        hyper = HypernetEncoder.from_checkpoint(args.checkpoint, base)
        table = dict(zip((d.id for d in docs), hyper.generate([d.text for d in docs])))
        rows["hypernet"] = ((make(False), given, TableSource("hypernet", table, "all")),
                            (make(False), given, TableSource("hypernet", table, "question")))
    result: dict = {"command": "python benchmarks/activated_cost.py " + " ".join(argv), "questions": len(questions),
                    "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                    "threads": torch.get_num_threads()}
    for name, (before, after) in rows.items():
        timed(questions, *before)  # warm-up, not counted
        times = {"all_positions": [], "from_question": []}
        for _ in range(args.repeats):
            t, first = timed(questions, *before)
            times["all_positions"].append(t)
            t, second = timed(questions, *after)
            times["from_question"].append(t)
        a, b = statistics.median(times["all_positions"]), statistics.median(times["from_question"])
        result[name] = {"s_per_question_all_positions": a, "s_per_question_from_question": b, "speedup": a / b,
                        "same_answers": sum(x == y for x, y in zip(first, second)), "of": len(questions)}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

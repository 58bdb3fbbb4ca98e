"""Answer length under other worked examples: closed-book and standard RAG on the fictional test questions.

The prompt's worked examples (``hyper_prag.prompts.DEMONSTRATIONS``) set the answer format of every
method. This script swaps in a candidate set for one process, asks the harness's questions with the
store-free methods, and writes the harness's results plus a one-line summary per method (median answer
tokens, F1, EM, contained), so a candidate can be judged before it is adopted (adopting it changes the
prompt format id, and with it every per-document store key).

    python benchmarks/demo_variants.py v1 --out results/demo_variants/v1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hyper_prag import api, prompts

CURRENT = prompts.DEMONSTRATIONS
# Candidate additions to the three current examples (multi-hop and comparison questions, the kinds that
# were answered in sentences), each answered by the bare answer.
VARIANTS: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "current": (),
    "v1": (
        ("In which city was the author of Dracula born?", ("Dracula is an 1897 novel by Bram Stoker.",
                                                           "Bram Stoker was an Irish author, born in Dublin in 1847."),
         "Dublin"),
        ("Which city has the larger population, Paris or Lyon?", (), "Paris"),
        ("In which country was the founder of Microsoft born?", (), "the United States"),
    ),
    "v2": (
        ("In which city was the author of Dracula born?", ("Dracula is an 1897 novel by Bram Stoker.",
                                                           "Bram Stoker was an Irish author, born in Dublin in 1847."),
         "Dublin"),
        ("Who was born earlier, Albert Einstein or Isaac Newton?",
         ("Albert Einstein was a physicist born in Ulm in 1879.",
          "Isaac Newton was an English mathematician, born in 1643 in Woolsthorpe."), "Isaac Newton"),
        ("Which city has the larger population, Paris or Lyon?", (), "Paris"),
    ),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--methods", default="closed-book,rag")
    parser.add_argument("--per-type", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    prompts.DEMONSTRATIONS = CURRENT + VARIANTS[args.variant]
    results = api.evaluate(args.methods, benchmark="fictional", per_type=args.per_type, out=args.out, progress=False,
                           wandb_mode="disabled")
    summary = {"variant": args.variant, "format_id": prompts.format_id(), "examples": len(prompts.DEMONSTRATIONS),
               "methods": {m.name: {"median_answer_tokens": m.median_answer_tokens,
                                    **{k: round(100 * m.scores["total"][k]["mean"], 1) for k in ("f1", "em", "accuracy")}}
                           for m in results.methods}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

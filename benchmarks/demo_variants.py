"""Answer format under other worked examples and passage layouts: closed-book and standard RAG on the
fictional test questions.

The prompt's worked examples (``hyper_prag.prompts.DEMONSTRATIONS``) and where retrieved passages stand
(``hyper_prag.prompts.PASSAGES_IN``) set the answer format of every method. This script swaps in a
candidate for one process, asks the harness's questions with the store-free methods, and writes the
harness's results plus a one-line summary per method (median answer tokens, F1, EM, contained), so a
candidate can be judged before it is adopted (adopting it changes the prompt format id, and with it every
per-document store key).

    python benchmarks/demo_variants.py before --layout user --out results/demo_variants/before
    python benchmarks/demo_variants.py v4 --layout system --out results/demo_variants/system-v4

Layouts: ``user`` puts the numbered passages in the question's user turn, before the instruction, and
shows the worked examples with their passages (the format shipped before); ``system`` puts them in the
system turn after the model's own system text, with passage-free worked examples (shipped now: every
method's last user turn reads like a worked example); ``system-keep`` puts them in the system turn but
shows the worked examples with their passages.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from hyper_prag import api, dynamic, pipeline, prompts
from hyper_prag.model import BaseModel

Example = tuple[str, tuple[str, ...], str]  # (question, passages, answer)

# The three worked examples shipped before, with the passages they showed in the user layout.
BEFORE: tuple[Example, ...] = (
    ("Who founded Microsoft?", ("Microsoft is an American technology company founded by Bill Gates and Paul Allen "
                                "in 1975. It is headquartered in Redmond.",), "Bill Gates and Paul Allen"),
    ("When was the novel Dracula published?", (), "1897"),
    ("What was Marie Curie's occupation?", ("Marie Curie was a physicist and chemist born in Warsaw in 1867.",),
     "physicist"),
)
TWO_HOP: Example = ("In which city was the author of Dracula born?",
                    ("Dracula is an 1897 novel by Bram Stoker.", "Bram Stoker was an Irish author, born in Dublin in 1847."),
                    "Dublin")
# Each candidate is the full set of worked examples, in order: BEFORE plus the kinds a small model answered
# in sentences (two-hop, comparison, yes/no), each answered by the bare answer.
VARIANTS: dict[str, tuple[Example, ...]] = {
    "before": BEFORE,
    "v1": BEFORE + (TWO_HOP, ("Which city has the larger population, Paris or Lyon?", (), "Paris"),
                    ("In which country was the founder of Microsoft born?", (), "the United States")),
    "v2": BEFORE + (TWO_HOP, ("Who was born earlier, Albert Einstein or Isaac Newton?",
                              ("Albert Einstein was a physicist born in Ulm in 1879.",
                               "Isaac Newton was an English mathematician, born in 1643 in Woolsthorpe."), "Isaac Newton"),
                    ("Which city has the larger population, Paris or Lyon?", (), "Paris")),
    "v3": BEFORE + (("Who was born earlier, Albert Einstein or Isaac Newton?", (), "Isaac Newton"),
                    ("Were Mozart and Beethoven born in the same country?", (), "no")),
}
VARIANTS["v4"] = BEFORE + (TWO_HOP,) + VARIANTS["v3"][3:]  # shipped now (with the system layout)
VARIANTS["v5"] = VARIANTS["v1"] + VARIANTS["v3"][3:]


def layout_prompt(examples: tuple[Example, ...], layout: str):
    """A ``question_prompt`` replacement asking with ``examples`` in ``layout``."""
    shown = tuple((prompts.user_message(q, ps if layout != "system" else ()), a) for q, ps, a in examples)

    def question_prompt(base: BaseModel, question: str, passages: Sequence[str] = ()) -> str:
        if layout == "user":
            return base.chat_prompt(prompts.user_message(question, passages), history=shown)
        return base.chat_prompt(prompts.user_message(question), system=prompts.system_message(base, passages),
                                history=shown)

    return question_prompt


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--layout", choices=("user", "system", "system-keep"), default="system",
                        help="where retrieved passages stand (see the module docstring)")
    parser.add_argument("--methods", default="closed-book,rag")
    parser.add_argument("--per-type", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    examples = VARIANTS[args.variant]
    for module in (prompts, pipeline, dynamic):
        module.question_prompt = layout_prompt(examples, args.layout)
    results = api.evaluate(args.methods, benchmark="fictional", per_type=args.per_type, out=args.out, progress=False,
                           wandb_mode="disabled")
    summary = {"variant": args.variant, "layout": args.layout, "examples": len(examples),
               "methods": {m.name: {"median_answer_tokens": m.median_answer_tokens,
                                    **{k: round(100 * m.scores["total"][k]["mean"], 1) for k in ("f1", "em", "contained")}}
                           for m in results.methods}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

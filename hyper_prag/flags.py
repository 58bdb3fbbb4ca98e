"""Command-line flag spelling: one name per concept across every verb, words joined by hyphens.

The verbs that are generated from a signature (``hyper-prag encode`` from :func:`hyper_prag.api.encode`,
``hyper-prag train hypernet`` from the Lightning module's and data module's ``__init__``) get jsonargparse's
names, which are the Python names: ``--chunk_size``. :func:`hyphenate` shows them as ``--chunk-size``, the
spelling of the hand-written verbs, and keeps the underscore form working, unlisted, for the commands
already written down (jsonargparse's own ``--print_config`` keeps its name). Dotted flags
(``--trainer.max_steps``, ``--model.dtype``) are paths into the YAML and keep its keys.

:data:`RENAMED` holds the old names that still parse, hidden from ``--help``; a test walks every verb's
parser and fails on a concept with two visible names.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from hyper_prag.paths import ConfigKind, config_file

# old flag -> the one visible name of its concept (the old one still parses, unlisted)
RENAMED: dict[str, str] = {"--benchmark": "--corpus", "--hypernet": "--checkpoint"}


def hyphenate(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Lists every undotted ``--snake_case`` option of ``parser`` as ``--snake-case``; both spellings parse.

    Args:
        parser: an argparse (or jsonargparse) parser whose arguments are all added.

    Returns:
        ``parser``, changed in place.
    """
    for action in parser._actions:
        if type(action).__name__ == "_ActionPrintConfig":
            continue  # jsonargparse parses --print_config by its exact name (its value is optional)
        names = []
        for name in action.option_strings:
            if name.startswith("--") and "_" in name and "." not in name:
                hyphen = name.replace("_", "-")
                parser._option_string_actions.setdefault(hyphen, action)  # the underscore form stays registered
                name = hyphen
            if name not in names:
                names.append(name)
        action.option_strings = names  # what --help lists
    return parser


def config_argv(argv: Sequence[str], kind: ConfigKind) -> list[str]:
    """``argv`` with each ``--config`` / ``-c`` value replaced by the file it means (:func:`config_file`).

    Args:
        argv: command-line arguments.
        kind: which shipped configs a name is looked up in (``hypernet`` or ``encode``).

    Raises:
        HyperPragError: a value that is neither a file nor a shipped config's name.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            out += [arg, str(config_file(args[i + 1], kind))]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + str(config_file(arg.split("=", 1)[1], kind))
        out.append(arg)
        i += 1
    return out


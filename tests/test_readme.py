"""The README is a manual that is true: every `hyper-prag` command in its code blocks parses.

The argparse verbs are parsed by their own parsers; `encode` and `train …` go through their Lightning /
jsonargparse parsers with `--print_config`, which checks every flag and YAML key against the config
without loading a model. Nothing is run: the SmolLM2 commands train for minutes to hours, and the tiny
configs' runs are `tests/test_cli.py`'s.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from hyper_prag.cli import COMMANDS, _split_generated, build_parser, main

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    """Every `hyper-prag …` command of the README's bash blocks, continuation lines joined, comments cut."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("hyper-prag ") or " -m hyper_prag.cli " in line:
                commands.append(line[line.index("hyper") :].replace("hyper_prag.cli", "hyper-prag", 1))
    return commands


def test_the_readme_shows_commands_of_every_kind():
    verbs = {shlex.split(c)[1] for c in readme_commands()}
    assert {"evaluate", "ask", "encode", "train", "export-hypernet"} <= verbs


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    if "--help" in argv:
        return  # prints and exits by design
    verb = next(a for a in argv if a in COMMANDS)
    if verb in ("encode", "train"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            main([*argv, "--print_config"])
        assert done.value.code in (0, None), f"{command!r} does not parse: {out.getvalue()[-500:]}"
        return
    parsed, rest = _split_generated(argv, verb)
    build_parser(verb).parse_args(parsed)  # SystemExit (a failed test) on an unknown or mistyped flag
    assert not rest

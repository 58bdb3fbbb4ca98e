"""Writes the harness's result tables into docs/results.md (between the ``results`` markers), never by hand.

    .venv/bin/python benchmarks/readme_results.py results/demo results/squad results/hotpotqa

For every results folder written by ``hyper-prag evaluate`` (or ``hyper-prag demo``) it reads
``results.json`` and ``results.md``, rebuilds the exact ``hyper-prag evaluate`` command from the
recorded config, and puts a section with that command above the table. The README text between
``<!-- results:begin -->`` and ``<!-- results:end -->`` is replaced; nothing else is touched.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from hyper_prag.cli import evaluate_command

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

ROOT = Path(__file__).resolve().parent.parent


def _portable(value: object) -> str:
    """A path inside the repository as a relative path; other values unchanged."""
    text = str(value)
    return text.removeprefix(f"{ROOT}/")


def command(results: dict) -> str:
    """The command line that reproduces a results.json (``hyper-prag demo`` for the demo's slice)."""
    config = results["config"]
    methods = [m["name"] for m in results["methods"]]
    if str(config["benchmark"]).endswith("-demo"):  # hyper-prag demo evaluates a slice it saves in the cache
        words = shlex.split(evaluate_command({**config, "benchmark": Path(config["benchmark"]).name}, methods))
        return "make demo   # hyper-prag demo saves the slice in the cache, then runs:\n" + shlex.join(
            _portable(a) for a in words)
    line = shlex.join(_portable(a) for a in shlex.split(evaluate_command(config, methods)))
    if config.get("merged_runs", 1) > 1:  # hyper-prag merge-results: the one command that makes the whole table
        line += f"\n# (measured as {config['merged_runs']} runs of these questions, merged by `hyper-prag merge-results`)"
    return line


def section(folder: Path) -> str:
    """One README section: benchmark name, question count, the command, the harness's Markdown table."""
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    table = (folder / "results.md").read_text(encoding="utf-8").strip()
    config = results["config"]
    name = Path(str(config["benchmark"])).name
    head = f"### {name}: {config['questions']} {config.get('split', '')} questions, k = {config.get('k')}"
    return f"{head}\n\n```bash\n{command(results)}\n```\n\n{table}\n"


def rewrite(readme: Path, folders: list[Path]) -> None:
    """Replaces the text between the markers of ``readme`` with one section per results folder."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} … {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = "\n".join(section(f) for f in folders)
    readme.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="results folders (results.json + results.md)")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "results.md")
    args = parser.parse_args()
    rewrite(args.readme, args.folders)


if __name__ == "__main__":
    main()

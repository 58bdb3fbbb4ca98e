"""The demo: its slice asks every lookup its documents allow, and the README shows what the demo printed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hyper_prag.corpus import Corpus, Document, Question
from hyper_prag.demo import demo_config_sha256, demo_slice, encoder_table
from hyper_prag.evaluate import Results

ROOT = Path(__file__).parents[1]


def _benchmark() -> Corpus:
    docs = tuple(Document(id=f"d{i}", title=f"T{i}", text=f"Document {i}.", split="test") for i in range(12))
    questions = [Question(f"l{i}", f"Lookup {i}?", ("a",), "lookup", (f"d{i}",)) for i in range(12)]
    questions += [Question(f"c{i}", f"Compare {i}?", ("yes",), "compare", (f"d{i}", f"d{i + 6}")) for i in range(6)]
    questions += [Question("b0", "Bridge?", ("b",), "bridge", ("d11", "d0"))]
    return Corpus("toy", docs, tuple(questions))


def test_the_slice_asks_every_lookup_of_its_documents_and_keeps_each_questions_documents():
    s = demo_slice(_benchmark(), n_docs=6, per_type=2)
    ids = {d.id for d in s.documents}
    assert len(ids) == 6
    assert all(set(q.doc_ids) <= ids for q in s.questions)  # retrieval over the slice can find every document
    by_type = {t: [q.id for q in s.questions if q.type == t] for t in ("lookup", "compare", "bridge")}
    assert len(by_type["compare"]) == 2 and len(by_type["bridge"]) == 1
    assert by_type["lookup"] == [f"l{i[1:]}" for i in sorted(ids, key=lambda d: int(d[1:]))]  # one per document
    # The bridge question (d11, d0) shares no document with the compares chosen first, so it costs two; the
    # remaining room is filled with documents that bring a lookup.
    assert {"d11", "d0"} <= ids


def test_the_readme_demo_table_is_what_the_demo_printed_at_this_configuration():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- demo-config-sha256: ([0-9a-f]{64}) -->\n(.*?)<!-- /demo -->", readme, re.S)
    assert found, "the README's demo section lost its <!-- demo-config-sha256: … --> block"
    recorded, block = found.group(1), found.group(2)
    assert recorded == demo_config_sha256(), (
        "the demo's configuration changed since the README's table was made: run `make demo` and paste "
        "results/demo/demo.md's first table into the README with the new hash")
    run = Results.from_dict(json.loads((ROOT / "results" / "demo" / "results.json").read_text(encoding="utf-8")))
    assert run.config.get("demo_config_sha256") == recorded, "results/demo/ is from another demo configuration"
    table = encoder_table(run).split("\n\n")[0].strip()
    assert table in block, "the README's demo table differs from results/demo/results.json's"

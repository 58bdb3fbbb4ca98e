"""The comparison's W&B run, read back from the offline run's files (no mock of wandb)."""

from __future__ import annotations

import json

from hyper_prag.api import evaluate
from hyper_prag.corpus import Corpus, Document, save_corpus
from hyper_prag.tracking import ANSWER_COLUMNS, SUMMARY_COLUMNS
from tests.test_pipeline import QUESTIONS, TEXTS


def test_evaluate_logs_summary_answers_and_plots_to_an_offline_wandb_run(tmp_path, monkeypatch):
    import hyper_prag.retrieve as retrieve

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)
    monkeypatch.setenv("WANDB_SILENT", "true")
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    folder = save_corpus(Corpus(name="tiny-track", documents=docs, questions=tuple(QUESTIONS)), tmp_path / "corpus")
    results = evaluate("closed-book,rag", benchmark=str(folder), model="tiny", limit=4, max_new_tokens=3,
                       resamples=50, out=tmp_path / "results", progress=False, wandb_dir=tmp_path / "wb")
    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    (summary_file,) = (media / "table").glob("summary_*.table.json")
    (answers_file,) = (media / "table").glob("answers_*.table.json")
    summary, answers = json.loads(summary_file.read_text()), json.loads(answers_file.read_text())
    assert summary["columns"] == list(SUMMARY_COLUMNS) and answers["columns"] == list(ANSWER_COLUMNS)
    groups = [*results.types, "total"]
    assert [(r[0], r[1]) for r in summary["data"]] == [(m, g) for m in ("closed-book", "rag") for g in groups]
    total_rag = next(r for r in summary["data"] if r[:2] == ["rag", "total"])
    assert total_rag[2] == results.method("rag").scores["total"]["f1"]["mean"]
    assert len(answers["data"]) == 2 * 4
    logged = {(r[0], r[1]): r[4] for r in answers["data"]}
    for m in results.methods:
        assert all(logged[(m.name, p["id"])] == p["prediction"] for p in m.predictions)
    images = sorted(p.name.split("_")[0] for p in (media / "images").glob("*.png"))
    assert images == ["f1", "latency"]

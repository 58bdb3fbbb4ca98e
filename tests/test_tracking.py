"""The comparison's W&B run, read back from the offline run's own record file (no mock of wandb)."""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from hyper_prag.api import evaluate
from hyper_prag.corpus import Corpus, Document, save_corpus
from hyper_prag.evaluate import Results, compare
from hyper_prag.methods import STAGES, Answer
from hyper_prag.tracking import ANSWER_COLUMNS, F1_COLUMNS, SUMMARY_COLUMNS, ValidationGapChart, log_results
from tests.test_pipeline import QUESTIONS, TEXTS

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")


@dataclass
class Run:
    """What an offline run recorded: history keys, custom-chart specs, run summary, its folder."""

    history: set[str]
    charts: dict[str, dict]  # key -> the Vega panel config
    summary: dict[str, float]
    folder: Path

    def table(self, key: str) -> dict:
        """The logged table ``key`` (its JSON file under files/media/table)."""
        (path,) = (self.folder / "files" / "media" / "table").glob(f"{key.replace('/', '_')}_*.table.json")
        return json.loads(path.read_text())


def read_run(folder: Path) -> Run:
    """Parses ``run-*.wandb``: W&B's header, then LevelDB-log framed ``Record`` protobufs (32 KiB blocks).

    ``run.finish()`` returns before W&B's service has written the last block; ``wandb.teardown()`` (what
    the process does at exit) waits for it."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()

    (path,) = folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    history, charts, summary = set(), {}, {}
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(payload)
        for item in record.history.item:
            history.add(item.key or item.nested_key[0])
        for item in record.config.update:
            if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                charts[item.nested_key[2]] = json.loads(item.value_json)["panel_config"]
        for item in record.summary.update:
            if item.key:
                summary[item.key] = json.loads(item.value_json)
    return Run(history, charts, summary, folder)


@dataclass
class Fixed:
    """A method that answers from a table (no model): enough for the harness to score and time it."""

    name: str
    predictions: dict[str, str]

    def answer(self, questions):
        return [Answer(q, self.predictions.get(q, "no idea"), doc_ids=("quell",),
                       timing={s: 0.001 * (i + 1) for i, s in enumerate(STAGES)}) for q in questions]


def fake_results() -> Results:
    """Five questions of three types, five methods (a refine curve hypernet → hypernet+2), real scoring."""
    gold = {q.question: q.answers[0] for q in QUESTIONS}
    first = {q.question: gold[q.question] for q in QUESTIONS[:2]}
    methods = [Fixed("closed-book", {}), Fixed("rag", first), Fixed("prag", gold), Fixed("hypernet", first),
               Fixed("hypernet+2", dict(list(gold.items())[:4]))]
    costs = {"prag": {"encode_seconds_per_doc": 9.5, "bytes_per_doc": 1e5},
             "hypernet": {"encode_seconds_per_doc": 0.02}, "hypernet+2": {"encode_seconds_per_doc": 1.5}}
    return compare(methods, QUESTIONS, costs=costs, n_resamples=50, progress=False, config={"benchmark": "tiny"})


def markdown_cells(markdown: str) -> dict[str, dict[str, str]]:
    """method -> column -> cell of the first table of ``results.md``."""
    lines = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0]]
    rows = [[c.strip() for c in line] for line in lines[1:] if len(line) == len(head)]
    return {row[0]: dict(zip(head, row)) for row in rows if row[0] in {"closed-book", "rag", "prag", "hypernet",
                                                                        "hypernet+2"}}


def test_a_comparison_logs_native_charts_tables_and_percent_summaries(tmp_path):
    results = fake_results()
    paths = results.write(tmp_path / "results")
    folder = log_results(results, plots={k: v for k, v in paths.items() if k.endswith("_png")},
                         curves={"hypernet+k": {0: "hypernet", 2: "hypernet+2"}}, save_dir=tmp_path / "wb")
    run = read_run(folder)
    bars = ["f1_by_method", *(f"f1_by_type/{t}" for t in results.types),
            *(f"latency_by_stage/{s}" for s in (*STAGES, "total"))]
    presets = {key: "wandb/bar/v0" for key in bars} | {"quality_vs_cost": "wandb/scatter/v0",
                                                       "refine_curve": "wandb/line/v0"}
    assert {k: c["panelDefId"] for k, c in run.charts.items()} == presets
    assert {f"{k}_table" for k in presets} | {"summary", "answers", "paired_f1", "f1", "latency"} <= run.history

    f1 = run.table("f1_by_method_table")
    assert f1["columns"] == list(F1_COLUMNS)
    prag = results.method("prag").scores["total"]["f1"]
    assert ["prag", 100 * prag["mean"], 100 * prag["low"], 100 * prag["high"], 5] in f1["data"]
    cost = {r[0]: r[1:3] for r in run.table("quality_vs_cost_table")["data"]}
    assert cost == {"closed-book": [0.0, 0.0], "rag": [0.0, 40.0], "prag": [9.5, 100.0], "hypernet": [0.02, 40.0],
                    "hypernet+2": [1.5, 80.0]}
    curve = [r[:3] for r in run.table("refine_curve_table")["data"]]
    assert curve == [["hypernet+k", 0, 40.0], ["hypernet+k", 2, 80.0]]
    assert run.table("summary")["columns"] == list(SUMMARY_COLUMNS)
    answers = run.table("answers")
    assert answers["columns"] == list(ANSWER_COLUMNS) and len(answers["data"]) == 5 * len(QUESTIONS)
    assert {r[5] for r in answers["data"] if r[2] == "prag"} == {100.0}  # F1 in percent

    cells = markdown_cells(paths["markdown"].read_text())
    for m in results.methods:
        for metric, column in (("f1", "F1 total"), ("em", "EM"), ("contained", "contained")):
            value = run.summary[f"{metric}/{m.name}"]
            assert value == 100 * m.scores["total"][metric]["mean"]  # percent, as results.md
            assert cells[m.name][column].split(" ± ")[0] == f"{value:.1f}"
    assert run.summary["f1/prag"] == 100.0 and run.summary["encode_seconds_per_doc/prag"] == 9.5
    assert run.summary["delta_f1/prag - closed-book"] == 100.0


def test_evaluate_logs_its_comparison_to_an_offline_wandb_run(tmp_path, monkeypatch):
    import hyper_prag.retrieve as retrieve

    monkeypatch.setattr(retrieve, "cache_dir", lambda stage: tmp_path / stage)
    docs = tuple(Document(id=i, title=t, text=x) for i, (t, x) in TEXTS.items())
    folder = save_corpus(Corpus(name="tiny-track", documents=docs, questions=tuple(QUESTIONS)), tmp_path / "corpus")
    results = evaluate("closed-book,rag", benchmark=str(folder), model="tiny", limit=4, max_new_tokens=3,
                       resamples=50, out=tmp_path / "results", progress=False, wandb_dir=tmp_path / "wb")
    (path,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    run = read_run(path)
    assert {"f1_by_method", "quality_vs_cost", "latency_by_stage/generate"} <= run.charts.keys()
    assert {"summary", "answers", "f1", "latency"} <= run.history
    col = {c: i for i, c in enumerate(ANSWER_COLUMNS)}
    logged = {(r[col["method"]], r[col["id"]]): r[col["prediction"]] for r in run.table("answers")["data"]}
    for m in results.methods:
        assert all(logged[(m.name, p["id"])] == p["prediction"] for p in m.predictions)
        assert run.summary[f"f1/{m.name}"] == 100 * m.scores["total"]["f1"]["mean"]


def test_old_results_json_is_read_with_the_current_metric_names():
    def old(cell):  # as results.json files written before "contained" was chosen
        return {("accuracy" if k == "contained" else k): v for k, v in cell.items()}

    data = fake_results().to_dict()
    for m in data["methods"]:
        m["scores"] = {group: old(cell) for group, cell in m["scores"].items()}
        m["predictions"] = [old(p) for p in m["predictions"]]
    back = Results.from_dict(data)
    assert back.method("prag").scores["total"]["contained"]["mean"] == 1.0
    assert "| contained |" in back.to_markdown() and "contained" in back.method("rag").predictions[0]


class _Validated(pl.LightningModule):
    """Logs a fixed val/loss and val/loss_wrong_doc, as the hypernet trainer's validation does."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log_dict({"val/loss": 1.0, "val/loss_wrong_doc": 1.75})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_validation_gap_chart_logs_wrong_doc_minus_own_loss(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=1)
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=2, num_sanity_val_steps=0, logger=logger,
                         callbacks=[ValidationGapChart()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", log_every_n_steps=1)
    trainer.fit(_Validated(), data, data)
    assert trainer.callback_metrics["val/wrong_doc_gap"].item() == pytest.approx(0.75)
    header, *rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("val/wrong_doc_gap")
    assert [float(r.split(",")[column]) for r in rows if r.split(",")[column]] == [0.75]


def test_hypernet_vs_perdoc_logs_its_rows_with_the_refine_curve(tmp_path):
    spec = importlib.util.spec_from_file_location("hypernet_vs_perdoc", ROOT / "benchmarks" / "hypernet_vs_perdoc.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gold = [q.answers[0] for q in QUESTIONS]
    predictions = {"closed_book": ["no"] * 5, "rag": gold, "hypernet": gold[:2] + ["no"] * 3,
                   "hypernet_wrong_doc": ["no"] * 5, "hypernet+rag": gold, "hypernet+0": gold[:2] + ["no"] * 3,
                   "hypernet+4": gold[:4] + ["no"], "random+0": ["no"] * 5, "random+4": gold[:1] + ["no"] * 4}
    result = {"command": "python benchmarks/hypernet_vs_perdoc.py", "documents": 6, "checkpoint": ["x.ckpt"],
              "hypernet": {"ms_per_doc_batched": 20.0}, "hypernet+0": {"s_per_doc": 0.03},
              "hypernet+4": {"s_per_doc": 4.0}, "random+0": {"s_per_doc": 0.0}, "random+4": {"s_per_doc": 4.0},
              "scores": {m: {"all": {"answer_seconds": 1.0}} for m in predictions}}
    results = bench.as_results(QUESTIONS, predictions, result, resamples=50)
    curves = {f"{row}+k": {k: f"{row}+{k}" for k in (0, 4)} for row in ("hypernet", "random")}
    folder = log_results(results, curves=curves, pairs=bench.pairs(list(predictions)), job_type="benchmark",
                         save_dir=tmp_path / "wb")
    run = read_run(folder)
    cost = {r[0]: r[1:3] for r in run.table("quality_vs_cost_table")["data"]}
    assert cost["closed_book"] == [0.0, 0.0] and cost["hypernet"] == [0.02, 40.0] and cost["hypernet+rag"][0] == 0.02
    assert "hypernet_wrong_doc" not in cost  # a control, not an encoder
    assert [r[:3] for r in run.table("refine_curve_table")["data"]] == [
        ["hypernet+k", 0, 40.0], ["hypernet+k", 4, 80.0], ["random+k", 0, 0.0], ["random+k", 4, 20.0]]
    assert run.summary["delta_f1/hypernet - hypernet_wrong_doc"] == 40.0
    assert {"latency_by_stage/answer", "latency_by_stage/total"} <= run.charts.keys()

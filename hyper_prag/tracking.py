"""Weights & Biases as the dashboard of a comparison (offline by default: nothing leaves the machine).

A harness run (``hyper-prag evaluate --wandb-mode ...``, :func:`hyper_prag.api.evaluate`) or a
benchmark script logs one W&B run through the plain ``wandb`` API, in the project of the training
runs and grouped by benchmark, so amortized and per-document encoding sit side by side in one
workspace. This module is the one place outside training that calls ``wandb.init``; training logs
through the Lightning logger of its YAML (:class:`ValidationGapChart` adds the gap that matters).

Every score is in percent, as in ``results.md``, under the names of :data:`hyper_prag.scoring.METRICS`
(``f1``, ``em``, ``contained``). One run logs::

    f1_by_method              bar chart: total F1 per method (table f1_by_method_table: ci_low, ci_high, n)
    f1_by_type/<type>         bar chart per question type: F1 per method, with the CI bounds in its table
    latency_by_stage/<stage>  bar chart per answering stage and "total": median ms per question per method
    quality_vs_cost           scatter: encoding seconds per document vs F1, one point per method that has a
                              cost (closed-book and RAG encode nothing: 0)
    refine_curve              line chart (when the caller passes ``curves``): F1 vs per-document steps k
    summary                   table: one row per (method, question type | "total"), every metric with its CI
    answers                   table: one row per (method, question): question, type, prediction, gold, F1, EM
    paired_f1                 table: paired F1 differences on the same questions, with their CIs
    f1, latency               the harness's PNG plots (error bars drawn), as images
    run summary               f1/<method>, f1_low/<method>, f1_high/<method>, em/<method>, contained/<method>,
                              seconds_per_question/<method>, encode_seconds_per_doc/<method>, ...

The native charts use W&B's built-in Vega presets (``wandb.plot.bar`` / ``scatter`` / ``line``), which
draw no error bars: each chart's table (``<key>_table``) carries the 95% bootstrap CI bounds, and the
``f1`` image draws them. Offline runs land in ``<save_dir>/wandb/offline-run-*``; ``wandb sync``
uploads them later.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

from hyper_prag.evaluate import PAIRS, MethodResult, Results
from hyper_prag.methods import METHODS
from hyper_prag.scoring import METRICS, TOTAL

log = logging.getLogger(__name__)

WandbMode = Literal["offline", "online", "disabled"]
PROJECT = "hyper-prag"  # the project the training runs log to (configs/hypernet/*.yaml, configs/encode/*.yaml)
SUMMARY_COLUMNS = ("method", "type", "n", *(f"{m}{s}" for m in METRICS for s in ("", "_low", "_high")),
                   "median_seconds", "encode_seconds_per_doc", "bytes_per_doc")
ANSWER_COLUMNS = ("question", "type", "method", "prediction", "gold", *METRICS, "seconds", "id", "doc_ids",
                  "lora_names")
F1_COLUMNS = ("method", "f1", "ci_low", "ci_high", "n")
LATENCY_COLUMNS = ("method", "median_ms", "mean_ms")
COST_COLUMNS = ("method", "encode_seconds_per_doc", "f1", "ci_low", "ci_high", "bytes_per_doc")
CURVE_COLUMNS = ("series", "steps", "f1", "ci_low", "ci_high", "encode_seconds_per_doc")
PAIRED_COLUMNS = ("method", "reference", "delta_f1", "ci_low", "ci_high")

Curves = Mapping[str, Mapping[int, str]]  # series (e.g. "hypernet+k") -> steps k -> the method measured at k


@dataclass(frozen=True)
class Chart:
    """One native W&B chart: its data and how ``wandb.plot`` draws it."""

    kind: Literal["bar", "scatter", "line"]
    columns: tuple[str, ...]
    rows: list[list[Any]]
    x: str  # bar: the label column; scatter and line: the x column
    y: str  # the value column
    title: str
    stroke: str | None = None  # line: one line per value of this column


def _pct(value: float | None) -> float | None:
    """A fraction as percent; ``None`` for a missing or NaN value (a type with no question)."""
    return None if value is None or math.isnan(value) else 100 * value


def _f1_row(m: MethodResult, group: str) -> list[Any]:
    cell = m.scores[group]["f1"]
    return [m.name, _pct(cell["mean"]), _pct(cell["low"]), _pct(cell["high"]), cell["n"]]


def encode_cost(m: MethodResult) -> float | None:
    """Seconds per document of offline encoding: the recorded cost, 0 for a harness method that encodes
    nothing (no LoRA, no augmentation), else ``None`` (unknown: left out of the scatter)."""
    if m.encode_seconds_per_doc is not None:
        return m.encode_seconds_per_doc
    spec = METHODS.get(m.name)
    return 0.0 if spec is not None and spec.lora == "none" and spec.context != "augmented" else None


def charts(results: Results, curves: Curves = {}) -> dict[str, Chart]:
    """The native charts of a run, keyed as logged (see the module docstring); scores in percent.

    Args:
        results: the harness's results.
        curves: series -> steps -> method name: the refine curve (F1 after k per-document steps).
    """
    out = {"f1_by_method": Chart("bar", F1_COLUMNS, [_f1_row(m, TOTAL) for m in results.methods], "method", "f1",
                                 "F1 (%) by method, all questions (95% CI: ci_low, ci_high)")}
    for t in results.types:
        out[f"f1_by_type/{t}"] = Chart("bar", F1_COLUMNS, [_f1_row(m, t) for m in results.methods], "method", "f1",
                                       f"F1 (%) on {t} questions (95% CI: ci_low, ci_high)")
    stages = list(dict.fromkeys(s for m in results.methods for s in m.latency["median"] if s != "total"))
    for stage in [*stages, "total"]:
        rows = [[m.name, 1000 * m.latency["median"].get(stage, 0.0), 1000 * m.latency["mean"].get(stage, 0.0)]
                for m in results.methods]
        out[f"latency_by_stage/{stage}"] = Chart("bar", LATENCY_COLUMNS, rows, "method", "median_ms",
                                                 f"{stage}: median ms per question")
    cost = [[m.name, encode_cost(m), *_f1_row(m, TOTAL)[1:4], m.bytes_per_doc] for m in results.methods]
    out["quality_vs_cost"] = Chart("scatter", COST_COLUMNS, [r for r in cost if r[1] is not None],
                                   "encode_seconds_per_doc", "f1", "F1 (%) vs encoding seconds per document")
    if curves:
        rows = [[series, k, *_f1_row(m, TOTAL)[1:4], m.encode_seconds_per_doc]
                for series, points in curves.items() for k, name in sorted(points.items())
                for m in [results.method(name)]]
        out["refine_curve"] = Chart("line", CURVE_COLUMNS, rows, "steps", "f1",
                                    "F1 (%) after k per-document steps", stroke="series")
    return out


def summary_rows(results: Results) -> list[list[Any]]:
    """One row per (method, question type | total) in :data:`SUMMARY_COLUMNS` order; scores in percent."""
    rows = []
    for m in results.methods:
        for group in [*results.types, TOTAL]:
            cell = m.scores[group]
            rows.append([m.name, group, cell["f1"]["n"],
                         *(_pct(cell[metric][s]) for metric in METRICS for s in ("mean", "low", "high")),
                         m.latency["median"]["total"], m.encode_seconds_per_doc, m.bytes_per_doc])
    return rows


def answer_rows(results: Results) -> list[list[Any]]:
    """One row per (method, question) in :data:`ANSWER_COLUMNS` order; scores in percent."""
    return [[p["question"], p["type"], m.name, p["prediction"], " | ".join(p["answers"]),
             *(_pct(p[metric]) for metric in METRICS), float(sum(p["timing"].values())), p["id"],
             " ".join(p["doc_ids"]), " ".join(p["lora_names"])]
            for m in results.methods for p in m.predictions]


def paired_rows(results: Results, pairs: Sequence[tuple[str, str]] = PAIRS) -> list[list[Any]]:
    """One row per pair that ran (method − reference, F1 on the same questions) in :data:`PAIRED_COLUMNS` order."""
    return [[a, b, *(_pct(v) for v in d)] for a, b in pairs if (d := results.paired(a, b)) is not None]


def summary_values(results: Results, pairs: Sequence[tuple[str, str]] = PAIRS) -> dict[str, float]:
    """The run summary: ``<metric>/<method>`` in percent (the numbers of ``results.md``), costs in seconds/bytes."""
    out: dict[str, float | None] = {}
    for m in results.methods:
        total = m.scores[TOTAL]
        out |= {f"{metric}/{m.name}": _pct(total[metric]["mean"]) for metric in METRICS}
        out |= {f"f1_low/{m.name}": _pct(total["f1"]["low"]), f"f1_high/{m.name}": _pct(total["f1"]["high"]),
                f"seconds_per_question/{m.name}": m.latency["median"]["total"],
                f"encode_seconds_per_doc/{m.name}": m.encode_seconds_per_doc,
                f"bytes_per_doc/{m.name}": m.bytes_per_doc,
                f"median_answer_tokens/{m.name}": m.median_answer_tokens}
    out |= {f"delta_f1/{a} - {b}": d for a, b, d, _, _ in paired_rows(results, pairs)}
    return {k: v for k, v in out.items() if v is not None}


def log_results(results: Results, *, plots: Mapping[str, Path] = {}, curves: Curves = {},
                pairs: Sequence[tuple[str, str]] = PAIRS, summary: Mapping[str, float] = {}, project: str = PROJECT,
                group: str | None = None, name: str | None = None, job_type: str = "evaluate",
                mode: WandbMode = "offline", save_dir: str | Path = "runs/wandb") -> Path | None:
    """Logs a comparison as one W&B run: native charts, tables, the PNG plots and percent summary values.

    Args:
        results: the harness's results (or a benchmark's rows in that form).
        plots: key -> PNG (e.g. ``Results.write``'s ``f1_png`` / ``latency_png``; logged as ``f1`` / ``latency``).
        curves: series -> steps -> method name, for the ``refine_curve`` chart (none: no such chart).
        pairs: (method, reference) pairs of the ``paired_f1`` table.
        summary: further run-summary values (e.g. encoding cost ratios).
        project: W&B project.
        group: W&B group (default: the benchmark's name).
        name: run name (default: ``<job_type>-<benchmark>``).
        job_type: W&B job type.
        mode: ``offline`` (default), ``online`` or ``disabled`` (nothing).
        save_dir: folder that receives ``wandb/``.

    Returns:
        The run's folder (offline: ``…/wandb/offline-run-*``), or ``None`` when disabled.
    """
    if mode == "disabled":
        return None
    import wandb

    benchmark = Path(str(results.config.get("benchmark", "benchmark"))).name
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    draw = {"bar": lambda t, c: wandb.plot.bar(t, c.x, c.y, title=c.title),
            "scatter": lambda t, c: wandb.plot.scatter(t, c.x, c.y, title=c.title),
            "line": lambda t, c: wandb.plot.line(t, c.x, c.y, stroke=c.stroke, title=c.title)}
    data: dict[str, Any] = {key: draw[c.kind](wandb.Table(columns=list(c.columns), data=c.rows), c)
                            for key, c in charts(results, curves).items()}
    for key, columns, rows in (("summary", SUMMARY_COLUMNS, summary_rows(results)),
                               ("answers", ANSWER_COLUMNS, answer_rows(results)),
                               ("paired_f1", PAIRED_COLUMNS, paired_rows(results, pairs))):
        if rows:
            data[key] = wandb.Table(columns=list(columns), data=rows)
    data |= {key.removesuffix("_png"): wandb.Image(str(path)) for key, path in plots.items()
             if str(path).endswith(".png")}
    # reinit="create_new": a run the caller has open stays theirs; console="off": the run spans only this call.
    with wandb.init(project=project, group=group or benchmark, name=name or f"{job_type}-{benchmark}",
                    job_type=job_type, config=results.config, dir=str(save_dir), mode=mode, reinit="create_new",
                    settings=wandb.Settings(console="off")) as run:
        run.log(data)
        run.summary.update(summary_values(results, pairs) | dict(summary))
        folder = Path(run.dir).parent
    log.info("W&B run (%s) written to %s", mode, folder)
    return folder


class ValidationGapChart(pl.Callback):
    """Logs ``val/wrong_doc_gap`` = ``val/loss_wrong_doc`` − ``val/loss`` after every validation.

    The gap is what the generated LoRAs carry about their own document: the same questions under
    another document's LoRAs (the control) lose this much more. A run whose gap stays near 0 learned
    answer format, not knowledge. It goes to every logger of the trainer (a W&B line chart, a CSV column)
    and to ``trainer.callback_metrics`` (``ModelCheckpoint(monitor="val/wrong_doc_gap", mode="max")``).

    Args:
        own: the metric under the right documents' LoRAs.
        control: the metric under the wrong documents' LoRAs.
        name: the logged gap.
    """

    def __init__(self, own: str = "val/loss", control: str = "val/loss_wrong_doc",
                 name: str = "val/wrong_doc_gap") -> None:
        self.own, self.control, self.name = own, control, name

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics  # the epoch means the module logged (synced over ranks)
        if self.own in metrics and self.control in metrics:
            pl_module.log(self.name, metrics[self.control] - metrics[self.own], prog_bar=True, sync_dist=True)

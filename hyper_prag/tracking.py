"""Weights & Biases as the dashboard of a comparison (offline by default: nothing leaves the machine).

A harness run (or a benchmark script) logs one W&B run through Lightning's ``WandbLogger``, in the
same project as the training runs and grouped by benchmark, so amortized and per-document encoding
sit side by side in one workspace::

    summary    W&B Table: one row per (method, question type | "total"): F1 / EM / answer-contained
               with their 95% CI bounds, n, median seconds per question, encoding s/doc, bytes/doc
    answers    W&B Table: one row per (method, question): question, type, prediction, gold answers,
               F1, EM, contained, seconds, retrieved documents, LoRAs applied
    f1, latency  the harness's PNG plots, as W&B images
    run summary  <method>/f1, <method>/em, <method>/seconds_per_question, <method>/encode_seconds_per_doc

Offline runs land in ``<save_dir>/wandb/offline-run-*``; ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from hyper_prag.evaluate import Results
from hyper_prag.scoring import TOTAL

log = logging.getLogger(__name__)

WandbMode = Literal["offline", "online", "disabled"]
PROJECT = "hyper-prag"  # the project the training runs log to (configs/hypernet/*.yaml, configs/encode/*.yaml)
SUMMARY_COLUMNS = ("method", "type", "f1", "f1_low", "f1_high", "em", "em_low", "em_high", "accuracy", "n",
                   "median_seconds", "encode_seconds_per_doc", "bytes_per_doc")
ANSWER_COLUMNS = ("method", "id", "type", "question", "prediction", "answers", "f1", "em", "accuracy", "seconds",
                  "doc_ids", "lora_names")


def summary_rows(results: Results) -> list[list[Any]]:
    """One row per (method, question type | total) in :data:`SUMMARY_COLUMNS` order."""
    rows = []
    for m in results.methods:
        for group in [*results.types, TOTAL]:
            cell = m.scores[group]
            rows.append([m.name, group, cell["f1"]["mean"], cell["f1"]["low"], cell["f1"]["high"], cell["em"]["mean"],
                         cell["em"]["low"], cell["em"]["high"], cell["accuracy"]["mean"], cell["f1"]["n"],
                         m.latency["median"]["total"], m.encode_seconds_per_doc, m.bytes_per_doc])
    return rows


def answer_rows(results: Results) -> list[list[Any]]:
    """One row per (method, question) in :data:`ANSWER_COLUMNS` order."""
    return [[m.name, p["id"], p["type"], p["question"], p["prediction"], " | ".join(p["answers"]), p["f1"], p["em"],
             p["accuracy"], float(sum(p["timing"].values())), " ".join(p["doc_ids"]), " ".join(p["lora_names"])]
            for m in results.methods for p in m.predictions]


def log_tables(tables: Mapping[str, tuple[Sequence[str], list[list[Any]]]], *, summary: Mapping[str, float] = {},
               images: Mapping[str, Path] = {}, config: Mapping[str, Any] = {}, project: str = PROJECT,
               group: str | None = None, name: str | None = None, mode: WandbMode = "offline",
               save_dir: str | Path = "runs/wandb") -> Path | None:
    """Logs W&B Tables, images and summary values as one run (``mode="disabled"``: nothing).

    Args:
        tables: key -> (columns, rows).
        summary: run-summary values (the numbers a dashboard compares runs by).
        images: key -> PNG file.
        config: the run's config (recorded settings).
        project: W&B project.
        group: W&B group (the benchmark).
        name: run name.
        mode: ``offline`` (default), ``online`` or ``disabled``.
        save_dir: folder that receives ``wandb/``.

    Returns:
        The run's folder (offline: ``…/wandb/offline-run-*``), or ``None`` when disabled.
    """
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=project, name=name, group=group, save_dir=str(save_dir), offline=mode == "offline",
                         job_type="evaluate")
    logger.log_hyperparams(json.loads(json.dumps(dict(config), default=str)))
    for key, (columns, rows) in tables.items():
        logger.log_table(key=key, columns=list(columns), data=rows)
    for key, path in images.items():
        logger.log_image(key=key, images=[str(path)])
    run = logger.experiment
    run.summary.update(dict(summary))
    folder = Path(run.dir).parent
    run.finish()
    log.info("W&B run (%s) written to %s", mode, folder)
    return folder


def log_results(results: Results, *, plots: Mapping[str, Path] = {}, project: str = PROJECT,
                mode: WandbMode = "offline", save_dir: str | Path = "runs/wandb", name: str | None = None) -> Path | None:
    """Logs a harness run: the summary and answers tables, the plots and per-method summary values.

    Args:
        results: the harness's results.
        plots: key -> PNG (e.g. ``Results.write``'s ``f1_png`` / ``latency_png``).
        project: W&B project.
        mode: ``offline``, ``online`` or ``disabled``.
        save_dir: folder that receives ``wandb/``.
        name: run name (default: ``evaluate-<benchmark>``).

    Returns:
        The run's folder, or ``None`` when disabled.
    """
    benchmark = Path(str(results.config.get("benchmark", "benchmark"))).name
    summary: dict[str, float] = {}
    for m in results.methods:
        total = m.scores[TOTAL]
        summary |= {f"{m.name}/f1": total["f1"]["mean"], f"{m.name}/em": total["em"]["mean"],
                    f"{m.name}/accuracy": total["accuracy"]["mean"],
                    f"{m.name}/seconds_per_question": m.latency["median"]["total"]}
        if m.encode_seconds_per_doc is not None:
            summary[f"{m.name}/encode_seconds_per_doc"] = m.encode_seconds_per_doc
        if m.median_answer_tokens is not None:
            summary[f"{m.name}/median_answer_tokens"] = m.median_answer_tokens
    images = {key.removesuffix("_png"): Path(p) for key, p in plots.items() if str(p).endswith(".png")}
    return log_tables({"summary": (SUMMARY_COLUMNS, summary_rows(results)),
                       "answers": (ANSWER_COLUMNS, answer_rows(results))},
                      summary=summary, images=images, config=results.config, project=project, group=benchmark,
                      name=name or f"evaluate-{benchmark}", mode=mode, save_dir=save_dir)

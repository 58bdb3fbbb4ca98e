"""The one evaluation harness: every method on the same questions, the same prompt, the same scoring.

:func:`compare` hands the same questions to every :class:`~hyper_prag.methods.Method`, scores each
answer (:mod:`hyper_prag.scoring`: EM / F1 / answer-contained, max over aliases) and summarises per
question type and in total with seeded bootstrap 95% confidence intervals. Latency is reported per
pipeline stage (median and mean seconds per question), with peak memory and, when the caller passes
them, the offline encoding cost per document and store bytes per document. :meth:`Results.write`
writes ``results.json``, ``results.md`` (one row per method) and the PNG plots of
:mod:`hyper_prag.plots`. Building the methods from names is :mod:`hyper_prag.assemble`'s job; the
whole ``hyper-prag evaluate`` run is :func:`hyper_prag.api.evaluate`.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hyper_prag.errors import HyperPragError
from hyper_prag.methods import METHOD_NAMES, STAGES, Answer, Method
from hyper_prag.scoring import RENAMED_METRICS, TOTAL, bootstrap_ci, score, summarize

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- results


@dataclass
class MethodResult:
    """One method's scores, latency and costs over the evaluated questions."""

    name: str
    scores: dict[str, dict[str, dict[str, float]]]  # type|"total" -> metric -> {"mean","low","high","n"}
    latency: dict[str, dict[str, float]]  # "median"|"mean" -> stage|"total" -> seconds per question
    memory: dict[str, float]  # peak memory (MiB), see pipeline.peak_memory
    retrievals: float  # mean retriever calls per question
    encode_seconds_per_doc: float | None = None  # offline cost per document (None: not applicable/unknown)
    bytes_per_doc: float | None = None  # LoRA store bytes per document (None: no store)
    wall_seconds: float = 0.0  # wall time of the whole method run
    predictions: list[dict[str, Any]] = field(default_factory=list)  # per question
    median_answer_tokens: float | None = None  # median answer length in the model's tokens (None: not counted)


# Paired comparisons shown under the table when both methods ran: (method, reference).
PAIRS: tuple[tuple[str, str], ...] = (("rag", "closed-book"), ("prag", "closed-book"), ("prag", "prag-wrong-doc"),
                                      ("prag", "rag"), ("prag-both", "rag"), ("hypernet", "closed-book"),
                                      ("hypernet", "hypernet-wrong-doc"), ("hypernet-both", "rag"),
                                      ("prag", "hypernet"))


# What runs must share for their rows to stand in one table: the same questions, asked and scored the same way.
SAME_QUESTIONS: tuple[str, ...] = ("benchmark", "split", "model", "base_identity", "device", "dtype", "k", "retriever",
                                   "combine", "max_new_tokens", "limit", "per_type", "n_resamples", "seed")


@dataclass
class Results:
    """Everything one harness run measured."""

    methods: list[MethodResult]
    types: list[str]  # question types, sorted
    config: dict[str, Any] = field(default_factory=dict)

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "types": self.types, "methods": [asdict(m) for m in self.methods]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Results":
        """The inverse of :meth:`to_dict` (a ``results.json`` read back)."""
        names = {f for f in MethodResult.__dataclass_fields__}
        methods = [MethodResult(**{k: v for k, v in _renamed(m).items() if k in names}) for m in data["methods"]]
        return cls(methods, list(data["types"]), dict(data.get("config", {})))

    @classmethod
    def merge(cls, runs: Sequence["Results"]) -> "Results":
        """One table from runs that asked the same questions the same way: e.g. the methods that need no
        store first, the per-document ones once their store is built. A method in several runs keeps the
        last run's rows. The config is the first run's, completed by the later runs' settings (encode
        config, store, hypernet), so :func:`hyper_prag.cli.evaluate_command` gives the one command that
        makes the whole table.

        Raises:
            HyperPragError: no runs, or runs of other questions or other settings.
        """
        if not runs:
            raise HyperPragError("nothing to merge: give at least one results.json.")
        first = runs[0]
        asked = _asked(first, 1)
        methods: dict[str, MethodResult] = {}
        config = dict(first.config)
        for i, run in enumerate(runs, start=1):
            for key in SAME_QUESTIONS:
                if run.config.get(key) != first.config.get(key):
                    raise HyperPragError(f"run {i} has {key} = {run.config.get(key)!r} but run 1 has "
                                         f"{first.config.get(key)!r}: only runs of the same questions asked the same "
                                         "way merge into one table.")
            if _asked(run, i) != asked:
                raise HyperPragError(f"run {i} asked other questions than run 1: only runs of the same questions merge.")
            methods.update({m.name: m for m in run.methods})
            config.update({k: v for k, v in run.config.items() if v is not None and config.get(k) is None})
        order = {name: i for i, name in enumerate(METHOD_NAMES)}
        config["merged_runs"] = len(runs)
        return cls(sorted(methods.values(), key=lambda m: order.get(m.name, len(order))),
                   sorted({t for run in runs for t in run.types}), config)

    def paired(self, method: str, reference: str, metric: str = "f1",
               qtype: str | None = None) -> tuple[float, float, float] | None:
        """Mean and 95% bootstrap CI of ``method − reference`` per question (same questions), or ``None``.

        ``qtype``: over the questions of that type only (``None``: all). ``None`` when either method did not run
        or their per-question records do not cover the same questions.
        """
        names = {m.name for m in self.methods}
        if method not in names or reference not in names:
            return None
        a = {p["id"]: p[metric] for p in self.method(method).predictions if qtype is None or p["type"] == qtype}
        b = {p["id"]: p[metric] for p in self.method(reference).predictions if qtype is None or p["type"] == qtype}
        if not a or a.keys() != b.keys():
            return None
        return bootstrap_ci([a[i] - b[i] for i in a], self.config.get("n_resamples", 1000), self.config.get("seed", 0))

    def to_markdown(self) -> str:
        """One row per method: F1 ± CI per type and total, EM, answer contained, median answer length,
        retriever calls/question, time/question and its breakdown, costs; then the paired F1 differences
        of :data:`PAIRS`."""
        cols = [f"F1 {t}" for t in self.types] + ["F1 total", "EM", "contained", "med. tokens", "retrievals/q",
                                                   "s/question", "retrieve/lora/apply/generate ms", "enc. s/doc",
                                                   "bytes/doc", "peak RSS MiB"]
        lines = ["| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]

        def pm(cell: Mapping[str, float]) -> str:
            if math.isnan(cell["mean"]):
                return "–"
            return f"{100 * cell['mean']:.1f} ± {100 * (cell['high'] - cell['low']) / 2:.1f}"

        for m in self.methods:
            med = m.latency["median"]
            row = [pm(m.scores[t]["f1"]) for t in self.types] + [pm(m.scores[TOTAL]["f1"]), pm(m.scores[TOTAL]["em"]),
                                                                 pm(m.scores[TOTAL]["contained"])]
            row += ["–" if m.median_answer_tokens is None else f"{m.median_answer_tokens:g}", f"{m.retrievals:.2f}", f"{med['total']:.3f}", "/".join(f"{1000 * med[s]:.1f}" for s in STAGES),
                    "–" if m.encode_seconds_per_doc is None else f"{m.encode_seconds_per_doc:.2f}",
                    "–" if m.bytes_per_doc is None else f"{m.bytes_per_doc:,.0f}",
                    f"{m.memory.get('max_rss_mib', math.nan):.0f}"]
            lines.append(f"| {m.name} | " + " | ".join(row) + " |")
        n = self.config.get("questions", "?")
        notes = ["", f"F1/EM/contained in %, mean ± half-width of the 95% bootstrap CI over {n} questions "
                      f"({self.config.get('n_resamples', 1000)} resamples, seed {self.config.get('seed', 0)}); "
                      "contained: an accepted answer appears in the prediction; med. tokens: median answer length "
                      "in the model's tokens; times are medians per question (batch stages divided evenly over the "
                      "batch); peak RSS is the process maximum so far (monotone over methods)."]
        diffs = [(a, b, d) for a, b in PAIRS if (d := self.paired(a, b)) is not None]
        if diffs:
            notes += ["", "| paired ΔF1 (same questions) | mean | 95% CI |", "|---|---|---|"]
            notes += [f"| {a} − {b} | {100 * d[0]:+.1f} | [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] |" for a, b, d in diffs]
        return "\n".join(lines + notes) + "\n"

    def write(self, out: str | Path, plots: bool = True) -> dict[str, Path]:
        """Writes ``results.json``, ``results.md`` and (if ``plots``) ``f1.png`` and ``latency.png`` into ``out``.

        Returns:
            name -> path of every file written.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "results.json", "markdown": out / "results.md"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n", encoding="utf-8")
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        if plots:
            from hyper_prag.plots import plot_f1, plot_latency

            paths["f1_png"] = plot_f1(self, out / "f1.png")
            paths["latency_png"] = plot_latency(self, out / "latency.png")
        return paths


def _asked(run: Results, number: int) -> tuple[str, ...]:
    """The question ids of a run, in the order asked (every method of a run asks the same ones)."""
    asked = {tuple(p["id"] for p in m.predictions) for m in run.methods}
    if len(asked) != 1 or not next(iter(asked)):
        raise HyperPragError(f"run {number} has no per-question records to merge (or its methods asked different "
                             "questions): re-run it with this version's `hyper-prag evaluate`.")
    return asked.pop()


def _renamed(method: Mapping[str, Any]) -> dict[str, Any]:
    """A method of a ``results.json`` with the metrics' current names (older files say ``accuracy``)."""
    def rename(cell: Mapping[str, Any]) -> dict[str, Any]:
        return {RENAMED_METRICS.get(k, k): v for k, v in cell.items()}

    return {**method, "scores": {group: rename(cell) for group, cell in method["scores"].items()},
            "predictions": [rename(p) for p in method.get("predictions", [])]}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)


def _latency(answers: Sequence[Answer]) -> dict[str, dict[str, float]]:
    table = {s: np.array([a.timing.get(s, 0.0) for a in answers]) for s in STAGES}  # stage -> (n,)
    table["total"] = sum(table.values())  # (n,)
    return {"median": {s: float(np.median(v)) for s, v in table.items()},
            "mean": {s: float(np.mean(v)) for s, v in table.items()}}


def peak_memory(device: Any = None) -> dict[str, float]:
    """Peak memory so far, in MiB: the process's max RSS (monotone), plus CUDA's max allocated on GPU.

    Args:
        device: the model's device; CUDA peak is reported only for a CUDA device.
    """
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"max_rss_mib": rss_kb / (1024 * 1024 if sys.platform == "darwin" else 1024)}
    if device is not None and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def compare(
    methods: Sequence[Method], questions: Sequence[Any], *, costs: Mapping[str, Mapping[str, float | None]] | None = None,
    n_resamples: int = 1000, seed: int = 0, chunk: int = 8, device: Any = None, progress: bool = True,
    config: Mapping[str, Any] | None = None, count_tokens: Callable[[str], int] | None = None,
) -> Results:
    """Runs every method over the same questions and scores them.

    Args:
        methods: the methods (each has ``name`` and ``answer(questions)``).
        questions: :class:`~hyper_prag.corpus.Question` records (``question``, ``answers``, ``type``, ``id``).
        costs: method name -> ``{"encode_seconds_per_doc": ..., "bytes_per_doc": ...}`` (from the encode
            report / store stats); methods without an entry get ``None``.
        n_resamples: bootstrap resamples per confidence interval.
        seed: bootstrap seed.
        chunk: questions handed to a method per call (the progress bar advances per chunk).
        device: the model's device, for CUDA peak memory.
        progress: show tqdm bars.
        config: recorded in the results (benchmark, split, k, ...).
        count_tokens: the length of an answer in tokens (the base model's tokenizer), for the median answer
            length of each method; ``None``: not reported.

    Returns:
        The :class:`Results`.
    """
    if not questions:
        raise HyperPragError("no questions to evaluate; check --benchmark, --split and --limit.")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise HyperPragError(f"methods must have distinct names, got {names}.")
    texts = [q.question for q in questions]
    types = [q.type for q in questions]
    all_types = sorted(set(types))
    results: list[MethodResult] = []
    for method in methods:
        if device is not None and str(device).startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        answers: list[Answer] = []
        with tqdm(total=len(texts), desc=f"evaluate {method.name}", unit="q", disable=not progress) as bar:
            for i in range(0, len(texts), chunk):
                answers += method.answer(texts[i : i + chunk])
                bar.update(min(chunk, len(texts) - i))
        wall = time.perf_counter() - start
        per_question = [score(a.prediction, q.answers) for a, q in zip(answers, questions)]
        lengths = [count_tokens(a.prediction) for a in answers] if count_tokens is not None else None
        cost = (costs or {}).get(method.name, {})
        results.append(MethodResult(
            name=method.name,
            scores=summarize(per_question, types, all_types, n_resamples, seed),
            latency=_latency(answers),
            memory=peak_memory(device),
            retrievals=float(np.mean([a.retrievals for a in answers])),
            encode_seconds_per_doc=cost.get("encode_seconds_per_doc"),
            bytes_per_doc=cost.get("bytes_per_doc"),
            wall_seconds=wall,
            predictions=[{"id": q.id, "type": q.type, "question": q.question, "answers": list(q.answers),
                          "prediction": a.prediction, "doc_ids": list(a.doc_ids), "lora_names": list(a.lora_names),
                          "retrievals": a.retrievals, "timing": dict(a.timing), **s,
                          **({} if lengths is None else {"answer_tokens": lengths[i]})}
                         for i, (a, q, s) in enumerate(zip(answers, questions, per_question))],
            median_answer_tokens=None if lengths is None else float(statistics.median(lengths)),
        ))
        total = results[-1].scores[TOTAL]
        log.info("%s: F1 %.1f EM %.1f contained %.1f, %.3f s/question (median)", method.name, 100 * total["f1"]["mean"],
                 100 * total["em"]["mean"], 100 * total["contained"]["mean"], results[-1].latency["median"]["total"])
    cfg = {"questions": len(questions), "n_resamples": n_resamples, "seed": seed, **(config or {})}
    return Results(results, all_types, cfg)


def select_questions(questions: Sequence[Any], per_type: int | None = None, limit: int | None = None) -> list[Any]:
    """The questions a run evaluates: the first ``per_type`` of each type (corpus order kept), then the first ``limit``.

    Benchmarks list their questions grouped by type, so ``limit`` alone would take one type only.
    """
    chosen = list(questions)
    if per_type:
        taken: Counter[str] = Counter()
        kept = []
        for q in chosen:
            if taken[q.type] < per_type:
                taken[q.type] += 1
                kept.append(q)
        chosen = kept
    return chosen[:limit] if limit else chosen

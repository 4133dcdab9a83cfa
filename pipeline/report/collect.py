"""Read what the train and evaluate stages wrote, for the report.

* ``<eval_dir>/metrics.json``: ``{"<variant>/<condition>": {"<task>": {metric: value}}}`` (the index);
* ``<eval_dir>/<variant>/<condition>/<task>/predictions.jsonl``: one scored row per question
  (``example_id``, ``task``, ``category``, ``scores``) — the per-question headline scores that the
  paired statistics need;
* ``<train_dir>/<variant>/metrics.json`` and ``<models_dir>/<variant>/training_summary.json``
  (``history``: one row per optimiser step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.params import BASE_VARIANT


class ReportInputError(RuntimeError):
    """Missing or malformed stage outputs, named by path."""


@dataclass
class UnitResult:
    """One (variant, condition, task) of the evaluation."""

    variant: str
    condition: str
    task: str  # the output folder name (== the task name unless renamed in params)
    task_name: str  # the registered task (pipeline.eval.tasks)
    metric: str  # the headline metric's key
    metrics: dict[str, Any]
    scores: dict[str, float] = field(default_factory=dict)  # example_id → headline score (headline rows)
    categories: dict[str, str] = field(default_factory=dict)  # example_id → category (all rows)
    category_scores: dict[str, float] = field(default_factory=dict)  # example_id → score (all rows)

    @property
    def label(self) -> str:
        return self.condition if self.variant == BASE_VARIANT else f"{self.variant}/{self.condition}"

    @property
    def is_deltamem(self) -> bool:
        return self.condition.startswith("deltamem")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportInputError(f"{path}: not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as e:
        raise ReportInputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def read_predictions(path: Path, task_name: str) -> tuple[str, dict[str, float], dict[str, str], dict[str, float]]:
    """(headline metric, headline-row scores, categories, all-row scores) of one predictions file."""
    from pipeline.eval.tasks import get_task

    task = get_task(task_name)
    rows = []
    try:
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ReportInputError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    except FileNotFoundError:
        raise ReportInputError(f"{path}: not found (rerun the evaluate stage)") from None
    head = task.headline
    for n, r in enumerate(rows, 1):
        if "example_id" not in r or not isinstance(r.get("scores"), Mapping):
            raise ReportInputError(f"{path}: row {n} lacks 'example_id' or 'scores'")
    scores = {r["example_id"]: float(r["scores"][head]) for r in task.headline_rows(rows) if head in r["scores"]}
    categories = {r["example_id"]: str(r["category"]) for r in rows if r.get("category") is not None}
    all_scores = {r["example_id"]: float(r["scores"][head]) for r in rows if head in r["scores"]}
    return head, scores, categories, all_scores


def collect_eval(eval_dir: Path) -> list[UnitResult]:
    """Every unit listed in ``<eval_dir>/metrics.json``, with its per-question scores."""
    index = _read_json(eval_dir / "metrics.json")
    if not isinstance(index, Mapping) or not index:
        raise ReportInputError(f"{eval_dir / 'metrics.json'}: expected a non-empty object of '<variant>/<condition>'")
    units = []
    for key, tasks in sorted(index.items()):
        variant, _, condition = key.partition("/")
        if not condition or not isinstance(tasks, Mapping):
            raise ReportInputError(f"{eval_dir / 'metrics.json'}: key {key!r} is not '<variant>/<condition>'")
        for task, metrics in sorted(tasks.items()):
            folder = eval_dir / variant / condition / task
            preds = folder / "predictions.jsonl"
            first = _first_row(preds)
            task_name = str(first.get("task") or task) if first else task
            head, scores, cats, all_scores = read_predictions(preds, task_name)
            units.append(UnitResult(variant, condition, task, task_name, head, dict(metrics), scores, cats, all_scores))
    return units


def _first_row(path: Path) -> dict[str, Any] | None:
    try:
        with path.open() as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return None


@dataclass
class TrainResult:
    """One trained variant: final metrics and the per-step history."""

    variant: str
    metrics: dict[str, Any]
    history: list[dict[str, float]]


def collect_train(train_dir: Path, models_dir: Path, variants: list[str] | None = None) -> list[TrainResult]:
    """Training results of ``variants`` (default: every folder of ``train_dir``); missing ones are skipped."""
    if variants is None:
        variants = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    out = []
    for v in variants:
        mfile = train_dir / v / "metrics.json"
        if not mfile.is_file():
            continue
        summary_file = models_dir / v / "training_summary.json"
        history = _read_json(summary_file).get("history", []) if summary_file.is_file() else []
        rows = [{k: float(x) for k, x in r.items() if isinstance(x, int | float) and math.isfinite(x)} for r in history]
        out.append(TrainResult(v, _read_json(mfile), rows))
    return out

"""Phase 7 of ``evaluate``: MLflow — a parent run ``evaluate`` with one nested run per unit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.common import json_safe
from pipeline.eval.params import EvalParams
from pipeline.eval.plan import Unit
from pipeline.eval.store import METRICS, PREDICTIONS

if TYPE_CHECKING:
    from pipeline.eval.runner import EvalSummary


def log_to_mlflow(p: EvalParams, units: Sequence[Unit], out: Path, summary: EvalSummary) -> None:
    """A parent run ``evaluate`` (params, headline per unit, the combined metrics) with one nested run per
    unit (its metrics, per-category keys included; predictions and metrics as artifacts)."""
    import mlflow

    from pipeline import tracking

    with tracking.start_run("evaluate", tags={"stage": "evaluate"}):
        tracking.log_params(p.model_dump(mode="json", exclude={"inject_failures"}), prefix="evaluate")
        headline: dict[str, float] = {}
        for u in units:
            if u.skipped:
                continue
            metrics = summary.metrics[f"{u.variant}/{u.condition}"][u.name]
            headline[tracking.metric_key(f"{u.key}/headline")] = metrics.get("headline")
            tags = {"stage": "evaluate", "variant": u.variant, "condition": u.condition, "task": u.task}
            with tracking.start_run(f"eval-{u.variant}-{u.condition}-{u.name}", tags=tags, nested=True):
                tracking.log_params(
                    {
                        "variant": u.variant,
                        "condition": u.condition,
                        "task": u.task,
                        "shards": len(u.shards),
                        "scoring": u.scoring,
                    }
                )
                tracking.log_metrics({tracking.metric_key(k): v for k, v in metrics.items()})
                folder = u.folder(out)
                mlflow.log_artifact(str(folder / PREDICTIONS))
                mlflow.log_artifact(str(folder / METRICS))
        tracking.log_metrics(headline)
        tracking.log_dict(json_safe(summary.metrics), "metrics.json")
        if summary.skipped_units:
            tracking.log_dict(summary.skipped_units, "skipped_units.json")

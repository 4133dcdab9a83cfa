"""Phase 6 of ``evaluate``: a unit's rows and cost records → its metrics.

``task.aggregate`` of the scored rows, the headline's 95% bootstrap interval over questions
(:func:`pipeline.stats.mean_interval`, the report's computation: ``evaluate.bootstrap`` resamples,
``evaluate.seed``), and ``cost/<figure>`` keys summed or maxed over the unit's shards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.eval.params import EvalParams
from pipeline.stats import mean_interval

SUM_COSTS = (
    "questions",
    "conversations",
    "prompt_tokens",
    "generated_tokens",
    "write_tokens",
    "history_tokens",
    "history_writes",
    "prefix_tokens_reused",
    "truncated_contexts",
    "forward_positions",
    "forward_tokens",
    "forward_calls",
    "wall_s",
)


def unit_costs(costs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Cost figures of a unit from its shards' (sums, max peak memory, derived rates and bytes)."""
    out: dict[str, float] = {k: float(sum(c.get(k, 0) for c in costs)) for k in SUM_COSTS}
    out["peak_memory_bytes"] = float(max((c.get("peak_memory_bytes", 0) for c in costs), default=0))
    out["max_prompt_tokens"] = float(max((c.get("max_prompt_tokens", 0) for c in costs), default=0))
    kv = max((c.get("kv_bytes_per_token", 0) for c in costs), default=0)
    out["state_bytes"] = float(max((c.get("state_bytes", 0) for c in costs), default=0))
    q, conv = out["questions"], out["conversations"]
    out["questions_per_s"] = q / out["wall_s"] if out["wall_s"] > 0 else math.nan
    out["forward_tokens_per_question"] = out["forward_tokens"] / q if q else math.nan
    # what a KV cache holding one conversation's history needs, vs the δ-mem state
    out["kv_bytes_history"] = kv * out["history_tokens"] / conv if conv else math.nan
    out["kv_bytes_prompt_max"] = float(kv * (out["max_prompt_tokens"]))
    return out


def headline_interval(values: Sequence[float | None], resamples: int, seed: int) -> tuple[float, float]:
    """95% bootstrap interval of the mean of the finite ``values`` (NaN, NaN when none or no resamples)."""
    x = [float(v) for v in values if v is not None and math.isfinite(v)]
    if resamples <= 0 or not x:
        return math.nan, math.nan
    iv = mean_interval(x, resamples, seed, 0.95)
    return iv.low, iv.high


def unit_metrics(
    task_name: str, rows: Sequence[Mapping[str, Any]], costs: Sequence[Mapping[str, Any]], p: EvalParams
) -> dict[str, Any]:
    """``task.aggregate`` of the rows, the headline's bootstrap CI, and ``cost/<figure>`` keys."""
    from pipeline.eval.tasks import get_task

    task = get_task(task_name)
    metrics: dict[str, Any] = dict(task.aggregate(rows))
    head = task.headline
    values = [r["scores"].get(head) for r in task.headline_rows(list(rows)) if head in r.get("scores", {})]
    if values and p.bootstrap:
        lo, hi = headline_interval(values, p.bootstrap, p.seed)
        metrics[f"{head}/ci95_low"], metrics[f"{head}/ci95_high"] = lo, hi
    metrics["headline"] = metrics.get(head, math.nan)
    for k, v in unit_costs(costs).items():
        metrics[f"cost/{k}"] = v
    return metrics

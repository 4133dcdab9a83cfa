"""The ``evaluate`` stage's driver: conditions × variants × tasks, sharded, resumable, Ray-parallel.

:func:`run_evaluate` runs phases 1–5 in this order, one module each (``pipeline/eval/``); the stage
(:mod:`pipeline.stages.evaluate`) then runs phase 6 on the returned summary:

1. **params** (:mod:`~pipeline.eval.params`): the ``evaluate`` section, validated (:class:`EvalParams`).
2. **plan** (:mod:`~pipeline.eval.plan`, inputs checked by :mod:`~pipeline.eval.inputs`): units
   (variant × condition × task), their shards of whole conversations, each with a typed
   :class:`~pipeline.eval.plan.PredictionSettings` and a config hash; bad inputs stop here (exit 2).
3. **store, resume** (:mod:`~pipeline.eval.store`): shards already written with the same hash are reused
   (re-scored when only the scoring protocol changed).
4. **execute** (:mod:`~pipeline.eval.executors`): the other shards, in this process or on Ray actors,
   each sent with its data and adapter as bytes (:mod:`~pipeline.eval.shipping`: no shared filesystem);
   each actor is an :class:`~pipeline.eval.worker.EvalWorker` — a memory-aware model backend
   (:mod:`~pipeline.eval.backend`) that builds the shard's **requests** from its condition
   (:mod:`~pipeline.eval.conditions`, :mod:`~pipeline.eval.requests`), writes histories into δ-mem
   states, generates and scores the answers (the task, :mod:`pipeline.eval.tasks`). Each shard is
   written atomically as it arrives, so a failed run resumes where it stopped.
5. **aggregate** (:mod:`~pipeline.eval.aggregate`): per unit ``task.aggregate``, the headline's
   bootstrap interval and the cost figures; predictions and metrics written (:mod:`~pipeline.eval.store`).
6. **track** (:mod:`~pipeline.eval.tracking`, called by the stage unless ``--no-tracking``): MLflow runs.

Efficiency: a conversation's history is written into the δ-mem state once and the state is reused for
all its questions (``MemoryState.stack``/``expand`` over a batch); questions are generated in
left-padded batches; for full-context prompts, which share the history as a prefix within a
conversation, the prefix is prefilled once (KV cache, and for ``deltamem_full_context`` the state after
the prefix) and the questions continue from copies of it (``prefix_cache``).

Entry point: :func:`run_evaluate` (the ``evaluate`` stage, :mod:`pipeline.stages.evaluate`). The names other code
uses are importable from here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.eval.aggregate import unit_metrics
from pipeline.eval.conditions import CONDITIONS
from pipeline.eval.errors import EvalError, EvalInputError
from pipeline.eval.executors import executor_for, run_local
from pipeline.eval.inputs import check_writable, resolve_path
from pipeline.eval.params import EvalParams, RayParams, TaskEntry
from pipeline.eval.plan import PredictionSettings, ShardSpec, Unit, donor_map, group_conversations, plan
from pipeline.eval.store import (
    METRICS,
    read_shard,
    remove_stale_units,
    rescore_shard,
    write_json,
    write_shard,
    write_unit,
)
from pipeline.eval.worker import EvalWorker


@dataclass
class EvalSummary:
    """What :func:`run_evaluate` did."""

    computed: list[str]
    reused: list[str]
    skipped_units: dict[str, str]
    metrics: dict[str, dict[str, dict[str, Any]]]
    wall_s: float
    rescored: list[str] = field(default_factory=list)  # reused shards scored again (scoring changed)
    units: list[Unit] = field(default_factory=list, repr=False)  # the plan (for tracking), not in to_dict
    out: Path | None = None  # the results folder

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("units", "out")}


def _stored(p: EvalParams, out: Path, specs: list[ShardSpec]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The shards already written with their planned hash (re-scored where the scoring changed)."""
    from pipeline.eval.tasks import scoring_id

    done: dict[str, dict[str, Any]] = {}
    rescored: list[str] = []
    examples_cache: dict[str, Any] = {}
    if p.resume:
        for s in specs:
            stored = read_shard(out, s)
            if stored is not None:
                if stored.get("scoring") != scoring_id(s.scoring):
                    stored = rescore_shard(out, s, stored, examples_cache)
                    rescored.append(s.key)
                done[s.key] = stored
    return done, rescored


def run_evaluate(
    p: EvalParams,
    root: Path,
    *,
    progress: bool = True,
    worker: EvalWorker | None = None,
) -> EvalSummary:
    """Plan, compute the missing shards (in-process or on Ray), merge, write metrics.

    Tracking is the caller's: the stage (:mod:`pipeline.stages.evaluate`) logs the returned summary with
    :func:`pipeline.eval.tracking.log_to_mlflow`.

    Raises :class:`EvalError` naming the shards that failed after ``max_retries`` retries (the shards
    that succeeded are kept for the next run).
    """
    t0 = time.perf_counter()
    root = Path(root)
    out = root / p.out_dir
    units = plan(p, root)
    backbone = resolve_path(root, p.backbone)
    check_writable(out, "evaluate.out_dir")  # before any shard is computed
    if p.metrics_file:
        check_writable((root / p.metrics_file).parent, "evaluate.metrics_file's folder")
    specs = [s for u in units for s in u.shards]
    done, rescored = _stored(p, out, specs)
    reused = list(done)
    todo = [s for s in specs if s.key not in done]
    computed: list[str] = []

    def on_result(spec: ShardSpec, result: dict[str, Any]) -> None:
        write_shard(out, spec, result)
        done[spec.key] = result
        computed.append(spec.key)
        if progress:
            c = result["cost"]
            print(
                f"evaluate: {spec.key}: {c['questions']} questions in {c['wall_s']:.1f}s "
                f"({len(done)}/{len(specs)} shards)",
                flush=True,
            )

    if progress:
        print(
            f"evaluate: {len(specs)} shards, {len(reused)} already done ({len(rescored)} re-scored), "
            f"{len(todo)} to compute",
            flush=True,
        )
    failures = executor_for(p, backbone, worker).run(todo, on_result) if todo else {}
    if failures:
        lines = "\n".join(f"  {k}: {v}" for k, v in failures.items())
        raise EvalError(f"{len(failures)} shard(s) failed after {p.max_retries} retries:\n{lines}")

    combined: dict[str, dict[str, dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for u in units:
        if u.skipped:
            skipped[u.key] = u.skipped
            continue
        results = [done[s.key] for s in u.shards]
        rows = [r for res in results for r in res["rows"]]
        metrics = unit_metrics(u.task, rows, [res["cost"] for res in results], p)
        metrics["scoring"] = u.scoring  # the protocol that produced these numbers (read by the report)
        write_unit(out, u, rows, metrics)
        combined.setdefault(f"{u.variant}/{u.condition}", {})[u.name] = metrics
    remove_stale_units(out, units)
    write_json(out / METRICS, combined)
    if p.metrics_file:
        write_json(root / p.metrics_file, combined)
    return EvalSummary(computed, reused, skipped, combined, time.perf_counter() - t0, rescored, list(units), out)


__all__ = [
    "CONDITIONS",
    "EvalError",
    "EvalInputError",
    "EvalParams",
    "EvalSummary",
    "EvalWorker",
    "PredictionSettings",
    "RayParams",
    "ShardSpec",
    "TaskEntry",
    "Unit",
    "donor_map",
    "group_conversations",
    "plan",
    "run_evaluate",
    "run_local",
]

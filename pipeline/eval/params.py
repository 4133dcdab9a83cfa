"""Phase 1 of ``evaluate``: the ``evaluate`` section of params.yaml (:class:`EvalParams`), validated.

The models live in the one params schema, :mod:`pipeline.params` (:class:`~pipeline.params.EvalParams`,
:class:`~pipeline.params.TaskEntry`, :class:`~pipeline.params.RayParams`); the evaluation phases import
them from here. What can change a prediction is picked out of them by
:meth:`pipeline.eval.plan.PredictionSettings.from_params` (and per condition, for the shards' config
hashes, by :meth:`~pipeline.eval.conditions.Condition.hashed_settings`).
"""

from __future__ import annotations

from pipeline.params import EvalParams, RayParams, TaskEntry

__all__ = ["EvalParams", "RayParams", "TaskEntry"]

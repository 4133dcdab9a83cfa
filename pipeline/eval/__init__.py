"""Evaluation: the ``evaluate`` stage's package, one module per phase (see docs/EVALUATION.md).

:func:`pipeline.eval.runner.run_evaluate` (called by :mod:`pipeline.stages.evaluate`) runs, in order:

1. :mod:`~pipeline.eval.params` — the ``evaluate`` section (:class:`~pipeline.eval.params.EvalParams`).
2. :mod:`~pipeline.eval.inputs`, :mod:`~pipeline.eval.plan` — inputs checked and hashed; units and
   shards, each with a frozen :class:`~pipeline.eval.plan.PredictionSettings` and a config hash.
3. :mod:`~pipeline.eval.store` — shards already stored with the same hash are reused.
4. :mod:`~pipeline.eval.executors` — the other shards, in-process or on Ray (the only module importing
   Ray), each by an :class:`~pipeline.eval.worker.EvalWorker`: the condition
   (:mod:`~pipeline.eval.conditions`) builds the requests (:mod:`~pipeline.eval.requests`), the
   memory-aware backend (:mod:`~pipeline.eval.backend`) writes histories into states and generates, the
   task (:mod:`~pipeline.eval.tasks`) scores every answer.
5. :mod:`~pipeline.eval.aggregate`, :mod:`~pipeline.eval.store` — per-unit metrics, predictions written.
6. :mod:`~pipeline.eval.tracking` — MLflow.

Beside them: :mod:`~pipeline.eval.tasks` (per-benchmark prompts, decoding, official metrics),
:mod:`~pipeline.eval.metrics` (normalisation, token F1, IFEval checkers), :mod:`~pipeline.eval.retrieval`
(BM25 over the history), :mod:`~pipeline.eval.meters` (token and memory meters), :mod:`~pipeline.eval.errors`.
"""

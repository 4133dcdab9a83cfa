"""Evaluation: per-benchmark tasks (prompts, decoding settings, official metrics), BM25 retrieval over
the history, and the runner that combines them into the evaluation conditions.

* :mod:`pipeline.eval.tasks` — :data:`~pipeline.eval.tasks.TASKS` / :func:`~pipeline.eval.tasks.get_task`.
* :mod:`pipeline.eval.metrics` — normalisation, token F1 and the IFEval checkers.
* :mod:`pipeline.eval.retrieval` — :class:`~pipeline.eval.retrieval.BM25Retriever`.

See docs/EVALUATION.md.
"""

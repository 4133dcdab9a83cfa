"""One :class:`~pipeline.eval.tasks.base.Task` per benchmark, registered by name in :data:`TASKS`.

Usage::

    from pipeline.eval.tasks import get_task

    task = get_task("locomo")
    messages = task.context_messages(example, task.fit_context(example, budget, count_tokens))
    settings = task.decoding(example)            # Decoding(max_new_tokens=50, do_sample=False, ...)
    row = task.score_row(example, generated_text, scoring="delta-mem")  # or "official" (default)
    summary = task.aggregate(rows)               # {"f1": ..., "f1/category/temporal": ..., "n": ...}
"""

from __future__ import annotations

from .base import (
    DECODING_MODES,
    SCORING_VERSION,
    SCORINGS,
    Decoding,
    Message,
    Task,
    aggregate_means,
    check_scoring,
    rescore_rows,
    scoring_id,
)
from .choice import GPQATask, IFEvalTask, parse_choice
from .locomo import LoCoMoTask
from .memoryagentbench import MemoryAgentBenchTask
from .qa import HotpotQATask, QasperTask, SyntheticTask

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        SyntheticTask(),
        LoCoMoTask(),
        HotpotQATask(),
        QasperTask(),
        MemoryAgentBenchTask(),
        IFEvalTask(),
        GPQATask(),
    )
}


def get_task(name: str) -> Task:
    """The registered task for a benchmark name (= ``Example.task``); ``KeyError`` lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


__all__ = [
    "DECODING_MODES",
    "SCORINGS",
    "SCORING_VERSION",
    "TASKS",
    "Decoding",
    "GPQATask",
    "HotpotQATask",
    "IFEvalTask",
    "LoCoMoTask",
    "MemoryAgentBenchTask",
    "Message",
    "QasperTask",
    "SyntheticTask",
    "Task",
    "aggregate_means",
    "check_scoring",
    "get_task",
    "parse_choice",
    "rescore_rows",
    "scoring_id",
]

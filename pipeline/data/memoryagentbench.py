"""MemoryAgentBench (Hu, Wang & McAuley, 2025; hub ``ai-hyz/MemoryAgentBench``, MIT licence).

Native format (dataset card of ``ai-hyz/MemoryAgentBench``; code at github.com/HUST-AI-HYZ/
MemoryAgentBench): four splits, one per competency — ``Accurate_Retrieval``, ``Test_Time_Learning``,
``Long_Range_Understanding``, ``Conflict_Resolution`` — stored as ``data/<split>-00000-of-00001.parquet``.
Each row is one long context with several questions ("inject once, query many times"):
``context`` (str), ``questions`` (list of str), ``answers`` (list of lists of str: the acceptable
answers of each question) and ``metadata`` (struct: ``source`` such as ``ruler_qa1_197K`` or
``factconsolidation_mh_262k``, and per-question lists ``question_ids``, ``question_types``,
``question_dates``, ``qa_pair_ids``, plus ``keypoints``, ``previous_events``, ``demo``,
``haystack_sessions``). Local Parquet, JSON or JSONL exports of those rows are read the same way.

Mapping: one example per question; the context is cut into chunks of at most ``chunk_chars``
characters at line breaks (the benchmark feeds long contexts to memory agents chunk by chunk), each a
segment, shared by the row's questions (``conversation_id`` = ``<source>-<row>``). ``category`` = the
competency (``accurate_retrieval`` ...) taken from the split name (or option ``competency``);
``metadata`` keeps ``source`` and the question's own id/type/date.
"""

from __future__ import annotations

from typing import Any

from ._fields import as_records, get_field, str_list
from .errors import DataError
from .schema import Example, Segment

NAME = "memoryagentbench"
COMPETENCIES = {
    "accurate_retrieval": "accurate_retrieval",
    "ar": "accurate_retrieval",
    "test_time_learning": "test_time_learning",
    "ttl": "test_time_learning",
    "long_range_understanding": "long_range_understanding",
    "lru": "long_range_understanding",
    "conflict_resolution": "conflict_resolution",
    "cr": "conflict_resolution",
}
HF_SPLITS = ("Accurate_Retrieval", "Test_Time_Learning", "Long_Range_Understanding", "Conflict_Resolution")
PER_QUESTION_KEYS = ("question_ids", "question_types", "question_dates", "qa_pair_ids")
DEFAULT_CHUNK_CHARS = 4000


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``chunk_chars`` characters, at line breaks where possible."""
    if chunk_chars <= 0:
        raise ValueError("chunk_chars must be positive")
    chunks: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:  # a single over-long line: hard split
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(current) + len(line) > chunk_chars:
            chunks.append(current)
            current = ""
        current += line
    if current:
        chunks.append(current)
    return [c for c in (c.strip() for c in chunks) if c]


def competency_of(split: str, options: dict[str, Any]) -> str | None:
    """The competency name for a split name such as ``Accurate_Retrieval`` (or option ``competency``)."""
    explicit = options.get("competency")
    if explicit:
        return COMPETENCIES.get(str(explicit).lower(), str(explicit))
    return COMPETENCIES.get(split.lower())


def parse(records: Any, *, origin: str, split: str, options: dict[str, Any]) -> list[Example]:
    """Convert MemoryAgentBench rows into examples (see module doc).

    Options: ``chunk_chars`` (default 4000), ``sources`` (keep only rows whose ``metadata.source`` is
    listed), ``competency`` (category when the split name is not a competency).
    """
    rows = as_records(records, origin=origin, what="a list of rows")
    chunk_chars = int(options.get("chunk_chars", DEFAULT_CHUNK_CHARS))
    keep_sources = options.get("sources")
    category = competency_of(split, options)
    out: list[Example] = []
    for index, row in enumerate(rows):
        context = get_field(row, "context", str, origin=origin, rid=index)
        questions = str_list(
            get_field(row, "questions", list, origin=origin, rid=index), origin=origin, rid=index, path="questions"
        )
        answers = get_field(row, "answers", list, origin=origin, rid=index)
        if len(answers) != len(questions):
            raise DataError(
                f"{len(answers)} answers for {len(questions)} questions", source=origin, record=index, field="answers"
            )
        meta = get_field(row, "metadata", dict, origin=origin, rid=index, default={})
        source = meta.get("source")
        source = str(source) if source is not None else split
        if keep_sources is not None and source not in keep_sources:
            continue
        rid = f"{index} (source={source})"
        segments = [Segment(text=c, segment_id=f"chunk{k}") for k, c in enumerate(chunk_text(context, chunk_chars))]
        conversation_id = f"{source}-{index}"
        per_question = {
            key: meta[key]
            for key in PER_QUESTION_KEYS
            if isinstance(meta.get(key), list) and len(meta[key]) == len(questions)
        }
        for q_index, question in enumerate(questions):
            gold = answers[q_index]
            gold_list = [gold] if isinstance(gold, str | int | float) and not isinstance(gold, bool) else gold
            gold_list = str_list(gold_list, origin=origin, rid=rid, path=f"answers[{q_index}]")
            metadata: dict[str, Any] = {
                "conversation_id": conversation_id,
                "source": source,
                "row": index,
                "question_index": q_index,
            }
            for key, values in per_question.items():
                value = values[q_index]
                metadata[key[:-1]] = value if value is None or isinstance(value, str | int | float) else str(value)
            if isinstance(meta.get("keypoints"), list):
                metadata["keypoints"] = [str(k) for k in meta["keypoints"]]
            out.append(
                Example(
                    example_id=f"{NAME}-{source}-{index}-q{q_index:03d}",
                    task=NAME,
                    question=question.strip(),
                    answers=[a.strip() for a in gold_list],
                    segments=segments,
                    category=category,
                    metadata=metadata,
                )
            )
    return out

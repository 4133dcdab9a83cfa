"""HotpotQA (Yang et al., EMNLP 2018), distractor setting: multi-hop questions over 10 paragraphs.

Native format (``hotpot_dev_distractor_v1.json`` / ``hotpot_train_v1.1.json``): a JSON list of
``{"_id", "question", "answer", "type" (bridge|comparison), "level" (easy|medium|hard),
"supporting_facts": [[title, sent_id]], "context": [[title, [sentence, ...]]]}``.
The Hugging Face layout (``hotpotqa/hotpot_qa``, config ``distractor``) is accepted too: ``id``
instead of ``_id``, ``context: {"title": [...], "sentences": [[...]]}`` and
``supporting_facts: {"title": [...], "sent_id": [...]}``.

Mapping: one example per question; segments = the context paragraphs in the given order (session =
paragraph title, text = its sentences joined, ``segment_id`` = title), not shared between questions.
``category`` = ``type``; ``level`` and ``supporting_facts`` go to metadata.
"""

from __future__ import annotations

from typing import Any

from ._fields import as_records, get_field, str_list
from .errors import DataError
from .schema import Example, Segment

NAME = "hotpotqa"


def _paragraphs(context: Any, *, origin: str, rid: str) -> list[tuple[str, list[str]]]:
    if isinstance(context, dict):  # HF layout
        titles = str_list(context.get("title"), origin=origin, rid=rid, path="context.title")
        sentences = context.get("sentences")
        if not isinstance(sentences, list) or len(sentences) != len(titles):
            raise DataError(
                "expected one sentence list per title", source=origin, record=rid, field="context.sentences"
            )
        return [
            (t, str_list(s, origin=origin, rid=rid, path=f"context.sentences[{i}]"))
            for i, (t, s) in enumerate(zip(titles, sentences, strict=True))
        ]
    if not isinstance(context, list):
        raise DataError("expected a list of [title, sentences]", source=origin, record=rid, field="context")
    out = []
    for i, item in enumerate(context):
        if not isinstance(item, list | tuple) or len(item) != 2 or not isinstance(item[0], str):
            raise DataError("expected [title, [sentences]]", source=origin, record=rid, field=f"context[{i}]")
        out.append((item[0], str_list(item[1], origin=origin, rid=rid, path=f"context[{i}][1]")))
    return out


def _supporting(value: Any, *, origin: str, rid: str) -> list[list[Any]]:
    if value is None:
        return []
    if isinstance(value, dict):  # HF layout
        titles = value.get("title") or []
        ids = value.get("sent_id") or []
        return [[t, int(s)] for t, s in zip(titles, ids, strict=False)]
    if not isinstance(value, list):
        raise DataError("expected a list of [title, sent_id]", source=origin, record=rid, field="supporting_facts")
    return [list(item) for item in value]


def parse(records: Any, *, origin: str, split: str, options: dict[str, Any]) -> list[Example]:
    """Convert HotpotQA records (either layout) into examples (see module doc)."""
    rows = as_records(records, origin=origin, what="a list of questions")
    out: list[Example] = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected an object, got {type(row).__name__}", source=origin, record=index)
        key = "_id" if "_id" in row else "id"
        qid = str(get_field(row, key, (str, int), origin=origin, rid=index, path="_id"))
        rid = f"{index} (_id={qid})"
        question = get_field(row, "question", str, origin=origin, rid=rid)
        answer = get_field(row, "answer", (str, int, float), origin=origin, rid=rid)
        paragraphs = _paragraphs(
            get_field(row, "context", (list, dict), origin=origin, rid=rid), origin=origin, rid=rid
        )
        segments = [
            Segment(text="".join(sentences).strip(), session=title, segment_id=title) for title, sentences in paragraphs
        ]
        qtype = row.get("type")
        out.append(
            Example(
                example_id=f"{NAME}-{qid}",
                task=NAME,
                question=question.strip(),
                answers=[str(answer).strip()],
                segments=segments,
                category=qtype if isinstance(qtype, str) else None,
                metadata={
                    "id": qid,
                    "level": row.get("level"),
                    "supporting_facts": _supporting(row.get("supporting_facts"), origin=origin, rid=rid),
                },
            )
        )
    return out

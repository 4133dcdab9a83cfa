"""LoCoMo (Maharana et al., ACL 2024): very long multi-session conversations with QA.

Native format (``data/locomo10.json`` of github.com/snap-research/LoCoMo): a JSON list of samples,
each ``{"sample_id", "conversation", "qa", "event_summary", "observation", "session_summary"}``.
``conversation`` holds ``speaker_a``/``speaker_b``, ``session_N`` (list of turns
``{"speaker", "dia_id", "text"}`` plus, for shared images, ``img_url``/``blip_caption``/``query``) and
``session_N_date_time``. Each ``qa`` item has ``question``, ``answer`` (or, for adversarial questions,
``adversarial_answer``), ``evidence`` (dia_ids) and ``category`` 1–5.

Category numbers follow the upstream evaluation code (``task_eval/evaluation.py``,
``CATEGORY_MAPPING``): 1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial. (The
paper's prose lists the types in another order; the code is what scores the numbers.)

Mapping: one :class:`Example` per QA item; the segments (every turn of every non-empty session, in
session order, with speaker, session date and ``dia_id``) are shared by all QA of a conversation
(``metadata["conversation_id"] = sample_id``). Gold answers follow upstream scoring: category 5
questions are answered by saying the information is not in the conversation (the scorer accepts
"not mentioned" / "no information available"); the misleading ``adversarial_answer`` is kept in
metadata. Category 3 answers are cut at the first ``;`` (upstream scores that part only); the raw
answer is kept in ``metadata["raw_answer"]``.
"""

from __future__ import annotations

import re
from typing import Any

from ._fields import as_records, get_field, str_list
from .errors import DataError
from .schema import Example, Segment

NAME = "locomo"
CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL_ANSWER = "Not mentioned in the conversation"
_SESSION_RE = re.compile(r"session_(\d+)")


def _turn_text(turn: dict[str, Any], with_captions: bool) -> str:
    text = turn["text"]
    caption = turn.get("blip_caption")
    if with_captions and isinstance(caption, str) and caption.strip():
        text = f"{text} [shares an image: {caption.strip()}]"
    return text


def conversation_segments(
    conversation: Any, *, origin: str, rid: int | str, with_captions: bool = True
) -> list[Segment]:
    """Every turn of every non-empty ``session_N`` (in N order) as a :class:`Segment`."""
    if not isinstance(conversation, dict):
        raise DataError("expected an object", source=origin, record=rid, field="conversation")
    numbers = sorted(int(m.group(1)) for key in conversation if (m := _SESSION_RE.fullmatch(key)))
    segments: list[Segment] = []
    for n in numbers:
        key = f"session_{n}"
        turns = conversation[key]
        if turns is None or turns == []:
            continue
        if not isinstance(turns, list):
            raise DataError("expected a list of turns", source=origin, record=rid, field=f"conversation.{key}")
        date = conversation.get(f"{key}_date_time")
        date = date if isinstance(date, str) else None
        for i, turn in enumerate(turns):
            where = f"conversation.{key}[{i}]"
            speaker = get_field(turn, "speaker", str, origin=origin, rid=rid, path=f"{where}.speaker")
            get_field(turn, "text", str, origin=origin, rid=rid, path=f"{where}.text")
            dia_id = get_field(turn, "dia_id", str, origin=origin, rid=rid, path=f"{where}.dia_id")
            segments.append(
                Segment(
                    text=_turn_text(turn, with_captions),
                    role="user",
                    speaker=speaker,
                    timestamp=date,
                    session=f"Session {n}",
                    segment_id=dia_id,
                )
            )
    if not segments:
        raise DataError("conversation has no turns", source=origin, record=rid, field="conversation")
    return segments


def parse(records: Any, *, origin: str, split: str, options: dict[str, Any]) -> list[Example]:
    """Convert the parsed ``locomo10.json`` list into examples (see module doc).

    Options: ``sample_ids`` (keep only these conversations), ``image_captions`` (default true:
    append ``[shares an image: <caption>]`` to turns that shared one).
    """
    samples = as_records(records, origin=origin, what="a list of conversation samples")
    keep = options.get("sample_ids")
    with_captions = bool(options.get("image_captions", True))
    out: list[Example] = []
    for index, sample in enumerate(samples):
        sample_id = get_field(sample, "sample_id", (str, int), origin=origin, rid=index)
        sample_id = str(sample_id)
        rid = f"{index} (sample_id={sample_id})"
        if keep is not None and sample_id not in keep:
            continue
        conversation = get_field(sample, "conversation", dict, origin=origin, rid=rid)
        speakers = [
            get_field(conversation, key, str, origin=origin, rid=rid, path=f"conversation.{key}")
            for key in ("speaker_a", "speaker_b")
        ]
        segments = conversation_segments(conversation, origin=origin, rid=rid, with_captions=with_captions)
        qa_items = get_field(sample, "qa", list, origin=origin, rid=rid)
        for q_index, qa in enumerate(qa_items):
            where = f"qa[{q_index}]"
            question = get_field(qa, "question", str, origin=origin, rid=rid, path=f"{where}.question")
            number = get_field(qa, "category", int, origin=origin, rid=rid, path=f"{where}.category")
            if number not in CATEGORY_NAMES:
                raise DataError(
                    f"unknown category {number} (expected 1-5)", source=origin, record=rid, field=f"{where}.category"
                )
            answer = qa.get("answer")
            adversarial = qa.get("adversarial_answer")
            if answer is None and adversarial is None:
                raise DataError(
                    "missing required field (neither 'answer' nor 'adversarial_answer')",
                    source=origin,
                    record=rid,
                    field=f"{where}.answer",
                )
            evidence = str_list(qa.get("evidence", []), origin=origin, rid=rid, path=f"{where}.evidence")
            metadata: dict[str, Any] = {
                "conversation_id": sample_id,
                "question_index": q_index,
                "locomo_category": number,
                "evidence": evidence,
                "speakers": speakers,
            }
            if number == 5:
                answers = [ADVERSARIAL_ANSWER]
                if adversarial is not None:
                    metadata["adversarial_answer"] = str(adversarial)
                if answer is not None:
                    metadata["raw_answer"] = str(answer)
            else:
                if answer is None:
                    raise DataError("missing required field", source=origin, record=rid, field=f"{where}.answer")
                raw = str(answer)
                gold = raw.split(";")[0].strip() if number == 3 else raw.strip()
                answers = [gold or raw]
                metadata["raw_answer"] = raw
            out.append(
                Example(
                    example_id=f"{NAME}-{sample_id}-q{q_index:04d}",
                    task=NAME,
                    question=question.strip(),
                    answers=answers,
                    segments=segments,
                    category=CATEGORY_NAMES[number],
                    metadata=metadata,
                )
            )
    return out

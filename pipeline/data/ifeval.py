"""IFEval (Zhou et al., 2023): prompts with verifiable formatting instructions.

Native format (``input_data.jsonl`` of google-research ``instruction_following_eval``): one JSON
object per line, ``{"key": int, "prompt": str, "instruction_id_list": [str], "kwargs": [dict]}``, one
kwargs dict per instruction. The hub copy ``google/IFEval`` (split ``train``) has the same columns but
fills every kwargs dict with all possible keys set to null; those nulls are dropped here so both
sources give identical examples.

Mapping: one example per prompt, no memory context, ``question`` = the prompt, no gold ``answers``
(a checker scores the response against ``instruction_ids`` with ``kwargs``), category
``instruction-following``.
"""

from __future__ import annotations

from typing import Any

from ._fields import as_records, get_field, str_list
from .errors import DataError
from .schema import Example

NAME = "ifeval"
CATEGORY = "instruction-following"


def parse(records: Any, *, origin: str, split: str, options: dict[str, Any]) -> list[Example]:
    """Convert IFEval rows into examples (see module doc)."""
    rows = as_records(records, origin=origin, what="a list of prompts")
    out: list[Example] = []
    for index, row in enumerate(rows):
        key = get_field(row, "key", (int, str), origin=origin, rid=index)
        rid = f"{index} (key={key})"
        prompt = get_field(row, "prompt", str, origin=origin, rid=rid)
        ids = str_list(
            get_field(row, "instruction_id_list", list, origin=origin, rid=rid),
            origin=origin,
            rid=rid,
            path="instruction_id_list",
        )
        kwargs = get_field(row, "kwargs", list, origin=origin, rid=rid)
        if len(kwargs) != len(ids):
            raise DataError(
                f"{len(kwargs)} kwargs for {len(ids)} instructions", source=origin, record=rid, field="kwargs"
            )
        clean = []
        for k_index, kw in enumerate(kwargs):
            if kw is None:
                kw = {}
            if not isinstance(kw, dict):
                raise DataError("expected an object", source=origin, record=rid, field=f"kwargs[{k_index}]")
            clean.append({k: v for k, v in kw.items() if v is not None})
        out.append(
            Example(
                example_id=f"{NAME}-{key}",
                task=NAME,
                question=prompt,
                answers=[],
                category=CATEGORY,
                instruction_ids=ids,
                kwargs=clean,
                metadata={"key": key},
            )
        )
    return out

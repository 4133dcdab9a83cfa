"""GPQA-Diamond (Rein et al., 2023): 198 graduate-level multiple-choice science questions.

Native format (``gpqa_diamond.csv`` from the authors' password-protected zip, or the gated hub
dataset ``Idavidrein/gpqa`` config ``gpqa_diamond``, split ``train``): one row per question with,
among others, ``Question``, ``Correct Answer``, ``Incorrect Answer 1``..``3``, ``Record ID``,
``High-level domain`` and ``Subdomain``.

Mapping: one example per row, no memory context. The four options are shuffled with a random
generator seeded by ``sha256("<seed>:<Record ID>")``, so the order is the same on every machine and
run, independent of row order; ``choices`` holds them in that order and ``answers`` the gold letter
(``A``–``D``), with the correct text and index in metadata. ``category`` = the high-level domain.
The authors ask that examples are not revealed online: never publish prepared GPQA files.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from ._fields import as_records, get_field
from .schema import Example

NAME = "gpqa"
LETTERS = "ABCD"
WRONG_COLUMNS = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


def choice_order(record_id: str, seed: int) -> list[int]:
    """Deterministic permutation of the 4 options (index 0 = the correct answer) for one record."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    order = [0, 1, 2, 3]
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def parse(records: Any, *, origin: str, split: str, options: dict[str, Any]) -> list[Example]:
    """Convert GPQA rows into examples (see module doc). Option ``seed`` (default 0) for the shuffle."""
    rows = as_records(records, origin=origin, what="a list of rows")
    seed = int(options.get("seed", 0))
    out: list[Example] = []
    for index, row in enumerate(rows):
        record_id = str(get_field(row, "Record ID", (str, int), origin=origin, rid=index)).strip()
        rid = f"{index} (Record ID={record_id})"
        question = get_field(row, "Question", str, origin=origin, rid=rid).strip()
        options_text = [get_field(row, "Correct Answer", (str, int, float), origin=origin, rid=rid)]
        options_text += [get_field(row, col, (str, int, float), origin=origin, rid=rid) for col in WRONG_COLUMNS]
        options_text = [str(o).strip() for o in options_text]
        order = choice_order(record_id, seed)
        choices = [options_text[i] for i in order]
        gold_index = order.index(0)
        domain = row.get("High-level domain")
        out.append(
            Example(
                example_id=f"{NAME}-{record_id}",
                task=NAME,
                question=question,
                answers=[LETTERS[gold_index]],
                choices=choices,
                category=domain.strip() if isinstance(domain, str) and domain.strip() else None,
                metadata={
                    "record_id": record_id,
                    "gold_index": gold_index,
                    "gold_letter": LETTERS[gold_index],
                    "correct_answer": options_text[0],
                    "subdomain": row.get("Subdomain"),
                    "shuffle_seed": seed,
                },
            )
        )
    return out

"""Tasks without a memory context: GPQA-Diamond (multiple choice) and IFEval (instruction following).

Both have no history, so ``context_messages`` equals ``question_messages`` and ``history_messages`` is
empty; in the paper they are scored with δ-mem writing online while it reads the prompt.

* ``gpqa``: the four shuffled options (the reader shuffles them deterministically per record) lettered
  A–D, and the instruction to end with ``{"answer": "C"}``; greedy, up to 8,192 new tokens (the
  protocol's budget: reasoning models think first). Accuracy of the letter :func:`parse_choice` finds.
* ``ifeval``: the prompt as the only user turn; greedy, 1,500 new tokens. Prompt- and instruction-level
  accuracy, strict and loose (:mod:`pipeline.eval.metrics.ifeval`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pipeline.data.schema import Example

from ..metrics.ifeval import IFEvalVerdict, evaluate_response
from .base import Message, ScoredRow, Task, mean

LETTERS = "ABCD"
GPQA_INSTRUCTION = (
    "Answer the following multiple-choice question. You may reason step by step, but end your reply with "
    'the answer as JSON on its own line, in the form {"answer": "C"}, where the letter is one of A, B, C or D.'
)

_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_JSON_FIELD = re.compile(r"""["']?answer["']?\s*:\s*["']?\(?\s*([A-Da-d])\s*\)?["']?""", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{\s*)?\(?([A-D])\)?")
_STATED = re.compile(
    r"\b(?:final\s+answer|answer|correct\s+(?:answer|option|choice)|option|choice)\s*(?:is|:|=|-)?\s*"
    r"(?:option\s+|choice\s+)?[\(\[*\"']*([A-D])\b(?![\w'-])",
    re.IGNORECASE,
)
_LINE_LETTER = re.compile(r"^[\s*\"'(\[]*([A-D])[\s*\"')\].:]*$", re.MULTILINE)
_PAREN_LETTER = re.compile(r"\(([A-D])\)")
_LONE_LETTER = re.compile(r"(?<![\w'-])([A-D])(?![\w'-])")


def parse_choice(text: str) -> str | None:
    """The answer letter (A–D) in a reply, or None. Tried in order, the last match of each rule wins:

    1. a JSON object with an ``answer`` field (``{"answer": "C"}``, also ``{'answer': '(c)'}``);
    2. ``\\boxed{C}``;
    3. a stated answer: ``Answer: C``, ``the answer is (C)``, ``correct option: **C**``;
    4. a line that is only the letter (``C``, ``(C)``, ``C.``, ``**C**``);
    5. ``(C)`` anywhere;
    6. the last standalone capital A–D, ignoring "A" used as an article (followed by a lowercase word).
    """
    if not text:
        return None
    for obj in reversed(_JSON_OBJECT.findall(text)):
        try:
            data = json.loads(obj)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for key, value in data.items():
                if str(key).strip().lower() == "answer" and isinstance(value, str):
                    letter = value.strip().strip("()").strip().upper()
                    if letter in LETTERS and len(letter) == 1:
                        return letter
        m = _JSON_FIELD.search(obj)
        if m:
            return m.group(1).upper()
    for pattern in (_BOXED, _STATED, _LINE_LETTER, _PAREN_LETTER):
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    for m in reversed(list(_LONE_LETTER.finditer(text))):
        letter = m.group(1)
        if letter == "A" and re.match(r"\s+[a-z]", text[m.end() :]):
            continue  # the article "A"
        return letter
    return None


class GPQATask(Task):
    """GPQA-Diamond (see module doc)."""

    name = "gpqa"
    headline = "accuracy"
    max_new_tokens = 8192

    def question_messages(self, example: Example) -> list[Message]:
        choices = example.choices or []
        if len(choices) > len(LETTERS):
            raise ValueError(f"{example.example_id}: {len(choices)} choices, at most {len(LETTERS)} supported")
        options = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
        return [{"role": "user", "content": f"{GPQA_INSTRUCTION}\n\nQuestion: {example.question}\n\n{options}"}]

    def context_messages(self, example: Example, context_text: str | None = None) -> list[Message]:
        return self.question_messages(example)

    def render_context(self, example: Example, segments=None) -> str:  # type: ignore[override]
        return ""

    def score(self, example: Example, prediction: str) -> dict[str, float]:
        letter = parse_choice(prediction)
        gold = (example.answers[0] if example.answers else "").strip().upper()
        return {"accuracy": float(letter is not None and letter == gold), "answered": float(letter is not None)}

    def details(self, example: Example, prediction: str) -> dict[str, Any]:
        return {"parsed": parse_choice(prediction)}


class IFEvalTask(Task):
    """IFEval (see module doc). Per example: ``prompt_level_strict_acc`` / ``prompt_level_loose_acc``
    (0/1), ``inst_level_strict_acc`` / ``inst_level_loose_acc`` (share of the prompt's instructions
    followed) and ``n_instructions``; :meth:`aggregate` gives instruction-level accuracy over all
    instructions (micro average, as upstream) and a breakdown by instruction group
    (``inst_level_strict_acc/instruction/<group>``, e.g. ``detectable_format``)."""

    name = "ifeval"
    headline = "prompt_level_strict_acc"
    max_new_tokens = 1500

    def question_messages(self, example: Example) -> list[Message]:
        return [{"role": "user", "content": example.question}]

    def context_messages(self, example: Example, context_text: str | None = None) -> list[Message]:
        return self.question_messages(example)

    def render_context(self, example: Example, segments=None) -> str:  # type: ignore[override]
        return ""

    def _verdict(self, example: Example, prediction: str) -> IFEvalVerdict:
        ids = example.instruction_ids or []
        kwargs = example.kwargs if example.kwargs is not None else [{} for _ in ids]
        return evaluate_response(ids, kwargs, prediction, example.question)

    def score(self, example: Example, prediction: str) -> dict[str, float]:
        return self._scores(self._verdict(example, prediction))

    @staticmethod
    def _scores(v: IFEvalVerdict) -> dict[str, float]:
        n = len(v.instruction_ids)
        return {
            "prompt_level_strict_acc": float(v.prompt_strict),
            "prompt_level_loose_acc": float(v.prompt_loose),
            "inst_level_strict_acc": sum(v.strict) / n if n else 1.0,
            "inst_level_loose_acc": sum(v.loose) / n if n else 1.0,
            "n_instructions": float(n),
        }

    def details(self, example: Example, prediction: str) -> dict[str, Any]:
        return self._details(self._verdict(example, prediction))

    @staticmethod
    def _details(v: IFEvalVerdict) -> dict[str, Any]:
        return {"instruction_ids": list(v.instruction_ids), "strict": list(v.strict), "loose": list(v.loose)}

    def score_row(self, example: Example, prediction: str) -> dict[str, Any]:
        v = self._verdict(example, prediction)  # checked once for both scores and details
        return self.row(example, self._scores(v), self._details(v))

    def aggregate(self, rows) -> dict[str, float]:  # type: ignore[override]
        rows: Sequence[ScoredRow] = self._as_rows(rows)
        out: dict[str, float] = {"n": float(len(rows))}
        for level in ("strict", "loose"):
            out[f"prompt_level_{level}_acc"] = mean([float(r["scores"][f"prompt_level_{level}_acc"]) for r in rows])
            followed = sum(
                float(r["scores"][f"inst_level_{level}_acc"]) * float(r["scores"]["n_instructions"]) for r in rows
            )
            total = sum(float(r["scores"]["n_instructions"]) for r in rows)
            out[f"inst_level_{level}_acc"] = followed / total if total else float("nan")
        out["n_instructions"] = float(sum(float(r["scores"]["n_instructions"]) for r in rows))
        groups: dict[str, dict[str, list[bool]]] = {}
        for r in rows:
            d = r.get("details") or {}
            for iid, s, lo in zip(d.get("instruction_ids", []), d.get("strict", []), d.get("loose", []), strict=False):
                g = groups.setdefault(iid.split(":")[0], {"strict": [], "loose": []})
                g["strict"].append(bool(s))
                g["loose"].append(bool(lo))
        for name in sorted(groups):
            for level in ("strict", "loose"):
                values = groups[name][level]
                out[f"inst_level_{level}_acc/instruction/{name}"] = sum(values) / len(values)
            out[f"n/instruction/{name}"] = float(len(groups[name]["strict"]))
        return out

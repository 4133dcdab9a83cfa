"""Tasks without a memory context: GPQA-Diamond (multiple choice) and IFEval (instruction following).

Both have no history, so ``context_messages`` equals ``question_messages`` and ``history_messages`` is
empty; in the paper they are scored with δ-mem writing online while it reads the prompt.

* ``gpqa``: the four shuffled options (the reader shuffles them deterministically per record) lettered
  A–D, and the instruction to end with ``{"answer": "C"}``; greedy, up to 8,192 new tokens (the
  protocol's budget: reasoning models think first). Accuracy of the letter :func:`parse_choice` finds:
  scoring ``delta-mem`` = the paper's ``extract_gpqa_letter`` (made for this JSON prompt),
  ``official`` = the GPQA baselines' ``parse_sampled_answer`` (made for their "The correct answer is
  (X)" prompt, so it misses most JSON replies — the preset scores GPQA the paper's way).
* ``ifeval``: the prompt as the only user turn; greedy, 1,500 new tokens. Prompt- and instruction-level
  accuracy, strict and loose (:mod:`pipeline.eval.metrics.ifeval`); scoring ``delta-mem`` swaps in the
  paper's stand-ins for langdetect and NLTK (``ifeval_compat.py``), ``official`` is the google-research
  / lm-evaluation-harness behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.data.schema import Example

from ..metrics.ifeval import IFEvalVerdict, evaluate_response
from .base import Message, ScoredRow, Task, check_scoring, mean

LETTERS = "ABCD"
GPQA_INSTRUCTION = (
    "Answer the following multiple-choice question. You may reason step by step, but end your reply with "
    'the answer as JSON on its own line, in the form {"answer": "C"}, where the letter is one of A, B, C or D.'
)

# the δ-mem paper's extract_gpqa_letter (benchmark_compare.py), tried in order, the last match of the
# first pattern that matches wins; all case-insensitive, "." spans lines
_PAPER_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE | re.DOTALL)
    for p in (
        r'```json\s*\{[^`]*?"answer"\s*:\s*"([ABCD])"[^`]*\}\s*```',
        r'"answer"\s*:\s*"([ABCD])"',
        r"\\boxed\{\s*(?:\\text\{)?\s*([ABCD])\s*\}?\s*\}",
        r"(?:final answer|correct answer|answer)\s*[:：]\s*\**\s*([ABCD])\b",
        r"(?:final answer|correct answer)\s*(?:is)?\s*\**\s*([ABCD])\b",
    )
)
_PAPER_LINE_ONLY = re.compile(r"^\s*[\*\(\[]*([ABCD])[\*\)\]\.\:]*\s*$", re.IGNORECASE)
_PAPER_LINE_START = re.compile(r"^\s*([ABCD])(?:[\.)\:]|\s{2,}|$)", re.IGNORECASE)
# the GPQA baselines' parse_sampled_answer (idavidrein/gpqa), for its "The correct answer is (X)"
# prompt: the first pattern whose first match is a capital A-D; case-sensitive
_OFFICIAL_PATTERNS = tuple(
    re.compile(p) for p in (r"answer is \((.)\)", r"Answer: \((.)\)", r"answer: \((.)\)", r"answer \((.)\)", r"\((.)\)")
)


def paper_letter(text: str) -> str | None:
    """The δ-mem paper's ``extract_gpqa_letter`` (upper-cased letter, or None):

    1. the last match of the first of: a fenced JSON block with ``"answer": "C"``; ``"answer": "C"``;
       ``\\boxed{C}``; ``answer:``/``final answer:``/``correct answer:`` then the letter;
       ``final answer (is) C`` / ``correct answer (is) C`` (all case-insensitive, double quotes only);
    2. else the first, then the last non-blank line: the letter alone (``C``, ``(C)``, ``**C**``,
       ``C.``), or a line starting with the letter followed by ``.``, ``)``, ``:``, two spaces or the
       end of the line.
    """
    for pattern in _PAPER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return str(found[-1]).upper()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    for line in (lines[0], lines[-1]):
        m = _PAPER_LINE_ONLY.match(line) or _PAPER_LINE_START.match(line)
        if m:
            return m.group(1).upper()
    return None


def official_letter(text: str) -> str | None:
    """The GPQA baselines' ``parse_sampled_answer``: for each of ``answer is (X)``, ``Answer: (X)``,
    ``answer: (X)``, ``answer (X)``, ``(X)`` in turn, its first occurrence; returned when X is one of
    the capitals A–D, else the next pattern is tried (so ``(b)`` or ``(1)`` first hides a later ``(B)``)."""
    for pattern in _OFFICIAL_PATTERNS:
        m = pattern.search(text)
        if m and m.group(1) in LETTERS:
            return m.group(1)
    return None


def parse_choice(text: str, scoring: str = "official") -> str | None:
    """The answer letter of a reply under a scoring protocol (:func:`official_letter` or :func:`paper_letter`)."""
    return paper_letter(text) if check_scoring(scoring) == "delta-mem" else official_letter(text)


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

    def score(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, float]:
        letter = parse_choice(prediction, scoring)
        gold = (example.answers[0] if example.answers else "").strip().upper()
        return {"accuracy": float(letter is not None and letter == gold), "answered": float(letter is not None)}

    def details(self, example: Example, prediction: str, scoring: str = "official") -> dict[str, Any]:
        return {"parsed": parse_choice(prediction, scoring)}


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

    def _verdict(self, example: Example, prediction: str, scoring: str = "official") -> IFEvalVerdict:
        ids = example.instruction_ids or []
        kwargs = example.kwargs if example.kwargs is not None else [{} for _ in ids]
        paper = check_scoring(scoring) == "delta-mem"
        return evaluate_response(ids, kwargs, prediction, example.question, paper=paper)

    def score(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, float]:
        return self._scores(self._verdict(example, prediction, scoring))

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

    def details(self, example: Example, prediction: str, scoring: str = "official") -> dict[str, Any]:
        return self._details(self._verdict(example, prediction, scoring))

    @staticmethod
    def _details(v: IFEvalVerdict) -> dict[str, Any]:
        return {"instruction_ids": list(v.instruction_ids), "strict": list(v.strict), "loose": list(v.loose)}

    def score_row(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, Any]:
        v = self._verdict(example, prediction, scoring)  # checked once for both scores and details
        return self.row(example, self._scores(v), self._details(v), check_scoring(scoring))

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

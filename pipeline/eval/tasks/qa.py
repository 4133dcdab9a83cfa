"""Span-answer QA tasks: the synthetic memory set, HotpotQA (distractor) and Qasper.

* ``synthetic``: the prompts are the training ones (:func:`pipeline.data.tokenize.read_messages` /
  ``write_messages``), so the evaluation asks exactly what δ-mem was trained on. Metrics: ``em``
  (normalised exact match of the first line), ``f1`` (token F1 of the first line) and ``contains``
  (the normalised gold occurs, on word boundaries, anywhere in the generation — a small model tends to
  keep talking after the answer); headline ``em``.
* ``hotpotqa``: the paper's prompt, "Answer the question using only the passages below. Reply with a
  short span or yes/no only." + ``<title>: <text>`` passages + "Question: … Answer:"; greedy, 32 tokens;
  EM and F1 of the first line, max over the golds; headline ``f1``. Scoring ``official``: the first
  line split on ``"\n"`` (HotpotQA's code scores an answer string and defines no extraction), the
  ``hotpot_evaluate_v1.py`` normalisation and its yes/no/noanswer rule. ``delta-mem``: the paper's
  ``extract_first_line`` and ``hotpotqa_f1`` (:mod:`pipeline.eval.metrics.paper`: articles dropped
  before punctuation, punctuation → spaces, no yes/no rule, two empty answers equal), F1 rounded to 4
  decimals.
* ``qasper``: the same kind of prompt over the paper's sections; Qasper's answer F1 (SQuAD
  normalisation, max over the annotators' references, "Unanswerable"/"Yes"/"No" as text, as the
  official ``qasper_evaluator.py``); headline ``f1``.

The synthetic set and Qasper have no δ-mem-paper scorer of their own, so both protocols score them
alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.data.schema import Example, Segment
from pipeline.data.tokenize import DEFAULT_READ_SYSTEM, DEFAULT_WRITE_SYSTEM, RenderConfig, read_messages

from ..metrics import paper
from ..metrics.text import (
    contains_words,
    exact_match,
    first_line,
    hotpot_prf,
    max_over,
    strip_answer_prefix,
    token_f1,
)
from .base import Message, Task, check_scoring


def _answer_text(prediction: str) -> str:
    return strip_answer_prefix(first_line(prediction))


class SyntheticTask(Task):
    """The synthetic multi-session memory set (:mod:`pipeline.data.synthetic`)."""

    name = "synthetic"
    headline = "em"
    max_new_tokens = 32
    write_render = RenderConfig()  # the training WRITE format

    def question_messages(self, example: Example) -> list[Message]:
        return read_messages(example)

    def context_messages(self, example: Example, context_text: str | None = None) -> list[Message]:
        context = self.render_context(example) if context_text is None else context_text
        return [
            {"role": "system", "content": DEFAULT_READ_SYSTEM},
            {"role": "user", "content": f"Here is a conversation:\n\n{context}\n\n{example.question}"},
        ]

    def postprocess(self, example: Example, prediction: str) -> str:
        return _answer_text(prediction)

    def score(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, float]:
        answer = self.postprocess(example, prediction)
        return {
            "em": max_over(exact_match, answer, example.answers),
            "f1": max_over(token_f1, answer, example.answers),
            "contains": max_over(contains_words, prediction, example.answers),
        }


HOTPOT_INSTRUCTION = "Answer the question using only the passages below. Reply with a short span or yes/no only."
HOTPOT_QUESTION_ONLY = "Answer the question. Reply with a short span or yes/no only."


class HotpotQATask(Task):
    """HotpotQA, distractor setting (see module doc)."""

    name = "hotpotqa"
    headline = "f1"
    max_new_tokens = 32
    write_render = RenderConfig(write_system=DEFAULT_WRITE_SYSTEM)  # one message per passage: "[title]\ntext"

    def render_context(self, example: Example, segments: Sequence[Segment] | None = None) -> str:
        """One ``<title>: <text>`` line per passage."""
        segs = example.segments if segments is None else segments
        return "\n".join(f"{s.session}: {s.text}" if s.session else s.text for s in segs)

    def question_messages(self, example: Example) -> list[Message]:
        return [{"role": "user", "content": f"{HOTPOT_QUESTION_ONLY}\n\nQuestion: {example.question}\nAnswer:"}]

    def context_messages(self, example: Example, context_text: str | None = None) -> list[Message]:
        context = self.render_context(example) if context_text is None else context_text
        content = f"{HOTPOT_INSTRUCTION}\n\n{context}\n\nQuestion: {example.question}\nAnswer:"
        return [{"role": "user", "content": content}]

    def postprocess(self, example: Example, prediction: str, scoring: str = "official") -> str:
        """The first line of the generation, as the protocol extracts it (module doc)."""
        if check_scoring(scoring) == "delta-mem":
            return paper.first_line(prediction)
        return prediction.strip().split("\n")[0].strip()

    def score(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, float]:
        answer = self.postprocess(example, prediction, scoring)
        if scoring == "delta-mem":
            golds = [str(g).strip() for g in example.answers]
            return {
                "em": max_over(paper.span_em, answer, golds),
                "f1": round(max_over(paper.span_f1, answer, golds), 4),
            }
        best = max((hotpot_prf(answer, g) for g in example.answers), default=(0.0, 0.0, 0.0))
        return {
            "em": max_over(exact_match, answer, example.answers),
            "f1": best[0],
            "precision": best[1],
            "recall": best[2],
        }

    def groups(self, example: Example) -> dict[str, str]:
        level = example.metadata.get("level")
        return {"level": str(level)} if level else {}


QASPER_INSTRUCTION = (
    "Answer the question using only the paper below. Reply with a short answer: a span from the paper, "
    'a short phrase, "Yes" or "No", or "Unanswerable" if the paper does not answer it.'
)
QASPER_QUESTION_ONLY = (
    'Answer the question about the paper with a short answer: a span, a short phrase, "Yes" or "No", '
    'or "Unanswerable" if it cannot be answered.'
)


class QasperTask(Task):
    """Qasper (see module doc)."""

    name = "qasper"
    headline = "f1"
    max_new_tokens = 100
    write_render = RenderConfig(write_system=DEFAULT_WRITE_SYSTEM)  # section header on each new section

    def render_context(self, example: Example, segments: Sequence[Segment] | None = None) -> str:
        """Paragraphs under their section names (a header line where the section changes)."""
        segs = example.segments if segments is None else segments
        parts: list[str] = []
        previous: str | None = None
        for s in segs:
            if s.session and s.session != previous:
                parts.append(f"## {s.session}")
                previous = s.session
            parts.append(s.text)
        return "\n".join(parts)

    def question_messages(self, example: Example) -> list[Message]:
        return [{"role": "user", "content": f"{QASPER_QUESTION_ONLY}\n\nQuestion: {example.question}\nAnswer:"}]

    def context_messages(self, example: Example, context_text: str | None = None) -> list[Message]:
        context = self.render_context(example) if context_text is None else context_text
        return [
            {"role": "user", "content": f"{QASPER_INSTRUCTION}\n\n{context}\n\nQuestion: {example.question}\nAnswer:"}
        ]

    def postprocess(self, example: Example, prediction: str) -> str:
        return strip_answer_prefix(prediction.strip())

    def score(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, float]:
        answer = self.postprocess(example, prediction)
        return {
            "f1": max_over(token_f1, answer, example.answers),
            "em": max_over(exact_match, answer, example.answers),
        }

"""LoCoMo: the official prompt of snap-research/LoCoMo (``task_eval/hf_llm_utils.py``) and its scorer
(``task_eval/evaluation.py``).

Prompt (``context_messages``): the Llama-chat system line, then one user turn: "Below is a conversation
between two people: A and B. …" followed by each session as ``DATE: <date>`` / ``CONVERSATION:`` /
``<speaker> said, "<text>"`` lines, then "Based on the above conversations, write a short answer …
Question: <q>". Category 2 (temporal) questions get "Use DATE of CONVERSATION to answer with an
approximate date." appended; category 5 (adversarial) questions are posed as upstream does, as a choice
"(a) No information available (b) <adversarial answer>" (order fixed per question by a hash of its id,
where upstream flips a coin).

Metric (two protocols, per question; docs/EVALUATION.md):

* ``official`` — upstream ``task_eval/hf_llm_utils.py`` post-processing, then ``evaluation.py``'s
  ``eval_question_answering`` and ``evaluate_qa.py``'s rounding. Cleanup: ``\\"`` → ``'``, strip, the
  first line split on ``"\n"`` only, stripped; category 5: lower-cased, ``"(a)"`` anywhere → option
  (a), anything else → option (b); other categories: lower-cased, every ``"(a)"``, ``"(b)"``,
  ``"a)"``, ``"b)"``, ``"answer:"`` deleted (anywhere), stripped. Score: categories 2–4
  Porter-stemmed token F1 after LoCoMo's normalisation (``regex`` word boundaries), against the
  record's ``answer`` (category 3 cut at the first ``;``); category 1 the comma-split multi-answer
  F1; category 5 1 if the answer says "not mentioned" / "no information available"; each question's
  score rounded to 3 decimals.
* ``delta-mem`` — the paper's ``deltamem/eval/locomo_protocol.py``: the first non-blank line by
  ``str.splitlines``; category 5: ``"(a)"`` anywhere, ``"a"`` or a leading ``"a)"`` → (a), the same
  for (b), else an answer naming the abstention keeps it, else the cleaned text (no fallback to (b));
  NFD normalisation before the F1, empty comma parts dropped in the multi-answer F1; rounded to 4
  decimals.

Both: the category-5 distractor is the record's ``answer`` when it has one, else its
``adversarial_answer`` (upstream's order). The headline ``f1`` averages categories 1–4 (1,540
questions of locomo10.json), as in the paper's protocol; ``f1/category/adversarial`` is reported on
its own and ``f1_all`` averages all five.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data.schema import Example, Segment
from pipeline.data.tokenize import DEFAULT_WRITE_SYSTEM, RenderConfig

from ..metrics import paper
from ..metrics.text import locomo_abstains, locomo_f1, locomo_multi_f1
from .base import (
    Decoding,
    DecodingMode,
    Message,
    ScoredRow,
    Task,
    aggregate_means,
    check_scoring,
    mean,
    question_index,
)

SYSTEM = (
    "You are a helpful, respectful and honest assistant whose job is to understand the following conversation "
    "and answer questions based on the conversation. If you don't know the answer to a question, please don't "
    "share false information."
)
# verbatim from upstream, typo included ("wriiten"): the official prompt
CONV_START = (
    "Below is a conversation between two people: {a} and {b}. The conversation takes place over multiple days "
    "and the date of each conversation is wriiten at the beginning of the conversation.\n\n"
)
QA_PROMPT = (
    "Based on the above conversations, write a short answer for the following question in a few words. "
    "Do not write complete and lengthy sentences. Answer with exact words from the conversations whenever "
    "possible.\n\nQuestion: {question}"
)
TEMPORAL_HINT = " Use DATE of CONVERSATION to answer with an approximate date."
ADVERSARIAL_CHOICE = " (a) {a} (b) {b}. Select the correct answer by writing (a) or (b)."
NO_INFORMATION = "No information available"
HEADLINE_CATEGORIES = (1, 2, 3, 4)
PAPER_SAMPLING = {"temperature": 0.4, "top_p": 0.9, "top_k": 10}
PAPER_SEED = 42


def category_number(example: Example) -> int:
    """The upstream category number (1–5) of a LoCoMo example."""
    number = example.metadata.get("locomo_category")
    if isinstance(number, int):
        return number
    names = {"multi-hop": 1, "temporal": 2, "open-domain": 3, "single-hop": 4, "adversarial": 5}
    if example.category in names:
        return names[example.category]
    raise ValueError(f"{example.example_id}: no LoCoMo category")


class LoCoMoTask(Task):
    """LoCoMo QA (see module doc). ``adversarial_choices=False`` asks category-5 questions plainly."""

    name = "locomo"
    headline = "f1"
    max_new_tokens = 50
    write_render = RenderConfig(write_system=DEFAULT_WRITE_SYSTEM, speaker_format='{speaker} said, "{text}"')

    def __init__(self, adversarial_choices: bool = True) -> None:
        self.adversarial_choices = adversarial_choices

    # -- prompts -------------------------------------------------------------------------------------
    def adversarial_options(self, example: Example) -> tuple[str, str] | None:
        """(option a, option b) of a category-5 question, or None (other categories, or no adversarial answer)."""
        if not self.adversarial_choices or category_number(example) != 5:
            return None
        # upstream (hf_llm_utils.py, and the paper's locomo_protocol.py) prefer "answer" to
        # "adversarial_answer"; the reader keeps a category-5 "answer" as raw_answer
        wrong = example.metadata.get("raw_answer")
        if wrong is None:
            wrong = example.metadata.get("adversarial_answer")
        if not wrong:
            return None
        if hashlib.sha256(example.example_id.encode()).digest()[0] % 2 == 0:
            return NO_INFORMATION, str(wrong)
        return str(wrong), NO_INFORMATION

    def question_text(self, example: Example) -> str:
        """The question as upstream poses it (temporal hint, adversarial choice)."""
        q = example.question
        number = category_number(example)
        if number == 2:
            return q + TEMPORAL_HINT
        options = self.adversarial_options(example)
        if options is not None:
            return q + ADVERSARIAL_CHOICE.format(a=options[0], b=options[1])
        return q

    def question_messages(self, example: Example) -> list[Message]:
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QA_PROMPT.format(question=self.question_text(example))},
        ]

    def context_messages(self, example: Example, context_text: str | None = None) -> list[Message]:
        context = self.render_context(example) if context_text is None else context_text
        prompt = QA_PROMPT.format(question=self.question_text(example))
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{context}\n\n{prompt}"}]

    def render_context(self, example: Example, segments: Sequence[Segment] | None = None) -> str:
        """``CONV_START`` + per session ``DATE:``/``CONVERSATION:`` and ``<speaker> said, "<text>"`` lines,
        in chronological order (a subset keeps its own order and session headers)."""
        segs = example.segments if segments is None else segments
        speakers = example.metadata.get("speakers")
        if not (isinstance(speakers, list) and len(speakers) == 2):
            seen = list(dict.fromkeys(s.speaker for s in example.segments if s.speaker))
            speakers = [*seen, "", ""][:2]
        parts = [CONV_START.format(a=speakers[0], b=speakers[1])]
        previous: tuple[str | None, str | None] | None = None
        for seg in segs:
            here = (seg.session, seg.timestamp)
            if here != previous:
                parts.append(f"\nDATE: {seg.timestamp or seg.session or 'unknown'}\nCONVERSATION:\n")
                previous = here
            parts.append(f'{seg.speaker or "Someone"} said, "{seg.text}"\n\n')
        return "".join(parts).rstrip("\n")

    # -- decoding ------------------------------------------------------------------------------------
    def decoding(
        self, example: Example | None = None, mode: DecodingMode = "greedy", index: int | None = None
    ) -> Decoding:
        """Greedy by default; ``mode="paper"``: T=0.4, top-p 0.9, top-k 10, seed 42 + ``index`` (default:
        the question's index within its conversation)."""
        super().decoding(example, mode, index)
        if mode == "greedy":
            return Decoding(max_new_tokens=self.max_new_tokens)
        position = index if index is not None else (question_index(example) if example is not None else 0)
        return Decoding(
            max_new_tokens=self.max_new_tokens, do_sample=True, seed=PAPER_SEED + position, **PAPER_SAMPLING
        )

    # -- scoring -------------------------------------------------------------------------------------
    def postprocess(self, example: Example, prediction: str, scoring: str = "official") -> str:
        """The answer text the metric reads, cleaned as the protocol's code does (module doc)."""
        check_scoring(scoring)
        text = prediction.replace('\\"', "'").strip()
        options = self.adversarial_options(example)
        if scoring == "official":
            text = text.split("\n")[0].strip()
            low = text.lower()
            if options is not None:
                return options[0] if "(a)" in low.strip() else options[1]
        else:
            text = paper.first_line(text) if text else text
            low = text.lower()
            if options is not None:
                if "(a)" in low or low == "a" or low.startswith("a)"):
                    return options[0]
                if "(b)" in low or low == "b" or low.startswith("b)"):
                    return options[1]
                if locomo_abstains(low):
                    return NO_INFORMATION
        for token in ("(a)", "(b)", "a)", "b)", "answer:"):
            low = low.replace(token, "")
        return low.strip()

    def gold(self, example: Example) -> str:
        """The record's ``answer`` as upstream scores it (``str``; category 3 cut at the first ``;``)."""
        raw = example.metadata.get("raw_answer")
        gold = str(raw) if raw is not None else (example.answers[0] if example.answers else "")
        if category_number(example) == 3:
            gold = gold.split(";")[0].strip()
        return gold

    def score(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, float]:
        pred = self.postprocess(example, prediction, scoring).strip()
        number = category_number(example)
        paper_rules = scoring == "delta-mem"
        if number == 5:
            value = locomo_abstains(pred)
        elif number == 1:
            value = locomo_multi_f1(pred, self.gold(example), paper=paper_rules)
            if not paper_rules:  # upstream's value is an np.mean, and numpy rounds it its own way
                return {"f1": float(round(np.float64(value), 3))}
        else:
            value = locomo_f1(pred, self.gold(example), nfd=paper_rules)
        return {"f1": round(float(value), 4 if paper_rules else 3)}

    def headline_rows(self, rows: Sequence[ScoredRow]) -> list[ScoredRow]:
        return [r for r in rows if r.get("category") != "adversarial"]

    def aggregate(self, rows) -> dict[str, float]:  # type: ignore[override]
        rows = self._as_rows(rows)
        out = aggregate_means(self.headline_rows(rows), rows)
        out["f1_all"] = mean([float(r["scores"]["f1"]) for r in rows])
        out["n_all"] = float(len(rows))
        return out

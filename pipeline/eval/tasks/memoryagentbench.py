"""MemoryAgentBench (Hu, Wang & McAuley, 2025): a unified prompt and the per-source metrics.

Prompt: the paper's unified one — "Use only the memory context below to answer the question. If the
answer is not in the memory context, reply exactly: I don't know." + the context + "Question: …
Answer:". The context (the row's chunks) is pre-clipped to 120,000 characters, keeping the first third
and the last two thirds (:func:`clip_middle`), before the runner clips it to the window by tokens.

Metrics by source family (``metadata["source"]`` prefix), following the benchmark's published metrics
(HELMET-style normalisation: lower, no punctuation, no articles):

==========================  ====================  ==========================================  ======
source prefix               family                per-example ``score``                        tokens
==========================  ====================  ==========================================  ======
``ruler_qa``                ruler_qa              substring exact match, max over aliases      50
``ruler_niah``              ruler_niah            fraction of gold values found (RULER recall) 50
``longmemeval``             longmemeval           substring exact match (upstream: GPT judge)  50
``eventqa``                 eventqa               substring exact match                        50
``infbench_qa``             infbench_qa           substring exact match                        50
``infbench_sum``            infbench_sum          token F1 against the reference summary       1200
``detective``               detectiveqa           substring exact match                        50
``factconsolidation``       factconsolidation     substring exact match                        10
``icl``                     icl                   exact match of the parsed ``label:``          20
``recsys``                  recsys                Recall@5 of the recommended titles           300
anything else               other                 substring exact match                        50
==========================  ====================  ==========================================  ======

As upstream (HELMET's ``default_post_process``), exact/substring/F1 take the max of the raw generation
and the text after ``Answer:`` (or its first line). Every row also carries ``em``, ``f1`` and ``subem``.
``aggregate``: ``score`` = sample-weighted mean over all questions, plus ``score/source/<source>``,
``score/family/<family>`` and ``score/category/<competency>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.data.schema import Example, Segment
from pipeline.data.tokenize import DEFAULT_WRITE_SYSTEM, RenderConfig

from ..metrics.text import exact_match, max_over, normalize_squad, parse_labelled, substring_match, token_f1
from .base import Decoding, DecodingMode, Message, Task

INSTRUCTION = (
    "Use only the memory context below to answer the question. If the answer is not in the memory context, "
    "reply exactly: I don't know."
)
INSTRUCTION_QUESTION_ONLY = (
    "Use only your memory of the context you have read to answer the question. If you do not know the answer, "
    "reply exactly: I don't know."
)
MAX_CONTEXT_CHARS = 120_000

# (prefix, family, metric, max_new_tokens); the first matching prefix wins
FAMILIES: tuple[tuple[str, str, str, int], ...] = (
    ("ruler_qa", "ruler_qa", "subem", 50),
    ("ruler_niah", "ruler_niah", "recall", 50),
    ("longmemeval", "longmemeval", "subem", 50),
    ("eventqa", "eventqa", "subem", 50),
    ("infbench_qa", "infbench_qa", "subem", 50),
    ("infbench_sum", "infbench_sum", "f1", 1200),
    ("detective", "detectiveqa", "subem", 50),
    ("factconsolidation", "factconsolidation", "subem", 10),
    ("icl", "icl", "em_label", 20),
    ("recsys", "recsys", "recall@5", 300),
)
DEFAULT_FAMILY = ("", "other", "subem", 50)


def family_of(source: str | None) -> tuple[str, str, str, int]:
    """(prefix, family, metric, max_new_tokens) for a ``metadata["source"]`` value."""
    s = (source or "").lower()
    for entry in FAMILIES:
        if s.startswith(entry[0]):
            return entry
    return DEFAULT_FAMILY


def clip_middle(text: str, limit: int = MAX_CONTEXT_CHARS) -> str:
    """``text`` if it has at most ``limit`` characters, else its first third and last two thirds of ``limit``."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + text[len(text) - (limit - head) :]


_YEAR = re.compile(r"\(\s*\d{4}\s*\)")
_ITEM_PREFIX = re.compile(r"^\s*(?:[-*•]|\d+[.)]|\(\d+\))\s*")


def _title_key(title: str) -> str:
    return normalize_squad(_YEAR.sub(" ", title))


def recommended_titles(prediction: str, k: int = 5) -> list[str]:
    """The first ``k`` distinct items of a recommendation list (one per line, numbered/bulleted or not;
    a single line is split on commas/semicolons), normalised without a trailing ``(year)``."""
    lines = [ln for ln in prediction.splitlines() if ln.strip()]
    if len(lines) <= 1:
        lines = re.split(r"[;,]", prediction)
    out: list[str] = []
    for line in lines:
        key = _title_key(_ITEM_PREFIX.sub("", line).split(":")[0])
        if key and key not in out:
            out.append(key)
        if len(out) == k:
            break
    return out


def recall_at_k(prediction: str, golds: Sequence[str], k: int = 5) -> float:
    """Share of the gold titles found among the first ``k`` recommended titles (a gold title counts as
    found when a recommendation equals or contains it, after normalisation)."""
    keys = [g for g in (_title_key(x) for x in golds) if g]
    if not keys:
        return 0.0
    recs = recommended_titles(prediction, k)
    hits = sum(1 for g in keys if any(g == r or f" {g} " in f" {r} " for r in recs))
    return hits / len(keys)


def ruler_recall(prediction: str, golds: Sequence[str]) -> float:
    """RULER's ``string_match_all``: share of the gold values occurring (lower-cased) in the prediction."""
    if not golds:
        return 0.0
    low = prediction.lower()
    return sum(1 for g in golds if g.lower() in low) / len(golds)


class MemoryAgentBenchTask(Task):
    """MemoryAgentBench (see module doc)."""

    name = "memoryagentbench"
    headline = "score"
    max_new_tokens = 50
    write_render = RenderConfig(write_system=DEFAULT_WRITE_SYSTEM)  # one message per chunk

    def render_context(self, example: Example, segments: Sequence[Segment] | None = None) -> str:
        """The chunks joined by newlines, clipped to 120,000 characters by :func:`clip_middle`."""
        segs = example.segments if segments is None else segments
        return clip_middle("\n".join(s.text for s in segs))

    def question_messages(self, example: Example) -> list[Message]:
        return [{"role": "user", "content": f"{INSTRUCTION_QUESTION_ONLY}\n\nQuestion: {example.question}\nAnswer:"}]

    def context_messages(self, example: Example, context_text: str | None = None) -> list[Message]:
        context = self.render_context(example) if context_text is None else context_text
        content = f"{INSTRUCTION}\n\nMemory context:\n{context}\n\nQuestion: {example.question}\nAnswer:"
        return [{"role": "user", "content": content}]

    def decoding(
        self, example: Example | None = None, mode: DecodingMode = "greedy", index: int | None = None
    ) -> Decoding:
        """Greedy; the budget of the example's source family (50 when unknown)."""
        super().decoding(example, mode, index)
        source = example.metadata.get("source") if example is not None else None
        return Decoding(max_new_tokens=family_of(source)[3])

    def score(self, example: Example, prediction: str) -> dict[str, float]:
        golds = example.answers
        _, family, metric, _ = family_of(example.metadata.get("source"))
        raw = prediction.strip()
        if family == "icl":
            label = parse_labelled(raw, "label:")
            em = max_over(exact_match, label, golds)
            return {"score": em, "em": em, "subem": max_over(substring_match, label, golds)}
        if family == "recsys":
            r5 = recall_at_k(raw, golds, 5)
            return {"score": r5, "recall@5": r5}
        parsed = parse_labelled(raw, "Answer:")
        scores = {
            "em": max(max_over(exact_match, raw, golds), max_over(exact_match, parsed, golds)),
            "f1": max(max_over(token_f1, raw, golds), max_over(token_f1, parsed, golds)),
            "subem": max(max_over(substring_match, raw, golds), max_over(substring_match, parsed, golds)),
        }
        if metric == "recall":
            scores["recall"] = ruler_recall(raw, golds)
        scores["score"] = scores[metric]
        return scores

    def groups(self, example: Example) -> dict[str, str]:
        source = example.metadata.get("source")
        return {"source": str(source), "family": family_of(source)[1]} if source else {}

"""BM25 retrieval over an example's history segments (the ``bm25`` baseline condition).

Built on ``rank-bm25``'s ``BM25Plus`` (Lv & Zhai, 2011; k1=1.5, b=0.75, delta=1): BM25 with a
lower-bounded term frequency and an IDF of ``log((N + 1) / df)`` that is always positive. The common
``BM25Okapi`` is not used because its IDF ``log((N - df + 0.5) / (df + 0.5))`` is zero or negative for
any term found in half of the documents or more, so on a history of one or two segments (or for a term
like a speaker's name) a matching segment scores *below* one without the term. Documents are the
segments: speaker and text for dialogue turns, title/section (``Segment.session``) and text for
passages. Tokens are lower-cased ``\\w+`` runs without a small English stop-word list, Porter-stemmed
(so "runs" matches "running").

Ranking is deterministic: by score, ties broken by the earlier segment. A question that shares no
term with the history still gets ``k`` segments (the first ones, all scores being 0). An empty history
gives no segments; a history of one or two segments ranks a matching segment first.

Typical use by the runner (cache one retriever per shared context)::

    retriever = BM25Retriever(example.segments)
    picked = retriever.top_k(example.question, k=10)           # indices, best first
    context = task.render_context(example, [example.segments[i] for i in sorted(picked)])
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.data.schema import Example, Segment

from .metrics.text import stem

STOP_WORDS = frozenset(
    """a about an and are as at be by did do does for from had has have he her his how i in is it its me my
    of on or she so that the their them they this to was we were what when where which who whom why will
    with you your""".split()  # noqa: SIM905
)
_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-cased, stemmed ``\\w+`` tokens without stop words."""
    return [stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


def segment_document(segment: Segment) -> str:
    """The text a segment is indexed by: speaker + text for a turn, title/section + text otherwise."""
    if segment.speaker:
        return f"{segment.speaker} {segment.text}"
    if segment.session:
        return f"{segment.session} {segment.text}"
    return segment.text


class BM25Retriever:
    """A BM25 index over a list of segments (see module doc)."""

    def __init__(self, segments: Sequence[Segment], k1: float = 1.5, b: float = 0.75, delta: float = 1.0) -> None:
        self.segments = list(segments)
        self._docs = [tokenize(segment_document(s)) for s in self.segments]
        self._bm25 = None
        if self.segments:
            from rank_bm25 import BM25Plus

            # rank-bm25 divides by the mean document length: give empty documents a harmless token
            self._bm25 = BM25Plus([d or ["\0"] for d in self._docs], k1=k1, b=b, delta=delta)

    def __len__(self) -> int:
        return len(self.segments)

    def scores(self, query: str) -> list[float]:
        """BM25 score of every segment for ``query`` (all 0 for a query without usable terms)."""
        if self._bm25 is None:
            return []
        terms = tokenize(query)
        if not terms:
            return [0.0] * len(self.segments)
        return [float(x) for x in self._bm25.get_scores(terms)]

    def top_k(self, query: str, k: int) -> list[int]:
        """Indices of the ``k`` best segments, best first (ties: earlier segment first)."""
        if k <= 0 or not self.segments:
            return []
        scores = self.scores(query)
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def retrieve_segments(
    example: Example, k: int, query: str | None = None, retriever: BM25Retriever | None = None
) -> list[Segment]:
    """The ``k`` best segments of ``example`` for its question (or ``query``), in their original order
    (ready for :meth:`~pipeline.eval.tasks.base.Task.render_context`)."""
    retriever = retriever if retriever is not None else BM25Retriever(example.segments)
    picked = retriever.top_k(example.question if query is None else query, k)
    return [retriever.segments[i] for i in sorted(picked)]

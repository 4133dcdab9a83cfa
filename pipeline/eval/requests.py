"""Phase 3 of ``evaluate``: a shard's questions become :class:`Request` objects.

A request (built by :meth:`Condition.build_requests <pipeline.eval.conditions.Condition.build_requests>`)
is everything the model backend needs for one question: its prompt token ids (built by the condition's
:class:`PromptBuilder` and encoded exactly as the training READ segment), its decoding
settings (the task's, under ``evaluate.decoding``, capped by ``max_new_tokens_cap``), and the
conversation whose history is written into its δ-mem state (:meth:`Condition.memory_source
<pipeline.eval.conditions.Condition.memory_source>`: its own, a donor's, or none).
:func:`decoding_batches` groups requests into ``generate`` calls (same decoding; sampled ones alone);
:func:`common_prefix` measures the prefix that full-context prompts of one conversation share.

The full-context prompt of all questions of one conversation shares one truncated history (the budget is
computed for the conversation's longest question), so their prompts share a prefix that the backend
can prefill once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.data.schema import Example
from pipeline.eval.retrieval import BM25Retriever, retrieve_segments
from pipeline.eval.tasks.base import Decoding, Message, Task

if TYPE_CHECKING:
    from pipeline.eval.conditions import Condition


class Encoder(Protocol):
    """What request building needs of the backend's tokenizer (:class:`pipeline.eval.backend.MemoryBackend`)."""

    def count_tokens(self, text: str) -> int: ...
    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...
    def history_ids(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]: ...
    def prompt_segment_ids(self, messages: Sequence[Mapping[str, str]], ids: Sequence[int]) -> list[int]: ...


@dataclass(frozen=True)
class Request:
    """One question, ready to generate.

    Attributes:
        example: the question.
        conversation: its conversation key (questions of one conversation share a state / prefix).
        prompt_ids: the generation prompt's token ids.
        decoding: generation settings.
        memory_from: the conversation whose history is written into the state (None: no history state).
        segment_ids: per prompt token, its message (SSW writes of a condition that writes the prompt online:
            :meth:`deltamem.chat.ChatFormat.prompt_segment_ids`); None for the other conditions.
    """

    example: Example
    conversation: str
    prompt_ids: list[int]
    decoding: Decoding
    memory_from: str | None
    segment_ids: list[int] | None = None


@dataclass
class ShardRequests:
    """A shard's requests (in question order) and the prompt figures its cost record reports."""

    requests: list[Request]
    conversations: list[str]
    history_tokens: int  # tokens of the conversations' own histories
    truncated_contexts: int  # conversations whose history was cut to fit the window


def decoding_batches(requests: Sequence[Request], indices: Iterable[int], batch_size: int) -> Iterable[list[int]]:
    """``indices`` grouped by decoding settings (first-appearance order), ``batch_size`` per group and
    call; a sampled request is a call of its own (its seed is set before it)."""
    by_dec: dict[Any, list[int]] = defaultdict(list)
    for i in indices:
        d = requests[i].decoding
        by_dec[(d.max_new_tokens, d.do_sample, d.seed if d.do_sample else None)].append(i)
    for (_, sample, _), members in by_dec.items():
        size = 1 if sample else batch_size
        for start in range(0, len(members), size):
            yield members[start : start + size]


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, at most ``min(len) - 1`` (every suffix keeps a token)."""
    limit = min(len(x) for x in seqs) - 1
    n = 0
    while n < limit and all(x[n] == seqs[0][n] for x in seqs):
        n += 1
    return n


class PromptBuilder:
    """Chat messages of one task's examples under one condition.

    Args:
        task: the benchmark task.
        condition: the condition.
        count_tokens: token count of a text (the backbone tokenizer's).
        prompt_tokens: token count of a message list rendered as a generation prompt.
        window: the model's context window in tokens (full-context prompts are fitted to it).
        reserve: tokens kept free besides the generation budget (the paper: 50).
        bm25_k: segments retrieved for ``rag_bm25``.
    """

    def __init__(
        self,
        task: Task,
        condition: Condition,
        count_tokens: Callable[[str], int],
        prompt_tokens: Callable[[Sequence[Message]], int],
        window: int,
        reserve: int = 50,
        bm25_k: int = 10,
    ) -> None:
        self.task, self.condition = task, condition
        self.count_tokens, self.prompt_tokens = count_tokens, prompt_tokens
        self.window, self.reserve, self.bm25_k = window, reserve, bm25_k
        self._retrievers: dict[str, BM25Retriever] = {}
        self.truncated: dict[str, bool] = {}  # conversation key -> history left-truncated?

    def context_budget(self, examples: Sequence[Example], max_new_tokens: int) -> int:
        """History tokens that fit: window − generation budget − reserve − the longest prompt without history."""
        overhead = max(self.prompt_tokens(self.task.context_messages(e, "")) for e in examples)
        return self.window - max_new_tokens - self.reserve - overhead

    def conversation_messages(self, key: str, examples: Sequence[Example], max_new_tokens: int) -> list[list[Message]]:
        """The messages of every question of one conversation (``key``), in order. Prompts with a history
        are fitted to ``window − max_new_tokens − reserve`` tokens (the history cut oldest first)."""
        kind = self.condition.prompt
        if kind == "question":
            return [self.task.question_messages(e) for e in examples]
        limit = self.window - max_new_tokens - self.reserve
        if kind == "context":
            budget = self.context_budget(examples, max_new_tokens)
            for _ in range(8):  # the context's tokens in isolation may differ slightly from in the prompt
                context = self.task.fit_context(examples[0], budget, self.count_tokens)
                messages = [self.task.context_messages(e, context) for e in examples]
                excess = max(self.prompt_tokens(m) for m in messages) - limit
                if excess <= 0 or not context:
                    break
                budget -= excess
            self.truncated[key] = context != self.task.render_context(examples[0])
            return messages
        retriever = self._retrievers.get(key)
        if retriever is None:
            retriever = self._retrievers[key] = BM25Retriever(examples[0].segments)
        budget = self.context_budget(examples, max_new_tokens)
        out = []
        for e in examples:
            segments = retrieve_segments(e, self.bm25_k, retriever=retriever)  # in history order
            b = budget
            for _ in range(8):
                messages = self.task.context_messages(e, self.task.fit_context(e, b, self.count_tokens, segments))
                excess = self.prompt_tokens(messages) - limit
                if excess <= 0:
                    break
                b -= excess
            out.append(messages)
        return out

"""The evaluation conditions: what goes into the prompt, what goes into the δ-mem state.

Every condition asks the same questions (a :class:`~pipeline.eval.tasks.base.Task`'s examples); they
differ only in where the history is:

=========================  =======  ===================================  ===================================
condition                  adapter  prompt                               δ-mem state
=========================  =======  ===================================  ===================================
``base_no_context``        no       the question only                    none
``base_full_context``      no       history (left-truncated) + question  none
``rag_bm25``               no       BM25 top-k segments + question       none
``deltamem_only``          yes      the question only                    the history, written once per
                                                                         conversation; read-only answers
``deltamem_full_context``  yes      history (left-truncated) + question  empty per question, written online
                                                                         during prefill and decoding (the
                                                                         paper's protocol)
``deltamem_shuffled``      yes      the question only                    the history of ANOTHER conversation
                                                                         (control: recall vs. format)
=========================  =======  ===================================  ===================================

Conditions without an adapter run once ("variant" ``base``); the others once per adapter variant
(TSW/SSW/MSW). :class:`PromptBuilder` turns an example into chat messages for a condition; the
full-context prompt of all questions of one conversation shares one truncated history (the budget is
computed for the conversation's longest question), so their prompts share a prefix that the runner can
prefill once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pipeline.data.schema import Example
from pipeline.eval.retrieval import BM25Retriever, retrieve_segments
from pipeline.eval.tasks.base import Message, Task

PromptKind = Literal["question", "context", "retrieval"]
MemoryKind = Literal["none", "history", "donor", "online"]
BASE_VARIANT = "base"


@dataclass(frozen=True)
class Condition:
    """One evaluation condition.

    Attributes:
        name: the name used in params and output paths.
        uses_adapter: runs with a δ-mem adapter (once per variant) rather than the bare backbone.
        prompt: ``question`` (question only), ``context`` (history fitted to the window + question) or
            ``retrieval`` (BM25 top-k segments + question).
        memory: ``none``; ``history`` (the conversation's history written into the state, read-only
            answers); ``donor`` (another conversation's history, read-only); ``online`` (a fresh state
            per question, written while the prompt is read and the answer decoded).
        description: one line for reports.
    """

    name: str
    uses_adapter: bool
    prompt: PromptKind
    memory: MemoryKind
    description: str

    @property
    def writes_history(self) -> bool:
        """The state is built by writing a history before the questions are asked."""
        return self.memory in ("history", "donor")


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("base_no_context", False, "question", "none", "frozen backbone, question only"),
        Condition("base_full_context", False, "context", "none", "frozen backbone, history in the prompt"),
        Condition("rag_bm25", False, "retrieval", "none", "frozen backbone, BM25 top-k history segments"),
        Condition("deltamem_only", True, "question", "history", "δ-mem state of the history, question only"),
        Condition("deltamem_full_context", True, "context", "online", "history in the prompt + δ-mem writing online"),
        Condition("deltamem_shuffled", True, "question", "donor", "control: δ-mem state of another conversation"),
    )
}
DEFAULT_CONDITIONS: tuple[str, ...] = tuple(CONDITIONS)


def get_condition(name: str) -> Condition:
    """The condition called ``name``; ``KeyError`` lists the known ones."""
    try:
        return CONDITIONS[name]
    except KeyError:
        raise KeyError(f"unknown condition {name!r}; known conditions: {', '.join(CONDITIONS)}") from None


def unsupported_reason(condition: Condition, write_mode: str | None) -> str | None:
    """Why a (condition, adapter write mode) pair cannot run, or None.

    ``deltamem_full_context`` writes token by token during ``generate``; the library supports that for
    TSW and MSW only (SSW writes one update per message and needs the message boundaries).
    """
    if condition.memory == "online" and write_mode == "SSW":
        return "generate(memory_write=True) is not supported for write_mode='SSW' (token writes only)"
    return None


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

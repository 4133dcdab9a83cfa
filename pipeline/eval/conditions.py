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
                                                                         paper's protocol; SSW: one write per
                                                                         prompt message, then one per
                                                                         generated token)
``deltamem_shuffled``      yes      the question only                    the history of ANOTHER conversation
                                                                         (control: recall vs. format)
=========================  =======  ===================================  ===================================

Conditions without an adapter run once ("variant" ``base``); the others once per adapter variant
(TSW/SSW/MSW). A condition answers, through its methods, every question the later phases ask of it:
which settings enter its shards' hash (:meth:`Condition.hashed_settings`), whose history is written into
a conversation's state (:meth:`Condition.memory_source`), whether it needs donors, writes online or
shares a prefix, which adapters it cannot run with, and how its prompts are built
(:meth:`Condition.prompt_builder` → :class:`~pipeline.eval.requests.PromptBuilder`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.data.schema import Example
from pipeline.eval.requests import Encoder, PromptBuilder, Request, ShardRequests
from pipeline.eval.tasks.base import Decoding, Task
from pipeline.params import BASE_VARIANT  # noqa: F401  (the condition names are pipeline.params.ConditionName)

if TYPE_CHECKING:
    from pipeline.eval.plan import PredictionSettings

PromptKind = Literal["question", "context", "retrieval"]
MemoryKind = Literal["none", "history", "donor", "online"]


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

    @property
    def needs_donors(self) -> bool:
        """Its state comes from another conversation (needs two conversations with a history)."""
        return self.memory == "donor"

    @property
    def writes_online(self) -> bool:
        """A fresh state per question, written while the prompt is read and the answer decoded."""
        return self.memory == "online"

    @property
    def shares_history_prefix(self) -> bool:
        """The questions of a conversation share the history as a prompt prefix (prefilled once)."""
        return self.prompt == "context"

    def memory_source(self, conversation: str, donors: Mapping[str, str]) -> str | None:
        """The conversation whose history is written into ``conversation``'s state (None: none is)."""
        if not self.writes_history:
            return None
        return donors[conversation] if self.needs_donors else conversation

    def hashed_settings(self) -> tuple[str, ...]:
        """The :class:`~pipeline.eval.plan.PredictionSettings` fields that can change this condition's
        predictions (they enter its shards' config hash; the others do not, so e.g. a new ``bm25_k``
        recomputes only ``rag_bm25``)."""
        keys = ["decoding", "max_new_tokens_cap", "batch_size", "dtype"]
        if self.writes_history:
            keys += ["write_batch_size", "write_length", "reuse_state"]
        if self.prompt != "question":
            keys += ["context_window", "context_reserve"]
        if self.prompt == "context":
            keys += ["prefix_cache", "prefix_min_tokens"]
        if self.prompt == "retrieval":
            keys += ["bm25_k"]
        return tuple(keys)

    def unsupported_reason(self, write_mode: str | None) -> str | None:
        """Why this condition cannot run with an adapter of ``write_mode``, or None (every condition runs
        with every write mode; kept so that the planner can skip a unit with a reason)."""
        return None

    def prefills_shared_prefix(self, write_mode: str | None) -> bool:
        """Whether the questions of a conversation may continue from one prefill of their shared prompt
        prefix (with ``prefix_cache``).

        Not for SSW writing online: it writes the prompt one message at a time, each write from the mean
        over ALL the message's tokens, and every prompt token reads the state as it was before the prompt
        (empty). A prefix prefilled on its own would write the message that straddles the prefix end from
        part of its tokens and let the rest of the prompt read those writes. So each SSW prompt is read and
        written in one call, as the reference implementation does.
        """
        return self.shares_history_prefix and not (self.writes_online and write_mode == "SSW")

    def prompt_builder(
        self,
        task: Task,
        count_tokens: Callable[[str], int],
        prompt_tokens: Callable[..., int],
        window: int,
        reserve: int,
        bm25_k: int,
    ) -> PromptBuilder:
        """The :class:`~pipeline.eval.requests.PromptBuilder` of ``task``'s prompts under this condition."""
        return PromptBuilder(task, self, count_tokens, prompt_tokens, window, reserve, bm25_k)

    def build_requests(
        self,
        task: Task,
        groups: Sequence[tuple[str, list[Example]]],
        settings: PredictionSettings,
        encoder: Encoder,
        window: int,
        donors: Mapping[str, str],
    ) -> ShardRequests:
        """The requests of a shard's conversations ``groups`` (prompt ids, decoding, memory source; see
        :mod:`pipeline.eval.requests`)."""
        builder = self.prompt_builder(
            task,
            encoder.count_tokens,
            lambda m: len(encoder.prompt_ids(m)),
            window,
            settings.context_reserve,
            settings.bm25_k,
        )
        cap = settings.max_new_tokens_cap

        def decoding_of(example: Example) -> Decoding:
            d = task.decoding(example, settings.decoding)
            return dataclasses.replace(d, max_new_tokens=min(d.max_new_tokens, cap)) if cap else d

        requests: list[Request] = []
        history_tokens = 0
        for key, exs in groups:
            decs = [decoding_of(e) for e in exs]
            messages = builder.conversation_messages(key, exs, max(d.max_new_tokens for d in decs))
            hist = task.history_messages(exs[0])
            history_tokens += len(encoder.history_ids(hist)[0]) if hist else 0
            source = self.memory_source(key, donors)
            for e, d, m in zip(exs, decs, messages, strict=True):
                ids = encoder.prompt_ids(m)
                seg = None
                if self.writes_online:  # the prompt's messages, for an SSW adapter's per-message writes
                    try:
                        seg = encoder.prompt_segment_ids(m, ids)
                    except ValueError:  # not segmentable by message: only SSW needs it (the backend says so)
                        seg = None
                requests.append(Request(e, key, ids, d, source, seg))
        truncated = sum(1 for v in builder.truncated.values() if v)
        return ShardRequests(requests, [k for k, _ in groups], history_tokens, truncated)


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
    """:meth:`Condition.unsupported_reason` (kept as a function for callers)."""
    return condition.unsupported_reason(write_mode)

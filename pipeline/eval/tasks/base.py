"""The :class:`Task` interface: prompts, decoding settings and the official metric of one benchmark.

A task never tokenises or generates; the evaluation runner does, with the messages and settings a
task gives it. The conditions use the builders as follows (see docs/EVALUATION.md):

============================  ===================================================================
condition                     messages
============================  ===================================================================
``base_no_context``           :meth:`Task.question_messages`
``deltamem_only``             write :meth:`Task.history_messages` into the δ-mem state, then
                              :meth:`Task.question_messages`
``full_context`` (± δ-mem)    :meth:`Task.context_messages` with :meth:`Task.fit_context` (the
                              history left-truncated to a token budget)
``bm25``                      :meth:`Task.context_messages` with :meth:`Task.render_context` of the
                              top-k segments (:mod:`pipeline.eval.retrieval`)
============================  ===================================================================

Scoring: :meth:`Task.score` gives the per-example metrics (floats) of a generated text under a named
**scoring protocol** (:data:`SCORINGS`): ``official`` — what the benchmark's own code does, its text
cleanup included — or ``delta-mem`` — what the δ-mem paper's evaluation code does where it differs
(docs/EVALUATION.md lists both per benchmark). Scores are a pure function of (example, generated
text, protocol), so stored predictions can be re-scored under another protocol without generating
again (:func:`rescore_rows`). :meth:`Task.row` / :meth:`Task.score_row` give a JSON-ready record
with the example's category, groups and protocol, and
:meth:`Task.aggregate` the benchmark numbers from such records: ``<metric>`` overall,
``<metric>/category/<category>`` and ``<metric>/<group>/<value>`` breakdowns, and the counts ``n``,
``n/category/<category>``. :attr:`Task.headline` names the key the benchmark reports.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.schema import Example, Segment
from pipeline.data.tokenize import RenderConfig, write_messages
from pipeline.params import DECODING_MODES, SCORINGS, DecodingMode, check_scoring  # noqa: F401  (defined once, there)

Message = dict[str, str]
# bump when a scoring rule changes: stored predictions are then re-scored (not regenerated)
SCORING_VERSION = 2


def scoring_id(scoring: str) -> str:
    """The protocol with the scoring code's version (``official/v2``): what a stored row was scored by."""
    return f"{check_scoring(scoring)}/v{SCORING_VERSION}"


@dataclass(frozen=True)
class Decoding:
    """Generation settings for one example.

    Attributes:
        max_new_tokens: the generation budget.
        do_sample: False = greedy.
        temperature / top_p / top_k: sampling parameters (used only when ``do_sample``).
        seed: the seed the runner must set before generating this example (sampling only).
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for Hugging Face ``generate`` (the seed is the runner's job)."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, for run manifests."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for no values (an empty category is "not measured", not 0)."""
    return sum(values) / len(values) if values else math.nan


ScoredRow = Mapping[str, Any]


class Task:
    """Base class of the benchmark tasks (subclasses override the prompt and metric hooks).

    Class attributes:
        name: registry name (= ``Example.task`` of the data it scores).
        headline: the :meth:`aggregate` key the benchmark reports.
        max_new_tokens: default generation budget.
        write_render: how :meth:`history_messages` renders segments (shared with training,
            :func:`pipeline.data.tokenize.write_messages`).
    """

    name: str = ""
    headline: str = ""
    max_new_tokens: int = 32
    write_render: RenderConfig = RenderConfig()

    # -- prompts -------------------------------------------------------------------------------------
    def question_messages(self, example: Example) -> list[Message]:
        """The question alone, without the history (``base_no_context``, ``deltamem_only``)."""
        raise NotImplementedError

    def context_messages(self, example: Example, context_text: str | None = None) -> list[Message]:
        """The benchmark's official prompt with the history inlined. ``context_text`` defaults to
        :meth:`render_context` of all segments; pass a truncated or retrieved one instead."""
        raise NotImplementedError

    def render_context(self, example: Example, segments: Sequence[Segment] | None = None) -> str:
        """The history (``segments``, default all of ``example.segments``) as the text the official
        prompt inlines. Generic form: the :meth:`history_messages` contents, one per line."""
        segs = example.segments if segments is None else segments
        render = dataclasses.replace(self.write_render, write_system=None)
        return "\n".join(m["content"] for m in write_messages(segs, render))

    def history_messages(self, example: Example) -> list[Message]:
        """The history as chat messages to WRITE into the δ-mem state (empty when there is none)."""
        if not example.segments:
            return []
        return write_messages(example.segments, self.write_render)

    def fit_context(
        self,
        example: Example,
        max_tokens: int,
        count_tokens: Callable[[str], int],
        segments: Sequence[Segment] | None = None,
    ) -> str:
        """:meth:`render_context` of the longest suffix of ``segments`` (default: all) whose rendering
        has at most ``max_tokens`` tokens by ``count_tokens`` — the history left-truncated at segment
        boundaries, newest kept ("" when not even the last segment fits).

        Binary search over the number of dropped leading segments (rendering grows with the suffix).
        """
        segs = list(example.segments if segments is None else segments)
        if max_tokens <= 0 or not segs:
            return ""
        full = self.render_context(example, segs)
        if count_tokens(full) <= max_tokens:
            return full
        lo, hi = 1, len(segs)  # answer: smallest drop count in [lo, hi] that fits (hi = drop all)
        while lo < hi:
            mid = (lo + hi) // 2
            if count_tokens(self.render_context(example, segs[mid:])) <= max_tokens:
                hi = mid
            else:
                lo = mid + 1
        return self.render_context(example, segs[lo:]) if lo < len(segs) else ""

    # -- decoding ------------------------------------------------------------------------------------
    def decoding(
        self, example: Example | None = None, mode: DecodingMode = "greedy", index: int | None = None
    ) -> Decoding:
        """Generation settings. ``mode="greedy"`` (default) or ``"paper"`` (the paper's settings; for
        most benchmarks greedy too). ``index`` = the question's position in the run (seeds sampling)."""
        if mode not in DECODING_MODES:
            raise ValueError(f"unknown decoding mode {mode!r}; known: {', '.join(DECODING_MODES)}")
        return Decoding(max_new_tokens=self.max_new_tokens)

    # -- scoring -------------------------------------------------------------------------------------
    def postprocess(self, example: Example, prediction: str) -> str:
        """The part of the generated text the metric reads (default: stripped)."""
        return prediction.strip()

    def score(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, float]:
        """Per-example metrics (floats in [0, 1] unless documented otherwise) under the protocol
        ``scoring``. ``data_dir``: the folder of the prepared split, for tasks whose official scorer
        reads a side file there (MemoryAgentBench's ``entity2id.json``)."""
        raise NotImplementedError

    def check_scoring_inputs(self, examples: Sequence[Example], scoring: str, data_dir: Path | None) -> None:
        """Raise ``ValueError`` (one line, naming the file or field) when ``examples`` cannot be scored
        under ``scoring`` — called before anything is generated."""
        check_scoring(scoring)

    def groups(self, example: Example) -> dict[str, str]:
        """Extra breakdowns besides the category (e.g. MemoryAgentBench's source)."""
        return {}

    def details(self, example: Example, prediction: str, scoring: str = "official") -> dict[str, Any]:
        """JSON-ready per-example extras the aggregate may use (e.g. IFEval's per-instruction verdicts)."""
        return {}

    def row(
        self,
        example: Example,
        scores: Mapping[str, float],
        details: Mapping[str, Any] | None = None,
        scoring: str | None = None,
    ) -> dict[str, Any]:
        """A JSON-ready scored record for :meth:`aggregate` (``scoring``: the protocol, when known)."""
        out = {
            "example_id": example.example_id,
            "task": self.name,
            "category": example.category,
            "groups": self.groups(example),
            "scores": dict(scores),
            "details": dict(details or {}),
        }
        if scoring is not None:
            out["scoring"] = scoring
        return out

    def score_row(
        self, example: Example, prediction: str, scoring: str = "official", data_dir: Path | None = None
    ) -> dict[str, Any]:
        """:meth:`score` and :meth:`details` under ``scoring``, packed by :meth:`row`."""
        check_scoring(scoring)
        return self.row(
            example,
            self.score(example, prediction, scoring, data_dir),
            self.details(example, prediction, scoring),
            scoring,
        )

    def _as_rows(self, rows: Iterable[ScoredRow | tuple[Example, Mapping[str, float]]]) -> list[ScoredRow]:
        out = []
        for r in rows:
            if isinstance(r, tuple):
                ex, scores = r
                out.append(self.row(ex, scores))
            else:
                out.append(r)
        return out

    def headline_rows(self, rows: Sequence[ScoredRow]) -> list[ScoredRow]:
        """The rows the overall numbers average over (default: all)."""
        return list(rows)

    def aggregate(self, rows: Iterable[ScoredRow | tuple[Example, Mapping[str, float]]]) -> dict[str, float]:
        """Benchmark numbers from scored rows (:meth:`row` records, or ``(example, scores)`` pairs)."""
        rows = self._as_rows(rows)
        return aggregate_means(self.headline_rows(rows), rows)


def aggregate_means(headline_rows: Sequence[ScoredRow], all_rows: Sequence[ScoredRow]) -> dict[str, float]:
    """Means of every score key: overall over ``headline_rows``; per category and per group over
    ``all_rows`` (so a category left out of the headline is still reported on its own)."""
    out: dict[str, float] = {"n": float(len(headline_rows))}
    keys = sorted({k for r in all_rows for k in r["scores"]})
    for key in keys:
        out[key] = mean([float(r["scores"][key]) for r in headline_rows if key in r["scores"]])
    by: dict[str, list[ScoredRow]] = defaultdict(list)
    for r in all_rows:
        if r.get("category") is not None:
            by[f"category/{r['category']}"].append(r)
        for kind, value in (r.get("groups") or {}).items():
            if value is not None:
                by[f"{kind}/{value}"].append(r)
    for label in sorted(by):
        members = by[label]
        out[f"n/{label}"] = float(len(members))
        for key in keys:
            values = [float(r["scores"][key]) for r in members if key in r["scores"]]
            if values:
                out[f"{key}/{label}"] = mean(values)
    return out


def question_index(example: Example) -> int:
    """``metadata["question_index"]`` (0 when absent or not a number): the question's position in its context."""
    try:
        return int(example.metadata.get("question_index", 0))
    except (TypeError, ValueError):
        return 0


# keys of a stored row that scoring writes (the rest — prediction, tokens, ids — is kept on re-scoring)
SCORED_KEYS = ("example_id", "task", "category", "groups", "scores", "details", "scoring")


def rescore_rows(
    task: Task,
    rows: Sequence[Mapping[str, Any]],
    examples: Mapping[str, Example],
    scoring: str,
    data_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Stored rows (each with ``example_id`` and the generated ``prediction``) scored again under
    ``scoring``: the scored keys are replaced, every other key is kept as it was."""
    out = []
    for r in rows:
        fresh = task.score_row(examples[r["example_id"]], str(r.get("prediction") or ""), scoring, data_dir)
        kept = {k: v for k, v in r.items() if k not in SCORED_KEYS}
        out.append({**fresh, **kept})
    return out

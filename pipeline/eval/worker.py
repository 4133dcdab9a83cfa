"""Phases 3–6 for one shard: requests → memory states → generation → scored rows and a cost record.

:meth:`EvalWorker.run_shard` is what an executor (:mod:`pipeline.eval.executors`) calls, in this process
or in a Ray actor. In order:

1. the condition builds the shard's requests (:meth:`Condition.build_requests
   <pipeline.eval.conditions.Condition.build_requests>`);
2. for a condition with a history state, each conversation's history (its own or its donor's) is written
   once into a batch-1 state (``reuse_state``; otherwise once per question, the naive baseline);
3. requests are generated in batches of equal decoding settings (:func:`~pipeline.eval.requests.decoding_batches`);
   full-context prompts of one conversation continue from one prefill of their shared prefix
   (``prefix_cache``; not for SSW writing online, see :meth:`Condition.prefills_shared_prefix
   <pipeline.eval.conditions.Condition.prefills_shared_prefix>`), and ``deltamem_full_context`` starts every
   question from an empty state written online (SSW: per prompt message, then per generated token);
4. every answer is scored by the task (:meth:`Task.score_row <pipeline.eval.tasks.base.Task.score_row>`),
   and the shard's cost figures (tokens, writes, peak memory, state and KV bytes) are measured.

What a worker reads needs no shared filesystem (:meth:`EvalWorker.run_payload`): the executor ships the
shard's data (the split's lines of its questions and donors, their contexts, the dataset folder's other
files) and the adapter's files as :data:`Files` (file name → bytes: safetensors and JSON, never a pickle)
and the worker writes them into a private temporary folder for the shard's duration; the backbone is a
hub id or a folder path, or its files (:meth:`EvalWorker.__init__`), written into a temporary folder
that is removed as soon as the model is loaded.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.eval.backend import MemoryBackend
from pipeline.eval.conditions import Condition, get_condition
from pipeline.eval.errors import EvalInputError
from pipeline.eval.meters import PeakMemory
from pipeline.eval.plan import PredictionSettings, ShardSpec, group_conversations
from pipeline.eval.requests import Request, ShardRequests, common_prefix, decoding_batches

Result = tuple[str, int]  # (generated text, new tokens)
Files = dict[str, bytes]  # a shipped folder: relative POSIX file name → content


def materialize(files: Mapping[str, bytes], folder: Path) -> Path:
    """Write shipped ``files`` under ``folder`` (created); a name that would leave it is an input error."""
    for name, data in files.items():
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
            raise EvalInputError(f"shipped file {name!r}: expected a relative name inside its folder")
        dest = folder.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class EvalWorker(MemoryBackend):
    """Loads the backbone once and computes shards (:meth:`run_payload`, :meth:`run_shard`) for any
    variant and condition.

    Used in-process (``workers: 0``) and as the Ray actor class (:mod:`pipeline.eval.executors`).
    ``backbone``: a hub id / ``embedded``, a folder path, or the folder's :data:`Files` (materialised in
    a temporary folder that is removed once the model and tokenizer are loaded).
    """

    def __init__(
        self,
        backbone: str | Mapping[str, bytes],
        dtype: str = "float32",
        device: str = "auto",
        threads: int | None = None,
        attn_implementation: str = "auto",
    ):
        if isinstance(backbone, Mapping):
            with tempfile.TemporaryDirectory(prefix="deltamem-backbone-") as tmp:
                super().__init__(str(materialize(backbone, Path(tmp))), dtype, device, threads, attn_implementation)
        else:
            super().__init__(backbone, dtype, device, threads, attn_implementation)

    def run_payload(
        self,
        spec: Mapping[str, Any],
        attempt: int,
        data: Mapping[str, bytes],
        adapter: Mapping[str, bytes] | None = None,
        extras: Mapping[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """Compute a shipped shard: ``spec`` (:meth:`ShardSpec.to_dict`) with ``data_path`` relative to
        ``data`` (the shard's data files; ``extras``: more files of its dataset folder, shared by the
        split's shards) and ``adapter`` naming the adapter whose files are ``adapter``.

        The files live in a private temporary folder while the shard runs (the scorer may read the
        dataset folder's files); the adapter is materialised only when it is not the loaded one."""
        shard = ShardSpec.from_dict(spec)
        with tempfile.TemporaryDirectory(prefix="deltamem-shard-") as tmp:
            root = Path(tmp)
            materialize(data, root / "data")
            if extras:
                materialize(extras, root / "data")
            if adapter is not None and (shard.adapter, shard.adapter_digest) != self.adapter:
                self.use_adapter(shard.adapter, shard.adapter_digest, source=materialize(adapter, root / "adapter"))
            local = dataclasses.replace(shard, data_path=str(root / "data" / shard.data_path))
            try:
                return self.run_shard(local, attempt)
            finally:
                self.forget_split(local.data_path)

    def run_shard(self, spec: ShardSpec | Mapping[str, Any], attempt: int = 0) -> dict[str, Any]:
        """Compute one shard: ``{"key", "config_hash", "rows": [...], "cost": {...}}``."""
        if isinstance(spec, Mapping):
            spec = ShardSpec.from_dict(spec)
        if attempt < spec.fail_attempts:
            raise RuntimeError(f"injected failure of {spec.key} (attempt {attempt + 1})")
        self.use_adapter(spec.adapter, spec.adapter_digest)
        self.counter.reset()
        writes_before = self.history_writes
        t0 = time.perf_counter()
        with PeakMemory(self.device) as peak:
            rows, cost = self._compute(spec)
        cost["wall_s"] = time.perf_counter() - t0
        cost["peak_memory_bytes"] = peak.peak
        cost["peak_memory_scope"] = peak.scope
        cost["forward_positions"] = self.counter.positions
        cost["forward_tokens"] = self.counter.tokens
        cost["forward_calls"] = self.counter.calls
        cost["history_writes"] = self.history_writes - writes_before
        return {"key": spec.key, "config_hash": spec.config_hash, "rows": rows, "cost": cost}

    def _compute(self, spec: ShardSpec) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from pipeline.eval.tasks import get_task

        s = spec.settings
        task = get_task(spec.task)
        cond = get_condition(spec.condition)
        by_id, by_conv = self.split(spec.data_path)
        groups = group_conversations(by_id[i] for i in spec.example_ids)
        window = s.context_window or self.max_positions
        shard = cond.build_requests(task, groups, s, self, window, spec.donors)
        run = _Generation(self, cond, s, shard.requests, lambda src: self._history(task, by_conv[src]))
        if cond.writes_history and s.reuse_state:
            run.write_states(shard.conversations)
        if s.prefix_cache and cond.prefills_shared_prefix(self.write_mode):
            run.with_prefixes(shard.conversations)
        else:
            run.plain(list(range(len(shard.requests))))
        rows = [self._row(task, cond, spec, req, run.results[i]) for i, req in enumerate(shard.requests)]
        return rows, self._cost(cond, shard, rows, run)

    def _history(self, task: Any, example: Any) -> tuple[list[int], list[int]]:
        hist = task.history_messages(example)
        return self.history_ids(hist) if hist else ([], [])

    @staticmethod
    def _row(task: Any, cond: Condition, spec: ShardSpec, req: Request, result: Result) -> dict[str, Any]:
        e = req.example
        text, new_tokens = result
        row = task.score_row(e, text, spec.scoring, Path(spec.data_path).parent)
        row.update(
            conversation_id=req.conversation,
            question=e.question,
            prediction=text,
            gold=list(e.answers),
            prompt_tokens=len(req.prompt_ids),
            new_tokens=new_tokens,
        )
        if cond.needs_donors:
            row["memory_from"] = req.memory_from
        return row

    def _cost(
        self, cond: Condition, shard: ShardRequests, rows: list[dict[str, Any]], run: _Generation
    ) -> dict[str, Any]:
        reqs = shard.requests
        state_bytes = 0
        if getattr(self.model, "delta_mem", None) is not None:
            state_bytes = self.model.new_memory(1).nbytes
        return {
            "questions": len(reqs),
            "conversations": len(shard.conversations),
            "prompt_tokens": sum(len(r.prompt_ids) for r in reqs),
            "generated_tokens": sum(r["new_tokens"] for r in rows),
            "write_tokens": run.write_tokens,
            "history_tokens": shard.history_tokens,
            "prefix_tokens_reused": run.prefix_tokens_reused,
            "truncated_contexts": shard.truncated_contexts,
            "state_bytes": state_bytes if cond.uses_adapter else 0,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_prompt_tokens": max((len(r.prompt_ids) for r in reqs), default=0),
        }


class _Generation:
    """The generation of one shard's requests: states, batches, shared prefixes; ``results[i]`` is
    request ``i``'s answer."""

    def __init__(
        self,
        backend: MemoryBackend,
        cond: Condition,
        settings: PredictionSettings,
        requests: list[Request],
        encoded: Any,
    ) -> None:
        self.backend, self.cond, self.s, self.requests = backend, cond, settings, requests
        self.encoded = encoded  # conversation key → its history's (ids, message index per token)
        self.states: dict[str, Any] = {}
        self.results: dict[int, Result] = {}
        self.write_tokens = 0
        self.prefix_tokens_reused = 0

    def write_states(self, conversations: list[str]) -> None:
        """One state per conversation, from its requests' memory source (written once)."""
        source = {r.conversation: r.memory_from for r in self.requests}
        keys = [k for k in conversations if k in source]
        hists = [self.encoded(source[k]) for k in keys]
        self.write_tokens += sum(len(h[0]) for h in hists)
        self.states = dict(zip(keys, self.backend.write_histories(hists, self.s), strict=True))

    def _batches(self, indices: list[int]) -> Any:
        return decoding_batches(self.requests, indices, self.s.batch_size)

    def plain(self, indices: list[int]) -> None:
        """Generate ``indices`` without a shared prefix."""
        from deltamem import MemoryState

        reqs, online = self.requests, self.cond.writes_online
        for batch in self._batches(indices):
            state = None
            if self.cond.writes_history:
                if self.s.reuse_state:
                    state = MemoryState.stack([self.states[reqs[i].conversation] for i in batch])
                else:  # the naive baseline: write the history again for every question
                    hists = [self.encoded(reqs[i].memory_from) for i in batch]
                    self.write_tokens += sum(len(h[0]) for h in hists)
                    state = MemoryState.stack(self.backend.write_histories(hists, self.s))
            elif online:
                state = self.backend.model.new_memory(len(batch))
            seg = [reqs[i].segment_ids for i in batch] if online else None
            out = self.backend.generate(
                [reqs[i].prompt_ids for i in batch], reqs[batch[0]].decoding, state, online, segment_ids=seg
            )
            self.results.update(zip(batch, out, strict=True))

    def _from_prefix(self, batch: list[int], prefix: tuple[list[int], Any, Any]) -> None:
        reqs = self.requests
        out = self.backend.generate(
            [reqs[i].prompt_ids for i in batch], reqs[batch[0]].decoding, prefix=prefix, write=self.cond.writes_online
        )
        self.results.update(zip(batch, out, strict=True))

    def with_prefixes(self, conversations: list[str]) -> None:
        """Per conversation: prefill the prefix its prompts share once and continue every batch from it;
        sampled requests (one per call, own seed) share one prefill; batches without a prefix worth
        caching (one question, or shorter than ``prefix_min_tokens``) are generated plainly at the end."""
        reqs, online, min_tokens = self.requests, self.cond.writes_online, self.s.prefix_min_tokens
        leftovers: list[int] = []
        for key in conversations:
            members = [i for i, r in enumerate(reqs) if r.conversation == key]
            sampled = [i for i in members if reqs[i].decoding.do_sample]
            if sampled:
                prompts = [reqs[i].prompt_ids for i in sampled]
                plen = common_prefix(prompts)
                if len(sampled) < 2 or plen < min_tokens:
                    leftovers.extend(sampled)
                else:
                    prefix = self.backend.prefill_prefix(prompts[0][:plen], online)
                    for batch in self._batches(sampled):
                        self._from_prefix(batch, prefix)
                    self.prefix_tokens_reused += plen * (len(sampled) - 1)
                members = [i for i in members if not reqs[i].decoding.do_sample]
            for batch in self._batches(members):
                prompts = [reqs[i].prompt_ids for i in batch]
                plen = common_prefix(prompts)
                if len(batch) < 2 or plen < min_tokens:
                    leftovers.extend(batch)
                    continue
                self._from_prefix(batch, self.backend.prefill_prefix(prompts[0][:plen], online))
                self.prefix_tokens_reused += plen * (len(batch) - 1)
        self.plain(leftovers)

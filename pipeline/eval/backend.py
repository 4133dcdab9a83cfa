"""Phase 4 of ``evaluate``: the memory-aware model backend — one loaded backbone, any adapter.

:class:`MemoryBackend` loads the backbone once and offers what the requests need: encoding (prompts as the
training READ segment, histories as the WRITE segment), :meth:`~MemoryBackend.write_histories` (histories →
batch-1 :class:`~deltamem.MemoryState` objects), :meth:`~MemoryBackend.generate` (left-padded batches,
optionally reading / writing a state, optionally continuing a prefilled prefix) and
:meth:`~MemoryBackend.prefill_prefix`. Adapters are swapped in per shard (:meth:`~MemoryBackend.use_adapter`).
The shard-level loop over requests is :class:`pipeline.eval.worker.EvalWorker`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.common import pad_token_id, torch_dtype
from pipeline.eval.errors import EvalInputError, describe_error
from pipeline.eval.meters import TokenCounter
from pipeline.eval.plan import PredictionSettings, conversation_key


class MemoryBackend:
    """A loaded backbone (with or without a δ-mem adapter) that writes histories and generates."""

    def __init__(
        self,
        backbone: str,
        dtype: str = "float32",
        device: str = "auto",
        threads: int | None = None,
        attn_implementation: str = "auto",
    ):
        import torch

        from deltamem.backbones import find_attention_layers, load_backbone
        from pipeline.data.tokenize import ChatFormat

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.tokenizer = load_backbone(
            backbone, dtype=torch_dtype(dtype), attn_implementation=attn_implementation, what="evaluate.backbone"
        )
        self.model.to(self.device).eval()
        self.fmt = ChatFormat(self.tokenizer)
        self.pad_id = pad_token_id(self.tokenizer)
        decoder, _ = find_attention_layers(self.model)
        self.counter = TokenCounter()
        decoder.register_forward_pre_hook(self.counter.hook, with_kwargs=True)
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        elem = torch.empty((), dtype=self.model.dtype).element_size()
        self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.adapter: tuple[str | None, str | None] = (None, None)
        self._splits: dict[tuple[str, int, int], tuple[dict[str, Any], dict[str, Any]]] = {}
        self.write_mode: str | None = None
        self.history_writes = 0  # conversations' histories written (all shards)

    # -- setup -------------------------------------------------------------------------------------
    def use_adapter(self, adapter: str | None, digest: str | None = None, source: str | Path | None = None) -> None:
        """Switch to ``adapter`` (None = the bare backbone); ``digest`` tells a changed folder apart.

        ``adapter`` names the adapter (in messages and for the cache); it is loaded from ``source`` when
        given (a shipped copy materialised by the worker), else from the folder ``adapter``."""
        from deltamem import detach_delta_mem, load_adapter

        if (adapter, digest) == self.adapter:
            return
        detach_delta_mem(self.model)
        self.write_mode = None
        self.adapter = (None, None)
        if adapter is not None:
            import torch

            try:
                self.model = load_adapter(self.model, adapter if source is None else source)
            except (OSError, ValueError, KeyError, TypeError) as err:  # an input problem: never retried
                why = describe_error(err)
                if source is not None:  # name the adapter, not the worker's temporary copy
                    why = why.replace(str(source), str(adapter))
                raise EvalInputError(f"adapter {adapter}: {why}") from None
            bad = [n for n, t in self.model.delta_mem.named_parameters() if not bool(torch.isfinite(t).all())]
            if bad:
                detach_delta_mem(self.model)
                raise EvalInputError(f"adapter {adapter}: non-finite values (NaN/Inf) in {bad[:3]}")
            self.write_mode = self.model.delta_mem.config.write_mode
        self.adapter = (adapter, digest)

    def split(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(example id → example, conversation key → first example) of a split file (cached while the
        file is unchanged)."""
        st = Path(path).stat()
        key = (path, st.st_mtime_ns, st.st_size)
        if key not in self._splits:
            from pipeline.data.schema import read_split

            examples = read_split(path)
            by_conv: dict[str, Any] = {}
            for e in examples:
                by_conv.setdefault(conversation_key(e), e)
            self._splits = {k: v for k, v in self._splits.items() if k[0] != path}  # drop a stale version
            self._splits[key] = ({e.example_id: e for e in examples}, by_conv)
        return self._splits[key]

    def forget_split(self, path: str) -> None:
        """Drop the cached split of ``path`` (a shard's private copy, deleted after the shard)."""
        self._splits = {k: v for k, v in self._splits.items() if k[0] != path}

    # -- tokens ------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.fmt.encode(text))

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The generation prompt exactly as the training READ segment is encoded."""
        return self.fmt.encode(self.fmt.render(list(messages), add_generation_prompt=True))

    def prompt_segment_ids(self, messages: Sequence[Mapping[str, str]], ids: Sequence[int]) -> list[int]:
        """Per token of ``ids`` (:meth:`prompt_ids` of ``messages``), its message for SSW writes (−1: not
        written; :meth:`deltamem.chat.ChatFormat.prompt_segment_ids`)."""
        return self.fmt.prompt_segment_ids(messages, ids)

    def history_ids(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, message index per token) of a history, exactly as the training WRITE segment is encoded
        (for templated tokenizers this equals :func:`deltamem.encode_messages`)."""
        ids: list[int] = []
        seg: list[int] = []
        for i, piece in enumerate(self.fmt.message_pieces(list(messages))):
            piece_ids = self.fmt.encode(piece)
            ids += piece_ids
            seg += [i] * len(piece_ids)
        return ids, seg

    # -- memory ------------------------------------------------------------------------------------
    def write_histories(
        self, histories: Sequence[tuple[list[int], list[int]]], settings: PredictionSettings
    ) -> list[Any]:
        """One batch-1 :class:`~deltamem.MemoryState` per history; ``write_batch_size`` histories per
        ``write_memory`` call (right-padded, padding never writes); a history longer than
        ``write_length`` is written in consecutive chunks (message boundaries where possible)."""
        import torch

        from deltamem import MemoryState
        from pipeline.data.tokenize import split_chunks

        model = self.model
        ssw = self.write_mode == "SSW"
        states = []
        for start in range(0, len(histories), settings.write_batch_size):
            batch = histories[start : start + settings.write_batch_size]
            chunks = [split_chunks(ids, seg, settings.write_length) if ids else [] for ids, seg in batch]
            current = [model.new_memory(1) for _ in batch]
            for j in range(max((len(c) for c in chunks), default=0)):
                rows = [i for i, c in enumerate(chunks) if len(c) > j]
                width = max(len(chunks[i][j].input_ids) for i in rows)
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                seg = torch.full((len(rows), width), -1, dtype=torch.long)
                for r, i in enumerate(rows):
                    c = chunks[i][j]
                    n = len(c.input_ids)
                    ids[r, :n] = torch.tensor(c.input_ids)
                    mask[r, :n] = 1
                    seg[r, :n] = torch.tensor(c.segment_ids)
                state = MemoryState.stack([current[i] for i in rows])
                with torch.no_grad():
                    model.write_memory(
                        ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        segment_ids=seg.to(self.device) if ssw else None,
                        state=state,
                    )
                for r, i in enumerate(rows):
                    current[i] = state.select(r)
            self.history_writes += sum(1 for c in chunks if c)
            states.extend(current)
        return states

    # -- generation --------------------------------------------------------------------------------
    def _generate_kwargs(self, decoding: Any) -> dict[str, Any]:
        kwargs = decoding.generate_kwargs()
        kwargs["pad_token_id"] = self.pad_id
        if not decoding.do_sample:  # silence "generation flags are not valid" warnings of sampling configs
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _decode(self, out: Any, width: int) -> list[tuple[str, int]]:
        results = []
        eos = self.tokenizer.eos_token_id
        for row in out[:, width:].tolist():
            n = 0
            for tok in row:
                n += 1
                if tok == eos or tok == self.pad_id:
                    break
            results.append((self.tokenizer.decode(row[:n], skip_special_tokens=True), n))
        return results

    def generate(
        self,
        prompts: Sequence[list[int]],
        decoding: Any,
        state: Any = None,
        write: bool = False,
        prefix: tuple[list[int], Any, Any] | None = None,
        segment_ids: Sequence[list[int] | None] | None = None,
    ) -> list[tuple[str, int]]:
        """Generate for left-padded ``prompts``; ``state`` = batch state (read-only unless ``write``).

        ``prefix`` = (prefix ids, KV cache of the prefix, δ-mem state after it or None): every prompt
        starts with the prefix ids; the cache is copied, expanded to the batch and continued.
        ``segment_ids`` (one list per prompt, without a prefix): an SSW adapter writing online writes each
        prompt one segment at a time (padding: −1) and then every generated token on its own (the decode
        steps carry no ids), as the reference implementation does.
        """
        import torch

        kwargs = self._generate_kwargs(decoding)
        plen = len(prefix[0]) if prefix else 0
        suffixes = [p[plen:] for p in prompts]
        width = max(len(s) for s in suffixes)
        n = len(prompts)
        ids = torch.full((n, plen + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, plen + width), dtype=torch.long)
        for r, s in enumerate(suffixes):
            if plen:
                ids[r, :plen] = torch.tensor(prefix[0])
                mask[r, :plen] = 1
            ids[r, plen + width - len(s) :] = torch.tensor(s)
            mask[r, plen + width - len(s) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if prefix is not None:
            from deltamem.attach import cache_kwarg

            cache = copy.deepcopy(prefix[1])
            if n > 1:
                cache.batch_repeat_interleave(n)
            kwargs[cache_kwarg(self.model)] = cache
            if prefix[2] is not None:
                state = prefix[2].expand(n).clone() if n > 1 else prefix[2].clone()
        if state is not None:
            kwargs.update(memory=state, memory_write=write)
            if write and self.write_mode == "SSW" and segment_ids is not None and prefix is None:
                if any(s is None for s in segment_ids):
                    raise EvalInputError(
                        "SSW writing online: the chat template renders the prompt differently from its messages "
                        "one by one, so it cannot be written message by message (chat settings: template='plain')"
                    )
                seg = torch.full((n, width), -1, dtype=torch.long)
                for r, s in enumerate(segment_ids):
                    seg[r, width - len(s) :] = torch.tensor(s)
                kwargs["segment_ids"] = seg.to(self.device)
        if decoding.do_sample and decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, **kwargs)
        return self._decode(out, plen + width)

    def prefill_prefix(self, prefix: list[int], online: bool) -> tuple[list[int], Any, Any]:
        """Run the decoder over a shared prefix once: (ids, KV cache, state after it or None)."""
        import torch
        from transformers import DynamicCache

        from deltamem.attach import cache_kwarg
        from deltamem.backbones import find_attention_layers

        decoder, _ = find_attention_layers(self.model)
        cache = DynamicCache(config=self.model.config)
        x = torch.tensor([prefix], device=self.device)
        kwargs = {"input_ids": x, "attention_mask": torch.ones_like(x), "use_cache": True, cache_kwarg(decoder): cache}
        state = None
        with torch.no_grad():
            if online:
                state = self.model.new_memory(1)
                with self.model.delta_mem.use(state, write=True):
                    decoder(**kwargs)
            else:
                decoder(**kwargs)
        return prefix, cache, state

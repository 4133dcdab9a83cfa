"""`MemorySession`: online use of δ-mem — tell it a conversation, ask it questions from the state.

    session = MemorySession(model, tokenizer)          # speaks the adapter's training format
    session.add_message("user", "I moved to Porto in May.", speaker="Ana", timestamp="3 May 2024")
    session.ask("Where does Ana live now?")
    session.save("sessions/alice"); MemorySession.load("sessions/alice", model, tokenizer)

Everything is rendered by :class:`deltamem.chat.ChatFormat` under the :class:`~deltamem.chat.ChatSettings`
stored in the adapter (``load_adapter`` keeps its metadata on ``model.delta_mem.adapter_meta``), i.e. the
system prompts, ``"<speaker>: <text>"`` turns and session headers training used. Two protocols:

* ``protocol="training"`` (default): the training/evaluation protocol. Told messages wait until the next
  question (or :meth:`flush` / :meth:`save`); then they are written in one forward pass as the training
  WRITE segment — the write system prompt opens the memory (first write only), then one message per turn,
  in chunks of at most ``write_length`` tokens cut at message boundaries, each from position 0. A question
  is the training READ prompt (read system prompt + the question) answered read-only from the state; no
  KV cache is kept: the memory is the r×r state per layer, whatever the length of the conversation.
  ``recent_turns`` > 0 also puts the last turns in the prompt as text.
* ``protocol="reference"``: the chat runtime of the reference implementation (``declare-lab/delta-Mem``,
  ``deltamem/runtime/session.py``): the whole conversation is one token stream rendered by the chat
  template with a KV cache; each new suffix (a told message, a question with its generation prompt) is
  ingested with writes on, and the answer is decoded token by token with writes on (reading and writing
  the state at every step); the stored answer turn is then ingested too. If re-rendering the
  conversation changes already-ingested tokens, state and cache are rebuilt from scratch. With SSW,
  system messages and the generation prompt are not written (segment id −1), every other message is one
  segment and each decoded token is a write of the answer's segment; with TSW every token is written,
  as upstream does. Only greedy decoding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Literal

import torch

from .chat import ChatFormat, ChatSettings, history_messages, question_messages, split_chunks
from .state import MemoryState

SESSION_FILE, STATE_FILE, CACHE_FILE = "session.json", "state.safetensors", "cache.safetensors"
OUR_FILES = (SESSION_FILE, STATE_FILE, CACHE_FILE)
ROLES = ("system", "user", "assistant")
Protocol = Literal["training", "reference"]


def format_message(tokenizer: Any, role: str, text: str, settings: ChatSettings | None = None) -> str:
    """The text of one message in its context-free form (as a WRITE history renders it)."""
    fmt = ChatFormat(tokenizer, settings)
    return fmt.message_pieces([{"role": "system", "content": "-"}, {"role": role, "content": text}])[1]


def encode_messages(
    tokenizer: Any, messages: list[dict[str, str]], settings: ChatSettings | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a message list as a WRITE history and, per token, the index of its message (SSW)."""
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must have 'role' and 'content', got keys {sorted(m)}")
    return ChatFormat(tokenizer, settings).encode_messages(messages)


class MemorySession:
    """A conversation held in a δ-mem state (see the module docstring for the two protocols).

    Args:
        model: a model with δ-mem attached (``attach_delta_mem`` / ``load_adapter``).
        tokenizer: its tokenizer.
        system_prompt: overrides the settings' ``read_system`` (the question's system prompt).
        recent_turns: also put the last N turns in the question prompt as text (training protocol).
        max_new_tokens: answer length limit.
        state: a state to continue (default: a fresh one).
        settings: the chat format (default: the adapter's, else the library defaults).
        protocol: ``"training"`` or ``"reference"``.
        write_length: maximum tokens per write (training protocol).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system_prompt: str | None = None,
        recent_turns: int = 0,
        max_new_tokens: int = 64,
        state: MemoryState | None = None,
        *,
        settings: ChatSettings | None = None,
        protocol: Protocol = "training",
        write_length: int = 8192,
    ) -> None:
        if getattr(model, "delta_mem", None) is None:
            raise ValueError("MemorySession needs a model with δ-mem attached (attach_delta_mem / load_adapter)")
        if protocol not in ("training", "reference"):
            raise ValueError(f"protocol must be 'training' or 'reference', got {protocol!r}")
        if write_length < 1:
            raise ValueError("write_length must be positive")
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or ChatSettings.from_adapter(getattr(model.delta_mem, "adapter_meta", None))
        if system_prompt is not None:
            self.settings = ChatSettings(**{**self.settings.to_dict(), "read_system": system_prompt})
        self.system_prompt = self.settings.read_system
        self.recent_turns, self.max_new_tokens = recent_turns, max_new_tokens
        self.protocol: Protocol = protocol
        self.write_length = write_length
        self.fmt = ChatFormat(tokenizer, self.settings)
        self.device = next(model.parameters()).device
        self.state = state if state is not None else model.new_memory(1)
        self.history: list[dict[str, Any]] = []  # told turns: role, content, speaker, timestamp, session
        self.written = 0  # training protocol: turns already written into the state
        self.opened = False  # training protocol: the write system prompt has been written
        self.stream: list[int] = []  # reference protocol: ingested token ids
        self.cache: Any = None  # reference protocol: the KV cache of ``stream``

    @property
    def ssw(self) -> bool:
        return self.model.delta_mem.config.write_mode == "SSW"

    # -- telling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_message(
        self,
        role: str,
        text: str,
        *,
        speaker: str | None = None,
        timestamp: str | None = None,
        session: str | None = None,
    ) -> None:
        """Tell the session one turn (rendered ``speaker_format`` / session header as in training)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not isinstance(text, str):
            raise ValueError(f"message text must be a string, got {type(text).__name__}")
        turn = {"role": role, "content": text, "speaker": speaker, "timestamp": timestamp, "session": session}
        self.history.append({k: v for k, v in turn.items() if v is not None})
        if self.protocol == "reference":
            self._ingest(self._conversation(), add_generation_prompt=False)

    def _messages(self) -> list[dict[str, str]]:
        return history_messages(self.history, self.settings, system=False)

    @torch.no_grad()
    def flush(self) -> None:
        """Training protocol: write the turns told since the last write (no-op when none)."""
        if self.protocol != "training" or self.written == len(self.history):
            return
        pending = self._messages()[self.written :]
        anchor = {"role": "system", "content": self.settings.write_system or "-"}
        if self.settings.write_system is not None and not self.opened:
            messages, drop = [anchor, *pending], 0  # the write system prompt opens the memory
        elif not self.opened:
            messages, drop = pending, 0
        else:
            messages, drop = [anchor, *pending], 1  # later writes: the turns in their context-free form
        ids, seg = self.fmt.encode_messages(messages)
        keep = [i for i, s in enumerate(seg) if s >= drop]
        ids, seg = [ids[i] for i in keep], [seg[i] - drop for i in keep]
        for chunk in split_chunks(ids, seg, self.write_length):
            x = torch.tensor([chunk.input_ids], device=self.device)
            s = torch.tensor([chunk.segment_ids], device=self.device) if self.ssw else None
            self.model.write_memory(x, segment_ids=s, state=self.state)
        self.written, self.opened = len(self.history), True

    # -- asking ----------------------------------------------------------------------------------------
    def prompt_ids(self, question: str, choices: list[str] | None = None) -> torch.Tensor:
        """The READ prompt of ``question`` (training protocol), as a [1, T] tensor."""
        recent = self._messages()[-self.recent_turns :] if self.recent_turns else []
        ids = self.fmt.prompt_ids(question_messages(question, self.settings, choices=choices, recent=recent))
        return torch.tensor([ids], device=self.device)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @torch.no_grad()
    def ask(self, question: str, write_turn: bool = False, **generate_kwargs: Any) -> str:
        """Answer ``question`` (greedy by default). Training protocol: read-only from the state, then
        ``write_turn`` tells Q and A as two turns. Reference protocol: always part of the conversation."""
        if self.protocol == "reference":
            max_new = generate_kwargs.pop("max_new_tokens", self.max_new_tokens)
            if generate_kwargs.pop("do_sample", False) or generate_kwargs:
                raise ValueError(
                    f"protocol='reference' decodes greedily; unsupported options {sorted(generate_kwargs)}"
                )
            return self._ask_reference(question, max_new)
        self.flush()
        x = self.prompt_ids(question, generate_kwargs.pop("choices", None))
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **generate_kwargs}
        if not kwargs["do_sample"]:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(
            x, attention_mask=torch.ones_like(x), memory=self.state, pad_token_id=self._pad_id(), **kwargs
        )
        answer = self.tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True).strip()
        if write_turn:
            self.add_message("user", question)
            self.add_message("assistant", answer)
        return answer

    # -- the reference protocol ------------------------------------------------------------------------
    def _conversation(self) -> list[dict[str, str]]:
        return self._messages()

    def _segment_ids(self, messages: list[dict[str, str]], ids: list[int]) -> list[int]:
        """Per token of ``ids`` (the rendering of ``messages``, perhaps + generation prompt): the index of
        its message among the non-system ones; −1 for system messages and template text after the last."""
        seg: list[int] = []
        next_id = 0
        for k in range(1, len(messages) + 1):
            n = len(self.fmt.encode(self.fmt.render(messages[:k])))
            del seg[n:]  # a template that re-renders earlier text: the later message owns it
            role = messages[k - 1]["role"]
            seg += [-1 if role == "system" else next_id] * (n - len(seg))
            next_id += role != "system"
        return (seg + [-1] * len(ids))[: len(ids)]

    def _forward(self, ids: list[int], seg: list[int] | None) -> torch.Tensor:
        from .attach import cache_kwarg

        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
        x = torch.tensor([ids], device=self.device)
        kwargs = {cache_kwarg(self.model.delta_mem.decoder): self.cache}
        segment_ids = torch.tensor([seg], device=self.device) if (self.ssw and seg is not None) else None
        # SSW: a chunk with no message to write (only system text / template tokens, ids all −1) is read, not
        # written — the layer would otherwise fall back to per-token writes, as it does when ids are absent
        write = not (segment_ids is not None and bool((segment_ids < 0).all()))
        out = self.model(
            input_ids=x,
            use_cache=True,
            memory=self.state,
            memory_write=write,
            segment_ids=segment_ids if write else None,
            **kwargs,
        )
        return out.logits[:, -1, :]

    def _ingest(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> torch.Tensor | None:
        """Feed the part of the rendered conversation not yet in the stream (rebuild when it diverged)."""
        full = self.fmt.encode(self.fmt.render(messages, add_generation_prompt=add_generation_prompt))
        prefix = 0
        while prefix < min(len(full), len(self.stream)) and full[prefix] == self.stream[prefix]:
            prefix += 1
        if prefix < len(self.stream):  # history re-rendered differently: start again from scratch
            self.state = self.model.new_memory(1)
            self.cache, self.stream, prefix = None, [], 0
        if prefix == len(full):
            return None
        seg = self._segment_ids(messages, full) if self.ssw else None
        logits = self._forward(full[prefix:], None if seg is None else seg[prefix:])
        self.stream = list(full)
        return logits

    def _ask_reference(self, question: str, max_new_tokens: int) -> str:
        with torch.no_grad():
            self.history.append({"role": "user", "content": question})
            messages = self._conversation()
            logits = self._ingest(messages, add_generation_prompt=True)
            if logits is None:
                raise RuntimeError("the question added no tokens to the conversation; cannot start generation")
            answer_id = sum(1 for m in messages if m["role"] != "system")
            eos = self.tokenizer.eos_token_id
            generated: list[int] = []
            token = int(logits.argmax(-1))
            for _ in range(max_new_tokens):
                if eos is not None and token == eos:
                    break
                generated.append(token)
                logits = self._forward([token], [answer_id])
                token = int(logits.argmax(-1))
            self.stream += generated
            answer = self.tokenizer.decode(generated, skip_special_tokens=True)
            self.history.append({"role": "assistant", "content": answer})
            self._ingest(self._conversation(), add_generation_prompt=False)
        return answer.strip()

    # -- saving --------------------------------------------------------------------------------------
    def _write_files(self, folder: Path) -> None:
        self.state.save(folder / STATE_FILE)
        if self.cache is not None:
            from safetensors.torch import save_file

            tensors = {}
            for i, layer in enumerate(self.cache.layers):
                tensors[f"layers.{i}.keys"] = layer.keys.detach().cpu().contiguous()
                tensors[f"layers.{i}.values"] = layer.values.detach().cpu().contiguous()
            save_file(tensors, str(folder / CACHE_FILE))
        meta = {
            "format": "deltamem-session",
            "protocol": self.protocol,
            "settings": self.settings.to_dict(),
            "recent_turns": self.recent_turns,
            "max_new_tokens": self.max_new_tokens,
            "write_length": self.write_length,
            "history": self.history,
            "written": self.written,
            "opened": self.opened,
            "stream": self.stream,
            "config": self.model.delta_mem.config.to_dict(),
        }
        (folder / SESSION_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    def save(self, path: str | os.PathLike) -> Path:
        """Save state + history into ``path``: a new temporary sibling renamed into place. ``path`` may be
        absent, an empty directory or a saved session; anything else is refused and nothing is deleted."""
        self.flush()
        path = Path(path).absolute()
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a directory; not saving a session over it")
        entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if entries and SESSION_FILE not in entries:
            raise FileExistsError(
                f"{path}: a non-empty directory that is not a saved MemorySession (no {SESSION_FILE}); "
                "choose a new or empty directory"
            )
        foreign = [e for e in entries if e not in OUR_FILES]
        if foreign:
            raise FileExistsError(
                f"{path}: a saved session that also holds other files {foreign[:5]}; not replacing it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        cwd = Path.cwd().absolute()
        if path.is_dir() and (not entries or path == cwd or path in cwd.parents):
            # an empty directory, or the working one: files renamed in one by one (never the folder itself)
            with tempfile.TemporaryDirectory(dir=path, prefix=".tmp-session-") as tmp:
                self._write_files(Path(tmp))  # a failure here leaves the previous files untouched
                written = {p.name for p in Path(tmp).iterdir()}
                for name in sorted(written, key=lambda n: n == SESSION_FILE):  # session.json last
                    os.replace(Path(tmp) / name, path / name)
            for name in set(OUR_FILES) - written:  # e.g. a KV cache the new session no longer has
                (path / name).unlink(missing_ok=True)
            return path
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            self._write_files(tmp)
            if path.exists():  # a previous session: swap, then remove only the files we wrote there
                old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(path, old)
                os.replace(tmp, path)
                for name in OUR_FILES:
                    (old / name).unlink(missing_ok=True)
                old.rmdir()
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)  # our own temporary directory only
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, tokenizer: Any) -> MemorySession:
        path = Path(path)
        meta_file = path / SESSION_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a saved MemorySession (no {SESSION_FILE})")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_file}: not valid JSON ({e})") from e
        if meta.get("config") != model.delta_mem.config.to_dict():
            raise ValueError(f"{path}: the session was saved with another δ-mem config than the model's")
        state = MemoryState.load(path / STATE_FILE, device=next(model.parameters()).device)
        settings = (
            ChatSettings.from_dict(meta["settings"], f"{meta_file}: field 'settings'") if "settings" in meta else None
        )
        session = cls(
            model,
            tokenizer,
            None,
            meta.get("recent_turns", 0),
            meta.get("max_new_tokens", 64),
            state,
            settings=settings,
            protocol=meta.get("protocol", "training"),
            write_length=meta.get("write_length", 8192),
        )
        session.history = meta.get("history", [])
        # sessions saved before flush-on-save wrote every turn at once
        session.written = meta.get("written", len(session.history))
        session.opened = meta.get("opened", bool(session.history))
        session.stream = meta.get("stream", [])
        if (path / CACHE_FILE).is_file():
            from safetensors.torch import load_file
            from transformers import DynamicCache

            tensors = load_file(str(path / CACHE_FILE), device=str(session.device))
            cache = DynamicCache(config=model.config)
            i = 0
            while f"layers.{i}.keys" in tensors:
                cache.update(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"], i)
                i += 1
            session.cache = cache
        return session

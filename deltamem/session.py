"""`MemorySession`: online use of δ-mem — write each turn once, answer any number of questions from the state.

    session = MemorySession(model, tokenizer)
    session.add_message("user", "My sister Ana moved to Porto in May.")   # written into the state
    session.ask("Where does Ana live now?")                               # answered from the state
    session.save("sessions/alice"); MemorySession.load("sessions/alice", model, tokenizer)

Each message is formatted with the tokenizer's chat template (just that message's span, no default
system prompt injected) and written in its own forward pass, positions from 0, no KV cache kept: the
memory is the r×r state per layer, whatever the length of the conversation. ``recent_turns`` > 0 also
puts the last turns in the prompt as text (a hybrid of short-term context and long-term state).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .state import MemoryState

_ANCHOR = [{"role": "system", "content": "-"}]


def format_message(tokenizer: Any, role: str, text: str) -> str:
    """The chat-template text of one message on its own (falls back to ``role: text``)."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(_ANCHOR, tokenize=False)
        full = tokenizer.apply_chat_template([*_ANCHOR, {"role": role, "content": text}], tokenize=False)
        if full.startswith(head):
            return full[len(head) :]
    return f"{role}: {text}\n"


def encode_messages(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a message list and, per token, the index of its message (segment ids for SSW)."""
    ids: list[int] = []
    seg: list[int] = []
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must have 'role' and 'content', got keys {sorted(m)}")
        piece = tokenizer(format_message(tokenizer, m["role"], m["content"]), add_special_tokens=False)["input_ids"]
        ids += piece
        seg += [i] * len(piece)
    return ids, seg


class MemorySession:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system_prompt: str | None = None,
        recent_turns: int = 0,
        max_new_tokens: int = 64,
        state: MemoryState | None = None,
    ) -> None:
        if getattr(model, "delta_mem", None) is None:
            raise ValueError("MemorySession needs a model with δ-mem attached (attach_delta_mem / load_adapter)")
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.recent_turns, self.max_new_tokens = system_prompt, recent_turns, max_new_tokens
        self.state = state if state is not None else model.new_memory(1)
        self.history: list[dict[str, str]] = []
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def add_message(self, role: str, text: str) -> None:
        """Write one turn into the state."""
        ids, seg = encode_messages(self.tokenizer, [{"role": role, "content": text}])
        x = torch.tensor([ids], device=self.device)
        segment_ids = (
            torch.tensor([seg], device=self.device) if self.model.delta_mem.config.write_mode == "SSW" else None
        )
        self.model.write_memory(x, segment_ids=segment_ids, state=self.state)
        self.history.append({"role": role, "content": text})

    def prompt_ids(self, question: str) -> torch.Tensor:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if self.recent_turns:
            messages += self.history[-self.recent_turns :]
        messages.append({"role": "user", "content": question})
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        else:
            text = "".join(format_message(self.tokenizer, m["role"], m["content"]) for m in messages) + "assistant:"
            ids = self.tokenizer(text)["input_ids"]
        return torch.tensor([list(ids)], device=self.device)

    @torch.no_grad()
    def ask(self, question: str, write_turn: bool = False, **generate_kwargs: Any) -> str:
        """Answer from the state (read-only; greedy by default). ``write_turn`` then writes Q and A."""
        x = self.prompt_ids(question)
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False, **generate_kwargs}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(x, attention_mask=torch.ones_like(x), memory=self.state, pad_token_id=pad, **kwargs)
        answer = self.tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True).strip()
        if write_turn:
            self.add_message("user", question)
            self.add_message("assistant", answer)
        return answer

    def save(self, path: str | os.PathLike) -> None:
        """A directory with ``state.safetensors`` and ``session.json``, written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
        try:
            self.state.save(tmp / "state.safetensors")
            meta = {
                "system_prompt": self.system_prompt,
                "recent_turns": self.recent_turns,
                "max_new_tokens": self.max_new_tokens,
                "history": self.history,
                "config": self.model.delta_mem.config.to_dict(),
            }
            (tmp / "session.json").write_text(json.dumps(meta, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, tokenizer: Any) -> MemorySession:
        path = Path(path)
        meta_file = path / "session.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a saved MemorySession (no session.json)")
        meta = json.loads(meta_file.read_text())
        if meta.get("config") != model.delta_mem.config.to_dict():
            raise ValueError(f"{path}: the session was saved with another δ-mem config than the model's")
        state = MemoryState.load(path / "state.safetensors", device=next(model.parameters()).device)
        session = cls(
            model,
            tokenizer,
            meta.get("system_prompt"),
            meta.get("recent_turns", 0),
            meta.get("max_new_tokens", 64),
            state,
        )
        session.history = meta.get("history", [])
        return session

"""The one chat format of δ-mem: how a history and a question become tokens, in training, evaluation and chat.

Everything that turns messages into token ids goes through :class:`ChatFormat` (training's
``pipeline.data.tokenize.Packer``, the evaluator's workers, :class:`deltamem.MemorySession` and
``deltamem chat``), under one :class:`ChatSettings`. The settings a model was trained with are stored in
its adapter's metadata (``save_adapter``), so a session on a trained adapter speaks its training format
by default (``ChatSettings.from_adapter``).

A memory history (WRITE) is a chat: an optional ``write_system`` message, then one message per turn whose
content is ``speaker_format`` (``"{speaker}: {text}"``) when the turn has a speaker, prefixed with
``[<session> | <timestamp>]`` on the first turn of each session (``session_header``). A question (READ)
is an optional ``read_system`` message and the question as the user turn, followed by the template's
generation prompt.

Templates are rendered in NON-thinking mode unless ``thinking=True``: ``enable_thinking=False`` is passed
(Qwen3 hybrids then close an empty ``<think></think>`` block in the prompt itself, so training labels and
evaluation prompts share it); SmolLM3-style templates (``/system_override``) render the system prompt
exactly as given, with no "Today Date", no "Reasoning Mode" metadata and no injected persona (an empty
system turn when there is no system message), unless ``template_persona=True`` — so no default prompt
changes from one day to the next. (Other templates that print today's date through ``strftime_now``, e.g.
Llama 3.2's, still do; transformers offers no way to pin it per call.)

Every WRITE message is rendered on its own after the first message (the anchor) — the form one message
has wherever it sits in a conversation — so a history written in one pass (training, evaluation) and one
written message by message (a chat session) have the same tokens.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_WRITE_SYSTEM = "You are a helpful assistant. Remember the following conversation."
DEFAULT_READ_SYSTEM = "You are a helpful assistant. Answer the question briefly, using what you remember."
Message = dict[str, str]
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")  # an empty reasoning block (non-thinking answers)


@dataclass
class ChatSettings:
    """How histories and questions are rendered (saved in the adapter metadata at training time).

    Attributes:
        write_system: system message opening a WRITE history (None: none).
        read_system: system message opening a READ prompt (None: none).
        speaker_format: content of a turn with a speaker (``{speaker}``, ``{text}``).
        session_header: prefix the first turn of each session with ``[<session> | <timestamp>]``.
        choice_format: one line per multiple-choice option (``{letter}``, ``{choice}``).
        template: ``"auto"`` (the tokenizer's chat template when it has one, else the plain format),
            ``"chat"`` (require the template) or ``"plain"`` (``"Role: text"`` turns, never the template).
        thinking: render hybrid-reasoning templates in thinking mode (default off).
        template_persona: let a template inject its own default system prompt / date / reasoning
            metadata (SmolLM3); off by default.
    """

    write_system: str | None = DEFAULT_WRITE_SYSTEM
    read_system: str | None = DEFAULT_READ_SYSTEM
    speaker_format: str = "{speaker}: {text}"
    session_header: bool = True
    choice_format: str = "({letter}) {choice}"
    template: Literal["auto", "chat", "plain"] = "auto"
    thinking: bool = False
    template_persona: bool = False

    def __post_init__(self) -> None:
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError(f"chat settings: 'template' must be 'auto', 'chat' or 'plain', got {self.template!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ChatSettings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "chat settings") -> ChatSettings:
        known = {f.name for f in dataclasses.fields(ChatSettings)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_adapter(cls, meta: Mapping[str, Any] | None) -> ChatSettings:
        """The settings stored in adapter metadata (``read_adapter_config(...)[1]``); defaults when absent
        (adapters saved before the settings were recorded were trained with the defaults)."""
        chat = (meta or {}).get("chat")
        return cls() if chat is None else cls.from_dict(chat, "adapter metadata field 'chat'")


def _field(turn: Any, name: str, default: Any = None) -> Any:
    if isinstance(turn, Mapping):
        return turn.get(name, default)
    return getattr(turn, name, default)


def turn_content(
    text: str,
    speaker: str | None,
    settings: ChatSettings,
    header: str | None = None,
) -> str:
    """The message content of one turn: ``speaker_format`` and an optional session header line."""
    content = text if speaker is None else settings.speaker_format.format(speaker=speaker, text=text)
    return content if header is None else f"[{header}]\n{content}"


def session_label(session: str | None, timestamp: str | None) -> str | None:
    """``"<session> | <timestamp>"`` (whichever are given), or None."""
    label = " | ".join(x for x in (session, timestamp) if x)
    return label or None


def history_messages(turns: Iterable[Any], settings: ChatSettings | None = None, system: bool = True) -> list[Message]:
    """The WRITE chat of ``turns`` (objects or dicts with ``text``/``content``, ``role``, ``speaker``,
    ``timestamp``, ``session``): the write system message (if ``system``), then one message per turn."""
    settings = settings or ChatSettings()
    messages: list[Message] = []
    if system and settings.write_system is not None:
        messages.append({"role": "system", "content": settings.write_system})
    previous: tuple[Any, Any] | None = None
    for turn in turns:
        text = _field(turn, "text")
        if text is None:
            text = _field(turn, "content", "")
        here = (_field(turn, "session"), _field(turn, "timestamp"))
        header = session_label(*here) if settings.session_header and here != previous else None
        previous = here
        messages.append(
            {
                "role": _field(turn, "role", "user"),
                "content": turn_content(text, _field(turn, "speaker"), settings, header),
            }
        )
    return messages


def question_text(question: str, choices: Sequence[str] | None = None, settings: ChatSettings | None = None) -> str:
    """The user turn of a READ prompt: the question, plus lettered options for multiple choice."""
    settings = settings or ChatSettings()
    if not choices:
        return question
    lines = [settings.choice_format.format(letter=_LETTERS[i], choice=c) for i, c in enumerate(choices)]
    return question + "\n\n" + "\n".join(lines)


def question_messages(
    question: str,
    settings: ChatSettings | None = None,
    choices: Sequence[str] | None = None,
    recent: Sequence[Mapping[str, str]] = (),
) -> list[Message]:
    """The READ prompt messages: read system message, optional recent turns as text, the question."""
    settings = settings or ChatSettings()
    messages: list[Message] = []
    if settings.read_system is not None:
        messages.append({"role": "system", "content": settings.read_system})
    messages += [{"role": m["role"], "content": m["content"]} for m in recent]
    messages.append({"role": "user", "content": question_text(question, choices, settings)})
    return messages


class ChatFormat:
    """Renders messages (template or plain format) under :class:`ChatSettings` and encodes pieces.

    Args:
        tokenizer: a Hugging Face tokenizer.
        settings: the :class:`ChatSettings` (default ones if None).
        use_chat_template: legacy switch overriding ``settings.template`` (True = "chat", False = "plain").
    """

    def __init__(
        self, tokenizer: Any, settings: ChatSettings | None = None, use_chat_template: bool | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.settings = settings or ChatSettings()
        mode = self.settings.template
        if use_chat_template is not None:
            mode = "chat" if use_chat_template else "plain"
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        has_template = bool(template)
        if mode == "chat" and not has_template:
            raise ValueError("the tokenizer has no chat template (chat settings ask for template='chat')")
        self.templated = has_template and mode != "plain"
        source = template if isinstance(template, str) else ""
        # SmolLM3-style: a /system_override switch drops the metadata block (date, reasoning mode) and persona.
        self._override = self.templated and "/system_override" in source and not self.settings.template_persona
        eos = getattr(tokenizer, "eos_token", None)
        self.plain_end = eos if isinstance(eos, str) else ""

    # -- rendering -------------------------------------------------------------------------------
    def _template_messages(self, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self._override:
            if out and out[0]["role"] == "system":
                out[0]["content"] = out[0]["content"] + "/system_override"
            else:
                out.insert(0, {"role": "system", "content": "/system_override"})
        return out

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text: THE rendering function (training, evaluation and chat use it)."""
        if self.templated:
            return self.tokenizer.apply_chat_template(
                self._template_messages(messages),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=self.settings.thinking,
            )
        parts = []
        for m in messages:
            end = self.plain_end if m["role"] == "assistant" else ""
            parts.append(f"{m['role'].capitalize()}: {m['content']}{end}\n\n")
        if add_generation_prompt:
            parts.append("Assistant: ")
        return "".join(parts)

    def message_pieces(self, messages: Sequence[Mapping[str, str]]) -> list[str]:
        """One text per message, concatenated = the WRITE history: the first message rendered alone, each
        later one rendered right after the first and cut off it (its context-free form). Templates that
        cannot render a message after the first fall back to rendering prefixes."""
        if not messages:
            return []
        first = self.render(messages[:1])
        pieces = [first]
        for m in messages[1:]:
            both = self.render([messages[0], m])
            if not both.startswith(first):
                break
            pieces.append(both[len(first) :])
        if len(pieces) == len(messages):
            return pieces
        pieces, previous = [], ""  # slow path: prefixes
        for k in range(1, len(messages) + 1):
            text = self.render(messages[:k])
            if not text.startswith(previous):
                raise ValueError(
                    "the chat template does not render conversations prefix by prefix; use template='plain'"
                )
            pieces.append(text[len(previous) :])
            previous = text
        return pieces

    def answer_parts(self, prompt: Sequence[Mapping[str, str]], answer: str) -> tuple[str, str]:
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
        between = rest[:at]
        if _EMPTY_THINK.fullmatch(between):
            # e.g. Qwen3-*-Instruct-2507: a final assistant turn gets an empty <think></think> that the
            # generation prompt lacks; the model answers right after the generation prompt, so it is dropped
            # (training then reads exactly the prompt evaluation generates from)
            between = ""
        return prompt_text + between, answer + end_marker

    # -- encoding ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings in it are recognised; none are added)."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, index of its message per token) of a WRITE history (segment ids for SSW)."""
        ids: list[int] = []
        seg: list[int] = []
        for index, piece in enumerate(self.message_pieces(messages)):
            piece_ids = self.encode(piece)
            ids += piece_ids
            seg += [index] * len(piece_ids)
        return ids, seg

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a READ prompt with the generation prompt (what generation continues)."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def prompt_segment_ids(self, messages: Sequence[Mapping[str, str]], ids: Sequence[int]) -> list[int]:
        """SSW segment ids of a prompt that is read and written (``ids`` = :meth:`prompt_ids` of ``messages``,
        or their rendering without the generation prompt): per token, the index of its message among the
        non-system ones; −1 for system messages and for the template text after the last message (the
        generation prompt). The reference implementation writes such a prompt this way: one write per
        message, neither the system prompt nor the generation prompt.

        The message spans are exactly the WRITE segmentation's (:meth:`encode_messages`, what training's SSW
        episodes write): message k owns its piece's tokens, header and end-of-turn marker included. Raises
        ``ValueError`` when the pieces' tokens are not how ``ids`` begins (a template that renders a message
        differently inside the prompt than on its own)."""
        piece_ids, spans = self.encode_messages(messages)
        if list(ids[: len(piece_ids)]) != piece_ids:
            raise ValueError(
                "the chat template renders the prompt differently from its messages one by one; SSW cannot "
                "segment it by message (use template='plain')"
            )
        written: dict[int, int] = {}
        for index, m in enumerate(messages):
            if m["role"] != "system":
                written[index] = len(written)
        return [written.get(s, -1) for s in spans] + [-1] * (len(ids) - len(piece_ids))


@dataclass
class WriteChunk:
    """One piece of a WRITE history: token ids and, per token, the index of its message."""

    input_ids: list[int]
    segment_ids: list[int]


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

"""The one chat format (deltamem.chat) with each family's published template: training READ prompts and
evaluation prompts share their generation prefix, in non-thinking mode, with no date and no persona."""

from __future__ import annotations

import time
import types

import pytest

from deltamem.chat import ChatFormat, ChatSettings, history_messages
from pipeline.data.schema import Example, Segment
from pipeline.data.tokenize import Packer, RenderConfig, read_messages
from pipeline.eval.runner import EvalWorker
from pipeline.eval.tasks import get_task
from tests.fixtures.families import FAMILIES, chat_template, standin_tokenizer

EXAMPLE = Example(
    "ex-1",
    "synthetic",
    "Where does Rosalind live?",
    ["Tallinn"],
    segments=[
        Segment("I live in Tallinn.", role="user", speaker="Rosalind", session="Session 1", timestamp="3 May 2024"),
        Segment("Nice city!", role="assistant", speaker="Bot", session="Session 1", timestamp="3 May 2024"),
        Segment("I moved again.", role="user", speaker="Rosalind", session="Session 2", timestamp="9 June 2024"),
    ],
    metadata={"conversation_id": "c1"},
)


def _today_strings() -> list[str]:
    now = time.localtime()
    return [time.strftime(f, now) for f in ("%d %B %Y", "%d %b %Y", "%Y-%m-%d", "%B %d, %Y")]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_and_eval_prompts_share_the_generation_prefix(family):
    tok = standin_tokenizer(family)
    packer = Packer(tok, write_length=512, read_length=512)
    ids, labels, _ = packer.read_ids(EXAMPLE)
    first_label = next(i for i, v in enumerate(labels) if v != -100)
    train_prefix = ids[:first_label]  # what the model sees before it must produce the answer
    # the evaluator's own encoder (EvalWorker.prompt_ids) on the synthetic task's question messages
    worker = types.SimpleNamespace(fmt=ChatFormat(tok))
    eval_ids = EvalWorker.prompt_ids(worker, get_task("synthetic").question_messages(EXAMPLE))
    assert eval_ids == train_prefix, family
    text = tok.decode(eval_ids)
    # non-thinking: any <think> in the prompt is a closed (empty) block, never an open generation prompt
    if "<think>" in text:
        assert text.rstrip().endswith("</think>"), text[-80:]
        assert text.count("<think>") == text.count("</think>")
    for day in _today_strings():
        assert day not in text
    assert "Today Date" not in text and "Reasoning Mode" not in text
    assert "SmolLM" not in text and "Hugging Face" not in text  # no injected persona
    # the answer's labels are the answer + end of turn, not a thinking block
    answer = tok.decode([v for v in labels if v != -100])
    assert answer.startswith("Tallinn") and "<think>" not in answer


def test_qwen3_hybrid_prompt_closes_an_empty_thinking_block():
    tok = standin_tokenizer("qwen3")
    text = ChatFormat(tok).render(read_messages(EXAMPLE), add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = ChatFormat(tok, ChatSettings(thinking=True)).render(read_messages(EXAMPLE), add_generation_prompt=True)
    assert thinking.endswith("<|im_start|>assistant\n")  # the template's own thinking default, on request


def test_qwen3_instruct_2507_prompt_has_no_thinking_block_at_all():
    """The non-thinking-only Qwen3-4B-Instruct-2507 template: the generation prompt is the bare assistant
    header, whatever the thinking switch says (the template has none)."""
    tok = standin_tokenizer("qwen3-instruct-2507")
    assert "enable_thinking" not in chat_template("qwen3-instruct-2507")
    for thinking in (False, True):
        fmt = ChatFormat(tok, ChatSettings(thinking=thinking))
        text = fmt.render(read_messages(EXAMPLE), add_generation_prompt=True)
        assert text.endswith("<|im_start|>user\nWhere does Rosalind live?<|im_end|>\n<|im_start|>assistant\n"), text
        assert "<think>" not in text


def test_smollm3_no_think_no_date_no_persona_unless_asked():
    tok = standin_tokenizer("smollm3")
    msgs = read_messages(EXAMPLE)
    text = ChatFormat(tok).render(msgs, add_generation_prompt=True)
    assert text.startswith(f"<|im_start|>system\n{RenderConfig().read_system}<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    # no system message at all: an empty system turn, not the persona
    bare = ChatFormat(tok).render(msgs[1:], add_generation_prompt=True)
    assert bare.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    persona = ChatFormat(tok, ChatSettings(template_persona=True)).render(msgs[1:], add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in persona
    assert "Today Date: " in persona  # the template's own metadata, only on request
    assert "Reasoning Mode: /no_think" in persona


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_history_is_the_same_tokens_everywhere(family):
    """Training's WRITE segment = the evaluator's history encoding = the session's encoding."""
    tok = standin_tokenizer(family)
    packer = Packer(tok, write_length=4096)
    train_ids, train_seg = packer.context_ids(EXAMPLE.segments)
    worker = types.SimpleNamespace(fmt=ChatFormat(tok))
    hist = get_task("synthetic").history_messages(EXAMPLE)
    assert EvalWorker.history_ids(worker, hist) == (train_ids, train_seg)
    assert ChatFormat(tok).encode_messages(history_messages(EXAMPLE.segments)) == (train_ids, train_seg)
    assert hist[1]["content"] == "[Session 1 | 3 May 2024]\nRosalind: I live in Tallinn."
    assert hist[2]["content"] == "Bot: Nice city!"  # the header only opens a session
    assert hist[3]["content"].startswith("[Session 2 | 9 June 2024]\n")
    # each message's tokens are its context-free form: writing them one by one gives the same ids
    fmt = ChatFormat(tok)
    anchor = hist[0]
    one_by_one = fmt.encode(fmt.message_pieces(hist[:1])[0])
    for m in hist[1:]:
        one_by_one += fmt.encode(fmt.message_pieces([anchor, m])[1])
    assert one_by_one == train_ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_segments_are_the_training_write_segments(family):
    """SSW writing a prompt it reads (deltamem_full_context): one segment per non-system message, with the
    token spans training's WRITE segmentation gives the same messages; system prompt and generation prompt
    are not written (−1)."""
    fmt = ChatFormat(standin_tokenizer(family))
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "I live in Tallinn."},
        {"role": "assistant", "content": "Nice city!"},
        {"role": "user", "content": "Where do I live?"},
    ]
    for messages in (msgs[:2], msgs):
        ids = fmt.prompt_ids(messages)
        seg = fmt.prompt_segment_ids(messages, ids)
        write_ids, write_seg = fmt.encode_messages(messages)
        assert len(seg) == len(ids) and ids[: len(write_ids)] == write_ids
        assert seg[: len(write_ids)] == [s - 1 for s in write_seg]  # message 0 is the system prompt: −1
        assert set(seg[len(write_ids) :]) == {-1} and len(ids) > len(write_ids)  # the generation prompt
        assert sorted(set(seg) - {-1}) == list(range(len(messages) - 1))


def test_prompt_segments_refuse_a_template_that_renders_messages_in_context():
    tok = standin_tokenizer("llama")
    tok.chat_template = "{% for m in messages %}[{{ messages | length }}]{{ m.content }}{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    fmt = ChatFormat(tok)
    with pytest.raises(ValueError):
        fmt.prompt_segment_ids(msgs, fmt.prompt_ids(msgs))


def test_templates_are_the_published_files():
    for family in FAMILIES:
        text = chat_template(family)
        assert "{%" in text and "messages" in text, family
        assert standin_tokenizer(family).chat_template == text
    assert "enable_thinking is defined and enable_thinking is false" in chat_template("qwen3")
    assert "/system_override" in chat_template("smollm3") and "strftime_now" in chat_template("smollm3")


def test_settings_round_trip_and_errors():
    s = ChatSettings(read_system="Answer.", template="plain")
    assert ChatSettings.from_dict(s.to_dict()) == s
    assert ChatSettings.from_adapter({"chat": s.to_dict()}) == s
    assert ChatSettings.from_adapter({}) == ChatSettings()
    with pytest.raises(ValueError, match=r"unknown field.*bogus"):
        ChatSettings.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="'template' must be"):
        ChatSettings(template="jinja")
    assert RenderConfig(answer_index=1).chat_settings() == ChatSettings()


def test_plain_format_without_template():
    tok = standin_tokenizer("llama")
    fmt = ChatFormat(tok, ChatSettings(template="plain"))
    assert fmt.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == "User: hi\n\nAssistant: "
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ChatFormat(tok, ChatSettings(template="chat"))
    assert not ChatFormat(tok).templated

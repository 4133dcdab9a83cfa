"""Tokenisation and packing: property tests with the real embedded SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data import load_split
from pipeline.data.schema import Example, Segment
from pipeline.data.tokenize import IGNORE_INDEX, ChatFormat, Packer, RenderConfig, write_messages

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# text incl. non-ASCII and newlines. Excluded: characters that the GGUF-converted SmolLM2 vocabulary
# cannot represent (a few ASCII control characters and code points from U+40000 on, whose UTF-8 lead
# bytes have no token): they do not survive encode/decode with any packing.
TEXT = st.text(
    st.characters(max_codepoint=0x1FFFF, exclude_categories=("Cs", "Cc"), include_characters="\n\t"),
    min_size=0,
    max_size=60,
)
WORDS = TEXT.map(str.strip).filter(bool)


def _end_marker(tok, templated: bool) -> str:
    return "<|im_end|>" if templated else tok.eos_token


def _labelled(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def test_embedded_tokenizer_has_the_expected_chat_template(smol_tokenizer):
    assert "<|im_start|>" in smol_tokenizer.chat_template
    fmt = ChatFormat(smol_tokenizer)
    assert fmt.templated
    prompt, answer = fmt.answer_parts([{"role": "user", "content": "Q?"}], "Oslo")
    assert prompt.endswith("<|im_start|>assistant\n") and answer == "Oslo<|im_end|>"


def test_synthetic_example_is_packed_as_documented(smol_tokenizer):
    examples, _ = load_split("synthetic", "test", options={"dialogues": {"train": 4, "test": 3}})
    packer = Packer(smol_tokenizer, write_length=64, read_length=512)
    ex = examples[0]
    packed = packer.pack(ex)
    labelled = _labelled(packed.read_input_ids, packed.read_labels)
    assert smol_tokenizer.decode(labelled) == ex.answers[0] + "<|im_end|>"
    text = smol_tokenizer.decode(packed.read_input_ids)
    assert text.endswith(f"<|im_start|>user\n{ex.question}<|im_end|>\n<|im_start|>assistant\n{ex.answers[0]}<|im_end|>")
    assert all(len(c.input_ids) <= 64 for c in packed.write_chunks) and len(packed.write_chunks) > 1
    history = smol_tokenizer.decode([t for c in packed.write_chunks for t in c.input_ids])
    assert history.startswith("<|im_start|>system\n")
    assert f"[Session 1 | {ex.segments[0].timestamp}]\n{ex.segments[0].speaker}: {ex.segments[0].text}" in history
    # the questions of one dialogue share the tokenised history
    assert packer.pack(examples[1]).write_chunks is packed.write_chunks
    # no context → no write chunks; no answer → no labels
    bare = Example(example_id="x", task="ifeval", question="Write a haiku.", answers=[])
    packed = packer.pack(bare)
    assert packed.write_chunks == [] and set(packed.read_labels) == {IGNORE_INDEX}
    assert smol_tokenizer.decode(packed.read_input_ids).endswith("<|im_start|>assistant\n")


def test_multiple_choice_question_lists_the_options(smol_tokenizer):
    ex = Example(example_id="g", task="gpqa", question="Which?", answers=["C"], choices=["w", "x", "y", "z"])
    packed = Packer(smol_tokenizer).pack(ex)
    text = smol_tokenizer.decode(packed.read_input_ids)
    assert "Which?\n\n(A) w\n(B) x\n(C) y\n(D) z<|im_end|>" in text
    assert smol_tokenizer.decode(_labelled(packed.read_input_ids, packed.read_labels)) == "C<|im_end|>"


@PROPERTY
@given(
    question=TEXT,
    answer=WORDS,
    read_length=st.integers(1, 160),
    templated=st.booleans(),
    system=st.one_of(st.none(), TEXT),
)
def test_read_loss_mask_covers_exactly_the_answer(smol_tokenizer, question, answer, read_length, templated, system):
    render = RenderConfig(read_system=system)
    packer = Packer(smol_tokenizer, read_length=read_length, render=render, use_chat_template=templated)
    ex = Example(example_id="p", task="t", question=question, answers=[answer])
    ids, labels, truncated = packer.read_ids(ex)
    full_ids, full_labels, _ = packer.read_ids(ex, truncate=False)

    assert len(ids) == len(labels) <= read_length
    assert truncated == (len(full_ids) > read_length)
    assert ids == full_ids[-read_length:] and labels == full_labels[-read_length:]
    # the labelled positions are a contiguous run at the end, and labels equal the input ids there
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    assert all(lab == IGNORE_INDEX for lab in labels[:first])
    assert labels[first:] == ids[first:]
    # ... and they are exactly the answer followed by the end-of-turn marker (what survives truncation of it)
    expected = packer.fmt.encode(answer + _end_marker(smol_tokenizer, templated))
    assert _labelled(full_ids, full_labels) == expected
    assert smol_tokenizer.decode(expected) == answer + _end_marker(smol_tokenizer, templated)
    assert _labelled(ids, labels) == expected[len(expected) - len(_labelled(ids, labels)) :]
    if not truncated:
        assert _labelled(ids, labels) == expected
        # the whole sequence is the rendered conversation, cut after the end-of-turn marker
        messages = [
            *([{"role": "system", "content": system}] if system is not None else []),
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        rendered = packer.fmt.render(messages)
        assert rendered.startswith(smol_tokenizer.decode(ids))
        assert smol_tokenizer.decode(ids).endswith(answer + _end_marker(smol_tokenizer, templated))


SEGMENT = st.builds(
    Segment,
    text=TEXT,
    role=st.sampled_from(["user", "assistant"]),
    speaker=st.one_of(st.none(), WORDS),
    timestamp=st.one_of(st.none(), st.sampled_from(["1 May 2023", "2 June 2024"])),
    session=st.one_of(st.none(), st.sampled_from(["Session 1", "Session 2"])),
)


@PROPERTY
@given(
    segments=st.lists(SEGMENT, min_size=1, max_size=12),
    write_length=st.integers(1, 120),
    overflow=st.sampled_from(["split", "truncate"]),
    templated=st.booleans(),
)
def test_write_chunks_never_exceed_write_length(smol_tokenizer, segments, write_length, overflow, templated):
    packer = Packer(smol_tokenizer, write_length=write_length, overflow=overflow, use_chat_template=templated)
    ex = Example(example_id="w", task="t", question="q", answers=["a"], segments=segments)
    chunks, total, truncated = packer.write_chunks(ex)
    full_ids, full_seg = packer.context_ids(segments)
    messages = write_messages(segments, packer.render)

    assert total == len(full_ids)
    assert smol_tokenizer.decode(full_ids) == packer.fmt.render(messages)
    assert full_seg == sorted(full_seg) and set(full_seg) == set(range(len(messages)))
    for k, message in enumerate(messages):  # every message's span holds its own text
        span = [t for t, s in zip(full_ids, full_seg, strict=True) if s == k]
        assert message["content"] in smol_tokenizer.decode(span)
    for chunk in chunks:
        assert 0 < len(chunk.input_ids) <= write_length
        assert len(chunk.segment_ids) == len(chunk.input_ids)
    if overflow == "truncate":
        assert len(chunks) == 1 and truncated == (total > write_length)
        assert chunks[0].input_ids == full_ids[-write_length:] and chunks[0].segment_ids == full_seg[-write_length:]
    else:
        assert not truncated
        assert [t for c in chunks for t in c.input_ids] == full_ids
        assert [s for c in chunks for s in c.segment_ids] == full_seg
        for k in set(full_seg):  # a message that fits in a chunk is never cut
            if full_seg.count(k) <= write_length:
                assert sum(k in c.segment_ids for c in chunks) == 1


def test_bad_packer_settings(smol_tokenizer):
    with pytest.raises(ValueError):
        Packer(smol_tokenizer, write_length=0)
    with pytest.raises(ValueError):
        Packer(smol_tokenizer, overflow="drop")  # type: ignore[arg-type]


def test_collate_read_pads_with_ignored_labels(smol_tokenizer):
    from pipeline.data.tokenize import collate_read

    packer = Packer(smol_tokenizer)
    short = packer.pack(Example(example_id="a", task="t", question="Q?", answers=["yes"]))
    long = packer.pack(Example(example_id="b", task="t", question="A much longer question here?", answers=["no"]))
    batch = collate_read([short, long], pad_id=smol_tokenizer.pad_token_id)
    n_short, n_long = len(short.read_input_ids), len(long.read_input_ids)
    assert n_short < n_long and batch["input_ids"].shape == (2, n_long)
    assert batch["input_ids"][0, :n_short].tolist() == short.read_input_ids
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert batch["labels"][0].tolist() == short.read_labels + [IGNORE_INDEX] * (n_long - n_short)
    assert batch["labels"][1].tolist() == long.read_labels
    with pytest.raises(ValueError):
        collate_read([], pad_id=0)

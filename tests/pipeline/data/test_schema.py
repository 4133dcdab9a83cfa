"""The common example schema: dict/JSONL round trips, shared contexts, clear errors."""

from __future__ import annotations

import json

import pytest

from pipeline.data.errors import DataError
from pipeline.data.schema import Example, Segment, contexts_path, read_split, write_split


def _example(i: int, segments: list[Segment], conversation: str | None = "c1") -> Example:
    meta = {"conversation_id": conversation} if conversation else {}
    return Example(
        example_id=f"ex-{i}",
        task="t",
        question=f"question {i}?",
        answers=[f"answer {i}", "alt"],
        segments=segments,
        category="single-hop",
        choices=None,
        metadata={**meta, "n": i, "nested": {"a": [1, 2]}},
    )


def test_segment_and_example_dict_round_trip():
    seg = Segment(
        text="Hi — ünïcode ✓", role="assistant", speaker="Ann", timestamp="1 May 2023", session="S1", segment_id="D1:1"
    )
    ex = Example(
        example_id="x",
        task="gpqa",
        question="q",
        answers=["B"],
        segments=[seg],
        category=None,
        choices=["a", "b", "c", "d"],
        instruction_ids=["punctuation:no_comma"],
        kwargs=[{"n": 3}],
        metadata={"k": "v"},
    )
    back = Example.from_dict(json.loads(json.dumps(ex.to_dict())))
    assert back == ex
    assert Segment.from_dict({"text": "t"}) == Segment(text="t")  # defaults
    assert "speaker" not in Segment(text="t").to_dict()  # None fields are left out


def test_write_split_stores_shared_context_once_and_reads_back(tmp_path):
    shared = [Segment(text=f"turn {k}", speaker="A", session="Session 1") for k in range(5)]
    own = [Segment(text="private")]
    examples = [_example(0, shared), _example(1, shared), _example(2, own, conversation=None)]
    path = tmp_path / "test.jsonl"
    counts = write_split(examples, path)
    assert counts == {"examples": 3, "contexts": 1}
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert "segments" not in json.loads(lines[0]) and json.loads(lines[0])["context_ref"] == "c1"
    assert json.loads(lines[2])["segments"] == [{"text": "private", "role": "user"}]
    assert len(contexts_path(path).read_text().splitlines()) == 1
    back = read_split(path)
    assert back == examples
    assert back[0].segments is back[1].segments  # shared again after reading


def test_conflicting_shared_contexts_are_refused(tmp_path):
    a = _example(0, [Segment(text="one")])
    b = _example(1, [Segment(text="two")])
    with pytest.raises(DataError, match="share a conversation_id"):
        write_split([a, b], tmp_path / "x.jsonl")


def test_read_split_names_file_record_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = _example(0, [Segment(text="x")], conversation=None).to_dict()
    bad = dict(good, example_id="ex-bad")
    del bad["question"]
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_split(path)
    assert str(err.value) == f"{path}: record ex-bad: field 'question': missing or non-string value"

    path.write_text(json.dumps(good) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: invalid JSON at line 2"):
        read_split(path)


def test_missing_context_reference_is_an_error(tmp_path):
    path = tmp_path / "s.jsonl"
    write_split([_example(0, [Segment(text="x")])], path)
    contexts_path(path).unlink()
    with pytest.raises(DataError, match="context 'c1' not found"):
        read_split(path)


def test_write_split_is_atomic(tmp_path):
    """A failure while writing leaves neither a partial file nor a temporary one."""
    path = tmp_path / "s.jsonl"

    def broken():
        yield _example(0, [Segment(text="x")], conversation=None)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_split(broken(), path)
    assert list(tmp_path.iterdir()) == []

"""Readers on the real LoCoMo and IFEval files in ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.data import DataError, load_split, read_split, write_split
from pipeline.data.locomo import ADVERSARIAL_ANSWER, CATEGORY_NAMES


def test_locomo_counts_and_fields(locomo_file, tmp_path):
    examples, prov = load_split("locomo", "test", str(locomo_file))
    assert len(examples) == 1986
    conversations = {e.conversation_id for e in examples}
    assert len(conversations) == 10
    by_number = Counter(e.metadata["locomo_category"] for e in examples)
    assert by_number == {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}
    # the numbering of the upstream evaluation code (task_eval/evaluation.py)
    assert Counter(e.category for e in examples) == {
        "multi-hop": 282,
        "temporal": 321,
        "open-domain": 96,
        "single-hop": 841,
        "adversarial": 446,
    }
    assert all(e.answers and e.answers[0] for e in examples)
    assert all(e.answers == [ADVERSARIAL_ANSWER] for e in examples if e.category == "adversarial")
    assert sum("adversarial_answer" in e.metadata for e in examples) == 446
    assert set(CATEGORY_NAMES.values()) == {e.category for e in examples}

    first = examples[0]
    assert first.example_id == "locomo-conv-26-q0000"
    assert first.question == "When did Caroline go to the LGBTQ support group?"
    assert first.answers == ["7 May 2023"]
    assert first.metadata["evidence"] == ["D1:3"]
    assert first.metadata["speakers"] == ["Caroline", "Melanie"]
    seg0 = first.segments[0]
    assert (seg0.speaker, seg0.segment_id, seg0.session, seg0.timestamp) == (
        "Caroline",
        "D1:1",
        "Session 1",
        "1:56 pm on 8 May, 2023",
    )
    # every evidence id that is well formed points at a turn of the same conversation
    ids = {s.segment_id for s in first.segments}
    assert "D19:1" in ids and "D20:1" not in ids  # conv-26 has 19 non-empty sessions
    # conv-26: integer answers are kept as text
    assert any(e.answers == ["2022"] for e in examples if e.conversation_id == "conv-26")
    # segments are shared by the conversation's questions (stored once on disk)
    assert all(e.segments is first.segments for e in examples if e.conversation_id == "conv-26")
    assert prov.files[0]["sha256"] and prov.files[0]["bytes"] == locomo_file.stat().st_size

    counts = write_split(examples, tmp_path / "test.jsonl")
    assert counts == {"examples": 1986, "contexts": 10}
    assert read_split(tmp_path / "test.jsonl") == examples


def test_locomo_dropped_field_names_file_record_and_field(locomo_file, tmp_path):
    data = json.loads(locomo_file.read_text(encoding="utf-8"))
    del data[3]["qa"][5]["question"]
    bad = tmp_path / "locomo10.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_split("locomo", "test", str(bad))
    assert str(err.value) == f"{bad}: record 3 (sample_id=conv-42): field 'qa[5].question': missing required field"


def test_locomo_truncated_file(locomo_file, tmp_path):
    bad = tmp_path / "locomo10.json"
    bad.write_bytes(locomo_file.read_bytes()[:100_000])
    with pytest.raises(DataError, match=r"locomo10.json: invalid JSON at line \d+ column \d+"):
        load_split("locomo", "test", str(bad))


def test_locomo_sample_filter_and_folder_source(locomo_file):
    examples, _ = load_split("locomo", "test", str(locomo_file.parent), options={"sample_ids": ["conv-30"]})
    assert len(examples) == 105
    assert {e.conversation_id for e in examples} == {"conv-30"}


def test_ifeval_counts_and_a_concrete_prompt(ifeval_file, tmp_path):
    examples, _ = load_split("ifeval", "test", str(ifeval_file))
    assert len(examples) == 540
    assert len({e.example_id for e in examples}) == 540
    first = examples[0]
    assert first.example_id == "ifeval-1000" and first.metadata["key"] == 1000
    assert first.instruction_ids == [
        "punctuation:no_comma",
        "detectable_format:number_highlighted_sections",
        "length_constraints:number_words",
    ]
    assert first.kwargs == [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]
    assert first.question.startswith("Write a 300+ word summary")
    assert first.segments == [] and first.answers == []
    assert sum(len(e.instruction_ids or []) for e in examples) == 832
    write_split(examples, tmp_path / "test.jsonl")
    assert read_split(tmp_path / "test.jsonl") == examples

"""The synthetic memory data set: determinism, no answer leaks, answerability, disjoint splits."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.data import DataError, load_split, write_split
from pipeline.data.synthetic import CATEGORIES, SyntheticConfig, generate_split, name_pools
from pipeline.data.synthetic_vocab import NAMES, check_vocabulary

SMALL = {"train": 150, "validation": 40, "test": 40}


def _split_bytes(tmp_path, name: str, cfg: SyntheticConfig, split: str) -> bytes:
    path = tmp_path / name / f"{split}.jsonl"
    write_split(generate_split(cfg, split), path)
    return path.read_bytes() + path.with_name(f"{split}.contexts.jsonl").read_bytes()


def test_same_seed_gives_identical_bytes(tmp_path):
    cfg = SyntheticConfig(seed=7, dialogues=SMALL)
    for split in SMALL:
        first = _split_bytes(tmp_path, "a", cfg, split)
        second = _split_bytes(tmp_path, "b", SyntheticConfig(seed=7, dialogues=dict(SMALL)), split)
        assert first == second
    assert _split_bytes(tmp_path, "c", SyntheticConfig(seed=8, dialogues=SMALL), "test") != first


def test_dialogue_does_not_depend_on_split_sizes():
    small = generate_split(SyntheticConfig(seed=3, dialogues={"train": 5, "validation": 2, "test": 2}), "test")
    large = generate_split(SyntheticConfig(seed=3, dialogues={"train": 50, "validation": 9, "test": 9}), "test")
    assert [e.to_dict() for e in small] == [e.to_dict() for e in large[: len(small)]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answers_never_appear_in_the_question(seed):
    cfg = SyntheticConfig(seed=seed, dialogues=SMALL, facts_per_dialogue=6, distractor_facts=4)
    for split in SMALL:
        for ex in generate_split(cfg, split):
            for answer in ex.answers:
                assert answer.lower() not in ex.question.lower(), (ex.question, answer)


def test_every_answer_is_in_the_history_and_the_categories_behave():
    cfg = SyntheticConfig(seed=5, dialogues=SMALL)
    examples = generate_split(cfg, "train")
    assert len(examples) == SMALL["train"] * cfg.facts_per_dialogue
    assert set(Counter(e.category for e in examples)) == set(CATEGORIES)
    for ex in examples:
        by_id = {s.segment_id: s for s in ex.segments}
        evidence = [by_id[i] for i in ex.metadata["evidence"]]
        answer = ex.answers[0]
        if ex.category == "temporal":  # the date of the session the event was told in
            assert evidence[0].timestamp == answer
            assert "today" in evidence[0].text.lower()
            continue
        assert answer in evidence[-1].text  # stated in the last evidence turn
        if ex.category == "multi-hop":  # a link turn, then the relative's fact, by name
            bridge = ex.metadata["bridge_entity"]
            assert bridge in evidence[0].text and bridge in evidence[1].text
            assert bridge not in ex.question
            assert ex.segments.index(evidence[0]) < ex.segments.index(evidence[1])
        if ex.category == "knowledge-update":  # the stale value is told in an earlier session
            stale = ex.metadata["stale_answer"]
            assert stale != answer and stale in evidence[0].text
            assert int(evidence[0].session.split()[-1]) < int(evidence[1].session.split()[-1])
        # values are distinct within a dialogue: no other turn mentions the answer
        assert sum(answer.lower() in s.text.lower() for s in ex.segments) == 1, (answer, ex.example_id)


def test_hard_to_guess_without_the_context():
    examples = generate_split(SyntheticConfig(seed=0, dialogues={"train": 10, "test": 250}), "test")
    by_category: dict[str, Counter] = {}
    for ex in examples:
        by_category.setdefault(ex.category, Counter())[ex.answers[0]] += 1
    for category, answers in by_category.items():
        most_common_share = answers.most_common(1)[0][1] / sum(answers.values())
        assert most_common_share < 0.05, (category, answers.most_common(3))


def test_split_order_does_not_matter():
    a = generate_split(SyntheticConfig(seed=2, dialogues={"train": 3, "validation": 2, "test": 2}), "test")
    b = generate_split(SyntheticConfig(seed=2, dialogues={"test": 2, "validation": 2, "train": 3}), "test")
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]


def test_splits_use_disjoint_people():
    cfg = SyntheticConfig(seed=11, dialogues=SMALL)
    pools = name_pools(cfg.seed, list(SMALL))
    assert sum(len(p) for p in pools.values()) == len(NAMES)
    people = {}
    for split in SMALL:
        names = set()
        for ex in generate_split(cfg, split):
            names.update(ex.metadata["speakers"])
            names.update(s.speaker for s in ex.segments)
            if "bridge_entity" in ex.metadata:
                names.add(ex.metadata["bridge_entity"])
        assert names <= set(pools[split])
        people[split] = names
    assert not people["train"] & people["test"]
    assert not people["train"] & people["validation"]
    assert not people["validation"] & people["test"]


def test_history_length_follows_difficulty_settings():
    def turns(**kw):
        exs = generate_split(SyntheticConfig(seed=1, dialogues={"train": 20}, **kw), "train")
        return sum(len(e.segments) for e in exs) / len(exs)

    easy = turns(sessions=2, facts_per_dialogue=2, distractor_facts=0, distractor_turns=0, ack_prob=0.0)
    hard = turns(sessions=5, facts_per_dialogue=6, distractor_facts=4, distractor_turns=4)
    assert easy < 8 < 20 < hard
    one_session = generate_split(SyntheticConfig(dialogues={"train": 30}, sessions=1), "train")
    assert "knowledge-update" not in {e.category for e in one_session}


def test_vocabulary_lists_are_disjoint():
    check_vocabulary()


def test_bad_settings_are_clear_errors():
    with pytest.raises(DataError, match="unknown synthetic settings"):
        load_split("synthetic", "train", options={"sesions": 3})
    with pytest.raises(DataError, match="sessions must be >= 1"):
        load_split("synthetic", "train", options={"sessions": 0})
    with pytest.raises(DataError, match="no dialogue count for split 'dev'"):
        load_split("synthetic", "dev", options={})


def test_relations_and_max_values_give_a_closed_answer_set():
    from pipeline.data import synthetic_vocab as vocab

    cfg = SyntheticConfig(
        seed=2,
        dialogues={"train": 40},
        sessions=1,
        facts_per_dialogue=1,
        distractor_facts=0,
        distractor_turns=0,
        ack_prob=0.0,
        category_weights={"single-hop": 1},
        relations=["city"],
        max_values=8,
    )
    exs = generate_split(cfg, "train")
    assert len(exs) == 40
    assert {e.metadata["relation"] for e in exs} == {"city"}
    assert {e.answers[0] for e in exs} <= set(vocab.CITIES[:8])
    with pytest.raises(DataError, match="relations must be"):
        load_split("synthetic", "train", options={"relations": ["planet"]})
    with pytest.raises(DataError, match="max_values must be"):
        load_split("synthetic", "train", options={"facts_per_dialogue": 4, "max_values": 5})

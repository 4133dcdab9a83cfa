"""LoCoMo task: the official prompt, its truncation, decoding and the upstream scorer (also on the full
locomo10.json when the shared copy is present)."""

from __future__ import annotations

import pytest

from pipeline.data import load_split
from pipeline.data.schema import Example, Segment
from pipeline.eval.metrics.text import locomo_abstains
from pipeline.eval.tasks import get_task
from pipeline.eval.tasks.locomo import CONV_START, NO_INFORMATION, TEMPORAL_HINT, LoCoMoTask
from tests.pipeline.conftest import shared_file

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}


def _segments() -> list[Segment]:
    turns = [
        ("Session 1", "1:56 pm on 8 May, 2023", "Caroline", "D1:1", "I went to a support group yesterday."),
        ("Session 1", "1:56 pm on 8 May, 2023", "Melanie", "D1:2", "That sounds great!"),
        ("Session 2", "1:14 pm on 25 May, 2023", "Caroline", "D2:1", "I ran a charity race for mental health."),
        ("Session 2", "1:14 pm on 25 May, 2023", "Melanie", "D2:2", "Wow, proud of you."),
    ]
    return [Segment(text=t, speaker=s, session=n, timestamp=d, segment_id=i) for n, d, s, i, t in turns]


def _example(category: int = 4, answer: str = "a support group", **meta) -> Example:
    metadata = {"conversation_id": "conv-x", "question_index": 7, "locomo_category": category}
    metadata["speakers"] = ["Caroline", "Melanie"]
    metadata.update(meta)
    return Example(
        example_id=f"locomo-conv-x-q{category:04d}",
        task="locomo",
        question="What did Caroline attend?",
        answers=[answer],
        segments=_segments(),
        category=CATEGORIES[category],
        metadata=metadata,
    )


def test_official_prompt_has_dates_and_said_lines():
    task = get_task("locomo")
    messages = task.context_messages(_example())
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert user.startswith(CONV_START.format(a="Caroline", b="Melanie"))
    assert "DATE: 1:56 pm on 8 May, 2023\nCONVERSATION:\n" in user
    assert "DATE: 1:14 pm on 25 May, 2023\nCONVERSATION:\n" in user
    assert user.count('said, "') == 4
    assert 'Caroline said, "I went to a support group yesterday."' in user
    # chronological, and the question comes last
    assert user.index("8 May") < user.index("25 May") < user.index("Question: What did Caroline attend?")
    assert user.rstrip().endswith("Question: What did Caroline attend?")
    assert "Based on the above conversations, write a short answer" in user


def test_context_is_left_truncatable():
    task = get_task("locomo")
    ex = _example()
    full = task.render_context(ex)
    budget = len(full) - 1  # one character too many: the oldest turn must go

    def count(text: str) -> int:
        return len(text)

    fitted = task.fit_context(ex, budget, count)
    assert len(fitted) <= budget
    assert fitted.startswith(CONV_START.format(a="Caroline", b="Melanie"))
    assert "support group" not in fitted  # the oldest turn dropped
    assert 'Melanie said, "Wow, proud of you."' in fitted  # the newest kept
    assert "DATE: 1:56 pm on 8 May, 2023" in fitted  # its session header kept with the surviving turn
    # only the last session fits: the header of the first session disappears with its turns
    last_session = task.render_context(ex, ex.segments[2:])
    assert task.fit_context(ex, len(last_session), count) == last_session
    assert "8 May" not in last_session
    assert task.fit_context(ex, 5, count) == ""
    # the truncated text drops into the same prompt
    assert task.context_messages(ex, fitted)[1]["content"].startswith(fitted)


def test_temporal_hint_only_for_category_2():
    task = get_task("locomo")
    for number in CATEGORIES:
        ex = _example(category=number, adversarial_answer="a yoga class")
        for messages in (task.question_messages(ex), task.context_messages(ex)):
            assert (TEMPORAL_HINT.strip() in messages[-1]["content"]) == (number == 2)


def test_adversarial_question_is_a_choice_and_mapped_back():
    task = LoCoMoTask()
    ex = _example(category=5, answer="Not mentioned in the conversation", adversarial_answer="a yoga class")
    a, b = task.adversarial_options(ex)
    assert {a, b} == {NO_INFORMATION, "a yoga class"}
    content = task.question_messages(ex)[-1]["content"]
    assert f"(a) {a} (b) {b}. Select the correct answer by writing (a) or (b)." in content
    right = "(a)" if a == NO_INFORMATION else "(b)"
    wrong = "(b)" if right == "(a)" else "(a)"
    for scoring in ("official", "delta-mem"):
        assert task.score(ex, right, scoring)["f1"] == 1.0
        assert task.score(ex, f"The answer is {wrong}.", scoring)["f1"] == 0.0
    # a reply naming neither option: option (b) upstream, the text itself in the paper's code
    neither = "This is not mentioned in the conversation."
    assert task.score(ex, neither)["f1"] == float(b == NO_INFORMATION)
    assert task.score(ex, neither, "delta-mem")["f1"] == 1.0
    assert task.score(ex, "a yoga class")["f1"] == float(b == NO_INFORMATION)
    assert task.score(ex, "a yoga class", "delta-mem")["f1"] == 0.0
    assert task.score(ex, "", "delta-mem")["f1"] == 0.0
    # plain variant: no options in the question
    plain = LoCoMoTask(adversarial_choices=False)
    assert "(a)" not in plain.question_messages(ex)[-1]["content"]


def test_scores_per_category():
    task = get_task("locomo")
    # multi-hop: sub-answers
    ex1 = _example(category=1, answer="Paris, London")
    assert task.score(ex1, "London, Paris")["f1"] == 1.0
    assert task.score(ex1, "London")["f1"] == pytest.approx(0.5)
    # open-domain: gold cut at ";"
    ex3 = _example(category=3, answer="likely yes; she loves it")
    assert task.score(ex3, "Likely yes")["f1"] == 1.0
    # only the first line of the generation counts, "answer:" deleted (anywhere, as upstream)
    ex4 = _example(category=4)
    assert task.score(ex4, "Answer: a support group\nShe told Melanie about it.")["f1"] == 1.0
    assert task.score(ex4, "a support group (answer: yes)")["f1"] == pytest.approx(0.8)  # "( yes)" stays
    assert task.score(ex4, "support group for three people")["f1"] == 0.571  # rounded to 3 decimals
    assert task.score(ex4, "support group for three people", "delta-mem")["f1"] == 0.5714  # to 4
    assert task.score(ex4, "")["f1"] == 0.0


def test_aggregate_excludes_adversarial_from_headline():
    task = get_task("locomo")
    rows = [
        task.score_row(_example(category=4), "a support group"),  # 1
        task.score_row(_example(category=2, answer="8 May 2023"), "yesterday"),  # 0
        task.score_row(_example(category=5, answer="Not mentioned", adversarial_answer="x"), _choose_abstain()),  # 1
    ]
    agg = task.aggregate(rows)
    assert agg["f1"] == pytest.approx(0.5)
    assert agg["n"] == 2
    assert agg["f1/category/adversarial"] == 1.0
    assert agg["f1/category/temporal"] == 0.0
    assert agg["f1_all"] == pytest.approx(2 / 3)
    assert agg["n_all"] == 3
    # (example, scores) pairs are accepted too
    ex = _example(category=4)
    assert task.aggregate([(ex, task.score(ex, "a support group"))])["f1"] == 1.0


def _choose_abstain() -> str:
    a, _ = LoCoMoTask().adversarial_options(_example(category=5, answer="Not mentioned", adversarial_answer="x"))
    return "(a)" if a == NO_INFORMATION else "(b)"


def test_decoding_greedy_default_and_paper_sampling():
    task = get_task("locomo")
    ex = _example()
    greedy = task.decoding(ex)
    assert greedy.generate_kwargs() == {"max_new_tokens": 50, "do_sample": False}
    paper = task.decoding(ex, mode="paper")
    assert paper.generate_kwargs() == {
        "max_new_tokens": 50,
        "do_sample": True,
        "temperature": 0.4,
        "top_p": 0.9,
        "top_k": 10,
    }
    assert paper.seed == 42 + 7  # question_index
    assert task.decoding(ex, mode="paper", index=100).seed == 142
    with pytest.raises(ValueError, match="unknown decoding mode"):
        task.decoding(ex, mode="beam")  # type: ignore[arg-type]


def test_history_messages_one_per_turn_with_session_headers():
    msgs = get_task("locomo").history_messages(_example())
    assert msgs[0]["role"] == "system"
    turns = msgs[1:]
    assert len(turns) == 4
    assert (
        turns[0]["content"]
        == '[Session 1 | 1:56 pm on 8 May, 2023]\nCaroline said, "I went to a support group yesterday."'
    )
    assert turns[1]["content"] == 'Melanie said, "That sounds great!"'
    assert turns[2]["content"].startswith("[Session 2 | 1:14 pm on 25 May, 2023]\n")


# --- the real data set -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locomo_examples():
    path = shared_file("locomo/locomo10.json")
    examples, _ = load_split("locomo", "test", source=str(path))
    return examples


def test_full_locomo_gold_scores_one_and_empty_zero(locomo_examples):
    task = get_task("locomo")
    assert len(locomo_examples) == 1986
    for scoring in ("official", "delta-mem"):
        rows = [task.score_row(e, e.answers[0], scoring) for e in locomo_examples]
        gold = task.aggregate(rows)
        assert gold["n"] == 1540  # categories 1-4
        assert gold["n/category/adversarial"] == 446
        # the gold as the reply scores 1, except where the cleanup eats part of it: one multi-hop gold,
        # "Warrior II, Dancer Pose (Natarajasana), Tree pose" ("a)" is deleted from "Natarajasana)")
        below = [
            e.metadata.get("raw_answer")
            for e, r in zip(locomo_examples, rows, strict=True)
            if r["scores"]["f1"] < 1 and e.category != "adversarial"
        ]
        assert below == ["Warrior II, Dancer Pose (Natarajasana), Tree pose"]
        for name in ("temporal", "open-domain", "single-hop"):
            assert gold[f"f1/category/{name}"] == 1.0
        empty = task.aggregate(task.score_row(e, "", scoring) for e in locomo_examples)
        assert empty["f1"] == 0.0
    # category 5 with the abstention text as the reply: the paper's code keeps it (1), upstream maps a
    # reply naming neither option to option (b), right only where (b) is the abstention
    adversarial = [e for e in locomo_examples if e.category == "adversarial"]
    paper = [task.score(e, e.answers[0], "delta-mem")["f1"] for e in adversarial]
    official = [task.score(e, e.answers[0])["f1"] for e in adversarial]
    assert paper == [1.0] * len(adversarial)
    assert official == [locomo_abstains(task.adversarial_options(e)[1]) for e in adversarial]
    assert 0 < sum(official) < len(adversarial)


def test_full_locomo_prompt_lists_every_session(locomo_examples):
    task = get_task("locomo")
    ex = locomo_examples[0]
    text = task.context_messages(ex)[1]["content"]
    dates = {s.timestamp for s in ex.segments}
    assert all(f"DATE: {d}\nCONVERSATION:\n" in text for d in dates)
    assert text.count(' said, "') >= len(ex.segments)
    hinted = [e for e in locomo_examples if TEMPORAL_HINT.strip() in task.question_messages(e)[-1]["content"]]
    assert hinted and all(e.category == "temporal" for e in hinted)
    assert len(hinted) == sum(e.category == "temporal" for e in locomo_examples)


def test_fit_context_with_the_embedded_tokenizer(locomo_examples, smol_tokenizer):
    task = get_task("locomo")
    ex = locomo_examples[0]

    def count(text: str) -> int:
        return len(smol_tokenizer(text, add_special_tokens=False)["input_ids"])

    fitted = task.fit_context(ex, 2048, count)
    assert 1800 < count(fitted) <= 2048  # close to the budget: only whole turns are dropped
    assert fitted.startswith(CONV_START.format(a=ex.metadata["speakers"][0], b=ex.metadata["speakers"][1]))
    assert fitted.endswith(f'{ex.segments[-1].speaker} said, "{ex.segments[-1].text}"')  # newest turn kept
    assert f"DATE: {ex.segments[-1].timestamp}" in fitted

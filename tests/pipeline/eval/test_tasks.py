"""The other tasks: prompts, decoding settings and metrics of synthetic, HotpotQA, Qasper,
MemoryAgentBench and GPQA; the registry; context fitting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data import load_split
from pipeline.data.schema import Example, Segment
from pipeline.data.tokenize import read_messages, write_messages
from pipeline.eval.tasks import TASKS, Decoding, Task, get_task, parse_choice
from pipeline.eval.tasks.memoryagentbench import clip_middle, family_of, recall_at_k, recommended_titles


def test_registry_covers_every_benchmark():
    assert set(TASKS) == {"synthetic", "locomo", "hotpotqa", "qasper", "memoryagentbench", "ifeval", "gpqa"}
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name and task.headline
    with pytest.raises(KeyError, match="known tasks"):
        get_task("mmlu")


def test_decoding_kwargs():
    assert Decoding(max_new_tokens=8).generate_kwargs() == {"max_new_tokens": 8, "do_sample": False}
    assert Decoding(max_new_tokens=8).to_dict()["seed"] is None
    for task in TASKS.values():
        d = task.decoding(None)
        assert not d.do_sample and d.max_new_tokens > 0
        assert task.decoding(None, mode="paper").do_sample == (task.name == "locomo")


# --- synthetic ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_examples():
    examples, _ = load_split("synthetic", "test", options={"dialogues": {"train": 2, "test": 3}, "seed": 1})
    return examples


def test_synthetic_prompts_are_the_training_ones(synthetic_examples):
    task = get_task("synthetic")
    ex = synthetic_examples[0]
    assert task.question_messages(ex) == read_messages(ex)
    assert task.history_messages(ex) == write_messages(ex.segments)
    messages = task.context_messages(ex)
    assert messages[-1]["content"].endswith(ex.question)
    assert ex.segments[0].text in messages[-1]["content"]
    assert "[Session 1 |" in task.render_context(ex)


def test_synthetic_metrics(synthetic_examples):
    task = get_task("synthetic")
    gold = task.aggregate(task.score_row(e, e.answers[0]) for e in synthetic_examples)
    assert gold["em"] == gold["f1"] == gold["contains"] == 1.0
    ex = Example(example_id="s", task="synthetic", question="Which city does Maja live in?", answers=["Oslo"])
    assert task.score(ex, "Oslo.") == {"em": 1.0, "f1": 1.0, "contains": 1.0}
    verbose = task.score(ex, "I think Maja lives in Oslo")
    assert verbose["em"] == 0.0 and verbose["contains"] == 1.0
    assert verbose["f1"] == pytest.approx(2 / 7)  # 1 of 6 predicted tokens, the only gold token
    assert task.score(ex, "Bergen\nor Oslo")["em"] == 0.0  # em reads the first line, contains all
    assert task.score(ex, "") == {"em": 0.0, "f1": 0.0, "contains": 0.0}


# --- HotpotQA / Qasper ------------------------------------------------------------------------------------


def _hotpot(answer: str = "yes", qtype: str = "comparison") -> Example:
    return Example(
        example_id="hotpotqa-1",
        task="hotpotqa",
        question="Are Oslo and Bergen both in Norway?",
        answers=[answer],
        segments=[
            Segment(text="Oslo is the capital of Norway.", session="Oslo", segment_id="Oslo"),
            Segment(text="Bergen is a city in Norway.", session="Bergen", segment_id="Bergen"),
        ],
        category=qtype,
        metadata={"level": "hard"},
    )


def test_hotpot_prompt_and_first_line_scoring():
    task = get_task("hotpotqa")
    ex = _hotpot()
    (msg,) = task.context_messages(ex)
    assert msg["content"].startswith("Answer the question using only the passages below. Reply with a short span")
    assert "Oslo: Oslo is the capital of Norway.\nBergen: Bergen is a city in Norway." in msg["content"]
    assert msg["content"].endswith("Question: Are Oslo and Bergen both in Norway?\nAnswer:")
    assert "passages" not in task.question_messages(ex)[0]["content"]
    assert task.history_messages(ex)[1]["content"] == "[Oslo]\nOslo is the capital of Norway."
    assert task.decoding(ex).max_new_tokens == 32
    assert task.score(ex, "Yes.\nBoth are Norwegian cities.")["em"] == 1.0
    assert task.score(ex, "Yes, both are.")["f1"] == 0.0  # yes/no rule
    span = task.score(_hotpot("the Eiffel Tower", "bridge"), "Eiffel Tower in Paris")
    assert span["em"] == 0.0 and span["f1"] == pytest.approx(2 / 3)
    assert span["precision"] == 0.5 and span["recall"] == 1.0
    # HotpotQA's scorer knows no "Answer:" label: it is a token like any other (official)
    labelled = task.score(_hotpot("the Eiffel Tower", "bridge"), "Answer: Eiffel Tower")
    assert labelled["em"] == 0.0 and labelled["f1"] == pytest.approx(0.8)
    rows = [task.score_row(_hotpot(), "yes"), task.score_row(_hotpot("Paris", "bridge"), "")]
    agg = task.aggregate(rows)
    assert agg["em"] == 0.5 and agg["f1/category/comparison"] == 1.0 and agg["f1/category/bridge"] == 0.0
    assert agg["f1/level/hard"] == 0.5


def test_qasper_answer_f1_over_references():
    task = get_task("qasper")
    ex = Example(
        example_id="qasper-q1",
        task="qasper",
        question="Which datasets do they use?",
        answers=["SQuAD, TriviaQA", "Unanswerable"],
        segments=[
            Segment(text="A paper.", session="Title"),
            Segment(text="We use SQuAD.", session="Experiments"),
            Segment(text="And TriviaQA.", session="Experiments"),
        ],
        category="extractive",
    )
    ctx = task.render_context(ex)
    assert ctx == "## Title\nA paper.\n## Experiments\nWe use SQuAD.\nAnd TriviaQA."
    assert task.score(ex, "SQuAD and TriviaQA")["f1"] == pytest.approx(0.8)  # P 2/3, R 1
    assert task.score(ex, "Unanswerable")["f1"] == 1.0
    assert task.score(ex, "")["f1"] == 0.0


# --- MemoryAgentBench ---------------------------------------------------------------------------------------


def _mab(source: str, answers: list[str], competency: str = "accurate_retrieval") -> Example:
    return Example(
        example_id=f"mab-{source}",
        task="memoryagentbench",
        question="What is the special magic number?",
        answers=answers,
        segments=[Segment(text="chunk one", segment_id="chunk0"), Segment(text="chunk two", segment_id="chunk1")],
        category=competency,
        metadata={"source": source, "conversation_id": f"{source}-0"},
    )


def test_mab_sources_budgets_and_prompt():
    task = get_task("memoryagentbench")
    assert family_of("ruler_qa1_197K")[1:] == ("ruler_qa", "subem", 50)
    assert family_of("factconsolidation_mh_262k")[3] == 10
    assert family_of("icl_banking77_5900shot_balance")[3] == 20
    assert family_of("recsys_redial_full")[3] == 300
    assert family_of("infbench_sum_eng_shots2")[3] == 1200
    assert family_of("something_new")[1] == "other"
    assert task.decoding(_mab("infbench_sum_eng_shots2", ["x"])).max_new_tokens == 1200
    (msg,) = task.context_messages(_mab("ruler_qa1_197K", ["x"]))
    assert msg["content"].startswith("Use only the memory context below to answer the question.")
    assert "reply exactly: I don't know." in msg["content"]
    assert "chunk one\nchunk two" in msg["content"]


def test_clip_middle_keeps_first_third_and_last_two_thirds():
    text = "a" * 50 + "b" * 100 + "c" * 100
    clipped = clip_middle(text, 150)
    assert clipped == "a" * 50 + "c" * 100
    assert clip_middle("short", 150) == "short"


def test_mab_metrics_per_family():
    task = get_task("memoryagentbench")
    qa = task.score(_mab("ruler_qa1_197K", ["Oslo", "the Norwegian capital"]), "I believe it is Oslo.")
    assert qa["score"] == qa["subem"] == 1.0 and qa["em"] == 0.0
    assert task.score(_mab("ruler_qa1_197K", ["Oslo"]), "Answer: Oslo\nbecause...")["em"] == 1.0  # parsed
    assert task.score(_mab("factconsolidation_sh_6k", ["Paris"]), "I don't know.")["score"] == 0.0
    # ICL: exact match of the text after the default "Answer:" prefix (README: "label: 43" is wrong)
    assert task.score(_mab("icl_trec_coarse_6600shot_balance", ["3"]), "3")["score"] == 1.0
    assert task.score(_mab("icl_trec_coarse_6600shot_balance", ["3"]), "Answer: 3")["score"] == 1.0
    assert task.score(_mab("icl_trec_coarse_6600shot_balance", ["3"]), "label: 3")["score"] == 0.0
    summary = task.score(_mab("infbench_sum_eng_shots2", ["the cat sat on the mat"]), "a cat sat")
    assert summary["score"] == summary["f1"] == pytest.approx(2 * (2 / 2) * (2 / 4) / (1 + 2 / 4))
    niah = task.score(_mab("ruler_niah_mq", ["1234", "5678"]), "The numbers are 1234 and 999.")
    assert niah["score"] == 0.5
    rec = task.score(  # title golds (upstream's are ids): our title matching
        _mab("recsys_redial_full", ["Inception (2010)", "Heat"], "test_time_learning"), "1. Inception\n2. Up"
    )
    assert rec == {"score": 0.5, "recall@5": 0.5}
    assert task.score(_mab("ruler_qa1_197K", ["Oslo"]), "")["score"] == 0.0


def test_mab_aggregate_is_sample_weighted_with_breakdowns():
    task = get_task("memoryagentbench")
    rows = [
        task.score_row(_mab("ruler_qa1_197K", ["Oslo"]), "Oslo"),
        task.score_row(_mab("ruler_qa1_197K", ["Oslo"]), "Bergen"),
        task.score_row(_mab("ruler_qa1_197K", ["Oslo"]), "Oslo"),
        task.score_row(_mab("factconsolidation_sh_6k", ["Paris"], "conflict_resolution"), "Paris"),
    ]
    agg = task.aggregate(rows)
    assert agg["score"] == pytest.approx(3 / 4)  # not the mean of the source means (5/6)
    assert agg["score/source/ruler_qa1_197K"] == pytest.approx(2 / 3)
    assert agg["score/family/factconsolidation"] == 1.0
    assert agg["score/category/conflict_resolution"] == 1.0
    assert agg["n/source/ruler_qa1_197K"] == 3


def test_recommendation_list_parsing():
    assert recommended_titles("1. The Matrix (1999)\n2) Heat\n- Up: a film about a house") == ["matrix", "heat", "up"]
    assert recommended_titles("Heat, Up; Alien") == ["heat", "up", "alien"]
    assert recommended_titles("") == []
    assert recall_at_k("Alien, Brazil, Cars, Dune, Elf, Fargo", ["Fargo"]) == 0.0  # only the first five count
    assert recall_at_k("Alien, Brazil, Cars, Dune, Elf, Fargo", ["Elf"]) == 1.0
    assert recall_at_k("anything", []) == 0.0


# --- GPQA -----------------------------------------------------------------------------------------------------


def _gpqa() -> Example:
    return Example(
        example_id="gpqa-rec1",
        task="gpqa",
        question="Which particle is a lepton?",
        answers=["C"],
        choices=["Proton", "Neutron", "Electron", "Pion"],
        category="Physics",
    )


def test_gpqa_prompt_lists_four_lettered_choices():
    task = get_task("gpqa")
    (msg,) = task.question_messages(_gpqa())
    content = msg["content"]
    lines = [ln for ln in content.splitlines() if ln[:3] in {"A) ", "B) ", "C) ", "D) "}]
    assert lines == ["A) Proton", "B) Neutron", "C) Electron", "D) Pion"]
    assert '{"answer": "C"}' in content
    assert task.context_messages(_gpqa()) == task.question_messages(_gpqa())
    assert task.history_messages(_gpqa()) == []
    assert task.decoding(_gpqa()).max_new_tokens == 8192


@pytest.mark.parametrize(
    ("text", "paper", "official"),
    [
        # the cases: the paper's extract_gpqa_letter (made for this JSON prompt) ...
        ("B and C", None, None),
        ("A) foo\nB) bar\nThe answer is B", "A", None),
        ("b", "B", None),
        ("{'answer': '(c)'}", None, None),
        # ... and more
        ('Reasoning...\n{"answer": "C"}', "C", None),
        ('{"answer": "c"}', "C", None),
        ('```json\n{"answer": "D"}\n```', "D", None),
        ('{"answer": "A"} then {"answer": "D"}', "D", None),  # the last match
        ("Answer: B", "B", None),
        ("Final answer: **D**", "D", None),
        ("The final answer is C", "C", None),
        ("The answer is (C).", None, "C"),
        ("The correct answer is (B)", None, "B"),
        ("\\boxed{A}", "A", None),
        ("\\boxed{\\text{B}}", "B", None),
        ("Hmm.\nC\n", "C", None),
        ("(D)\nbecause ...", "D", "D"),
        ("It must be (D) since ...", None, "D"),
        ("(1) is false, (B) holds", None, None),  # official: "(1)" is the first "(X)", not a letter
        ("Answer: (b)", None, None),  # official is case-sensitive
        ("A lepton is light, so C", None, None),
        ("", None, None),
        ("No idea.", None, None),
    ],
)
def test_gpqa_letter_parsers(text, paper, official):
    assert parse_choice(text, "delta-mem") == paper
    assert parse_choice(text, "official") == official
    assert parse_choice(text) == official


def test_gpqa_accuracy():
    task = get_task("gpqa")
    assert task.score(_gpqa(), '{"answer": "C"}', "delta-mem") == {"accuracy": 1.0, "answered": 1.0}
    assert task.score(_gpqa(), '{"answer": "C"}') == {"accuracy": 0.0, "answered": 0.0}  # official
    assert task.score(_gpqa(), "The correct answer is (C)") == {"accuracy": 1.0, "answered": 1.0}
    assert task.score(_gpqa(), "Answer: A", "delta-mem") == {"accuracy": 0.0, "answered": 1.0}
    assert task.score(_gpqa(), "", "delta-mem") == {"accuracy": 0.0, "answered": 0.0}
    rows = [task.score_row(_gpqa(), "C", "delta-mem"), task.score_row(_gpqa(), "B", "delta-mem")]
    assert rows[0]["details"] == {"parsed": "C"} and rows[0]["scoring"] == "delta-mem"
    assert task.aggregate(rows)["accuracy/category/Physics"] == 0.5


# --- context fitting ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=30), max_size=12),
    budget=st.integers(min_value=-1, max_value=200),
)
def test_fit_context_keeps_the_longest_fitting_suffix(lengths, budget):
    task = get_task("memoryagentbench")  # render = chunks joined by newlines
    segs = [Segment(text="x" * n) for n in lengths]
    ex = Example(example_id="e", task="memoryagentbench", question="q", answers=["a"], segments=segs)
    fitted = task.fit_context(ex, budget, len)
    assert len(fitted) <= max(budget, 0)
    suffixes = [task.render_context(ex, segs[k:]) for k in range(len(segs))]
    fitting = [s for s in suffixes if len(s) <= budget]
    # the longest fitting suffix is the one with the fewest dropped segments
    assert fitted == (fitting[0] if fitting and budget > 0 else "")

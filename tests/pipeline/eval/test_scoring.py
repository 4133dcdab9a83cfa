"""The scoring protocols, one rule at a time: ``official`` (each benchmark's own code, cleanup
included) and ``delta-mem`` (the δ-mem paper's evaluation code). Each case states what the upstream
code does with that input (re-derived from snap-research/LoCoMo, HUST-AI-HYZ/MemoryAgentBench,
idavidrein/gpqa, hotpot_evaluate_v1.py and declare-lab/delta-Mem); see docs/EVALUATION.md."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.data.schema import Example
from pipeline.eval.metrics import paper
from pipeline.eval.metrics.recsys import (
    MovieCatalog,
    clean_item,
    clean_movie_name,
    levenshtein,
    recommendation_items,
    recsys_recall,
)
from pipeline.eval.metrics.text import locomo_f1, locomo_multi_f1, normalize_locomo
from pipeline.eval.tasks import SCORINGS, check_scoring, get_task, rescore_rows, scoring_id
from pipeline.eval.tasks.locomo import NO_INFORMATION, LoCoMoTask

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}


def test_protocol_names_are_checked():
    assert SCORINGS == ("official", "delta-mem")
    assert check_scoring("delta-mem") == "delta-mem"
    with pytest.raises(ValueError, match="unknown scoring 'paper'; known: official, delta-mem"):
        check_scoring("paper")
    with pytest.raises(ValueError, match="unknown scoring"):
        get_task("hotpotqa").score_row(_hotpot("x"), "x", "offical")
    assert scoring_id("official").startswith("official/v")


# --- LoCoMo ---------------------------------------------------------------------------------------------------


def _locomo(category: int = 4, answer: object = "a support group", **meta: object) -> Example:
    metadata: dict[str, object] = {"conversation_id": "conv-1", "question_index": 3, "locomo_category": category}
    if category != 5:
        metadata["raw_answer"] = str(answer)
    metadata.update(meta)
    gold = str(answer).split(";")[0].strip() if category == 3 else str(answer).strip()
    return Example(
        example_id=f"locomo-conv-1-q{category:04d}",
        task="locomo",
        question="What did Caroline attend?",
        answers=["Not mentioned in the conversation" if category == 5 else gold],
        category=CATEGORIES[category],
        metadata=metadata,
    )


def _f1(example: Example, reply: str, scoring: str = "official") -> float:
    return get_task("locomo").score(example, reply, scoring)["f1"]


def test_locomo_first_line_is_split_on_newline_only_officially():
    ex = _locomo()
    # upstream: answer.split('\n')[0] — "\r" and "\u2028" do not end the line
    assert _f1(ex, "a support group\rand a yoga class") == pytest.approx(0.667)
    assert _f1(ex, "a support group\u2028and a yoga class") == pytest.approx(0.667)
    assert _f1(ex, "a support group\nand a yoga class") == 1.0
    # the paper's code takes the first non-blank line of str.splitlines()
    assert _f1(ex, "a support group\rand a yoga class", "delta-mem") == 1.0
    assert _f1(ex, "a support group\u2028and a yoga class", "delta-mem") == 1.0
    # a leading blank line: stripped away first by both
    assert _f1(ex, "\n\n  a support group\nmore") == 1.0
    assert _f1(ex, "\n\n  a support group\nmore", "delta-mem") == 1.0


def test_locomo_cleanup_deletes_option_labels_and_answer_anywhere():
    task = get_task("locomo")
    ex = _locomo()
    assert task.postprocess(ex, "Answer: (a) A Support Group") == "a support group"
    assert task.postprocess(ex, "the group (b) of friends, answer: yes") == "the group  of friends,  yes"
    # "a)"/"b)" go even inside words, as upstream's str.replace
    assert task.postprocess(ex, "Samantha) and Bob)") == "samanth and bo"
    assert task.postprocess(ex, 'He said \\"hi\\"') == "he said 'hi'"
    for scoring in SCORINGS:
        assert task.postprocess(ex, "ANSWER: yes", scoring) == "yes"


def test_locomo_category5_mapping_per_protocol():
    task = LoCoMoTask()
    ex = _locomo(5, adversarial_answer="a yoga class")
    a, b = task.adversarial_options(ex)
    assert {a, b} == {NO_INFORMATION, "a yoga class"}
    # official: "(a)" anywhere → (a); anything else → (b)
    assert task.postprocess(ex, "I pick (A) here") == a
    assert task.postprocess(ex, "a") == b
    assert task.postprocess(ex, "I do not know") == b
    # the paper: "(a)", "a" or a leading "a)" → (a); the same for (b); the abstention text kept
    assert task.postprocess(ex, "a", "delta-mem") == a
    assert task.postprocess(ex, "b) because", "delta-mem") == b
    assert task.postprocess(ex, "It is not mentioned.", "delta-mem") == NO_INFORMATION
    assert task.postprocess(ex, "I do not know", "delta-mem") == "i do not know"
    assert _f1(ex, "I do not know", "delta-mem") == 0.0
    assert _f1(ex, "I do not know") == float(b == NO_INFORMATION)


def test_locomo_category5_distractor_is_read_from_answer_first():
    # upstream (hf_llm_utils.py and the paper's locomo_protocol.py): qa["answer"] if present, else
    # qa["adversarial_answer"]; the reader keeps a category-5 "answer" as raw_answer
    both = _locomo(5, adversarial_answer="a yoga class", raw_answer="a pottery class")
    assert "a pottery class" in LoCoMoTask().adversarial_options(both)
    only = _locomo(5, adversarial_answer="a yoga class")
    assert "a yoga class" in LoCoMoTask().adversarial_options(only)


def test_locomo_gold_is_the_records_answer():
    # the scorer reads str(qa["answer"]), category 3 cut at the first ";", not the prepared gold
    ex = _locomo(2, answer=2022)
    assert _f1(ex, "2022") == 1.0
    ex3 = _locomo(3, answer="likely yes; she loves it")
    assert _f1(ex3, "Likely yes") == 1.0
    assert _f1(ex3, "she loves it") == 0.0


@pytest.mark.parametrize(
    ("text", "official", "paper"),
    [
        ("the cat", "cat", "cat"),
        ("The Cat, and the Dog", "cat dog", "cat dog"),
        # combining acute accent: a word character for `regex`, so "the" is not a whole word
        ("the\u0301 cat", "the\u0301 cat", "the\u0301 cat"),
        # superscript two: not a word character for `regex`, so "the" is one
        ("the\u00b2 cat", "\u00b2 cat", "\u00b2 cat"),
        # zero-width joiner: a word character for `regex`
        ("the\u200d cat", "the\u200d cat", "the\u200d cat"),
        # NFD: only the paper's copy decomposes "é"
        ("caf\u00e9", "caf\u00e9", "cafe\u0301"),
    ],
)
def test_locomo_normalisation_word_boundaries(text, official, paper):
    assert normalize_locomo(text) == official
    assert normalize_locomo(text, nfd=True) == paper


def test_locomo_f1_tokens_differ_around_marks():
    # `re` would drop "the" before a combining mark; LoCoMo's `regex` keeps it as part of a token
    assert locomo_f1("the\u0301 cat", "cat") == pytest.approx(2 / 3)
    assert locomo_f1("the\u00b2 cat", "\u00b2 cat") == 1.0


def test_locomo_multi_hop_empty_parts():
    # upstream keeps empty comma parts: gold "Paris," has parts ["Paris", ""], the empty one scores 0
    assert locomo_multi_f1("Paris", "Paris,") == 0.5
    assert locomo_multi_f1("Paris", "Paris,", paper=True) == 1.0
    assert locomo_multi_f1(", Paris", "Paris, London") == 0.5
    assert locomo_multi_f1("", "Paris", paper=True) == 0.0
    ex = _locomo(1, answer="Paris, London, Rome")
    assert _f1(ex, "Paris, Rome") == 0.667  # mean of 1, 0, 1 rounded to 3 decimals
    assert _f1(ex, "Paris, Rome", "delta-mem") == 0.6667


# --- HotpotQA ---------------------------------------------------------------------------------------------------


def _hotpot(answer: str) -> Example:
    return Example(example_id="h", task="hotpotqa", question="q", answers=[answer], category="bridge")


@pytest.mark.parametrize(
    ("reply", "gold", "official", "paper"),
    [
        ("yes", "yes", (1.0, 1.0), (1.0, 1.0)),
        ("yes indeed", "yes", (0.0, 0.0), (0.0, 0.6667)),  # the yes/no rule is HotpotQA's only
        ("no way", "no", (0.0, 0.0), (0.0, 0.6667)),
        ("U.S. Army", "US Army", (1.0, 1.0), (0.0, 0.4)),  # punctuation deleted vs replaced by spaces
        ("the-end", "end", (0.0, 0.0), (1.0, 1.0)),  # articles before punctuation in the paper's copy
        ("", "", (1.0, 0.0), (1.0, 1.0)),  # two empty answers are equal only for the paper's F1
        ("Answer: Paris", "Paris", (0.0, 0.6667), (0.0, 0.6667)),
        ("Paris\rFrance", "Paris", (0.0, 0.6667), (1.0, 1.0)),  # first line: "\n" vs splitlines
    ],
)
def test_hotpot_rules(reply, gold, official, paper):
    task = get_task("hotpotqa")
    o = task.score(_hotpot(gold), reply)
    d = task.score(_hotpot(gold), reply, "delta-mem")
    assert (o["em"], round(o["f1"], 4)) == official
    assert (d["em"], d["f1"]) == paper


def test_paper_span_helpers():
    assert paper.normalize_span("The U.S.-led (2003) war!") == "u s led 2003 war"
    assert paper.first_line("\n  \nfirst\nsecond") == "first"
    assert paper.first_line("   ") == ""
    assert paper.answer_aliases([" Oslo ", "oslo", "", "  ", "The Oslo", "!!", 42]) == ["Oslo", "42"]
    assert paper.alias_correct("I think it is Oslo", ["Oslo"]) == 1.0
    assert paper.alias_correct("Osloville", ["Oslo"]) == 1.0  # substring, not on word boundaries
    assert paper.alias_correct("", ["Oslo"]) == 0.0
    assert paper.alias_correct("anything", []) == 0.0
    assert paper.alias_max_f1("Oslo\nNorway's capital", ["Oslo"]) == 1.0  # the first line counts too


# --- MemoryAgentBench -----------------------------------------------------------------------------------------


def _mab(source: str, answers: list[str]) -> Example:
    return Example(
        example_id=f"mab-{source}",
        task="memoryagentbench",
        question="q",
        answers=answers,
        category="accurate_retrieval",
        metadata={"source": source},
    )


def _mab_score(source: str, answers: list[str], reply: str, scoring: str = "official", data_dir=None) -> dict:
    return get_task("memoryagentbench").score(_mab(source, answers), reply, scoring, data_dir)


def test_mab_f1_has_the_yes_no_rule_officially():
    s = _mab_score("infbench_sum_eng_shots2", ["yes"], "yes it is")
    assert s["f1"] == 0.0 and s["score"] == 0.0
    assert _mab_score("infbench_sum_eng_shots2", ["yes"], "yes it is", "delta-mem")["score"] == 0.5


def test_mab_empty_normalised_gold_is_found_in_any_reply_officially():
    # upstream: normalize("") in normalize(reply) is "" in s → True
    assert _mab_score("ruler_qa1_197K", ["the"], "whatever")["score"] == 1.0
    assert _mab_score("ruler_qa1_197K", ["!?"], "whatever")["subem"] == 1.0
    # the paper drops golds that normalise to nothing
    assert _mab_score("ruler_qa1_197K", ["the"], "whatever", "delta-mem")["score"] == 0.0


def test_mab_detective_is_exact_match_officially():
    s = _mab_score("detective_qa", ["Mr. Smith"], "The culprit is Mr. Smith.")
    assert s["subem"] == 1.0 and s["em"] == 0.0 and s["score"] == 0.0
    assert _mab_score("detective_qa", ["Mr. Smith"], "Answer: mr smith")["score"] == 1.0
    assert _mab_score("detective_qa", ["Mr. Smith"], "The culprit is Mr. Smith.", "delta-mem")["score"] == 1.0


def test_mab_icl_is_exact_match_of_the_answer_parsed_output():
    src = "icl_banking77_5900shot_balance"
    assert _mab_score(src, ["43"], "43")["score"] == 1.0
    assert _mab_score(src, ["43"], "Answer: 43\nbecause")["score"] == 1.0
    assert _mab_score(src, ["43"], "label: 43")["score"] == 0.0  # README: strict parsing
    assert _mab_score(src, ["43"], "The label is 43")["score"] == 0.0
    assert _mab_score(src, ["43"], "label: 43", "delta-mem")["score"] == 1.0  # the paper: alias substring


def test_mab_eventqa_counts_only_the_parsed_output():
    src = "eventqa_131072"
    # parsed = the text after "Answer:" on its line; the gold in the rest of the reply does not count
    s = _mab_score(src, ["the storm"], "The storm came.\nAnswer: a flood")
    assert s["subem"] == 0.0 and s["score"] == 0.0
    assert s["eventqa_recall"] == 1.0  # the raw lower-cased containment of every gold
    assert _mab_score(src, ["the storm"], "Answer: the storm came")["score"] == 1.0
    # the default rule takes the max of raw and parsed
    assert _mab_score("ruler_qa1_197K", ["the storm"], "The storm came.\nAnswer: a flood")["score"] == 1.0


def test_mab_golds_used_as_given():
    # whitespace is normalised away by every metric but the raw containment of RULER NIAH
    assert _mab_score("ruler_niah_mk", ["1234", "99"], "numbers: 1234")["score"] == 0.5
    assert _mab_score("ruler_niah_mk", [], "numbers: 1234")["score"] == 0.0


def test_mab_choice_eng_uses_the_option_text():
    s = _mab_score("infbench_choice_eng", ["B", "The red house"], "I'd say the red house.")
    assert s["subem"] == 1.0 and s["em"] == 1.0


def test_mab_paper_metric_per_source():
    assert _mab_score("longmemeval_s*", ["Tokyo"], "She moved to Tokyo.", "delta-mem")["score"] == 1.0
    assert _mab_score("ruler_niah_mk", ["1234", "99"], "numbers: 1234", "delta-mem")["score"] == 1.0  # any alias
    assert set(_mab_score("factconsolidation_sh_6k", ["Paris"], "Paris", "delta-mem")) == {"accuracy", "f1", "score"}


# --- recsys -----------------------------------------------------------------------------------------------------

ENTITY2ID = {
    "/movies/Inception_(2010)": 1,
    "The-Matrix (1999)": 2,
    "Heat": 3,
    "Up": 4,
    "Alien": 5,
    "Aliens": 6,
    "Cars>2": 7,
}


@pytest.fixture
def entity_dir(tmp_path: Path) -> Path:
    (tmp_path / "entity2id.json").write_text(json.dumps(ENTITY2ID))
    return tmp_path


def test_recsys_name_and_item_cleaning():
    assert clean_movie_name("/movies/Inception_(2010)") == "Inception"
    assert clean_movie_name("The-Matrix (1999)") == "The Matrix"
    assert clean_movie_name("Cars>2") == "Cars 2"
    assert clean_item("3. Heat (1995)") == "Heat"
    assert clean_item("10) - Up") == "Up"
    assert clean_item("2、 Alien") == "Alien"
    # split at the first "1." only; the preference text before it is dropped; blank lines are items
    assert recommendation_items("You like heists. 1. Heat\n\n2. Up") == ["Heat", "", "Up"]
    assert recommendation_items("Heat, Up") == ["Heat", "Up"]


def test_recsys_recall_through_entity2id(entity_dir):
    golds = ["3", " 4 "]
    s = _mab_score("recsys_redial_full", golds, "1. heat\n2. Upp\n3. Alien", data_dir=entity_dir)
    assert s["recall@1"] == 0.5 and s["recall@5"] == 1.0 and s["score"] == 1.0
    # a blank line is an item too: matched to the nearest (shortest) name, it takes a top-5 slot
    s = _mab_score("recsys_redial_full", ["6"], "1. Heat\n\n\n\n\n2. Aliens", data_dir=entity_dir)
    assert s["recall@5"] == 0.0 and s["recall@10"] == 1.0
    paper_scores = _mab_score("recsys_redial_full", golds, "1. heat\n2. Up", "delta-mem", entity_dir)
    assert paper_scores["score"] == 1.0


def test_recsys_id_golds_without_mapping_fail_clearly(tmp_path):
    task = get_task("memoryagentbench")
    ex = _mab("recsys_redial_full", ["3", "4"])
    with pytest.raises(ValueError, match=r"entity2id\.json: not found; recsys golds are movie ids"):
        task.check_scoring_inputs([ex], "official", tmp_path)
    with pytest.raises(ValueError, match=r"entity2id\.json is missing"):
        task.score(ex, "1. Heat", "official", tmp_path)
    (tmp_path / "entity2id.json").write_text(json.dumps({"Heat": 3}))
    with pytest.raises(ValueError, match="has no movie id 4"):
        task.check_scoring_inputs([ex], "delta-mem", tmp_path)
    (tmp_path / "entity2id.json").write_text('{"Heat": "3"}')
    with pytest.raises(ValueError, match="expected a JSON object of movie name → integer id"):
        task.check_scoring_inputs([ex], "official", tmp_path)
    task.check_scoring_inputs([_mab("ruler_qa1_197K", ["3"])], "official", tmp_path)  # not recsys: no need


def test_nearest_movie_ties_go_to_the_first_in_file_order():
    catalog = MovieCatalog({"Alien": 1, "Alieb": 2, "Up": 3})
    assert catalog.nearest("Aliex") == "Alien"  # distance 1 to both
    assert catalog.nearest("") == "Up"
    assert catalog.nearest("ALIEB") == "Alieb"  # case-insensitive
    assert recsys_recall("Alieb", ["2"], catalog)["recall@1"] == 1.0


def test_levenshtein_matches_the_plain_dp():
    def dp(a: str, b: str) -> int:
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(3000):
        a = "".join(rng.choice("abcé ") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("abcé ") for _ in range(rng.randint(0, 90)))  # past one 64-bit word
        assert levenshtein(a, b) == dp(a, b) == levenshtein(b, a)


# --- re-scoring stored predictions -----------------------------------------------------------------------------


def test_rescore_rows_keeps_generation_fields_and_changes_scores():
    task = get_task("gpqa")
    ex = Example(example_id="g1", task="gpqa", question="q", answers=["C"], choices=["w", "x", "y", "z"])
    stored = task.score_row(ex, '{"answer": "C"}', "official")
    stored.update(prediction='{"answer": "C"}', new_tokens=7, conversation_id="g1")
    assert stored["scores"]["accuracy"] == 0.0
    (fresh,) = rescore_rows(task, [stored], {"g1": ex}, "delta-mem")
    assert fresh["scores"]["accuracy"] == 1.0 and fresh["scoring"] == "delta-mem"
    assert fresh["new_tokens"] == 7 and fresh["prediction"] == stored["prediction"]
    assert list(fresh) == list(stored)


# --- IFEval: the paper's stand-ins for langdetect and NLTK ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("", None),  # undetectable: counted as followed, as upstream
        ("The cat is on the mat with you.", "en"),
        ("HELLO WORLD", "en"),  # no stop word: English
        ("你好，世界", "en"),  # no listed script and no stop word: English
        ("Der Hund und die Katze", "de"),
        ("Il gatto e la casa", "it"),  # "e" also votes pt; it wins the tie by list order
        ("Привет и не что", "ru"),
        ("Здравей, се за че", "bg"),
        ("مرحبا ٹ", "ur"),
        ("سلام گ", "fa"),
        ("नमस्ते यो", "ne"),
        ("안녕하세요", "ko"),
        ("tämä on", "fi"),  # "on" votes; "tämä" is folded to "tama" and never matches
    ],
)
def test_paper_language_detector(text, language):
    from pipeline.eval.metrics.ifeval import paper_detect_language

    assert paper_detect_language(text) == language


def test_paper_sentence_and_word_stand_ins():
    from pipeline.eval.metrics.ifeval import evaluate_response, paper_split_sentences, paper_word_tokenize

    text = "Dr. Smith arrived. Was it late?\n\nYes!  OK"
    assert paper_split_sentences(text) == ["Dr.", "Smith arrived.", "Was it late?", "Yes!", "OK"]
    assert paper_word_tokenize("DON'T stop U.S.A.") == ["DON", "T", "stop", "U", "S", "A"]
    ids, kw = ["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 5}]
    assert evaluate_response(ids, kw, text).strict == (True,)  # Punkt: 4 sentences ("Dr." is no end)
    assert evaluate_response(ids, kw, text, paper=True).strict == (False,)  # the stand-in: 5
    lang = ["language:response_language"], [{"language": "ja"}]
    japanese = "これは日本語の答えです。とても長い文章です。"
    assert evaluate_response(*lang, japanese).strict == (True,)  # langdetect: ja
    assert evaluate_response(*lang, japanese, paper=True).strict == (False,)  # the stand-in: en


def test_ifeval_task_protocols_differ_only_in_the_stand_ins():
    task = get_task("ifeval")
    ex = Example(
        example_id="i",
        task="ifeval",
        question="Answer in Japanese.",
        answers=[],
        instruction_ids=["language:response_language", "punctuation:no_comma"],
        kwargs=[{"language": "ja"}, {}],
    )
    reply = "これは日本語の答えです。とても長い文章です。"
    assert task.score(ex, reply)["prompt_level_strict_acc"] == 1.0
    paper_row = task.score_row(ex, reply, "delta-mem")
    assert paper_row["scores"]["prompt_level_strict_acc"] == 0.0 and paper_row["details"]["strict"] == [False, True]


def test_ifeval_paper_stand_ins_on_the_reference_responses():
    """On the GPT-4 reference responses the paper's stand-ins change 19 prompts' strict verdicts, all
    through the three instruction families they touch."""
    from pipeline.data import load_split
    from tests.pipeline.conftest import shared_file

    examples, _ = load_split("ifeval", "test", source=str(shared_file("ifeval/input_data.jsonl")))
    path = shared_file("ifeval/input_response_data_gpt4_20231107_145030.jsonl")
    responses = {r["prompt"]: r["response"] for r in map(json.loads, path.read_text().splitlines()) if r}
    task = get_task("ifeval")
    official = [task.score_row(e, responses[e.question]) for e in examples]
    ours = [task.score_row(e, responses[e.question], "delta-mem") for e in examples]
    changed = set()
    for a, b in zip(official, ours, strict=True):
        for iid, x, y in zip(
            a["details"]["instruction_ids"], a["details"]["strict"], b["details"]["strict"], strict=True
        ):
            if x != y:
                changed.add((a["example_id"], iid))
    assert len({e for e, _ in changed}) == 19
    assert {i for _, i in changed} == {
        "language:response_language",
        "length_constraints:number_sentences",
        "change_case:english_lowercase",
        "change_case:english_capital",
    }
    assert round(task.aggregate(official)["prompt_level_strict_acc"], 4) == 0.7722
    assert round(task.aggregate(ours)["prompt_level_strict_acc"], 4) == 0.7648

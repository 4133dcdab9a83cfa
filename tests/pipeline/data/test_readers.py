"""Readers of the data sets that are not available offline, on small fixtures in their native formats.

The fixtures are written by the tests themselves (invented text, real field layout), following the
formats documented in each reader's module docstring and in docs/DATASETS.md.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import DataError, known_datasets, load_split, read_split, write_split
from pipeline.data.gpqa import LETTERS, choice_order
from pipeline.data.memoryagentbench import chunk_text


def _roundtrip(examples, tmp_path: Path):
    path = tmp_path / "rt" / "split.jsonl"
    write_split(examples, path)
    assert read_split(path) == examples


# --------------------------------------------------------------------------------------------- Qasper
def _blob(**kw):
    blob = {
        "unanswerable": False,
        "extractive_spans": [],
        "yes_no": None,
        "free_form_answer": "",
        "evidence": [],
        "highlighted_evidence": [],
    }
    blob.update(kw)
    return blob


QASPER_ALLENAI = {
    "2001.00001": {
        "title": "Learning Things From Other Things",
        "abstract": "We learn things.",
        "full_text": [
            {"section_name": "Introduction", "paragraphs": ["Things matter.", "We use a seed list."]},
            {"section_name": "Method ::: Model", "paragraphs": ["", "A small model."]},
        ],
        "figures_and_tables": [{"caption": "Table 1: Results on things.", "file": "1-Table1-1.png"}],
        "qas": [
            {
                "question": "What is the seed list?",
                "question_id": "q-seed",
                "nlp_background": "two",
                "topic_background": "unfamiliar",
                "paper_read": "no",
                "search_query": "",
                "question_writer": "w1",
                "answers": [
                    {
                        "answer": _blob(
                            extractive_spans=["a list of seed words", "positive verbs"],
                            evidence=["We use a seed list."],
                        ),
                        "annotation_id": "a1",
                        "worker_id": "k1",
                    },
                    {"answer": _blob(free_form_answer="seed words"), "annotation_id": "a2", "worker_id": "k2"},
                ],
            },
            {
                "question": "Is the model small?",
                "question_id": "q-small",
                "nlp_background": "",
                "topic_background": "",
                "paper_read": "",
                "search_query": "",
                "question_writer": "w2",
                "answers": [{"answer": _blob(yes_no=True), "annotation_id": "a3", "worker_id": "k1"}],
            },
            {
                "question": "Which GPU was used?",
                "question_id": "q-gpu",
                "nlp_background": "",
                "topic_background": "",
                "paper_read": "",
                "search_query": "",
                "question_writer": "w2",
                "answers": [{"answer": _blob(unanswerable=True), "annotation_id": "a4", "worker_id": "k3"}],
            },
        ],
    }
}


def _qasper_to_hf(paper_id: str, paper: dict) -> dict:
    """The HF ``allenai/qasper`` row layout: every sequence of structs stored column-wise."""
    qas = paper["qas"]
    keys = [k for k in qas[0] if k != "answers"]
    return {
        "id": paper_id,
        "title": paper["title"],
        "abstract": paper["abstract"],
        "full_text": {
            "section_name": [s["section_name"] for s in paper["full_text"]],
            "paragraphs": [s["paragraphs"] for s in paper["full_text"]],
        },
        "qas": {
            **{k: [q[k] for q in qas] for k in keys},
            "answers": [
                {
                    "answer": [a["answer"] for a in q["answers"]],
                    "annotation_id": [a["annotation_id"] for a in q["answers"]],
                    "worker_id": [a["worker_id"] for a in q["answers"]],
                }
                for q in qas
            ],
        },
        "figures_and_tables": {
            "caption": [f["caption"] for f in paper["figures_and_tables"]],
            "file": [f["file"] for f in paper["figures_and_tables"]],
        },
    }


def test_qasper_allenai_json(tmp_path):
    (tmp_path / "qasper-dev-v0.3.json").write_text(json.dumps(QASPER_ALLENAI), encoding="utf-8")
    examples, prov = load_split("qasper", "validation", str(tmp_path))  # folder: finds the allenai file name
    assert prov.origin.endswith("qasper-dev-v0.3.json")
    assert [e.example_id for e in examples] == ["qasper-q-seed", "qasper-q-small", "qasper-q-gpu"]
    seed, small, gpu = examples
    assert seed.answers == ["a list of seed words, positive verbs", "seed words"]
    assert seed.category == "extractive" and seed.metadata["answer_types"] == ["extractive", "abstractive"]
    assert seed.metadata["evidence"] == [["We use a seed list."], []]
    assert small.answers == ["Yes"] and small.category == "yes-no"
    assert gpu.answers == ["Unanswerable"] and gpu.category == "unanswerable"
    texts = [(s.session, s.text) for s in seed.segments]
    assert texts == [
        ("Title", "Learning Things From Other Things"),
        ("Abstract", "We learn things."),
        ("Introduction", "Things matter."),
        ("Introduction", "We use a seed list."),
        ("Method ::: Model", "A small model."),
        ("Figures and tables", "Table 1: Results on things."),
    ]
    assert seed.segments is gpu.segments and seed.conversation_id == "2001.00001"
    _roundtrip(examples, tmp_path)


def test_qasper_hf_layout_gives_the_same_examples(tmp_path):
    allenai = tmp_path / "allenai.json"
    allenai.write_text(json.dumps(QASPER_ALLENAI), encoding="utf-8")
    rows = [_qasper_to_hf(pid, p) for pid, p in QASPER_ALLENAI.items()]
    folder = tmp_path / "hf" / "qasper"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "validation-00000-of-00001.parquet")
    jsonl = tmp_path / "validation.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")

    expected, _ = load_split("qasper", "validation", str(allenai))
    from_parquet, _ = load_split("qasper", "validation", str(tmp_path / "hf"))
    from_jsonl, _ = load_split("qasper", "validation", str(jsonl))
    assert [e.to_dict() for e in from_parquet] == [e.to_dict() for e in expected]
    assert [e.to_dict() for e in from_jsonl] == [e.to_dict() for e in expected]


def test_qasper_bad_records(tmp_path):
    data = copy.deepcopy(QASPER_ALLENAI)
    del data["2001.00001"]["qas"][1]["question"]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_split("qasper", "test", str(path))
    assert str(err.value) == f"{path}: record paper 2001.00001: field 'qas[1].question': missing required field"

    data = copy.deepcopy(QASPER_ALLENAI)
    data["2001.00001"]["qas"][0]["answers"][1]["answer"] = _blob()
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match=r"field 'qas\[0\]\.answers\[1\]\.answer': answer has no content"):
        load_split("qasper", "test", str(path))


# ------------------------------------------------------------------------------------------- HotpotQA
HOTPOT = [
    {
        "_id": "5a8b57f25542995d1e6f1371",
        "question": "Which band formed first, Alpha Owls or The Beta Cats?",
        "answer": "Alpha Owls",
        "type": "comparison",
        "level": "hard",
        "supporting_facts": [["Alpha Owls", 0], ["The Beta Cats", 1]],
        "context": [
            ["Alpha Owls", ["Alpha Owls is a band formed in 1971.", " They play folk."]],
            ["The Beta Cats", ["The Beta Cats is a band.", " It was formed in 1988."]],
            ["Gamma", ["Unrelated text."]],
        ],
    },
    {
        "_id": "5a8c7595554299585d9e36b6",
        "question": "What city is the home of the band that released Blue Moon Walk?",
        "answer": "Porto",
        "type": "bridge",
        "level": "medium",
        "supporting_facts": [["Blue Moon Walk", 0], ["Delta Five", 0]],
        "context": [
            ["Blue Moon Walk", ["Blue Moon Walk is an album by Delta Five."]],
            ["Delta Five", ["Delta Five is a band from Porto."]],
        ],
    },
]


def _hotpot_to_hf(row: dict) -> dict:
    return {
        "id": row["_id"],
        "question": row["question"],
        "answer": row["answer"],
        "type": row["type"],
        "level": row["level"],
        "supporting_facts": {
            "title": [t for t, _ in row["supporting_facts"]],
            "sent_id": [s for _, s in row["supporting_facts"]],
        },
        "context": {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]},
    }


def test_hotpotqa_native_and_hf_layouts(tmp_path):
    (tmp_path / "hotpot_dev_distractor_v1.json").write_text(json.dumps(HOTPOT), encoding="utf-8")
    examples, _ = load_split("hotpotqa", "validation", str(tmp_path))
    assert len(examples) == 2
    first = examples[0]
    assert first.example_id == "hotpotqa-5a8b57f25542995d1e6f1371"
    assert first.answers == ["Alpha Owls"] and first.category == "comparison"
    assert first.metadata["level"] == "hard"
    assert first.metadata["supporting_facts"] == [["Alpha Owls", 0], ["The Beta Cats", 1]]
    assert [(s.session, s.text) for s in first.segments][:2] == [
        ("Alpha Owls", "Alpha Owls is a band formed in 1971. They play folk."),
        ("The Beta Cats", "The Beta Cats is a band. It was formed in 1988."),
    ]
    assert first.conversation_id is None  # each question has its own paragraphs
    _roundtrip(examples, tmp_path)

    hf = tmp_path / "hf.parquet"
    pq.write_table(pa.Table.from_pylist([_hotpot_to_hf(r) for r in HOTPOT]), hf)
    from_hf, _ = load_split("hotpotqa", "validation", str(hf))
    assert [e.to_dict() for e in from_hf] == [e.to_dict() for e in examples]


def test_hotpotqa_missing_answer(tmp_path):
    rows = copy.deepcopy(HOTPOT)
    del rows[1]["answer"]
    path = tmp_path / "h.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_split("hotpotqa", "validation", str(path))
    assert str(err.value) == f"{path}: record 1 (_id=5a8c7595554299585d9e36b6): field 'answer': missing required field"


# ----------------------------------------------------------------------------------- MemoryAgentBench
def _mab_rows() -> list[dict]:
    context = "\n".join(f"Document {i}: the code word of door {i} is W{i * 7}." for i in range(60))
    return [
        {
            "context": context,
            "questions": ["What is the code word of door 3?", "What is the code word of door 41?"],
            "answers": [["W21"], ["W287", "w287"]],
            "metadata": {
                "source": "ruler_qa1_197K",
                "question_ids": ["qa1-0", "qa1-1"],
                "question_types": ["single", "single"],
                "qa_pair_ids": ["p0", "p1"],
                "question_dates": None,
                "keypoints": None,
                "previous_events": None,
                "demo": "",
                "haystack_sessions": None,
            },
        },
        {
            "context": "Fact 1: Ann lives in Rome.\nFact 2: Ann lives in Oslo.",
            "questions": ["Where does Ann live?"],
            "answers": [["Oslo"]],
            "metadata": {
                "source": "factconsolidation_sh_6k",
                "question_ids": ["fc-0"],
                "question_types": None,
                "qa_pair_ids": None,
                "question_dates": None,
                "keypoints": None,
                "previous_events": None,
                "demo": None,
                "haystack_sessions": None,
            },
        },
    ]


def test_memoryagentbench_parquet_folder(tmp_path):
    data = tmp_path / "mab" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_mab_rows()), data / "Accurate_Retrieval-00000-of-00001.parquet")
    examples, prov = load_split(
        "memoryagentbench", "Accurate_Retrieval", str(tmp_path / "mab"), options={"chunk_chars": 500}
    )
    assert prov.origin.endswith("Accurate_Retrieval-00000-of-00001.parquet")
    assert len(examples) == 3
    q0, q1, q2 = examples
    assert q0.category == "accurate_retrieval"
    assert q0.answers == ["W21"] and q1.answers == ["W287", "w287"]
    assert q0.metadata["source"] == "ruler_qa1_197K" and q0.metadata["question_id"] == "qa1-0"
    assert q0.metadata["qa_pair_id"] == "p0"
    assert q0.segments is q1.segments and q0.conversation_id == "ruler_qa1_197K-0"
    assert len(q0.segments) > 1 and all(len(s.text) <= 500 for s in q0.segments)
    assert "Document 41: the code word of door 41 is W287." in "\n".join(s.text for s in q0.segments)
    assert q2.conversation_id == "factconsolidation_sh_6k-1" and "question_type" not in q2.metadata
    _roundtrip(examples, tmp_path)


def test_memoryagentbench_jsonl_with_source_filter_and_bad_row(tmp_path):
    path = tmp_path / "cr.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _mab_rows()) + "\n", encoding="utf-8")
    examples, _ = load_split(
        "memoryagentbench", "test", str(path), options={"competency": "cr", "sources": ["factconsolidation_sh_6k"]}
    )
    assert [e.answers for e in examples] == [["Oslo"]]
    assert examples[0].category == "conflict_resolution"

    rows = _mab_rows()
    rows[1]["answers"] = []
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_split("memoryagentbench", "test", str(path))
    assert str(err.value) == f"{path}: record 1: field 'answers': 0 answers for 1 questions"


def test_chunk_text_limits_and_keeps_content():
    text = "short line\n" + "x" * 25 + "\n" + "another\n\nlast"
    chunks = chunk_text(text, 10)
    assert all(0 < len(c) <= 10 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")


# ---------------------------------------------------------------------------------------------- GPQA
GPQA_COLUMNS = [
    "Pre-Revision Question",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "Explanation",
    "Record ID",
    "High-level domain",
    "Subdomain",
]


def _gpqa_rows(n: int) -> list[dict]:
    return [
        {
            "Pre-Revision Question": "",
            "Question": f"Invented question number {i}?",
            "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong {i}a",
            "Incorrect Answer 2": f"wrong {i}b",
            "Incorrect Answer 3": f"wrong {i}c\n",
            "Explanation": "",
            "Record ID": f"rec{i:04d}",
            "High-level domain": ["Physics", "Chemistry", "Biology"][i % 3],
            "Subdomain": "Invented",
        }
        for i in range(n)
    ]


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_gpqa_shuffle_is_seeded_per_record(tmp_path):
    rows = _gpqa_rows(40)
    _write_csv(tmp_path / "gpqa_diamond.csv", rows, GPQA_COLUMNS)
    examples, _ = load_split("gpqa", "test", str(tmp_path))
    assert len(examples) == 40
    for i, ex in enumerate(examples):
        letter = ex.answers[0]
        assert ex.choices[LETTERS.index(letter)] == f"right {i}"
        assert sorted(ex.choices) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"])
        assert ex.metadata["gold_letter"] == letter and ex.metadata["correct_answer"] == f"right {i}"
    assert len({e.answers[0] for e in examples}) == 4  # the gold letter is not always the same
    assert examples[0].category == "Physics"

    shuffled = tmp_path / "reordered.csv"
    _write_csv(shuffled, list(reversed(rows)), GPQA_COLUMNS)
    again, _ = load_split("gpqa", "test", str(shuffled))
    by_id = {e.example_id: e for e in again}
    assert all(by_id[e.example_id].choices == e.choices for e in examples)  # independent of row order

    other_seed, _ = load_split("gpqa", "test", str(tmp_path), options={"seed": 1})
    assert [e.choices for e in other_seed] != [e.choices for e in examples]
    assert choice_order("rec0001", 0) == choice_order("rec0001", 0)
    _roundtrip(examples, tmp_path)


def test_gpqa_missing_column(tmp_path):
    path = tmp_path / "gpqa.csv"
    _write_csv(path, _gpqa_rows(3), [c for c in GPQA_COLUMNS if c != "Incorrect Answer 2"])
    with pytest.raises(DataError) as err:
        load_split("gpqa", "test", str(path))
    assert str(err.value) == f"{path}: record 0 (Record ID=rec0000): field 'Incorrect Answer 2': missing required field"


# --------------------------------------------------------------------------------------------- general
def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DataError) as err:
        load_split("locomoo", "test", "x.json")
    assert "unknown dataset 'locomoo'" in str(err.value)
    for name in known_datasets():
        assert name in str(err.value)


def test_missing_file_and_missing_folder_file(tmp_path):
    with pytest.raises(DataError) as err:
        load_split("hotpotqa", "validation", str(tmp_path / "nope.json"))
    assert str(err.value) == f"{tmp_path / 'nope.json'}: file not found"
    with pytest.raises(DataError, match=r"no input file found; looked for hotpot_dev_distractor_v1\.json"):
        load_split("hotpotqa", "validation", str(tmp_path))


def test_hub_source_without_datasets_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError) as err:
        load_split("hotpotqa", "validation", "hf")
    assert str(err.value).startswith(
        "hf:hotpotqa/hotpot_qa/distractor[validation]: loading from the Hugging Face hub needs"
    )
    with pytest.raises(DataError, match=r"hf:ai-hyz/MemoryAgentBench\[Conflict_Resolution\]"):
        load_split("memoryagentbench", "cr", "hf")
    with pytest.raises(DataError, match="locomo is not on the Hugging Face hub"):
        load_split("locomo", "test", "hf")


class _FakeHub:
    """Stands in for the ``datasets`` package: serves rows from memory and records the calls."""

    def __init__(self, rows: dict[tuple[str, str | None, str], list[dict]]) -> None:
        self.rows = rows
        self.calls: list[tuple] = []

    def load_dataset(self, hf_id, config=None, split=None, revision=None):
        self.calls.append((hf_id, config, split, revision))
        if (hf_id, config, split) not in self.rows:
            raise ValueError(f"Unknown split {split!r}")
        return self.rows[(hf_id, config, split)]


def test_hub_sources_use_the_usual_ids_splits_and_configs(monkeypatch):
    import sys

    hub_ifeval_row = {  # the hub copy fills every kwargs dict with all keys set to null
        "key": 1000,
        "prompt": "Write without commas.",
        "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_highlighted_sections"],
        "kwargs": [{"num_highlights": None, "relation": None}, {"num_highlights": 3, "relation": None}],
    }
    fake = _FakeHub(
        {
            ("google/IFEval", None, "train"): [hub_ifeval_row],
            ("hotpotqa/hotpot_qa", "distractor", "validation"): [_hotpot_to_hf(r) for r in HOTPOT],
            ("ai-hyz/MemoryAgentBench", None, "Conflict_Resolution"): _mab_rows(),
            ("me/my-qasper", None, "test"): [_qasper_to_hf(pid, p) for pid, p in QASPER_ALLENAI.items()],
        }
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)

    examples, prov = load_split("ifeval", "test", "hf", revision="abc123")
    assert examples[0].kwargs == [{}, {"num_highlights": 3}]
    assert prov.to_dict() == {
        "origin": "hf:google/IFEval[train]",
        "hf_id": "google/IFEval",
        "hf_split": "train",
        "revision": "abc123",
    }
    hotpot, prov = load_split("hotpotqa", "validation", "hf")
    assert [e.answers for e in hotpot] == [["Alpha Owls"], ["Porto"]] and prov.hf_config == "distractor"
    mab, _ = load_split("memoryagentbench", "cr", "hf")
    assert {e.category for e in mab} == {"conflict_resolution"}
    qasper, _ = load_split("qasper", "test", "hf:me/my-qasper")
    assert len(qasper) == 3
    assert fake.calls == [
        ("google/IFEval", None, "train", "abc123"),
        ("hotpotqa/hotpot_qa", "distractor", "validation", None),
        ("ai-hyz/MemoryAgentBench", None, "Conflict_Resolution", None),
        ("me/my-qasper", None, "test", None),
    ]
    with pytest.raises(DataError) as err:
        load_split("hotpotqa", "nope", "hf")
    assert str(err.value).startswith(
        "hf:hotpotqa/hotpot_qa/distractor[nope]: could not load from the hub (ValueError: Unknown"
    )

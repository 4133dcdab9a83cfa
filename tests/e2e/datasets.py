"""Tiny raw files of every data set the presets read, each in its PUBLISHED on-disk layout.

The content is synthetic (seeded, a few records each); the layout is the one users download:

* Qasper: the allenai release ``qasper-{train,dev,test}-v0.3.json`` (``paper_id → paper``).
* LoCoMo: ``locomo10.json`` (a list of samples with ``conversation.session_<n>`` turns and ``qa``);
  when the real file is in ``../shared/data/locomo`` its first conversation is added, cut to its
  first session (same layout) so the rehearsal also reads real text.
* HotpotQA: ``hotpot_dev_distractor_v1.json`` (a list with ``context: [[title, [sentences]]]``).
* MemoryAgentBench: the hub export ``data/<split>-00000-of-00001.parquet`` (one per competency).
* IFEval: ``input_data.jsonl`` of google-research ``instruction_following_eval``.
* GPQA: ``gpqa_diamond.csv`` with the authors' column names.

:func:`write_all` writes them under ``<root>/data/raw/`` where the presets look for them.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah"]
CITIES = ["Lisbon", "Oslo", "Quito", "Nairobi", "Hanoi", "Perth"]
HOBBIES = ["chess", "rowing", "pottery", "baking", "hiking", "cello"]
TOPICS = ["memory", "attention", "retrieval", "parsing", "translation", "summarisation"]


def _rng(name: str) -> random.Random:
    return random.Random(f"rehearsal:{name}")


# ------------------------------------------------------------------------------------------------ Qasper
def _qasper_answer(kind: str, text: str, evidence: str) -> dict[str, Any]:
    return {
        "unanswerable": kind == "unanswerable",
        "extractive_spans": [text] if kind == "extractive" else [],
        "yes_no": (text == "Yes") if kind == "yes-no" else None,
        "free_form_answer": text if kind == "abstractive" else "",
        "evidence": [evidence] if kind != "unanswerable" else [],
        "highlighted_evidence": [evidence] if kind != "unanswerable" else [],
    }


def qasper_papers(split: str, n: int) -> dict[str, Any]:
    rng = _rng(f"qasper-{split}")
    papers: dict[str, Any] = {}
    for i in range(n):
        pid = f"{1900 + i:04d}.{rng.randrange(10000, 99999)}"
        topic, other = rng.sample(TOPICS, 2)
        size = rng.choice([8, 16, 32, 64])
        method = f"{topic} network with {size} slots"
        paras = [
            f"We study {topic} for long documents and propose a {method}.",
            f"Our model uses {size} memory slots and is trained on {other} data.",
            f"Results improve over the {other} baseline by {rng.randrange(1, 9)} points.",
        ]
        qas = [
            ("What model is proposed?", "extractive", method, paras[0]),
            ("How many memory slots are used?", "abstractive", f"{size} slots", paras[1]),
            (f"Is the model trained on {other} data?", "yes-no", "Yes", paras[1]),
            ("Which GPU was used?", "unanswerable", "", ""),
        ]
        papers[pid] = {
            "title": f"A {topic.title()} Study {i}",
            "abstract": f"This paper studies {topic}. " + paras[0],
            "full_text": [
                {"section_name": "Introduction", "paragraphs": paras[:1]},
                {"section_name": "Method", "paragraphs": paras[1:2]},
                {"section_name": "Experiments", "paragraphs": paras[2:]},
            ],
            "figures_and_tables": [{"caption": f"Table 1: {topic} results.", "file": "1-Table1-1.png"}],
            "qas": [
                {
                    "question": q,
                    "question_id": f"{pid}-q{k}",
                    "nlp_background": "two",
                    "topic_background": "familiar",
                    "paper_read": "no",
                    "search_query": topic,
                    "question_writer": "writer-0",
                    "answers": [
                        {
                            "answer": _qasper_answer(kind, text, ev),
                            "annotation_id": f"{pid}-a{k}",
                            "worker_id": "worker-0",
                        }
                    ],
                }
                for k, (q, kind, text, ev) in enumerate(qas)
            ],
        }
    return papers


def write_qasper(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("dev", 2), ("test", 2)):
        (folder / f"qasper-{split}-v0.3.json").write_text(json.dumps(qasper_papers(split, n)))


# ------------------------------------------------------------------------------------------------ LoCoMo
def locomo_sample(index: int) -> dict[str, Any]:
    rng = _rng(f"locomo-{index}")
    a, b = rng.sample(NAMES, 2)
    city, hobby = rng.choice(CITIES), rng.choice(HOBBIES)
    sessions = [
        [
            (a, f"Hi {b}! I just moved to {city} last week."),
            (b, f"Welcome to {city}, {a}! How is it going?"),
            (a, "Busy, but the flat is lovely."),
        ],
        [
            (b, f"{a}, did you find a club for {hobby} yet?"),
            (a, f"Yes, I joined a {hobby} club on Monday."),
            (b, "Great news, tell me how it goes."),
        ],
    ]
    conversation: dict[str, Any] = {"speaker_a": a, "speaker_b": b}
    for s, turns in enumerate(sessions, start=1):
        conversation[f"session_{s}_date_time"] = f"{s + 1}:00 pm on {s + 7} May, 2023"
        conversation[f"session_{s}"] = [
            {"speaker": who, "dia_id": f"D{s}:{t}", "text": text} for t, (who, text) in enumerate(turns, start=1)
        ]
    qa = [
        {"question": f"Where did {a} move to?", "answer": city, "evidence": ["D1:1"], "category": 4},
        {"question": f"When did {a} join the {hobby} club?", "answer": "Monday", "evidence": ["D2:2"], "category": 2},
        {
            "question": f"What club did {a} join after moving?",
            "answer": hobby,
            "evidence": ["D1:1", "D2:2"],
            "category": 1,
        },
        {"question": f"Would {a} like {city}?", "answer": "Likely yes", "evidence": ["D1:3"], "category": 3},
        {"question": f"Where did {b} move to?", "evidence": ["D1:1"], "category": 5, "adversarial_answer": city},
    ]
    return {
        "qa": qa,
        "conversation": conversation,
        "event_summary": {f"events_session_{s}": {a: [], b: [], "date": f"{s + 7} May, 2023"} for s in (1, 2)},
        "observation": {f"session_{s}_observation": {a: [], b: []} for s in (1, 2)},
        "session_summary": {f"session_{s}_summary": f"{a} and {b} talk." for s in (1, 2)},
        "sample_id": f"conv-fixture-{index}",
    }


def real_locomo_first_session(path: Path) -> dict[str, Any] | None:
    """The real file's first conversation cut to its first session (and the questions about it), or None."""
    if not path.is_file():
        return None
    sample = json.loads(path.read_text())[0]
    conv = sample["conversation"]
    turns = conv["session_1"]
    ids = {t["dia_id"] for t in turns}
    qa = [q for q in sample["qa"] if q.get("evidence") and set(q["evidence"]) <= ids][:3]
    if not qa:
        return None
    keep = {k: conv[k] for k in ("speaker_a", "speaker_b", "session_1_date_time", "session_1")}
    return {
        "qa": qa,
        "conversation": keep,
        "event_summary": {"events_session_1": sample["event_summary"].get("events_session_1", {})},
        "observation": {"session_1_observation": sample["observation"].get("session_1_observation", {})},
        "session_summary": {"session_1_summary": sample["session_summary"].get("session_1_summary", "")},
        "sample_id": f"{sample['sample_id']}-session1",
    }


def write_locomo(folder: Path, shared_data: Path | None) -> bool:
    """``locomo10.json``; returns whether the real sample was included."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = [locomo_sample(i) for i in range(2)]
    real = real_locomo_first_session(shared_data / "locomo" / "locomo10.json") if shared_data else None
    if real is not None:
        samples.append(real)
    (folder / "locomo10.json").write_text(json.dumps(samples, indent=1))
    return real is not None


# ---------------------------------------------------------------------------------------------- HotpotQA
def write_hotpotqa(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng("hotpotqa")
    rows = []
    for i in range(n):
        person, city = rng.choice(NAMES), rng.choice(CITIES)
        river = f"River {chr(65 + i)}"
        context = [
            [f"{person} (writer)", [f"{person} is a writer.", f" {person} was born in {city}."]],
            [city, [f"{city} is a city.", f" {city} lies on the {river}."]],
            [f"{river}", [f"The {river} is long."]],
            ["Unrelated page", ["Nothing relevant is said here."]],
        ]
        rng.shuffle(context)
        rows.append(
            {
                "_id": f"5a{i:06x}fixture",
                "answer": river,
                "question": f"Which river flows through the birthplace of {person}?",
                "supporting_facts": [[f"{person} (writer)", 1], [city, 1]],
                "context": context,
                "type": "bridge" if i % 2 == 0 else "comparison",
                "level": ["easy", "medium", "hard"][i % 3],
            }
        )
    (folder / "hotpot_dev_distractor_v1.json").write_text(json.dumps(rows))


# -------------------------------------------------------------------------------------- MemoryAgentBench
MAB_SPLITS = {
    "Accurate_Retrieval": "ruler_qa1_197K",
    "Test_Time_Learning": "icl_banking77_5900shot_balance",
    "Long_Range_Understanding": "infbench_sum_eng_shots2",
    "Conflict_Resolution": "factconsolidation_mh_262k",
}


def write_memoryagentbench(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, source in MAB_SPLITS.items():
        rng = _rng(f"mab-{split}")
        rows = []
        for r in range(2):
            facts = {n: rng.choice(CITIES) for n in rng.sample(NAMES, 3)}
            context = "\n".join(f"Document {k}: {n} lives in {c}." for k, (n, c) in enumerate(facts.items()))
            names = list(facts)[:2]
            rows.append(
                {
                    "context": context,
                    "questions": [f"Where does {n} live?" for n in names],
                    "answers": [[facts[n], f"in {facts[n]}"] for n in names],
                    "metadata": {
                        "source": source,
                        "question_ids": [f"{split}-{r}-{k}" for k in range(2)],
                        "question_types": ["single-hop", "single-hop"],
                        "question_dates": ["2024-01-01", "2024-01-02"],
                        "qa_pair_ids": [f"pair-{r}-{k}" for k in range(2)],
                        "keypoints": [f"{n} lives in {facts[n]}" for n in names],
                        "previous_events": [],
                        "demo": "",
                        "haystack_sessions": [],
                    },
                }
            )
        pq.write_table(pa.Table.from_pylist(rows), data / f"{split}-00000-of-00001.parquet")


# ------------------------------------------------------------------------------------------------ IFEval
def write_ifeval(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "key": 9001,
            "prompt": "Describe a river in at least 20 words. Do not use any commas.",
            "instruction_id_list": ["length_constraints:number_words", "punctuation:no_comma"],
            "kwargs": [{"relation": "at least", "num_words": 20}, {}],
        },
        {
            "key": 9002,
            "prompt": "Write a short note about chess, all in lowercase letters.",
            "instruction_id_list": ["change_case:english_lowercase"],
            "kwargs": [{}],
        },
        {
            "key": 9003,
            "prompt": "List two cities. Wrap your entire response with double quotation marks.",
            "instruction_id_list": ["startend:quotation"],
            "kwargs": [{}],
        },
    ]
    (folder / "input_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# -------------------------------------------------------------------------------------------------- GPQA
GPQA_COLUMNS = [
    "Pre-Revision Question",
    "Pre-Revision Correct Answer",
    "Pre-Revision Incorrect Answer 1",
    "Pre-Revision Incorrect Answer 2",
    "Pre-Revision Incorrect Answer 3",
    "Pre-Revision Explanation",
    "Self-reported question-writing time (minutes)",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
    "Explanation",
    "Revision Comments (from Question Writer)",
    "Subdomain",
    "Writer's Difficulty Estimate",
    "Extra Revised Question",
    "Extra Revised Explanation",
    "Extra Revised Correct Answer",
    "Extra Revised Incorrect Answer 1",
    "Extra Revised Incorrect Answer 2",
    "Extra Revised Incorrect Answer 3",
    "Non-Expert Validator Accuracy",
    "Majority Non-Expert Vals Incorrect",
    "Expert Validator Accuracy",
    "Record ID",
    "High-level domain",
    "Question Writer",
]


def write_gpqa(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    items = [
        ("Physics", "Mechanics", "What is the SI unit of force?", "newton", ["joule", "watt", "pascal"]),
        ("Chemistry", "Organic", "How many carbon atoms has ethane?", "2", ["1", "3", "4"]),
        ("Biology", "Genetics", "Which base pairs with adenine in DNA?", "thymine", ["guanine", "cytosine", "uracil"]),
    ]
    with (folder / "gpqa_diamond.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=GPQA_COLUMNS)
        writer.writeheader()
        for i, (domain, sub, q, right, wrong) in enumerate(items):
            row = dict.fromkeys(GPQA_COLUMNS, "")
            row.update(
                {
                    "Pre-Revision Question": q,
                    "Pre-Revision Correct Answer": right,
                    "Question": q,
                    "Correct Answer": right,
                    "Incorrect Answer 1": wrong[0],
                    "Incorrect Answer 2": wrong[1],
                    "Incorrect Answer 3": wrong[2],
                    "Explanation": f"By definition, {right}.",
                    "Subdomain": sub,
                    "Non-Expert Validator Accuracy": "0.5",
                    "Expert Validator Accuracy": "1.0",
                    "Record ID": f"recFixture{i:04d}",
                    "High-level domain": domain,
                    "Question Writer": "writer-0",
                }
            )
            writer.writerow(row)


def write_all(root: Path, shared_data: Path | None = None) -> dict[str, Any]:
    """Every data set under ``<root>/data/raw/<name>``; returns what was written (for the log)."""
    raw = root / "data" / "raw"
    write_qasper(raw / "qasper")
    real_locomo = write_locomo(raw / "locomo", shared_data)
    write_hotpotqa(raw / "hotpotqa")
    write_memoryagentbench(raw / "memoryagentbench")
    write_ifeval(raw / "ifeval")
    write_gpqa(raw / "gpqa")
    return {"raw_dir": str(raw), "real_locomo_sample": real_locomo}

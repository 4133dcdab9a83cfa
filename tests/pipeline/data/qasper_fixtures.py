"""Tiny Qasper fixtures in both published on-disk formats, generated (no real data is committed).

* :func:`write_release`: the allenai release — ``qasper-{train,dev,test}-v0.3.json`` (a JSON object
  ``paper_id → paper``), optionally packed as the two published tarballs ``qasper-train-dev-v0.3.tgz``
  and ``qasper-test-and-evaluator-v0.3.tgz``.
* :func:`write_parquet_conversion`: the hub's ``refs/convert/parquet`` branch of ``allenai/qasper``,
  ``qasper/<split>/0000.parquet`` …, with the Arrow types of the data set's features (every
  ``Sequence`` of structs stored as a struct of lists).

Schema: Dasigi et al. 2021 (allenai/qasper), ``title, abstract, full_text[{section_name, paragraphs}],
qas[{question, question_id, nlp_background, topic_background, paper_read, search_query, question_writer,
answers[{answer{unanswerable, extractive_spans, yes_no, free_form_answer, evidence, highlighted_evidence},
annotation_id, worker_id}]}], figures_and_tables[{caption, file}]``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SPLIT_FILES = {"train": "qasper-train-v0.3.json", "validation": "qasper-dev-v0.3.json", "test": "qasper-test-v0.3.json"}
KINDS = ("extractive", "abstractive", "yes-no", "unanswerable")


def _answer(kind: str, i: int) -> dict[str, Any]:
    blob = {
        "unanswerable": kind == "unanswerable",
        "extractive_spans": [f"span {i}"] if kind == "extractive" else [],
        "yes_no": (i % 2 == 0) if kind == "yes-no" else None,
        "free_form_answer": f"free answer {i}" if kind == "abstractive" else "",
        "evidence": [f"Paragraph {i} of the method."] if kind != "unanswerable" else [],
        "highlighted_evidence": [f"Paragraph {i}"] if kind != "unanswerable" else [],
    }
    return blob


def paper(index: int, kinds: list[str], paragraphs: int = 3) -> dict[str, Any]:
    """One paper in the allenai layout with one question per entry of ``kinds`` (first annotator's type)."""
    return {
        "title": f"Paper {index}: on things",
        "abstract": f"We study thing {index}.",
        "full_text": [
            {"section_name": "Introduction", "paragraphs": [f"Thing {index} matters."]},
            {
                "section_name": "Method ::: Model",
                "paragraphs": [f"Paragraph {j} of the method. " + "word " * (4 * j) for j in range(paragraphs)],
            },
        ],
        "qas": [
            {
                "question": f"Question {q} about paper {index}?",
                "question_id": f"p{index}q{q}",
                "nlp_background": "two",
                "topic_background": "familiar",
                "paper_read": "no",
                "search_query": "",
                "question_writer": f"w{q}",
                "answers": [
                    {"answer": _answer(kind, q), "annotation_id": f"a{index}-{q}-0", "worker_id": "k0"},
                    {"answer": _answer("abstractive", q), "annotation_id": f"a{index}-{q}-1", "worker_id": "k1"},
                ],
            }
            for q, kind in enumerate(kinds)
        ],
        "figures_and_tables": [{"caption": f"Table 1: results of paper {index}.", "file": f"{index}-Table1-1.png"}],
    }


def corpus() -> dict[str, dict[str, dict[str, Any]]]:
    """split → {paper id → paper}: train has papers with 0–3 answerable questions and different lengths."""
    return {
        "train": {
            "1901.00001": paper(1, ["extractive", "yes-no", "unanswerable"]),  # 2 answerable
            "1901.00002": paper(2, ["abstractive", "unanswerable"]),  # 1 answerable
            "1901.00003": paper(3, ["extractive", "abstractive", "yes-no"], paragraphs=30),  # 3, long
            "1901.00004": paper(4, ["unanswerable", "extractive", "abstractive"]),  # 2 answerable
        },
        "validation": {"1902.00001": paper(5, ["extractive", "yes-no"])},
        "test": {"1903.00001": paper(6, ["abstractive", "unanswerable"])},
    }


def write_release(folder: Path, splits: dict[str, dict[str, Any]], tarballs: bool = False, subfolder: str = "") -> None:
    """The allenai release files (JSON, or the two published tarballs holding them)."""
    target = folder / subfolder if subfolder else folder
    target.mkdir(parents=True, exist_ok=True)
    if not tarballs:
        for split, papers in splits.items():
            (target / SPLIT_FILES[split]).write_text(json.dumps(papers, indent=1), encoding="utf-8")
        return
    groups = {
        "qasper-train-dev-v0.3.tgz": [s for s in ("train", "validation") if s in splits],
        "qasper-test-and-evaluator-v0.3.tgz": [s for s in ("test",) if s in splits],
    }
    for name, members in groups.items():
        if not members:
            continue
        with tarfile.open(target / name, "w:gz") as tar:
            for split in members:
                data = json.dumps(splits[split]).encode("utf-8")
                info = tarfile.TarInfo(SPLIT_FILES[split])
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if name.startswith("qasper-test"):
                script = b"# the official evaluator ships here\n"
                info = tarfile.TarInfo("qasper_evaluator.py")
                info.size = len(script)
                tar.addfile(info, io.BytesIO(script))


_ANSWER = pa.struct(
    [
        ("unanswerable", pa.bool_()),
        ("extractive_spans", pa.list_(pa.string())),
        ("yes_no", pa.bool_()),
        ("free_form_answer", pa.string()),
        ("evidence", pa.list_(pa.string())),
        ("highlighted_evidence", pa.list_(pa.string())),
    ]
)
QA_TEXT = (
    "question",
    "question_id",
    "nlp_background",
    "topic_background",
    "paper_read",
    "search_query",
    "question_writer",
)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("title", pa.string()),
        ("abstract", pa.string()),
        (
            "full_text",
            pa.struct([("section_name", pa.list_(pa.string())), ("paragraphs", pa.list_(pa.list_(pa.string())))]),
        ),
        (
            "qas",
            pa.struct(
                [(k, pa.list_(pa.string())) for k in QA_TEXT]
                + [
                    (
                        "answers",
                        pa.list_(
                            pa.struct(
                                [
                                    ("answer", pa.list_(_ANSWER)),
                                    ("annotation_id", pa.list_(pa.string())),
                                    ("worker_id", pa.list_(pa.string())),
                                ]
                            )
                        ),
                    )
                ]
            ),
        ),
        ("figures_and_tables", pa.struct([("caption", pa.list_(pa.string())), ("file", pa.list_(pa.string()))])),
    ]
)


def hub_row(paper_id: str, p: dict[str, Any]) -> dict[str, Any]:
    """One paper as a row of the hub's data set (sequences of structs column-wise)."""
    qas = p["qas"]
    return {
        "id": paper_id,
        "title": p["title"],
        "abstract": p["abstract"],
        "full_text": {
            "section_name": [s["section_name"] for s in p["full_text"]],
            "paragraphs": [s["paragraphs"] for s in p["full_text"]],
        },
        "qas": {
            **{k: [q[k] for q in qas] for k in QA_TEXT},
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
            "caption": [f["caption"] for f in p["figures_and_tables"]],
            "file": [f["file"] for f in p["figures_and_tables"]],
        },
    }


def write_parquet_conversion(
    folder: Path, splits: dict[str, dict[str, Any]], shards: int = 1, config: str = "qasper"
) -> None:
    """``<folder>/<config>/<split>/0000.parquet`` … as the hub's ``refs/convert/parquet`` branch holds them."""
    for split, papers in splits.items():
        rows = [hub_row(pid, p) for pid, p in papers.items()]
        target = folder / config / split if config else folder / split
        target.mkdir(parents=True, exist_ok=True)
        per = max(1, -(-len(rows) // shards))
        for n in range(shards):
            part = rows[n * per : (n + 1) * per]
            if part:
                pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), target / f"{n:04d}.parquet")

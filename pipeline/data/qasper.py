"""Qasper (Dasigi et al., NAACL 2021): questions about NLP papers, answered from the full text.

Two native layouts are accepted, per paper:

* allenai release (``qasper-{train,dev,test}-v0.3.json``): a JSON object ``paper_id → paper`` with
  ``title``, ``abstract``, ``full_text: [{"section_name", "paragraphs": [str]}]``,
  ``figures_and_tables: [{"caption", "file"}]`` and ``qas: [{"question", "question_id", ...,
  "answers": [{"answer": {"unanswerable", "extractive_spans", "yes_no", "free_form_answer",
  "evidence", "highlighted_evidence"}, "annotation_id", "worker_id"}]}]``.
* Hugging Face ``allenai/qasper`` (parquet/JSON exports of it, or the hub itself): one row per paper
  with ``id`` and the same fields, but every sequence of structs stored column-wise:
  ``full_text: {"section_name": [...], "paragraphs": [[...]]}``, ``figures_and_tables: {"caption":
  [...], "file": [...]}``, ``qas: {"question": [...], "question_id": [...], ..., "answers": [{"answer":
  [struct, ...], "annotation_id": [...], "worker_id": [...]}]}``.

Mapping: one example per question; segments = title, abstract, every non-empty paragraph (session =
section name, ``segment_id`` = ``s<section>p<paragraph>``) and the figure/table captions, shared by
the paper's questions (``conversation_id`` = paper id). ``answers`` holds one reference per
annotator, turned into text as the official baseline evaluator does: ``Unanswerable``, the extractive
spans joined by ``", "``, the free-form answer, or ``Yes``/``No``. ``category`` is the first
annotator's answer type: extractive, abstractive, yes-no or unanswerable.
"""

from __future__ import annotations

from typing import Any

from ._fields import get_field, str_list
from .errors import DataError
from .schema import Example, Segment

NAME = "qasper"


def _columns_to_rows(columns: Any, *, origin: str, rid: str, path: str) -> list[dict[str, Any]]:
    """``{"a": [1, 2], "b": [3, 4]}`` → ``[{"a": 1, "b": 3}, {"a": 2, "b": 4}]`` (HF sequence of structs)."""
    if not isinstance(columns, dict):
        raise DataError(
            f"expected an object of columns, got {type(columns).__name__}", source=origin, record=rid, field=path
        )
    lengths = {k: len(v) for k, v in columns.items() if isinstance(v, list)}
    if len(lengths) != len(columns):
        bad = next(k for k, v in columns.items() if not isinstance(v, list))
        raise DataError("expected a list (column)", source=origin, record=rid, field=f"{path}.{bad}")
    if len(set(lengths.values())) > 1:
        raise DataError(f"columns of different lengths {lengths}", source=origin, record=rid, field=path)
    n = next(iter(lengths.values()), 0)
    return [{k: columns[k][i] for k in columns} for i in range(n)]


def _normalise_paper(paper: Any, *, origin: str, rid: str) -> dict[str, Any]:
    """Bring an HF-layout paper into the allenai layout (a no-op for allenai papers)."""
    if not isinstance(paper, dict):
        raise DataError(f"expected a paper object, got {type(paper).__name__}", source=origin, record=rid)
    paper = dict(paper)
    full_text = paper.get("full_text")
    if isinstance(full_text, dict):
        paper["full_text"] = _columns_to_rows(full_text, origin=origin, rid=rid, path="full_text")
    figures = paper.get("figures_and_tables")
    if isinstance(figures, dict):
        paper["figures_and_tables"] = _columns_to_rows(figures, origin=origin, rid=rid, path="figures_and_tables")
    qas = paper.get("qas")
    if isinstance(qas, dict):
        rows = _columns_to_rows(qas, origin=origin, rid=rid, path="qas")
        for q_index, row in enumerate(rows):
            answers = row.get("answers")
            if isinstance(answers, dict):
                row["answers"] = _columns_to_rows(answers, origin=origin, rid=rid, path=f"qas[{q_index}].answers")
        paper["qas"] = rows
    return paper


def answer_text(blob: Any, *, origin: str, rid: str, path: str) -> tuple[str, str]:
    """(reference text, answer type) of one annotator's answer struct."""
    if not isinstance(blob, dict):
        raise DataError("expected an answer object", source=origin, record=rid, field=path)
    if blob.get("unanswerable"):
        return "Unanswerable", "unanswerable"
    spans = blob.get("extractive_spans") or []
    spans = str_list(spans, origin=origin, rid=rid, path=f"{path}.extractive_spans")
    if any(s.strip() for s in spans):
        return ", ".join(s.strip() for s in spans if s.strip()), "extractive"
    free = blob.get("free_form_answer")
    if isinstance(free, str) and free.strip():
        return free.strip(), "abstractive"
    yes_no = blob.get("yes_no")
    if isinstance(yes_no, bool):
        return ("Yes" if yes_no else "No"), "yes-no"
    raise DataError(
        "answer has no content (not unanswerable, no spans, no free-form answer, no yes/no)",
        source=origin,
        record=rid,
        field=path,
    )


def paper_segments(paper: dict[str, Any], *, origin: str, rid: str, figures: bool = True) -> list[Segment]:
    """Title, abstract, paragraphs (session = section name) and figure/table captions."""
    title = get_field(paper, "title", str, origin=origin, rid=rid)
    abstract = get_field(paper, "abstract", str, origin=origin, rid=rid, default="")
    segments = [Segment(text=title, session="Title", segment_id="title")]
    if abstract.strip():
        segments.append(Segment(text=abstract.strip(), session="Abstract", segment_id="abstract"))
    full_text = get_field(paper, "full_text", list, origin=origin, rid=rid)
    for s_index, section in enumerate(full_text):
        where = f"full_text[{s_index}]"
        if not isinstance(section, dict):
            raise DataError("expected a section object", source=origin, record=rid, field=where)
        name = section.get("section_name")
        name = name.strip() if isinstance(name, str) and name.strip() else None
        paragraphs = str_list(section.get("paragraphs") or [], origin=origin, rid=rid, path=f"{where}.paragraphs")
        for p_index, paragraph in enumerate(paragraphs):
            if paragraph.strip():
                segments.append(Segment(text=paragraph.strip(), session=name, segment_id=f"s{s_index}p{p_index}"))
    if figures:
        for f_index, fig in enumerate(paper.get("figures_and_tables") or []):
            caption = fig.get("caption") if isinstance(fig, dict) else None
            if isinstance(caption, str) and caption.strip():
                file = fig.get("file")
                segments.append(
                    Segment(
                        text=caption.strip(),
                        session="Figures and tables",
                        segment_id=file if isinstance(file, str) and file else f"figure{f_index}",
                    )
                )
    return segments


def _papers(records: Any, origin: str) -> list[tuple[str, Any]]:
    """(paper id, paper) pairs from an allenai dict or a list of HF-style rows."""
    if isinstance(records, dict):
        return [(str(pid), paper) for pid, paper in records.items()]
    if isinstance(records, list):
        out = []
        for index, row in enumerate(records):
            pid = get_field(row, "id", (str, int), origin=origin, rid=index)
            out.append((str(pid), row))
        return out
    raise DataError(
        f"expected an object paper_id → paper (allenai) or a list of papers (HF), got {type(records).__name__}",
        source=origin,
    )


def parse(records: Any, *, origin: str, split: str, options: dict[str, Any]) -> list[Example]:
    """Convert Qasper papers (either layout) into examples (see module doc).

    Options: ``figures`` (default true: add figure/table captions to the context).
    """
    figures = bool(options.get("figures", True))
    out: list[Example] = []
    for paper_id, raw in _papers(records, origin):
        rid = f"paper {paper_id}"
        paper = _normalise_paper(raw, origin=origin, rid=rid)
        segments = paper_segments(paper, origin=origin, rid=rid, figures=figures)
        qas = get_field(paper, "qas", list, origin=origin, rid=rid)
        for q_index, qa in enumerate(qas):
            where = f"qas[{q_index}]"
            question = get_field(qa, "question", str, origin=origin, rid=rid, path=f"{where}.question")
            qid = str(get_field(qa, "question_id", (str, int), origin=origin, rid=rid, path=f"{where}.question_id"))
            annotations = get_field(qa, "answers", list, origin=origin, rid=rid, path=f"{where}.answers")
            if not annotations:
                raise DataError("no answers", source=origin, record=rid, field=f"{where}.answers")
            answers: list[str] = []
            types: list[str] = []
            evidence: list[list[str]] = []
            for a_index, annotation in enumerate(annotations):
                apath = f"{where}.answers[{a_index}].answer"
                blob = get_field(annotation, "answer", dict, origin=origin, rid=rid, path=apath)
                text, kind = answer_text(blob, origin=origin, rid=rid, path=apath)
                types.append(kind)
                evidence.append(str_list(blob.get("evidence") or [], origin=origin, rid=rid, path=f"{apath}.evidence"))
                if text not in answers:
                    answers.append(text)
            out.append(
                Example(
                    example_id=f"{NAME}-{qid}",
                    task=NAME,
                    question=question.strip(),
                    answers=answers,
                    segments=segments,
                    category=types[0],
                    metadata={
                        "conversation_id": paper_id,
                        "paper_id": paper_id,
                        "question_id": qid,
                        "title": paper.get("title"),
                        "answer_types": types,
                        "evidence": evidence,
                    },
                )
            )
    return out

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

Where the files come from (:func:`locate`, for a source folder such as ``data/raw/qasper``), tried in order:

1. the allenai release: ``qasper-train-v0.3.json`` and ``qasper-dev-v0.3.json`` (from
   ``qasper-train-dev-v0.3.tgz``), ``qasper-test-v0.3.json`` (from ``qasper-test-and-evaluator-v0.3.tgz``),
   in the folder or one folder below it, or read straight out of the ``.tgz`` files themselves (only
   that member is read; nothing is extracted);
2. the hub's parquet conversion (the ``refs/convert/parquet`` branch of ``allenai/qasper``, as
   ``hf download allenai/qasper --repo-type dataset --revision refs/convert/parquet --local-dir
   data/raw/qasper`` writes it): ``qasper/<split>/*.parquet`` (all shards, in name order), also without
   the ``qasper/`` level, and the older ``qasper/qasper-<split>.parquet``;
3. generic exports ``<split>.json``, ``<split>.jsonl``, ``<split>.parquet``, ``<split>-*.parquet``.

``source: hf`` does not work for Qasper: ``allenai/qasper`` is a loading-script data set that
``datasets`` ≥ 4 refuses, so the reader says at once which files to put where (:data:`HOW_TO_GET`).

The paper's training recipe (:func:`recipe_stats`, reported in the manifest): train papers with at least
two answerable questions whose WRITE (the whole paper) fits the write length; released adapters are
step 70 at global batch 32, i.e. 2,240 episodes (one episode = one question with its paper written).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._fields import get_field, str_list
from .errors import DataError
from .schema import Example, Segment
from .sources import RawSplit, read_file

NAME = "qasper"
ALLENAI_FILES = {
    "train": "qasper-train-v0.3.json",
    "validation": "qasper-dev-v0.3.json",
    "test": "qasper-test-v0.3.json",
}
TARBALLS = {
    "train": "qasper-train-dev-v0.3.tgz",
    "validation": "qasper-train-dev-v0.3.tgz",
    "test": "qasper-test-and-evaluator-v0.3.tgz",
}
RELEASE_URL = "https://qasper-dataset.s3.us-west-2.amazonaws.com/"
HOW_TO_GET = (
    f"either the allenai release (curl -LO {RELEASE_URL}qasper-train-dev-v0.3.tgz and {RELEASE_URL}qasper-test-and-evaluator-v0.3.tgz "
    "into the folder; the .tgz files are read as they are, or extracted: qasper-{train,dev,test}-v0.3.json) "
    "or the hub's parquet conversion (hf download allenai/qasper --repo-type dataset --revision "
    "refs/convert/parquet --local-dir <folder>, giving qasper/<split>/0000.parquet)"
)
PAPER_STEPS = 70
PAPER_GLOBAL_BATCH = 32
PAPER_MIN_ANSWERABLE = 2


def _parquet_shards(folder: Path, split: str) -> list[Path]:
    for pattern in (f"qasper/{split}/*.parquet", f"{split}/*.parquet", f"qasper/qasper-{split}.parquet"):
        hits = sorted(p for p in folder.glob(pattern) if p.is_file())
        if hits:
            return hits
    return []


def _from_tarball(tgz: Path, member_name: str) -> Any:
    """The JSON of member ``member_name`` (matched by base name) of a release tarball, without extracting."""
    try:
        with tarfile.open(tgz, "r:*") as tar:
            for member in tar:
                if member.isfile() and Path(member.name).name == member_name:
                    f = tar.extractfile(member)
                    if f is None:
                        break
                    try:
                        return json.load(f)
                    except json.JSONDecodeError as err:
                        raise DataError(
                            f"{member.name}: invalid JSON at line {err.lineno}: {err.msg}", source=tgz
                        ) from None
                    except UnicodeDecodeError as err:
                        raise DataError(f"{member.name}: not UTF-8 text ({err.reason})", source=tgz) from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot read the tarball ({err})", source=tgz) from None
    raise DataError(f"no {member_name} in the tarball", source=tgz)


def locate(folder: Path, split: str) -> RawSplit:
    """Split ``split`` from a source folder (see the module docstring), or a :class:`DataError` saying
    both ways to obtain Qasper when neither is there."""
    if split not in ALLENAI_FILES:
        raise DataError(f"unknown Qasper split {split!r}; splits: {', '.join(ALLENAI_FILES)}", source=folder)
    if folder.is_dir():
        name = ALLENAI_FILES[split]
        for cand in (folder / name, *sorted(folder.glob(f"*/{name}"))):
            if cand.is_file():
                return RawSplit(records=read_file(cand), origin=str(cand), files=[cand])
        tgz = folder / TARBALLS[split]
        if tgz.is_file():
            return RawSplit(records=_from_tarball(tgz, name), origin=f"{tgz}:{name}", files=[tgz])
        shards = _parquet_shards(folder, split)
        if shards:
            rows: list[Any] = []
            for shard in shards:
                rows.extend(read_file(shard))
            origin = str(shards[0]) if len(shards) == 1 else f"{shards[0].parent}/*.parquet ({len(shards)} files)"
            return RawSplit(records=rows, origin=origin, files=shards)
        for generic in (f"{split}.json", f"{split}.jsonl", f"{split}.parquet"):
            if (folder / generic).is_file():
                return RawSplit(
                    records=read_file(folder / generic), origin=str(folder / generic), files=[folder / generic]
                )
        generic_shards = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"*/{split}-*.parquet"))
        if generic_shards:
            rows = []
            for shard in generic_shards:
                rows.extend(read_file(shard))
            return RawSplit(records=rows, origin=str(generic_shards[0]), files=generic_shards)
        what = "no Qasper files for split " + repr(split)
    else:
        what = "no such folder"
    raise DataError(f"{what}; put {HOW_TO_GET}", source=folder)


def hub_error(split: str) -> DataError:
    """``source: hf``: allenai/qasper cannot be loaded by ``datasets`` ≥ 4 (a loading script)."""
    return DataError(
        "allenai/qasper is a loading-script data set that the datasets package (>= 4) refuses; set source to a "
        f"local folder (e.g. data/raw/qasper) and put {HOW_TO_GET}",
        source=f"hf:allenai/qasper[{split}]",
    )


def recipe_stats(
    examples: Sequence[Example], packer: Any = None, min_answerable: int = PAPER_MIN_ANSWERABLE
) -> dict[str, Any]:
    """How many training episodes the paper's recipe yields from these examples.

    A paper is selected when at least ``min_answerable`` of its questions are answerable (the first
    annotator's answer, the training target, is not "Unanswerable") and its WRITE — the paper's
    segments as the packer renders them — fits ``packer.write_length`` tokens. Episodes = the answerable
    questions of the selected papers; the paper trains ``PAPER_STEPS`` × ``PAPER_GLOBAL_BATCH`` of them.
    Without a packer (no ``prepare.tokenizer``) the write length cannot be checked: then the selected
    counts are None.
    """
    papers: dict[str, list[Example]] = {}
    for ex in examples:
        papers.setdefault(ex.conversation_id or ex.example_id, []).append(ex)
    answerable = {pid: sum(1 for e in exs if e.category != "unanswerable") for pid, exs in papers.items()}
    enough = [pid for pid, n in answerable.items() if n >= min_answerable]
    out: dict[str, Any] = {
        "papers": len(papers),
        "questions": len(examples),
        "answerable_questions": sum(answerable.values()),
        f"papers_with_{min_answerable}_answerable": len(enough),
        "write_length": None,
        "papers_selected": None,
        "episodes": None,
        "paper_steps": PAPER_STEPS,
        "paper_global_batch": PAPER_GLOBAL_BATCH,
        "paper_episodes": PAPER_STEPS * PAPER_GLOBAL_BATCH,
        "epochs_for_paper_episodes": None,
    }
    if packer is not None:
        fits = [pid for pid in enough if len(packer.context_ids(papers[pid][0].segments)[0]) <= packer.write_length]
        episodes = sum(answerable[pid] for pid in fits)
        out.update(
            write_length=packer.write_length,
            papers_selected=len(fits),
            episodes=episodes,
            epochs_for_paper_episodes=round(PAPER_STEPS * PAPER_GLOBAL_BATCH / episodes, 2) if episodes else None,
        )
    return out


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

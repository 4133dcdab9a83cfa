"""MemoryAgentBench (Hu, Wang & McAuley, 2025; hub ``ai-hyz/MemoryAgentBench``, MIT licence).

Native format (dataset card of ``ai-hyz/MemoryAgentBench``; code at github.com/HUST-AI-HYZ/
MemoryAgentBench): four splits, one per competency — ``Accurate_Retrieval``, ``Test_Time_Learning``,
``Long_Range_Understanding``, ``Conflict_Resolution`` — stored as ``data/<split>-00000-of-00001.parquet``.
Each row is one long context with several questions ("inject once, query many times"):
``context`` (str), ``questions`` (list of str), ``answers`` (list of lists of str: the acceptable
answers of each question) and ``metadata`` (struct: ``source`` such as ``ruler_qa1_197K`` or
``factconsolidation_mh_262k``, and per-question lists ``question_ids``, ``question_types``,
``question_dates``, ``qa_pair_ids``, plus ``keypoints``, ``previous_events``, ``demo``,
``haystack_sessions``). Local Parquet, JSON or JSONL exports of those rows are read the same way.

Mapping: one example per question; the context is cut into chunks of at most ``chunk_chars``
characters at line breaks (the benchmark feeds long contexts to memory agents chunk by chunk), each a
segment, shared by the row's questions (``conversation_id`` = ``<source>-<row>``). ``category`` = the
competency (``accurate_retrieval`` ...) taken from the split name (or option ``competency``);
``metadata`` keeps ``source`` and the question's own id/type/date. Questions and golds are kept
exactly as published (the official scorer compares RULER NIAH golds, surrounding spaces included,
with the raw reply); the question only loses surrounding whitespace.

Recsys mapping: the movie-recommendation golds (``recsys_*`` sources) are ReDial movie ids, which the
official scorer names through ``entity2id.json`` (``{"<movie name or path>": id}``). The hub dataset
ships it at its root, next to ``data/``; the benchmark's code reads it from
``processed_data/Recsys_Redial/``. :func:`find_entity2id` finds it for a source, :func:`check_entity2id`
checks that it names every gold id; the prepare stage copies it next to the prepared splits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._fields import as_records, get_field, str_list
from .errors import DataError
from .schema import Example, Segment

NAME = "memoryagentbench"
COMPETENCIES = {
    "accurate_retrieval": "accurate_retrieval",
    "ar": "accurate_retrieval",
    "test_time_learning": "test_time_learning",
    "ttl": "test_time_learning",
    "long_range_understanding": "long_range_understanding",
    "lru": "long_range_understanding",
    "conflict_resolution": "conflict_resolution",
    "cr": "conflict_resolution",
}
HF_SPLITS = ("Accurate_Retrieval", "Test_Time_Learning", "Long_Range_Understanding", "Conflict_Resolution")
PER_QUESTION_KEYS = ("question_ids", "question_types", "question_dates", "qa_pair_ids")
DEFAULT_CHUNK_CHARS = 4000
ENTITY2ID = "entity2id.json"
UPSTREAM_ENTITY2ID = Path("processed_data") / "Recsys_Redial" / ENTITY2ID  # where the benchmark's code reads it


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``chunk_chars`` characters, at line breaks where possible."""
    if chunk_chars <= 0:
        raise ValueError("chunk_chars must be positive")
    chunks: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:  # a single over-long line: hard split
            if current:
                chunks.append(current)
                current = ""
            chunks.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(current) + len(line) > chunk_chars:
            chunks.append(current)
            current = ""
        current += line
    if current:
        chunks.append(current)
    return [c for c in (c.strip() for c in chunks) if c]


def competency_of(split: str, options: dict[str, Any]) -> str | None:
    """The competency name for a split name such as ``Accurate_Retrieval`` (or option ``competency``)."""
    explicit = options.get("competency")
    if explicit:
        return COMPETENCIES.get(str(explicit).lower(), str(explicit))
    return COMPETENCIES.get(split.lower())


def parse(records: Any, *, origin: str, split: str, options: dict[str, Any]) -> list[Example]:
    """Convert MemoryAgentBench rows into examples (see module doc).

    Options: ``chunk_chars`` (default 4000), ``sources`` (keep only rows whose ``metadata.source`` is
    listed), ``competency`` (category when the split name is not a competency); ``entity2id`` (the
    recsys movie mapping's path) is for the prepare stage (:func:`find_entity2id`), not read here.
    """
    rows = as_records(records, origin=origin, what="a list of rows")
    chunk_chars = int(options.get("chunk_chars", DEFAULT_CHUNK_CHARS))
    keep_sources = options.get("sources")
    category = competency_of(split, options)
    out: list[Example] = []
    for index, row in enumerate(rows):
        context = get_field(row, "context", str, origin=origin, rid=index)
        questions = str_list(
            get_field(row, "questions", list, origin=origin, rid=index), origin=origin, rid=index, path="questions"
        )
        answers = get_field(row, "answers", list, origin=origin, rid=index)
        if len(answers) != len(questions):
            raise DataError(
                f"{len(answers)} answers for {len(questions)} questions", source=origin, record=index, field="answers"
            )
        meta = get_field(row, "metadata", dict, origin=origin, rid=index, default={})
        source = meta.get("source")
        source = str(source) if source is not None else split
        if keep_sources is not None and source not in keep_sources:
            continue
        rid = f"{index} (source={source})"
        segments = [Segment(text=c, segment_id=f"chunk{k}") for k, c in enumerate(chunk_text(context, chunk_chars))]
        conversation_id = f"{source}-{index}"
        per_question = {
            key: meta[key]
            for key in PER_QUESTION_KEYS
            if isinstance(meta.get(key), list) and len(meta[key]) == len(questions)
        }
        for q_index, question in enumerate(questions):
            gold = answers[q_index]
            gold_list = [gold] if isinstance(gold, str | int | float) and not isinstance(gold, bool) else gold
            gold_list = str_list(gold_list, origin=origin, rid=rid, path=f"answers[{q_index}]")
            metadata: dict[str, Any] = {
                "conversation_id": conversation_id,
                "source": source,
                "row": index,
                "question_index": q_index,
            }
            for key, values in per_question.items():
                value = values[q_index]
                metadata[key[:-1]] = value if value is None or isinstance(value, str | int | float) else str(value)
            if isinstance(meta.get("keypoints"), list):
                metadata["keypoints"] = [str(k) for k in meta["keypoints"]]
            out.append(
                Example(
                    example_id=f"{NAME}-{source}-{index}-q{q_index:03d}",
                    task=NAME,
                    question=question.strip(),
                    answers=gold_list,  # as published: the official scorer uses them as given
                    segments=segments,
                    category=category,
                    metadata=metadata,
                )
            )
    return out


# ------------------------------------------------------------------------------------- recsys mapping
def movie_id_golds(examples: Iterable[Example]) -> list[tuple[str, int]]:
    """``(example id, movie id)`` for each gold of the recsys questions whose golds are all movie ids.

    Recsys = ``metadata["source"]`` starting with ``recsys`` (as the evaluator's families); a gold is a
    movie id when ``int(gold.strip())`` succeeds (upstream's conversion)."""
    out: list[tuple[str, int]] = []
    for e in examples:
        if not str(e.metadata.get("source") or "").lower().startswith("recsys") or not e.answers:
            continue
        try:
            ids = [int(g.strip()) for g in e.answers]
        except ValueError:  # title golds: scored without the mapping
            continue
        out.extend((e.example_id, i) for i in ids)
    return out


def entity2id_candidates(folders: Iterable[Path]) -> list[Path]:
    """Where a local source may hold the mapping, in the order looked at: for each folder (the source
    folder and the folders of the files read) ``<folder>/entity2id.json``, then
    ``<folder>/processed_data/Recsys_Redial/entity2id.json``, and for a folder named ``data`` (the hub
    layout, ``data/<split>-*.parquet``) ``<folder>/../entity2id.json``."""
    out: list[Path] = []
    for folder in folders:
        folder = Path(os.path.normpath(folder))
        cands = [folder / ENTITY2ID, folder / UPSTREAM_ENTITY2ID]
        if folder.name == "data":
            cands.append(folder.parent / ENTITY2ID)
        out.extend(c for c in cands if c not in out)
    return out


@dataclass(frozen=True)
class MappingFile:
    """A found ``entity2id.json``: its bytes (read once, so what is checked is what is copied) and
    where they came from (``origin``: a path for messages, ``label``: for the manifest)."""

    data: bytes
    origin: str
    label: str


def _read_local(path: Path, label: str) -> MappingFile:
    try:
        return MappingFile(path.read_bytes(), str(path), label)
    except OSError as err:
        raise DataError(f"cannot read the recsys movie mapping ({err.strerror or err})", source=path) from None


def download_entity2id(hf_id: str, revision: str | None) -> MappingFile:
    """``entity2id.json`` of a hub dataset (``huggingface_hub.hf_hub_download``; its cache serves offline)."""
    where = f"hf:{hf_id}/{ENTITY2ID}" + (f"@{revision}" if revision else "")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(
            "the recsys movie mapping comes from the Hugging Face hub, which needs the 'datasets' package "
            "(pip install datasets); or download the dataset and give its folder as the source",
            source=where,
        ) from None
    try:
        path = hf_hub_download(hf_id, ENTITY2ID, repo_type="dataset", revision=revision)
    except Exception as err:  # offline, missing file, gated: the hub client raises many types
        raise DataError(
            f"could not download the recsys movie mapping ({type(err).__name__}: {err}); recsys golds are "
            "movie ids and need it: download the dataset elsewhere and give its folder as the source",
            source=where,
        ) from None
    return _read_local(Path(path), where)


def find_entity2id(
    source: str,
    *,
    examples: Sequence[Example],
    read_files: Iterable[Path],
    base_dir: Path,
    hf_id: str | None,
    revision: str | None = None,
    explicit: Any = None,
) -> MappingFile | None:
    """The source's ``entity2id.json``, or None when it has none and no recsys gold is a movie id.

    Local sources: ``explicit`` (reader option ``entity2id``, relative to ``base_dir``) or the first of
    :func:`entity2id_candidates` that exists — copied whenever found. Hub sources (``hf_id`` set):
    downloaded only when a recsys gold is a movie id. Raises :class:`DataError` (naming where it looked)
    when movie-id golds come without a mapping."""
    needed = movie_id_golds(examples)

    def display(path: Path) -> str:  # relative to base_dir: no machine-specific prefix in the manifest
        return os.path.normpath(os.path.relpath(path.absolute(), base_dir.absolute()))

    if explicit is not None:
        if not isinstance(explicit, str) or not explicit:
            raise DataError(f"reader option 'entity2id' must be a file path, got {explicit!r}", source=source)
        path = Path(os.path.expandvars(explicit)).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise DataError("file not found (reader option 'entity2id')", source=path)
        return _read_local(path, display(path))
    if hf_id is not None:
        return download_entity2id(hf_id, revision) if needed else None
    root = Path(os.path.expandvars(source)).expanduser()
    root = root if root.is_absolute() else base_dir / root
    folders = ([root] if root.is_dir() else []) + [Path(f).parent for f in read_files]
    candidates = entity2id_candidates(folders)
    for path in candidates:
        if path.is_file():
            return _read_local(path, display(path))
    if needed:
        example_id, movie_id = needed[0]
        raise DataError(
            f"recsys golds are movie ids (e.g. {movie_id} of {example_id}) but no {ENTITY2ID} was found; "
            f"looked for {', '.join(str(c) for c in candidates)}; put the benchmark's {ENTITY2ID} (from the hub "
            "dataset's root) there or name it with the reader option 'entity2id'",
            source=source,
        )
    return None


def check_entity2id(mapping: MappingFile, examples: Sequence[Example]) -> None:
    """A JSON object of movie name → integer id naming every movie-id gold, else a :class:`DataError`."""
    try:
        data = json.loads(mapping.data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"not a JSON file ({err})", source=mapping.origin) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in data.items()
    ):
        raise DataError("expected a JSON object of movie name → integer id", source=mapping.origin)
    ids = set(data.values())
    for example_id, movie_id in movie_id_golds(examples):
        if movie_id not in ids:
            raise DataError(f"has no movie id {movie_id} (gold of {example_id})", source=mapping.origin)

"""Where raw records come from: local files (JSON, JSONL, CSV, Parquet) or a Hugging Face dataset id.

A source string is either a local path (file or folder) or ``hf:<owner>/<name>`` for the Hugging Face
hub, loaded with the ``datasets`` package (imported lazily, only then). Every read returns a
:class:`RawSplit`: the raw records plus where they came from, for error messages and the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

HF_PREFIX = "hf:"
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class RawSplit:
    """Raw records of one split and their provenance.

    Attributes:
        records: the records as parsed (a list of dicts for row formats; whatever the JSON holds
            for ``.json`` files: the reader checks its shape).
        origin: human-readable origin used in error messages (a file path or ``hf:<id>[<split>]``).
        files: local input files (hashed into the manifest).
        hf_id / hf_config / hf_split / revision: set for hub sources (``revision`` as requested: pin
            one in params.yaml for reproducible runs; no network call is made to resolve it).
        fingerprint: the ``datasets`` fingerprint of the loaded split (identifies its content).
    """

    records: Any
    origin: str
    files: list[Path] = field(default_factory=list)
    hf_id: str | None = None
    hf_config: str | None = None
    hf_split: str | None = None
    revision: str | None = None
    fingerprint: str | None = None


def is_hf(source: str | None) -> bool:
    """True for ``hf:<owner>/<name>`` sources."""
    return bool(source) and str(source).startswith(HF_PREFIX)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_file(path: str | Path) -> Any:
    """Parse one local file by its extension.

    ``.json`` → the parsed JSON value; ``.jsonl`` → list of parsed lines; ``.csv`` → list of row dicts;
    ``.parquet`` → list of row dicts (nested structs/lists as Python objects, via pyarrow).
    Raises :class:`DataError` naming the file for a missing file or a parse error (with the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", source=path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            with path.open(encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}", source=path) from None
        except UnicodeDecodeError as err:
            raise DataError(f"not UTF-8 text ({err.reason})", source=path) from None
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"invalid JSON at line {lineno}: {err.msg}", source=path) from None
        return rows
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        if reader.fieldnames is None:
            raise DataError("empty CSV file (no header row)", source=path)
        return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow comes with the pipeline extras
            raise DataError("reading Parquet needs the 'pyarrow' package", source=path) from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise DataError(f"cannot read Parquet: {err}", source=path) from None
    raise DataError(f"unsupported file type {suffix!r} (expected one of {', '.join(LOCAL_SUFFIXES)})", source=path)


def find_split_file(folder: Path, candidates: Sequence[str]) -> Path:
    """The first of ``candidates`` (file names or glob patterns) that exists in ``folder``."""
    for cand in candidates:
        if any(ch in cand for ch in "*?["):
            hits = sorted(folder.glob(cand))
            if hits:
                return hits[0]
        elif (folder / cand).is_file():
            return folder / cand
    raise DataError(f"no input file found; looked for {', '.join(candidates)}", source=folder)


def read_local(path: Path) -> RawSplit:
    """A :class:`RawSplit` from one local file."""
    return RawSplit(records=read_file(path), origin=str(path), files=[path])


def read_hf(hf_id: str, split: str, config: str | None = None, revision: str | None = None) -> RawSplit:
    """Load one split of a hub dataset with ``datasets.load_dataset``; rows become plain dicts.

    Raises :class:`DataError` with a clear reason when ``datasets`` is missing or loading fails
    (offline machine, gated data set, unknown split).
    """
    origin = f"{HF_PREFIX}{hf_id}" + (f"/{config}" if config else "") + f"[{split}]"
    try:
        import datasets
    except ImportError:
        raise DataError(
            "loading from the Hugging Face hub needs the 'datasets' package (pip install datasets); "
            "or download the files and give a local path as the source",
            source=origin,
        ) from None
    try:
        ds = datasets.load_dataset(hf_id, config, split=split, revision=revision)
    except Exception as err:  # offline, gated, unknown split: datasets raises many types
        raise DataError(
            f"could not load from the hub ({type(err).__name__}: {err}); if this machine is offline, "
            "download the files elsewhere and give a local path as the source",
            source=origin,
        ) from None
    fingerprint = getattr(ds, "_fingerprint", None)
    return RawSplit(
        records=[dict(row) for row in ds],
        origin=origin,
        hf_id=hf_id,
        hf_config=config,
        hf_split=split,
        revision=revision,
        fingerprint=str(fingerprint) if fingerprint else None,
    )

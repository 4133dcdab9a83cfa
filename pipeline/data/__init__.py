"""Dataset readers: every supported data set turned into the common :class:`Example` schema.

Use :func:`load_split` to get one split of one data set::

    from pipeline.data import load_split
    examples, provenance = load_split("locomo", "test", source="../shared/data/locomo/locomo10.json")

``source`` is a local file, a local folder (the reader looks for its usual file names, see
:data:`DATASETS`), ``"hf"`` (the data set's usual Hugging Face id) or ``"hf:<owner>/<name>"``.
The synthetic set needs no source: its settings come in ``options``. All problems with the input
raise :class:`DataError` naming the file, the record and the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import gpqa, hotpotqa, ifeval, locomo, memoryagentbench, qasper, synthetic
from .errors import DataError
from .schema import Example, Segment, read_split, write_split
from .sources import HF_PREFIX, RawSplit, find_split_file, is_hf, read_hf, read_local, sha256_file

__all__ = [
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "Example",
    "Provenance",
    "Segment",
    "known_datasets",
    "load_split",
    "read_split",
    "write_split",
]

Parser = Callable[..., list[Example]]


def _generic(split: str) -> tuple[str, ...]:
    return (f"{split}.json", f"{split}.jsonl", f"{split}.csv", f"{split}.parquet", f"{split}-*.parquet")


@dataclass(frozen=True)
class DatasetInfo:
    """What the loader needs to know about one data set.

    Attributes:
        name: registry name, used in params.yaml.
        parse: ``parse(records, origin=, split=, options=) -> list[Example]`` (None: generated).
        default_splits: splits prepared when an entry lists none.
        local_files: file names / globs to look for in a source folder, given the split name.
        hf_id / hf_config: the usual hub location (``source: hf``).
        hf_split: our split name → the hub's split name.
        licence: short licence note (details in docs/DATASETS.md).
        locate: ``locate(folder, split) -> RawSplit`` for a source folder (or a missing one), replacing the
            ``local_files`` search (Qasper: release files, tarballs, the hub's parquet conversion).
        hub_error: ``hub_error(split) -> DataError`` when ``source: hf`` cannot work for this data set.
    """

    name: str
    parse: Parser | None
    default_splits: tuple[str, ...]
    local_files: Callable[[str], tuple[str, ...]] = _generic
    hf_id: str | None = None
    hf_config: str | None = None
    hf_split: Callable[[str], str] = field(default=lambda s: s)
    licence: str = ""
    locate: Callable[[Path, str], RawSplit] | None = None
    hub_error: Callable[[str], DataError] | None = None


def _mab_split(split: str) -> str:
    for hub in memoryagentbench.HF_SPLITS:
        if memoryagentbench.COMPETENCIES.get(split.lower()) == hub.lower():
            return hub
    return split


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "synthetic", None, ("train", "validation", "test"), licence="generated here (Apache-2.0, this project)"
        ),
        DatasetInfo(
            "locomo",
            locomo.parse,
            ("test",),
            local_files=lambda s: ("locomo10.json", *_generic(s)),
            licence="CC BY-NC 4.0",
        ),
        DatasetInfo(
            "qasper",
            qasper.parse,
            ("train", "validation", "test"),
            hf_id="allenai/qasper",
            licence="CC BY 4.0",
            locate=qasper.locate,
            hub_error=qasper.hub_error,
        ),
        DatasetInfo(
            "hotpotqa",
            hotpotqa.parse,
            ("validation",),
            local_files=lambda s: (
                (("hotpot_dev_distractor_v1.json",) if s == "validation" else ("hotpot_train_v1.1.json",))
                + _generic(s)
                + (f"*/{s}-*.parquet",)
            ),
            hf_id="hotpotqa/hotpot_qa",
            hf_config="distractor",
            licence="CC BY-SA 4.0",
        ),
        DatasetInfo(
            "memoryagentbench",
            memoryagentbench.parse,
            memoryagentbench.HF_SPLITS,
            local_files=lambda s: (*_generic(s), f"data/{s}-*.parquet", f"data/{s}.parquet"),
            hf_id="ai-hyz/MemoryAgentBench",
            hf_split=_mab_split,
            licence="MIT (dataset card); each source keeps its own licence",
        ),
        DatasetInfo(
            "ifeval",
            ifeval.parse,
            ("test",),
            local_files=lambda s: ("input_data.jsonl", *_generic(s)),
            hf_id="google/IFEval",
            hf_split=lambda s: "train",
            licence="Apache-2.0",
        ),
        DatasetInfo(
            "gpqa",
            gpqa.parse,
            ("test",),
            local_files=lambda s: ("gpqa_diamond.csv", *_generic(s)),
            hf_id="Idavidrein/gpqa",
            hf_config="gpqa_diamond",
            hf_split=lambda s: "train",
            licence="CC BY 4.0 (authors ask not to reveal examples online)",
        ),
    )
}


def known_datasets() -> list[str]:
    """Names accepted by :func:`load_split`."""
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry for ``name``; an unknown name raises a :class:`DataError` listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}") from None


@dataclass
class Provenance:
    """Where a split came from, for the manifest: ``origin`` plus hashed input files or hub coordinates."""

    origin: str
    files: list[dict[str, Any]] = field(default_factory=list)
    hf_id: str | None = None
    hf_config: str | None = None
    hf_split: str | None = None
    revision: str | None = None
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict without empty fields."""
        out: dict[str, Any] = {"origin": self.origin}
        if self.files:
            out["files"] = self.files
        for key in ("hf_id", "hf_config", "hf_split", "revision", "fingerprint"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _display(path: Path, base_dir: Path | None) -> str:
    """``path`` relative to ``base_dir`` when given (keeps machine-specific prefixes out of manifests)."""
    if base_dir is None or (not path.is_absolute() and not base_dir.is_absolute()):
        return os.path.normpath(path)
    return os.path.normpath(os.path.relpath(path.absolute(), base_dir.absolute()))


def _resolve(path: str | Path, base_dir: Path | None) -> Path:
    p = Path(os.path.expandvars(str(path))).expanduser()
    p = p if p.is_absolute() or base_dir is None else base_dir / p
    return Path(os.path.normpath(p))


def _read(
    info: DatasetInfo,
    split: str,
    source: str,
    files: dict[str, str] | None,
    hf_config: str | None,
    revision: str | None,
    base_dir: Path | None,
) -> RawSplit:
    if is_hf(source):
        hub_id = source[len(HF_PREFIX) :] or info.hf_id
        if not hub_id:
            raise DataError(f"{info.name} has no default Hugging Face id; write source: hf:<owner>/<name>")
        if hub_id == info.hf_id and info.hub_error is not None:
            raise info.hub_error(split)
        return read_hf(hub_id, info.hf_split(split), hf_config or info.hf_config, revision)
    if source == "hf":
        if info.hub_error is not None:
            raise info.hub_error(split)
        if not info.hf_id:
            raise DataError(f"{info.name} is not on the Hugging Face hub; give a local path as the source")
        return read_hf(info.hf_id, info.hf_split(split), hf_config or info.hf_config, revision)
    root = _resolve(source, base_dir)
    if files and split in files:
        path = _resolve(files[split], root if root.is_dir() else base_dir)
        return read_local(path)
    if info.locate is not None and (root.is_dir() or not root.exists()):
        return info.locate(root, split)
    if root.is_dir():
        return read_local(find_split_file(root, info.local_files(split)))
    return read_local(root)


def load_split(
    name: str,
    split: str,
    source: str | None = None,
    *,
    options: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
    hf_config: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
    base_dir: str | Path | None = None,
) -> tuple[list[Example], Provenance]:
    """Read (or generate) one split of one data set as :class:`Example` objects.

    Args:
        name: a registry name (:func:`known_datasets`).
        split: output split name (for hub sources mapped to the hub's split name).
        source: local file/folder, ``"hf"`` or ``"hf:<id>"``; ignored for ``synthetic``.
        options: reader-specific options (for ``synthetic``: :class:`~pipeline.data.synthetic.SyntheticConfig`
            fields).
        files: optional explicit ``split → file`` map (relative to a source folder).
        hf_config / revision: hub configuration name and revision.
        limit: keep only the first ``limit`` examples (in native order).
        base_dir: relative local paths are taken from here (default: the working directory).

    Returns:
        The examples and their :class:`Provenance`.
    """
    info = dataset_info(name)
    options = dict(options or {})
    base = Path(base_dir) if base_dir is not None else None
    if info.parse is None:  # generated
        try:
            cfg = synthetic.config_from_options(options)
            examples = synthetic.generate_split(cfg, split)
        except (TypeError, ValueError) as err:
            raise DataError(str(err), source="synthetic settings") from None
        provenance = Provenance(origin=f"generated (seed {cfg.seed})")
    else:
        if not source:
            raise DataError(f"dataset {name!r} needs a source (a local file or folder, or hf:<id>)")
        raw = _read(info, split, source, files, hf_config, revision, base)
        try:
            examples = info.parse(raw.records, origin=raw.origin, split=split, options=options)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise DataError(f"unexpected record structure ({type(err).__name__}: {err})", source=raw.origin) from None
        provenance = Provenance(
            origin=raw.origin,
            files=[{"path": _display(p, base), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in raw.files],
            hf_id=raw.hf_id,
            hf_config=raw.hf_config,
            hf_split=raw.hf_split,
            revision=raw.revision,
            fingerprint=raw.fingerprint,
        )
    if limit is not None:
        examples = examples[:limit]
    ids = [e.example_id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError("duplicate example id", source=provenance.origin, record=dup)
    return examples, provenance

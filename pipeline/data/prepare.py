"""The work of the ``prepare`` stage: read every configured data set, write the splits and a manifest.

Output layout (``out_dir``, default ``data/prepared``)::

    <dataset>/<split>.jsonl            one example per line (schema: pipeline.data.schema)
    <dataset>/<split>.contexts.jsonl   shared contexts, once each (when examples share one)
    <dataset>/entity2id.json           MemoryAgentBench's recsys movie mapping, when the source provides it
    manifest.json                      counts per split and category, provenance, hashes, token lengths

Everything is first written to a temporary folder next to ``out_dir`` and moved into place only when
all data sets succeeded: a failure leaves the previous output (or nothing) and no partial files.
The manifest holds no timestamps or absolute paths, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.common import atomic_dir

from . import DATASETS, load_split, memoryagentbench
from .errors import DataError
from .schema import SCHEMA_VERSION, Example, contexts_path, write_split
from .sources import HF_PREFIX, is_hf, sha256_file

MANIFEST = "manifest.json"


def percentiles(values: Sequence[int], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus min/mean/max of a list of lengths (empty list → ``{}``)."""
    if not values:
        return {}
    ordered = sorted(values)
    n = len(ordered)
    out: dict[str, float] = {"min": ordered[0]}
    for q in qs:
        out[f"p{q}"] = ordered[max(0, math.ceil(q / 100 * n) - 1)]
    out["max"] = ordered[-1]
    out["mean"] = round(sum(ordered) / n, 1)
    return out


def token_stats(examples: list[Example], packer: Any) -> dict[str, Any]:
    """Token-length statistics of the WRITE contexts (one per shared context) and READ segments.

    Lengths are of the untruncated sequences; ``*_over_limit`` count those longer than the packer's limits.
    """
    write: list[int] = []
    seen: set[str] = set()
    read: list[int] = []
    for ex in examples:
        key = ex.conversation_id or ex.example_id
        if ex.segments and key not in seen:
            seen.add(key)
            write.append(len(packer.context_ids(ex.segments)[0]))
        ids, _, _ = packer.read_ids(ex, truncate=False)
        read.append(len(ids))
    return {
        "write": percentiles(write),
        "read": percentiles(read),
        "write_over_limit": sum(n > packer.write_length for n in write),
        "read_over_limit": sum(n > packer.read_length for n in read),
    }


def _file_entry(path: Path, root: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _make_packer(params: Any, base_dir: Path | None = None) -> Any:
    if params.tokenizer is None:
        return None
    from .tokenize import Packer, load_tokenizer

    tok = load_tokenizer(params.tokenizer.name_or_path, params.tokenizer.gguf_file, root=base_dir)
    return Packer(tok, write_length=params.tokenizer.write_length, read_length=params.tokenizer.read_length)


def _copy_entity2id(entry: Any, examples: list[Example], ds_manifest: dict[str, Any], tmp: Path, base: Path) -> None:
    """MemoryAgentBench: put the source's ``entity2id.json`` next to the splits, where the evaluator
    reads it (checked first; written inside the staging folder, so it appears with the splits or not
    at all) and list it under ``files``; movie-id golds without a mapping are a :class:`DataError`."""
    source = entry.source or ""
    hf_id = None
    if source == "hf" or is_hf(source):
        hf_id = source[len(HF_PREFIX) :] if is_hf(source) else ""
        hf_id = hf_id or DATASETS[entry.name].hf_id
    read_files = [
        base / f["path"] for split in ds_manifest["splits"].values() for f in split["provenance"].get("files", [])
    ]
    mapping = memoryagentbench.find_entity2id(
        source,
        examples=examples,
        read_files=read_files,
        base_dir=base,
        hf_id=hf_id,
        revision=entry.revision,
        explicit=entry.options.get("entity2id"),
    )
    if mapping is None:
        return
    memoryagentbench.check_entity2id(mapping, examples)
    target = tmp / entry.out_name / memoryagentbench.ENTITY2ID
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(mapping.data)
    ds_manifest["files"] = {"entity2id": {**_file_entry(target, tmp), "origin": mapping.label}}


def _prepare_into(params: Any, tmp: Path, base_dir: Path) -> dict[str, Any]:
    packer = _make_packer(params, base_dir)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "params": params.model_dump(mode="json", exclude_none=True),
        "datasets": {},
        "totals": {"examples": 0},
    }
    for entry in params.datasets:
        if not entry.enabled:
            continue
        splits = entry.split_names()
        source_path = None
        if entry.source and entry.name != "synthetic" and entry.source != "hf" and not is_hf(entry.source):
            source_path = Path(os.path.expandvars(entry.source)).expanduser()
            source_path = source_path if source_path.is_absolute() else base_dir / source_path
            if source_path.is_file() and len(splits) > 1 and not entry.files:
                raise DataError(
                    f"{entry.name}: the source is a single file but {len(splits)} splits are listed "
                    f"({', '.join(splits)}); list one split or map each split to a file with 'files:'",
                    source=entry.source,
                )
        ds_manifest: dict[str, Any] = {
            "reader": entry.name,
            "source": entry.source,
            "licence": DATASETS[entry.name].licence,
            "splits": {},
        }
        prepared: list[Example] = []
        for split in splits:
            examples, provenance = load_split(
                entry.name,
                split,
                entry.source,
                options=entry.reader_options(),
                files=entry.files,
                hf_config=entry.hf_config,
                revision=entry.revision,
                limit=entry.limit,
                base_dir=base_dir,
            )
            if not examples:
                raise DataError(f"{entry.name}: split {split!r} has no examples", source=provenance.origin)
            out_file = tmp / entry.out_name / f"{split}.jsonl"
            counts = write_split(examples, out_file)
            files = {"examples": _file_entry(out_file, tmp)}
            if contexts_path(out_file).exists():
                files["contexts"] = _file_entry(contexts_path(out_file), tmp)
            split_manifest: dict[str, Any] = {
                "examples": counts["examples"],
                "contexts": counts["contexts"],
                "categories": dict(sorted(Counter(e.category or "none" for e in examples).items())),
                "provenance": provenance.to_dict(),
                "files": files,
            }
            if packer is not None:
                split_manifest["token_lengths"] = token_stats(examples, packer)
            if entry.name == "qasper" and split == "train":  # what the paper's training recipe gets from it
                from .qasper import recipe_stats

                split_manifest["paper_recipe"] = recipe_stats(examples, packer)
            ds_manifest["splits"][split] = split_manifest
            manifest["totals"]["examples"] += counts["examples"]
            if entry.name == memoryagentbench.NAME:  # kept for the recsys mapping's check
                prepared.extend(examples)
        if entry.name == memoryagentbench.NAME:
            _copy_entity2id(entry, prepared, ds_manifest, tmp, base_dir)
        manifest["datasets"][entry.out_name] = ds_manifest
    if packer is not None:
        manifest["tokenizer"] = params.tokenizer.model_dump(mode="json", exclude_none=True)
    with (tmp / MANIFEST).open("w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")
    return manifest


def prepare(params: Any, *, base_dir: str | Path, out_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Run the preparation described by a :class:`pipeline.params.PrepareParams`.

    Args:
        params: the validated ``prepare`` section.
        base_dir: folder that relative paths in the params are taken from (the params file's folder).
        out_dir: override of ``params.out_dir``.

    Returns:
        (the manifest, the output folder). Raises :class:`DataError` on bad input; then nothing
        is written (a previous output folder stays as it was).
    """
    base = Path(base_dir)
    out = Path(out_dir) if out_dir is not None else Path(params.out_dir)
    out = out if out.is_absolute() else base / out
    with atomic_dir(out) as tmp:
        manifest = _prepare_into(params, tmp, base)
    return manifest, out

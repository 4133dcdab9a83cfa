"""Phase 5 of ``evaluate``: the results on disk — shards written atomically as they finish, units merged.

::

    <out_dir>/<variant>/<condition>/<task>/shards/shard-0000.jsonl      # one scored row per question
    <out_dir>/<variant>/<condition>/<task>/shards/shard-0000.meta.json  # config hash + cost figures
    <out_dir>/<variant>/<condition>/<task>/predictions.jsonl            # all shards, in plan order
    <out_dir>/<variant>/<condition>/<task>/metrics.json                 # task.aggregate + cost/...
    <out_dir>/metrics.json              # {"<variant>/<condition>": {"<task>": {...}}} (dvc metrics)

A shard is done when its meta file exists with the planned config hash (:func:`read_shard`); a shard
stored under another scoring protocol is re-scored from its predictions (:func:`rescore_shard`). Every
write goes through :func:`pipeline.common.atomic_write_text`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.common import atomic_write_text, json_safe
from pipeline.eval.plan import ShardSpec, Unit

SHARDS_DIR = "shards"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


def jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    """Compact JSON lines (NaN/inf as null)."""
    return "".join(json.dumps(json_safe(r), ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)


def write_json(path: Path, data: Any) -> None:
    """Indented, sorted JSON (NaN/inf as null), atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n")


def shard_paths(out: Path, spec: ShardSpec) -> tuple[Path, Path]:
    folder = out / spec.variant / spec.condition / spec.name / SHARDS_DIR
    return folder / f"{spec.file_stem}.jsonl", folder / f"{spec.file_stem}.meta.json"


def write_shard(out: Path, spec: ShardSpec, result: Mapping[str, Any]) -> None:
    """Predictions first, then the meta file (its presence with the right hash marks the shard done)."""
    rows_path, meta_path = shard_paths(out, spec)
    atomic_write_text(rows_path, jsonl(result["rows"]))
    from pipeline.eval.tasks import scoring_id

    meta = {"key": spec.key, "config_hash": spec.config_hash, "rows": len(result["rows"]), "cost": result["cost"]}
    meta["scoring"] = scoring_id(spec.scoring)  # what the rows were scored by
    if result.get("node_id"):
        meta["node_id"] = result["node_id"]  # the Ray node that computed the shard
    write_json(meta_path, meta)


def read_shard(out: Path, spec: ShardSpec) -> dict[str, Any] | None:
    """The stored result of a shard when it is complete and has ``spec``'s config hash, else None."""
    rows_path, meta_path = shard_paths(out, spec)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("config_hash") != spec.config_hash:
            return None
        rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if len(rows) != meta.get("rows") or [r.get("example_id") for r in rows] != spec.example_ids:
        return None
    return {
        "key": spec.key,
        "config_hash": spec.config_hash,
        "rows": rows,
        "cost": meta.get("cost", {}),
        "scoring": meta.get("scoring"),
    }


def rescore_shard(out: Path, spec: ShardSpec, stored: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    """A stored shard scored again under ``spec.scoring`` from its stored predictions (nothing is
    generated) and written back; ``cache``: data path → examples by id."""
    from pipeline.data.schema import read_split
    from pipeline.eval.tasks import get_task, rescore_rows

    if spec.data_path not in cache:
        cache[spec.data_path] = {e.example_id: e for e in read_split(Path(spec.data_path))}
    rows = rescore_rows(
        get_task(spec.task), stored["rows"], cache[spec.data_path], spec.scoring, Path(spec.data_path).parent
    )
    result = {**stored, "rows": rows}
    write_shard(out, spec, result)
    return result


def write_unit(out: Path, unit: Unit, rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> None:
    """A unit's merged predictions and metrics; shard files no longer planned are removed."""
    folder = unit.folder(out)
    atomic_write_text(folder / PREDICTIONS, jsonl(rows))
    write_json(folder / METRICS, metrics)
    _remove_stale_shards(folder / SHARDS_DIR, {s.file_stem for s in unit.shards})


def _remove_stale_shards(folder: Path, keep: set[str]) -> None:
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        stem = f.name.split(".", 1)[0]
        if f.is_file() and stem not in keep:
            f.unlink()


def remove_stale_units(out: Path, units: Sequence[Unit]) -> None:
    """Delete result folders of (condition, task) pairs no longer planned under the planned variants
    (e.g. a condition dropped from the params), so the variant folders hold exactly this run's units."""
    planned = {(u.variant, u.condition, u.name) for u in units if not u.skipped}
    for variant in {u.variant for u in units}:
        vdir = out / variant
        if not vdir.is_dir():
            continue
        for cdir in (d for d in vdir.iterdir() if d.is_dir()):
            for tdir in (d for d in cdir.iterdir() if d.is_dir()):
                ours = (tdir / PREDICTIONS).exists() or (tdir / METRICS).exists() or (tdir / SHARDS_DIR).is_dir()
                if ours and (variant, cdir.name, tdir.name) not in planned:
                    shutil.rmtree(tdir)
            if not any(cdir.iterdir()):
                cdir.rmdir()

"""Phase 2 of ``evaluate``: the plan — units, their shards and the shards' config hashes.

A **unit** is (variant or ``base``) × condition × task; its questions are split into **shards** of
``shard_conversations`` whole conversations (:class:`ShardSpec`, plain data that travels to a worker). A
shard's config hash covers the backbone, adapter and data digests (:mod:`pipeline.eval.inputs`), the
example ids, the donors and the :class:`PredictionSettings` fields its condition can be changed by
(:meth:`~pipeline.eval.conditions.Condition.hashed_settings`); a stored shard with the same hash is reused
(:mod:`pipeline.eval.store`). The scoring protocol is outside the hash: a change re-scores stored
predictions without generating again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.eval.conditions import BASE_VARIANT, Condition, get_condition
from pipeline.eval.errors import EvalInputError, describe_error
from pipeline.eval.inputs import (
    check_adapter,
    check_backbone_folder,
    check_manifest_count,
    read_prepared_split,
    resolve_path,
    tree_digest,
)
from pipeline.eval.params import EvalParams

RUNNER_VERSION = 1


@dataclass(frozen=True)
class PredictionSettings:
    """The ``evaluate`` settings that can change a prediction (see :class:`~pipeline.eval.params.EvalParams`).

    Every shard carries all of them; its config hash covers the ones its condition is changed by
    (:meth:`hashed`)."""

    decoding: str
    max_new_tokens_cap: int | None
    batch_size: int
    dtype: str
    write_batch_size: int
    write_length: int
    reuse_state: bool
    context_window: int | None
    context_reserve: int
    prefix_cache: bool
    prefix_min_tokens: int
    bm25_k: int

    @classmethod
    def from_params(cls, p: EvalParams) -> PredictionSettings:
        return cls(**{f.name: getattr(p, f.name) for f in fields(cls)})

    def hashed(self, condition: Condition) -> dict[str, Any]:
        """The fields that enter ``condition``'s shards' config hash, by name."""
        return {k: getattr(self, k) for k in condition.hashed_settings()}


@dataclass
class ShardSpec:
    """One piece of work: some conversations of one unit. Plain data (sent to Ray actors)."""

    key: str  # "<variant>/<condition>/<task>/shard-0000"
    variant: str
    condition: str
    task: str  # registry name
    name: str  # output folder of the task
    index: int
    adapter: str | None
    adapter_digest: str | None
    data_path: str
    example_ids: list[str]
    donors: dict[str, str]  # conversation key → donor conversation key (deltamem_shuffled)
    settings: PredictionSettings
    config_hash: str = ""
    fail_attempts: int = 0
    scoring: str = "official"  # the scoring protocol (outside config_hash: re-scored, not regenerated)

    @property
    def unit(self) -> str:
        return f"{self.variant}/{self.condition}/{self.name}"

    @property
    def file_stem(self) -> str:
        return f"shard-{self.index:04d}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what is sent to a Ray actor)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardSpec:
        settings = data["settings"]
        if not isinstance(settings, PredictionSettings):
            settings = PredictionSettings(**settings)
        return cls(**{**data, "settings": settings})


@dataclass
class Unit:
    """(variant, condition, task) with its shards, or the reason it is skipped."""

    variant: str
    condition: str
    task: str
    name: str
    shards: list[ShardSpec] = field(default_factory=list)
    skipped: str | None = None
    scoring: str = "official"

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.condition}/{self.name}"

    def folder(self, out: Path) -> Path:
        return out / self.variant / self.condition / self.name


def conversation_key(example: Any) -> str:
    """Questions sharing a context share this key (``conversation_id``, else the example's own id)."""
    return example.conversation_id or example.example_id


def group_conversations(examples: Iterable[Any]) -> list[tuple[str, list[Any]]]:
    """Examples grouped by :func:`conversation_key`, groups in first-appearance order."""
    groups: dict[str, list[Any]] = {}
    for e in examples:
        groups.setdefault(conversation_key(e), []).append(e)
    return list(groups.items())


def donor_map(examples: Sequence[Any]) -> dict[str, str]:
    """Each conversation → the next conversation with a history, cyclically in file order (never itself).

    Conversations are taken from the whole split, so a shard's donor may lie outside the evaluated
    questions. A split with fewer than two histories has no donors.
    """
    keys = [k for k, exs in group_conversations(examples) if exs[0].segments]
    if len(keys) < 2:
        return {}
    return {k: keys[(i + 1) % len(keys)] for i, k in enumerate(keys)}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def plan(p: EvalParams, root: Path) -> list[Unit]:
    """The units and their shards, with config hashes (reads the data splits and hashes the inputs)."""
    from pipeline.eval.tasks import get_task

    backbone = resolve_path(root, p.backbone)
    looks_local = p.backbone.startswith((".", "/", "~")) or p.backbone.startswith(p.models_dir.rstrip("/") + "/")
    if looks_local and not Path(backbone).exists():
        raise EvalInputError(
            f"backbone not found: {root / p.backbone} (run the backbone stage, or set evaluate.backbone)"
        )
    if Path(backbone).is_dir():
        check_backbone_folder(Path(backbone))
    backbone_digest = tree_digest(Path(backbone))
    settings = PredictionSettings.from_params(p)
    adapter_cache: dict[str, tuple[str, str, str]] = {}

    def adapter_info(variant: str) -> tuple[str, str, str]:
        if variant not in adapter_cache:
            from deltamem import read_adapter_config
            from deltamem.adapter import adapter_digest

            path = p.adapter_dir(root, variant)
            if not path.is_dir():
                raise EvalInputError(
                    f"adapter of variant {variant!r} not found: {path} (train it, or set evaluate.adapters)"
                )
            try:
                config, meta = read_adapter_config(path)
            except (OSError, ValueError, KeyError, TypeError) as err:
                from deltamem.adapter import CONFIG_FILE, UPSTREAM_CONFIG

                named = path
                if isinstance(err, ValueError | KeyError | TypeError):  # the config file's content
                    named = path / (CONFIG_FILE if (path / CONFIG_FILE).is_file() else UPSTREAM_CONFIG)
                if isinstance(err, KeyError):
                    err = ValueError(f"missing field {err.args[0]!r}")
                raise EvalInputError(f"adapter of variant {variant!r}: {describe_error(err, named)}") from None
            check_adapter(path, meta, Path(backbone) if Path(backbone).is_dir() else None)
            adapter_cache[variant] = (str(path), adapter_digest(path), config.write_mode)  # weights + identity
        return adapter_cache[variant]

    units: list[Unit] = []
    for entry in p.tasks:
        path = root / p.data_dir / entry.dataset / f"{entry.split}.jsonl"
        if not path.is_file():
            raise EvalInputError(f"{path}: prepared split not found (run the prepare stage)")
        examples = read_prepared_split(path)
        if not examples:
            raise EvalInputError(f"{path}: no examples")
        check_manifest_count(root / p.data_dir, entry.dataset, entry.split, path, len(examples))
        task_name = entry.task or examples[0].task
        try:
            task = get_task(task_name)
        except KeyError as err:
            raise EvalInputError(f"{path}: {err.args[0]}") from None
        try:
            task.check_scoring_inputs(examples, entry.scoring, path.parent)
        except ValueError as err:
            raise EvalInputError(f"evaluate.tasks[{entry.out_name}] scoring {entry.scoring!r}: {err}") from None
        contexts = path.with_name(f"{entry.split}.contexts.jsonl")
        # an absent contexts file must not enter the hash by its (absolute) path: moving the
        # repository would then recompute every shard
        data_digest = tree_digest(path) + (tree_digest(contexts) if contexts.exists() else "no-contexts")
        chosen = examples[: entry.limit] if entry.limit else examples
        groups = group_conversations(chosen)
        donors = donor_map(examples)
        for cond_name in entry.conditions or p.conditions:
            cond = get_condition(cond_name)
            hashed_settings = settings.hashed(cond)
            for variant in p.variants if cond.uses_adapter else [BASE_VARIANT]:
                unit = Unit(variant, cond_name, task_name, entry.out_name, scoring=entry.scoring)
                units.append(unit)
                adapter = None
                adapter_digest = None
                if cond.uses_adapter:
                    adapter, adapter_digest, write_mode = adapter_info(variant)
                    unit.skipped = cond.unsupported_reason(write_mode)
                if unit.skipped is None and cond.needs_donors and not donors:
                    unit.skipped = "needs at least two conversations with a history (donor states)"
                if unit.skipped:
                    continue
                for index, start in enumerate(range(0, len(groups), p.shard_conversations)):
                    part = groups[start : start + p.shard_conversations]
                    ids = [e.example_id for _, exs in part for e in exs]
                    shard_donors = {k: donors[k] for k, _ in part if k in donors} if cond.needs_donors else {}
                    spec = ShardSpec(
                        key=f"{unit.key}/shard-{index:04d}",
                        variant=variant,
                        condition=cond_name,
                        task=task_name,
                        name=entry.out_name,
                        index=index,
                        adapter=adapter,
                        adapter_digest=adapter_digest,
                        data_path=str(path),
                        example_ids=ids,
                        donors=shard_donors,
                        settings=settings,
                        scoring=entry.scoring,
                    )
                    spec.config_hash = _hash(
                        {
                            "version": RUNNER_VERSION,
                            "unit": [variant, cond_name, task_name],
                            "backbone": backbone_digest,
                            "adapter": adapter_digest,
                            "data": data_digest,
                            "examples": ids,
                            "donors": shard_donors,
                            "settings": hashed_settings,
                        }
                    )
                    spec.fail_attempts = max(
                        (n for pat, n in p.inject_failures.items() if fnmatch.fnmatchcase(spec.key, pat)), default=0
                    )
                    unit.shards.append(spec)
    return units

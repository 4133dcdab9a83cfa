"""The evaluation runner: conditions × variants × tasks, sharded, resumable, Ray-parallel.

A **unit** is (variant or ``base``) × condition × task; its questions are split into **shards** of whole
conversations. Each shard is computed by an :class:`EvalWorker` (one loaded backbone; adapters are
swapped in per shard), in-process (``workers: 0``) or in Ray actors (:mod:`pipeline.eval.ray_runner`),
and written atomically as soon as it is done::

    <out_dir>/<variant>/<condition>/<task>/shards/shard-0000.jsonl      # one scored row per question
    <out_dir>/<variant>/<condition>/<task>/shards/shard-0000.meta.json  # config hash + cost figures
    <out_dir>/<variant>/<condition>/<task>/predictions.jsonl            # all shards, in plan order
    <out_dir>/<variant>/<condition>/<task>/metrics.json                 # task.aggregate + cost/...
    <out_dir>/metrics.json              # {"<variant>/<condition>": {"<task>": {...}}} (dvc metrics)

A rerun skips every shard whose files exist with the same config hash (backbone, adapter, data, example
ids and the settings that can change a prediction), so a failed run resumes where it stopped.

Efficiency: a conversation's history is written into the δ-mem state once and the state is reused for
all its questions (``MemoryState.stack``/``expand`` over a batch); questions are generated greedily in
left-padded batches; for full-context prompts, which share the history as a prefix within a
conversation, the prefix is prefilled once (KV cache, and for ``deltamem_full_context`` the state after
the prefix) and the questions continue from copies of it (``prefix_cache``).

Entry point: :func:`run_evaluate` (the ``evaluate`` stage, :mod:`stages.evaluate`).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.eval.conditions import BASE_VARIANT, CONDITIONS, DEFAULT_CONDITIONS, get_condition, unsupported_reason
from pipeline.params import register_section

RUNNER_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
SHARDS_DIR = "shards"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


class EvalError(RuntimeError):
    """The evaluation could not finish (e.g. a shard failed after all its retries)."""


class EvalInputError(EvalError):
    """A missing or unusable input (backbone, adapter, prepared split)."""


# =====================================================================================================
# params
# =====================================================================================================
def _check_conditions(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown condition(s) {unknown}; known conditions: {', '.join(CONDITIONS)}")
    if len(set(names)) != len(names):
        raise ValueError("a condition is listed twice")
    return names


class TaskEntry(BaseModel):
    """One evaluation set (an item of ``evaluate.tasks``).

    Attributes:
        dataset: folder under ``data_dir`` (as written by the prepare stage).
        split: split file ``<data_dir>/<dataset>/<split>.jsonl``.
        task: task name (default: the ``Example.task`` of the data, usually = ``dataset``).
        name: output folder name (default: ``dataset``, or ``dataset-split`` when needed to be unique).
        limit: the first ``limit`` questions of the split (file order; None = all).
        conditions: conditions for this set (default: ``evaluate.conditions``).
        scoring: ``official`` (the benchmark's own code, cleanup included) or ``delta-mem`` (the δ-mem
            paper's evaluation code); not part of the prediction hash: a change re-scores the stored
            predictions without generating again.
    """

    model_config = ConfigDict(extra="forbid")

    dataset: str = "synthetic"
    split: str = "test"
    task: str | None = None
    name: str | None = None
    limit: int | None = Field(default=None, ge=1)
    conditions: list[str] | None = None
    scoring: str = "official"

    @field_validator("conditions")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _check_conditions(v)

    @field_validator("scoring")
    @classmethod
    def _scoring(cls, v: str) -> str:
        from pipeline.eval.tasks import check_scoring

        return check_scoring(v)

    @property
    def out_name(self) -> str:
        return self.name or self.dataset


class RayParams(BaseModel):
    """``evaluate.ray``: where the actors run and what each one reserves.

    Attributes:
        address: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``); default
            ``$RAY_ADDRESS``, else a local cluster on 127.0.0.1.
        num_cpus: CPUs of the local cluster (default: all cores).
        object_store_mb: object store of the local cluster (results are small).
        actor_num_cpus / actor_num_gpus: resources reserved per worker actor (``workers`` is reduced,
            with a warning, to the actors the cluster's nodes can hold; none fitting is an error).
        actor_start_timeout_s: how long the stage waits, with no shard running, for a worker actor to
            start (backbone loaded) before it stops with an error.
    """

    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_mb: int = Field(default=200, ge=80)
    actor_num_cpus: float = Field(default=1.0, gt=0)
    actor_num_gpus: float = Field(default=0.0, ge=0)
    actor_start_timeout_s: float = Field(default=900.0, gt=0)


class EvalParams(BaseModel):
    """The ``evaluate`` section (see docs/EVALUATION.md, "The evaluation runner").

    Attributes:
        backbone: backbone folder (or hub id / ``embedded``), relative to the params file.
        models_dir: adapters are ``<models_dir>/<variant>/adapter``.
        variants: adapter variants to evaluate (each runs every adapter condition).
        adapters: explicit ``variant → adapter folder`` overrides.
        data_dir: prepared data (``<data_dir>/<dataset>/<split>.jsonl``).
        tasks: the evaluation sets.
        conditions: default conditions of every set (see :mod:`pipeline.eval.conditions`).
        out_dir: results folder.
        metrics_file: a second copy of the combined ``<out_dir>/metrics.json`` (relative to the params
            file) for ``dvc metrics``, outside the ``out_dir`` output.
        decoding: ``greedy`` (default) or ``paper`` (the tasks' paper settings; sampled examples run
            one at a time with their seed; full-context ones continue from one prefill of their
            conversation's shared prefix, like the greedy batches).
        max_new_tokens_cap: upper bound on any task's generation budget (report it).
        batch_size: questions per ``generate`` call.
        write_batch_size: histories written per ``write_memory`` call.
        write_length: history tokens per write (longer histories are written in consecutive chunks at
            message boundaries, as the training packer splits them).
        context_window: prompt + generation window of the full-context conditions (default: the
            model's ``max_position_embeddings``); ``context_reserve`` tokens are kept free.
        bm25_k: segments retrieved for ``rag_bm25``.
        prefix_cache: prefill the shared full-context prefix of a conversation's questions once.
        prefix_min_tokens: shortest shared prefix worth caching.
        reuse_state: write each history once per conversation (False: once per question, for benchmarks).
        bootstrap: resamples for the headline's 95% confidence interval (0 = none).
        shard_conversations: conversations per shard.
        workers: Ray worker actors (0 = in-process, no Ray).
        threads: torch threads per worker (default: ``ray.actor_num_cpus``; in-process: torch's default).
        max_retries: retries of a failed shard before the stage fails.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` …
        dtype: backbone dtype.
        resume: skip shards already written with the same config hash.
        seed: bootstrap seed.
        inject_failures: testing aid: ``shard-key glob → attempts that raise`` (not part of the hash).
    """

    model_config = ConfigDict(extra="forbid")

    backbone: str = "models/backbone"
    models_dir: str = "models"
    variants: list[str] = Field(default_factory=lambda: ["TSW"])
    adapters: dict[str, str] = Field(default_factory=dict)
    data_dir: str = "data/prepared"
    tasks: list[TaskEntry] = Field(default_factory=lambda: [TaskEntry()])
    conditions: list[str] = Field(default_factory=lambda: list(DEFAULT_CONDITIONS))
    out_dir: str = "results/eval"
    metrics_file: str | None = None
    decoding: str = "greedy"
    max_new_tokens_cap: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    write_batch_size: int = Field(default=4, ge=1)
    write_length: int = Field(default=8192, ge=1)
    context_window: int | None = Field(default=None, ge=16)
    context_reserve: int = Field(default=50, ge=0)
    bm25_k: int = Field(default=10, ge=1)
    prefix_cache: bool = True
    prefix_min_tokens: int = Field(default=32, ge=1)
    reuse_state: bool = True
    bootstrap: int = Field(default=1000, ge=0)
    shard_conversations: int = Field(default=8, ge=1)
    workers: int = Field(default=2, ge=0)
    threads: int | None = Field(default=None, ge=1)
    max_retries: int = Field(default=2, ge=0)
    device: str = "auto"
    dtype: str = "float32"
    attn_implementation: str = "auto"  # auto | eager | sdpa | flash_attention_2 (deltamem.backbones)
    resume: bool = True
    seed: int = 0
    ray: RayParams = Field(default_factory=RayParams)
    inject_failures: dict[str, int] = Field(default_factory=dict)

    @field_validator("attn_implementation")
    @classmethod
    def _attn(cls, v: str) -> str:
        from deltamem.backbones import check_attn_implementation

        return check_attn_implementation(v)

    @field_validator("conditions")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return _check_conditions(v)

    @field_validator("decoding")
    @classmethod
    def _mode(cls, v: str) -> str:
        from pipeline.eval.tasks import DECODING_MODES

        if v not in DECODING_MODES:
            raise ValueError(f"decoding {v!r}; allowed: {', '.join(DECODING_MODES)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r}; allowed: {', '.join(DTYPES)}")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if BASE_VARIANT in v:
            raise ValueError(f"'{BASE_VARIANT}' is reserved for the conditions without an adapter")
        if len(set(v)) != len(v):
            raise ValueError("a variant is listed twice")
        return v

    @model_validator(mode="after")
    def _unique_tasks(self) -> EvalParams:
        names = [t.out_name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two tasks write to the same folder {dup}; set 'name' on one of them")
        return self

    def adapter_dir(self, root: Path, variant: str) -> Path:
        return root / self.adapters.get(variant, f"{self.models_dir}/{variant}/adapter")

    def prediction_settings(self, condition: str | None = None) -> dict[str, Any]:
        """The settings that can change a prediction of ``condition`` (they enter its shards' config
        hash; None: all of them)."""
        keys = ["decoding", "max_new_tokens_cap", "batch_size", "dtype"]
        cond = CONDITIONS.get(condition) if condition else None
        if cond is None or cond.writes_history:
            keys += ["write_batch_size", "write_length", "reuse_state"]
        if cond is None or cond.prompt != "question":
            keys += ["context_window", "context_reserve"]
        if cond is None or cond.prompt == "context":
            keys += ["prefix_cache", "prefix_min_tokens"]
        if cond is None or cond.prompt == "retrieval":
            keys += ["bm25_k"]
        return {k: getattr(self, k) for k in keys}


register_section("evaluate", EvalParams)


# =====================================================================================================
# plan
# =====================================================================================================
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
    settings: dict[str, Any]
    config_hash: str = ""
    fail_attempts: int = 0
    scoring: str = "official"  # the scoring protocol (outside config_hash: re-scored, not regenerated)

    @property
    def unit(self) -> str:
        return f"{self.variant}/{self.condition}/{self.name}"

    @property
    def file_stem(self) -> str:
        return f"shard-{self.index:04d}"


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


def file_digest(path: Path, whole_limit: int = 64 * 2**20, piece: int = 16 * 2**20) -> str:
    """sha256 of a file; above ``whole_limit`` bytes: of its size, first and last ``piece`` bytes."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= whole_limit:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(piece))
            f.seek(size - piece)
            h.update(f.read(piece))
    return h.hexdigest()


def tree_digest(path: Path) -> str:
    """Digest of a file or of every file in a folder (names + contents, see :func:`file_digest`)."""
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        if path.is_absolute():  # never hash a machine's absolute path (results must survive a move)
            raise FileNotFoundError(f"{path}: not found")
        return f"name:{path}"  # a hub id or `embedded`: identified by its name
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def resolve_path(root: Path, value: str) -> str:
    """``value`` relative to ``root`` when that exists, else as given (a hub id or ``embedded``)."""
    candidate = root / value
    return str(candidate) if candidate.exists() else value


def _describe_error(err: BaseException, path: Path | None = None) -> str:
    """One line for an input error; names ``path`` unless the message already does."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, json.JSONDecodeError):
        text = f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
    elif isinstance(err, UnicodeDecodeError):
        text = f"not UTF-8 text (byte {err.start}: {err.reason})"
    if path is not None and str(path) not in text:
        text = f"{path}: {text}"
    return text


def read_prepared_split(path: Path) -> list[Any]:
    """:func:`pipeline.data.schema.read_split` with every input problem as an :class:`EvalInputError`
    naming the file (and line / record / field where known)."""
    from pipeline.data.errors import DataError
    from pipeline.data.schema import contexts_path, read_split

    try:
        return read_split(path)
    except DataError as err:
        raise EvalInputError(str(err)) from None
    except UnicodeDecodeError as err:  # raised while iterating: which of the two files?
        bad = path
        ctx = contexts_path(path)
        if ctx.exists():
            try:
                ctx.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                bad = ctx
        raise EvalInputError(_describe_error(err, bad)) from None
    except OSError as err:
        raise EvalInputError(_describe_error(err, path)) from None


def check_manifest_count(data_dir: Path, dataset: str, split: str, path: Path, n: int) -> None:
    """A split whose record count differs from what the prepare stage's manifest recorded is an error
    (a truncated or replaced file would otherwise be evaluated silently on fewer questions)."""
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        return
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalInputError(_describe_error(err, manifest)) from None
    info = (
        (data.get("datasets") or {}).get(dataset, {}).get("splits", {}).get(split) if isinstance(data, dict) else None
    )
    expected = info.get("examples") if isinstance(info, dict) else None
    if isinstance(expected, int) and expected != n:
        raise EvalInputError(
            f"{path}: {n} records, but {manifest} lists {expected} for {dataset}/{split} "
            "(a truncated or replaced file? rerun the prepare stage)"
        )


def _backbone_facts(folder: Path) -> dict[str, Any] | None:
    """The shape facts of :func:`deltamem.attach.backbone_fingerprint` from a local Hugging Face folder's
    ``config.json`` (and layer 0's q_proj statistics from its safetensors when found), without loading
    the model; None when the folder has no readable config."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return None
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    facts: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "q_out": heads * head_dim,
        "kv_out": kv_heads * head_dim,
        "o_in": heads * head_dim,
    }
    q = _layer0_q_weight(folder)
    if q is not None:
        facts["layer0_q_mean_abs"], facts["layer0_q_std"] = float(q.abs().mean()), float(q.std())
    return facts


def _layer0_q_weight(folder: Path) -> Any:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            names = [k for k in weight_map if k.endswith("layers.0.self_attn.q_proj.weight")]
            files = [folder / weight_map[names[0]]] if names else []
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    if k.endswith("layers.0.self_attn.q_proj.weight"):
                        return st.get_tensor(k).float()
    except Exception:  # an unreadable backbone is the worker's error to report; this is only a pre-check
        return None
    return None


def check_adapter(path: Path, meta: Mapping[str, Any], backbone: Path | None) -> None:
    """Planning-time check of an adapter folder: weights readable and finite, and (for a local backbone
    folder) trained on that backbone. Raises :class:`EvalInputError` naming the file / tensor / field."""
    import torch

    from deltamem.adapter import FORMAT, UPSTREAM_WEIGHTS, WEIGHTS_FILE

    ours = meta.get("format") == FORMAT
    weights = path / (WEIGHTS_FILE if ours else UPSTREAM_WEIGHTS)
    if not weights.is_file():
        raise EvalInputError(f"{weights}: adapter weights not found")
    try:
        if ours:
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        else:
            raw = torch.load(weights, map_location="cpu", weights_only=True)  # never unpickles objects
            tensors = raw if isinstance(raw, dict) else {}
    except Exception as err:  # safetensors / torch raise their own error types for corrupt files
        raise EvalInputError(f"{weights}: unreadable adapter weights ({_describe_error(err)})") from None
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise EvalInputError(f"{weights}: tensor {name!r} has {bad} non-finite value(s) (NaN/Inf)")
    saved = meta.get("backbone")
    facts = _backbone_facts(backbone) if ours and backbone is not None and isinstance(saved, Mapping) else None
    if facts is None:
        return
    diffs = [
        f"{k}: adapter {saved.get(k)!r} vs backbone {v!r}"
        for k, v in facts.items()
        if k in _SHAPE_FACTS and saved.get(k) != v
    ]
    for k in ("layer0_q_mean_abs", "layer0_q_std"):  # the weights' statistics: another checkpoint
        a, b = saved.get(k), facts.get(k)
        if isinstance(a, int | float) and b is not None and abs(a - b) > 2e-2 * max(abs(a), abs(b), 1e-12):
            diffs.append(f"{k}: adapter {a:.6g} vs backbone {b:.6g}")
    if diffs:
        raise EvalInputError(
            f"{path}: the adapter was trained on a different backbone than evaluate.backbone ({backbone}); "
            "mismatch: " + "; ".join(diffs)
        )


def check_backbone_folder(folder: Path) -> None:
    """A local backbone folder's ``config.json`` parses and every safetensors file's header is intact
    (a truncated file fails here: its header no longer covers the file), before any worker loads it."""
    from safetensors import safe_open

    cfg = folder / "config.json"
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalInputError(f"backbone: {_describe_error(err, cfg)}") from None
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as err:  # SafetensorError, OSError
            raise EvalInputError(f"backbone: {f}: unreadable safetensors file ({_describe_error(err)})") from None


_SHAPE_FACTS = ("hidden_size", "num_hidden_layers", "q_out", "kv_out", "o_in")


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write (then remove) a probe file, so that a read-only or full disk is found
    before any shard is computed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
    except OSError as err:
        raise EvalInputError(f"{what} {folder}: not writable ({err.strerror or err})") from None


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
                raise EvalInputError(f"adapter of variant {variant!r}: {_describe_error(err, named)}") from None
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
            hashed_settings = p.prediction_settings(cond_name)
            for variant in p.variants if cond.uses_adapter else [BASE_VARIANT]:
                unit = Unit(variant, cond_name, task_name, entry.out_name, scoring=entry.scoring)
                units.append(unit)
                adapter = None
                adapter_digest = None
                if cond.uses_adapter:
                    adapter, adapter_digest, write_mode = adapter_info(variant)
                    unit.skipped = unsupported_reason(cond, write_mode)
                if unit.skipped is None and cond.memory == "donor" and not donors:
                    unit.skipped = "needs at least two conversations with a history (donor states)"
                if unit.skipped:
                    continue
                for index, start in enumerate(range(0, len(groups), p.shard_conversations)):
                    part = groups[start : start + p.shard_conversations]
                    ids = [e.example_id for _, exs in part for e in exs]
                    shard_donors = {k: donors[k] for k, _ in part if k in donors} if cond.memory == "donor" else {}
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
                        settings=p.prediction_settings(),
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


# =====================================================================================================
# the worker: one loaded backbone, any adapter, any shard
# =====================================================================================================
class _TokenCounter:
    """Counts the tokens of every decoder forward pass (a pre-hook on the decoder module)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.positions = 0  # input positions fed (padding included)
        self.tokens = 0  # real tokens (attention mask = 1)
        self.calls = 0

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            return
        b, t = int(x.shape[0]), int(x.shape[1])
        self.calls += 1
        self.positions += b * t
        mask = kwargs.get("attention_mask")
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
            self.tokens += int(mask[:, -t:].sum())
        else:
            self.tokens += b * t


class _PeakMemory:
    """Peak memory of a block: CUDA peak allocation, else the peak RSS (VmHWM reset through
    ``/proc/self/clear_refs``; where that is impossible, the process's lifetime ``ru_maxrss``)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.scope = "block"
        self.peak = 0

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self.scope == "block":
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak = int(line.split()[1]) * 1024
                            return
            except OSError:
                pass
            self.scope = "process"
        self.peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class EvalWorker:
    """Loads the backbone once and computes shards (:meth:`run_shard`) for any variant and condition.

    Used in-process (``workers: 0``) and as the Ray actor class (:mod:`pipeline.eval.ray_runner`).
    """

    def __init__(
        self,
        backbone: str,
        dtype: str = "float32",
        device: str = "auto",
        threads: int | None = None,
        attn_implementation: str = "auto",
    ):
        import torch

        from deltamem.backbones import find_attention_layers, load_backbone
        from pipeline.data.tokenize import ChatFormat

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self.tokenizer = load_backbone(
            backbone, dtype=_torch_dtype(dtype), attn_implementation=attn_implementation, what="evaluate.backbone"
        )
        self.model.to(self.device).eval()
        self.fmt = ChatFormat(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        decoder, _ = find_attention_layers(self.model)
        self.counter = _TokenCounter()
        decoder.register_forward_pre_hook(self.counter.hook, with_kwargs=True)
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        elem = torch.empty((), dtype=self.model.dtype).element_size()
        self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.adapter: tuple[str | None, str | None] = (None, None)
        self._splits: dict[tuple[str, int, int], tuple[dict[str, Any], dict[str, Any]]] = {}
        self.write_mode: str | None = None
        self.history_writes = 0  # conversations' histories written (all shards)

    # -- setup -------------------------------------------------------------------------------------
    def use_adapter(self, adapter: str | None, digest: str | None = None) -> None:
        """Switch to ``adapter`` (None = the bare backbone); ``digest`` tells a changed folder apart."""
        from deltamem import detach_delta_mem, load_adapter

        if (adapter, digest) == self.adapter:
            return
        detach_delta_mem(self.model)
        self.write_mode = None
        self.adapter = (None, None)
        if adapter is not None:
            import torch

            try:
                self.model = load_adapter(self.model, adapter)
            except (OSError, ValueError, KeyError, TypeError) as err:  # an input problem: never retried
                raise EvalInputError(f"adapter {adapter}: {_describe_error(err)}") from None
            bad = [n for n, t in self.model.delta_mem.named_parameters() if not bool(torch.isfinite(t).all())]
            if bad:
                detach_delta_mem(self.model)
                raise EvalInputError(f"adapter {adapter}: non-finite values (NaN/Inf) in {bad[:3]}")
            self.write_mode = self.model.delta_mem.config.write_mode
        self.adapter = (adapter, digest)

    def split(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(example id → example, conversation key → first example) of a split file (cached while the
        file is unchanged)."""
        st = Path(path).stat()
        key = (path, st.st_mtime_ns, st.st_size)
        if key not in self._splits:
            from pipeline.data.schema import read_split

            examples = read_split(path)
            by_conv: dict[str, Any] = {}
            for e in examples:
                by_conv.setdefault(conversation_key(e), e)
            self._splits = {k: v for k, v in self._splits.items() if k[0] != path}  # drop a stale version
            self._splits[key] = ({e.example_id: e for e in examples}, by_conv)
        return self._splits[key]

    # -- tokens ------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.fmt.encode(text))

    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The generation prompt exactly as the training READ segment is encoded."""
        return self.fmt.encode(self.fmt.render(list(messages), add_generation_prompt=True))

    def history_ids(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, message index per token) of a history, exactly as the training WRITE segment is encoded
        (for templated tokenizers this equals :func:`deltamem.encode_messages`)."""
        ids: list[int] = []
        seg: list[int] = []
        for i, piece in enumerate(self.fmt.message_pieces(list(messages))):
            piece_ids = self.fmt.encode(piece)
            ids += piece_ids
            seg += [i] * len(piece_ids)
        return ids, seg

    # -- memory ------------------------------------------------------------------------------------
    def write_histories(
        self, histories: Sequence[tuple[list[int], list[int]]], settings: Mapping[str, Any]
    ) -> list[Any]:
        """One batch-1 :class:`~deltamem.MemoryState` per history; ``write_batch_size`` histories per
        ``write_memory`` call (right-padded, padding never writes); a history longer than
        ``write_length`` is written in consecutive chunks (message boundaries where possible)."""
        import torch

        from deltamem import MemoryState
        from pipeline.data.tokenize import split_chunks

        model = self.model
        ssw = self.write_mode == "SSW"
        states = []
        for start in range(0, len(histories), settings["write_batch_size"]):
            batch = histories[start : start + settings["write_batch_size"]]
            chunks = [split_chunks(ids, seg, settings["write_length"]) if ids else [] for ids, seg in batch]
            current = [model.new_memory(1) for _ in batch]
            for j in range(max((len(c) for c in chunks), default=0)):
                rows = [i for i, c in enumerate(chunks) if len(c) > j]
                width = max(len(chunks[i][j].input_ids) for i in rows)
                ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                seg = torch.full((len(rows), width), -1, dtype=torch.long)
                for r, i in enumerate(rows):
                    c = chunks[i][j]
                    n = len(c.input_ids)
                    ids[r, :n] = torch.tensor(c.input_ids)
                    mask[r, :n] = 1
                    seg[r, :n] = torch.tensor(c.segment_ids)
                state = MemoryState.stack([current[i] for i in rows])
                with torch.no_grad():
                    model.write_memory(
                        ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        segment_ids=seg.to(self.device) if ssw else None,
                        state=state,
                    )
                for r, i in enumerate(rows):
                    current[i] = state.select(r)
            self.history_writes += sum(1 for c in chunks if c)
            states.extend(current)
        return states

    # -- generation --------------------------------------------------------------------------------
    def _generate_kwargs(self, decoding: Any) -> dict[str, Any]:
        kwargs = decoding.generate_kwargs()
        kwargs["pad_token_id"] = self.pad_id
        if not decoding.do_sample:  # silence "generation flags are not valid" warnings of sampling configs
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _decode(self, out: Any, width: int) -> list[tuple[str, int]]:
        results = []
        eos = self.tokenizer.eos_token_id
        for row in out[:, width:].tolist():
            n = 0
            for tok in row:
                n += 1
                if tok == eos or tok == self.pad_id:
                    break
            results.append((self.tokenizer.decode(row[:n], skip_special_tokens=True), n))
        return results

    def generate(
        self,
        prompts: Sequence[list[int]],
        decoding: Any,
        state: Any = None,
        write: bool = False,
        prefix: tuple[list[int], Any, Any] | None = None,
    ) -> list[tuple[str, int]]:
        """Generate for left-padded ``prompts``; ``state`` = batch state (read-only unless ``write``).

        ``prefix`` = (prefix ids, KV cache of the prefix, δ-mem state after it or None): every prompt
        starts with the prefix ids; the cache is copied, expanded to the batch and continued.
        """
        import torch

        kwargs = self._generate_kwargs(decoding)
        plen = len(prefix[0]) if prefix else 0
        suffixes = [p[plen:] for p in prompts]
        width = max(len(s) for s in suffixes)
        n = len(prompts)
        ids = torch.full((n, plen + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, plen + width), dtype=torch.long)
        for r, s in enumerate(suffixes):
            if plen:
                ids[r, :plen] = torch.tensor(prefix[0])
                mask[r, :plen] = 1
            ids[r, plen + width - len(s) :] = torch.tensor(s)
            mask[r, plen + width - len(s) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if prefix is not None:
            from deltamem.attach import cache_kwarg

            cache = copy.deepcopy(prefix[1])
            if n > 1:
                cache.batch_repeat_interleave(n)
            kwargs[cache_kwarg(self.model)] = cache
            if prefix[2] is not None:
                state = prefix[2].expand(n).clone() if n > 1 else prefix[2].clone()
        if state is not None:
            kwargs.update(memory=state, memory_write=write)
        if decoding.do_sample and decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, **kwargs)
        return self._decode(out, plen + width)

    def prefill_prefix(self, prefix: list[int], online: bool) -> tuple[list[int], Any, Any]:
        """Run the decoder over a shared prefix once: (ids, KV cache, state after it or None)."""
        import torch
        from transformers import DynamicCache

        from deltamem.attach import cache_kwarg
        from deltamem.backbones import find_attention_layers

        decoder, _ = find_attention_layers(self.model)
        cache = DynamicCache(config=self.model.config)
        x = torch.tensor([prefix], device=self.device)
        kwargs = {"input_ids": x, "attention_mask": torch.ones_like(x), "use_cache": True, cache_kwarg(decoder): cache}
        state = None
        with torch.no_grad():
            if online:
                state = self.model.new_memory(1)
                with self.model.delta_mem.use(state, write=True):
                    decoder(**kwargs)
            else:
                decoder(**kwargs)
        return prefix, cache, state

    # -- a shard -----------------------------------------------------------------------------------
    def run_shard(self, spec: ShardSpec | Mapping[str, Any], attempt: int = 0) -> dict[str, Any]:
        """Compute one shard: ``{"key", "config_hash", "rows": [...], "cost": {...}}``."""
        if isinstance(spec, Mapping):
            spec = ShardSpec(**spec)
        if attempt < spec.fail_attempts:
            raise RuntimeError(f"injected failure of {spec.key} (attempt {attempt + 1})")
        self.use_adapter(spec.adapter, spec.adapter_digest)
        self.counter.reset()
        writes_before = self.history_writes
        t0 = time.perf_counter()
        with _PeakMemory(self.device) as peak:
            rows, cost = self._compute(spec)
        cost["wall_s"] = time.perf_counter() - t0
        cost["peak_memory_bytes"] = peak.peak
        cost["peak_memory_scope"] = peak.scope
        cost["forward_positions"] = self.counter.positions
        cost["forward_tokens"] = self.counter.tokens
        cost["forward_calls"] = self.counter.calls
        cost["history_writes"] = self.history_writes - writes_before
        return {"key": spec.key, "config_hash": spec.config_hash, "rows": rows, "cost": cost}

    def _compute(self, spec: ShardSpec) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from deltamem import MemoryState
        from pipeline.eval.conditions import PromptBuilder
        from pipeline.eval.tasks import get_task

        s = spec.settings
        task = get_task(spec.task)
        cond = get_condition(spec.condition)
        by_id, by_conv = self.split(spec.data_path)
        groups = group_conversations(by_id[i] for i in spec.example_ids)
        window = s["context_window"] or self.max_positions
        builder = PromptBuilder(
            task,
            cond,
            self.count_tokens,
            lambda m: len(self.prompt_ids(m)),
            window,
            s["context_reserve"],
            s["bm25_k"],
        )
        cap = s["max_new_tokens_cap"]

        def decoding_of(example: Any) -> Any:
            import dataclasses

            d = task.decoding(example, s["decoding"])
            return dataclasses.replace(d, max_new_tokens=min(d.max_new_tokens, cap)) if cap else d

        # prompts
        items: list[dict[str, Any]] = []  # per question
        history_tokens: dict[str, int] = {}
        for key, exs in groups:
            decs = [decoding_of(e) for e in exs]
            messages = builder.conversation_messages(key, exs, max(d.max_new_tokens for d in decs))
            hist = task.history_messages(exs[0])
            history_tokens[key] = len(self.history_ids(hist)[0]) if hist else 0
            for e, d, m in zip(exs, decs, messages, strict=True):
                items.append({"example": e, "key": key, "decoding": d, "ids": self.prompt_ids(m)})

        # memory states of the conversations (written once per conversation)
        states: dict[str, Any] = {}
        write_tokens = 0
        if cond.writes_history:
            source = {key: (spec.donors[key] if cond.memory == "donor" else key) for key, _ in groups}

            def encoded(src: str) -> tuple[list[int], list[int]]:
                hist = task.history_messages(by_conv[src])
                return self.history_ids(hist) if hist else ([], [])

            if s["reuse_state"]:
                keys = [k for k, _ in groups]
                hists = [encoded(source[k]) for k in keys]
                write_tokens = sum(len(h[0]) for h in hists)
                states = dict(zip(keys, self.write_histories(hists, s), strict=True))

        # generation
        results: dict[int, tuple[str, int]] = {}
        prefix_tokens_reused = 0
        use_prefix = s["prefix_cache"] and cond.prompt == "context"
        online = cond.memory == "online"

        def batches(indices: list[int]) -> Iterable[list[int]]:
            by_dec: dict[Any, list[int]] = defaultdict(list)
            for i in indices:
                d = items[i]["decoding"]
                by_dec[(d.max_new_tokens, d.do_sample, d.seed if d.do_sample else None)].append(i)
            for (_, sample, _), members in by_dec.items():
                size = 1 if sample else s["batch_size"]
                for start in range(0, len(members), size):
                    yield members[start : start + size]

        def run_plain(indices: list[int]) -> None:
            nonlocal write_tokens
            for batch in batches(indices):
                state = None
                if cond.writes_history:
                    if s["reuse_state"]:
                        state = MemoryState.stack([states[items[i]["key"]] for i in batch])
                    else:  # the naive baseline: write the history again for every question
                        hists = [encoded(source[items[i]["key"]]) for i in batch]
                        write_tokens += sum(len(h[0]) for h in hists)
                        state = MemoryState.stack(self.write_histories(hists, s))
                elif online:
                    state = self.model.new_memory(len(batch))
                out = self.generate([items[i]["ids"] for i in batch], items[batch[0]]["decoding"], state, online)
                results.update(zip(batch, out, strict=True))

        if use_prefix:
            leftovers: list[int] = []
            for key, _ in groups:
                members = [i for i, it in enumerate(items) if it["key"] == key]
                sampled = [i for i in members if items[i]["decoding"].do_sample]
                if sampled:  # one question per generate call (own seed), all from one prefill
                    prompts = [items[i]["ids"] for i in sampled]
                    plen = _common_prefix(prompts)
                    if len(sampled) < 2 or plen < s["prefix_min_tokens"]:
                        leftovers.extend(sampled)
                    else:
                        prefix = self.prefill_prefix(prompts[0][:plen], online)
                        for batch in batches(sampled):
                            out = self.generate(
                                [items[i]["ids"] for i in batch],
                                items[batch[0]]["decoding"],
                                prefix=prefix,
                                write=online,
                            )
                            results.update(zip(batch, out, strict=True))
                        prefix_tokens_reused += plen * (len(sampled) - 1)
                    members = [i for i in members if not items[i]["decoding"].do_sample]
                for batch in batches(members):
                    prompts = [items[i]["ids"] for i in batch]
                    plen = _common_prefix(prompts)
                    if len(batch) < 2 or plen < s["prefix_min_tokens"]:
                        leftovers.extend(batch)
                        continue
                    prefix = self.prefill_prefix(prompts[0][:plen], online)
                    out = self.generate(prompts, items[batch[0]]["decoding"], prefix=prefix, write=online)
                    results.update(zip(batch, out, strict=True))
                    prefix_tokens_reused += plen * (len(batch) - 1)
            run_plain(leftovers)
        else:
            run_plain(list(range(len(items))))

        # score
        rows = []
        for i, it in enumerate(items):
            e = it["example"]
            text, new_tokens = results[i]
            row = task.score_row(e, text, spec.scoring, Path(spec.data_path).parent)
            row.update(
                conversation_id=it["key"],
                question=e.question,
                prediction=text,
                gold=list(e.answers),
                prompt_tokens=len(it["ids"]),
                new_tokens=new_tokens,
            )
            if cond.memory == "donor":
                row["memory_from"] = spec.donors[it["key"]]
            rows.append(row)
        n_conv = len(groups)
        state_bytes = 0
        if getattr(self.model, "delta_mem", None) is not None:
            state_bytes = self.model.new_memory(1).nbytes
        cost = {
            "questions": len(items),
            "conversations": n_conv,
            "prompt_tokens": sum(len(it["ids"]) for it in items),
            "generated_tokens": sum(r["new_tokens"] for r in rows),
            "write_tokens": write_tokens,
            "history_tokens": sum(history_tokens.values()),
            "prefix_tokens_reused": prefix_tokens_reused,
            "truncated_contexts": sum(1 for v in builder.truncated.values() if v),
            "state_bytes": state_bytes if cond.uses_adapter else 0,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "max_prompt_tokens": max((len(it["ids"]) for it in items), default=0),
        }
        return rows, cost


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, at most ``min(len) - 1`` (every suffix keeps a token)."""
    limit = min(len(x) for x in seqs) - 1
    n = 0
    while n < limit and all(x[n] == seqs[0][n] for x in seqs):
        n += 1
    return n


# =====================================================================================================
# outputs
# =====================================================================================================
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(obj: Any) -> Any:
    """NaN/inf → None (JSON and dvc cannot read them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(_json_safe(r), ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)


def shard_paths(out: Path, spec: ShardSpec) -> tuple[Path, Path]:
    folder = out / spec.variant / spec.condition / spec.name / SHARDS_DIR
    return folder / f"{spec.file_stem}.jsonl", folder / f"{spec.file_stem}.meta.json"


def write_shard(out: Path, spec: ShardSpec, result: Mapping[str, Any]) -> None:
    """Predictions first, then the meta file (its presence with the right hash marks the shard done)."""
    rows_path, meta_path = shard_paths(out, spec)
    _atomic_write(rows_path, _jsonl(result["rows"]))
    from pipeline.eval.tasks import scoring_id

    meta = {"key": spec.key, "config_hash": spec.config_hash, "rows": len(result["rows"]), "cost": result["cost"]}
    meta["scoring"] = scoring_id(spec.scoring)  # what the rows were scored by
    _atomic_write(meta_path, json.dumps(_json_safe(meta), indent=2, sort_keys=True) + "\n")


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


SUM_COSTS = (
    "questions",
    "conversations",
    "prompt_tokens",
    "generated_tokens",
    "write_tokens",
    "history_tokens",
    "history_writes",
    "prefix_tokens_reused",
    "truncated_contexts",
    "forward_positions",
    "forward_tokens",
    "forward_calls",
    "wall_s",
)


def unit_costs(costs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Cost figures of a unit from its shards' (sums, max peak memory, derived rates and bytes)."""
    out: dict[str, float] = {k: float(sum(c.get(k, 0) for c in costs)) for k in SUM_COSTS}
    out["peak_memory_bytes"] = float(max((c.get("peak_memory_bytes", 0) for c in costs), default=0))
    out["max_prompt_tokens"] = float(max((c.get("max_prompt_tokens", 0) for c in costs), default=0))
    kv = max((c.get("kv_bytes_per_token", 0) for c in costs), default=0)
    out["state_bytes"] = float(max((c.get("state_bytes", 0) for c in costs), default=0))
    q, conv = out["questions"], out["conversations"]
    out["questions_per_s"] = q / out["wall_s"] if out["wall_s"] > 0 else math.nan
    out["forward_tokens_per_question"] = out["forward_tokens"] / q if q else math.nan
    # what a KV cache holding one conversation's history needs, vs the δ-mem state
    out["kv_bytes_history"] = kv * out["history_tokens"] / conv if conv else math.nan
    out["kv_bytes_prompt_max"] = float(kv * (out["max_prompt_tokens"]))
    return out


def bootstrap_ci(values: Sequence[float], n: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    import numpy as np

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if n <= 0 or x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def unit_metrics(
    task_name: str, rows: Sequence[Mapping[str, Any]], costs: Sequence[Mapping[str, Any]], p: EvalParams
) -> dict[str, Any]:
    """``task.aggregate`` of the rows, the headline's bootstrap CI, and ``cost/<figure>`` keys."""
    from pipeline.eval.tasks import get_task

    task = get_task(task_name)
    metrics: dict[str, Any] = dict(task.aggregate(rows))
    head = task.headline
    values = [r["scores"].get(head) for r in task.headline_rows(list(rows)) if head in r.get("scores", {})]
    if values and p.bootstrap:
        lo, hi = bootstrap_ci(values, p.bootstrap, p.seed)
        metrics[f"{head}/ci95_low"], metrics[f"{head}/ci95_high"] = lo, hi
    metrics["headline"] = metrics.get(head, math.nan)
    for k, v in unit_costs(costs).items():
        metrics[f"cost/{k}"] = v
    return metrics


# =====================================================================================================
# orchestration
# =====================================================================================================
def worker_threads(p: EvalParams, in_process: bool) -> int | None:
    if p.threads:
        return p.threads
    return None if in_process else max(1, int(p.ray.actor_num_cpus))


def run_local(
    specs: Sequence[ShardSpec],
    p: EvalParams,
    backbone: str,
    on_result: Callable[[ShardSpec, dict[str, Any]], None],
    worker: EvalWorker | None = None,
) -> dict[str, str]:
    """Compute shards in this process with retries; returns ``{shard key: error}`` of the failed ones."""
    failures: dict[str, str] = {}
    if not specs:
        return failures
    if worker is None:
        try:
            worker = EvalWorker(
                backbone,
                p.dtype,
                p.device,
                worker_threads(p, in_process=True),
                attn_implementation=p.attn_implementation,
            )
        except OSError as err:  # missing / unreadable backbone files, offline hub: an input problem
            raise EvalInputError(f"backbone {backbone}: {_describe_error(err)}") from None
    for spec in specs:
        for attempt in range(p.max_retries + 1):
            try:
                result = worker.run_shard(spec, attempt)
            except EvalInputError:
                raise  # bad input fails the same way on every attempt: stop now (finished shards are kept)
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
                if attempt < p.max_retries:
                    print(
                        f"evaluate: retrying {spec.key} (attempt {attempt + 2} of {p.max_retries + 1}) after: "
                        f"{_describe_error(err)}",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            on_result(spec, result)
            break
        else:
            failures[spec.key] = error
    return failures


@dataclass
class EvalSummary:
    """What :func:`run_evaluate` did."""

    computed: list[str]
    reused: list[str]
    skipped_units: dict[str, str]
    metrics: dict[str, dict[str, dict[str, Any]]]
    wall_s: float
    rescored: list[str] = field(default_factory=list)  # reused shards scored again (scoring changed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_evaluate(
    p: EvalParams,
    root: Path,
    *,
    log_mlflow: bool = True,
    progress: bool = True,
    worker: EvalWorker | None = None,
) -> EvalSummary:
    """Plan, compute the missing shards (in-process or on Ray), merge, write metrics, log to MLflow.

    Raises :class:`EvalError` naming the shards that failed after ``max_retries`` retries (the shards
    that succeeded are kept for the next run).
    """
    t0 = time.perf_counter()
    root = Path(root)
    out = root / p.out_dir
    units = plan(p, root)
    backbone = resolve_path(root, p.backbone)
    check_writable(out, "evaluate.out_dir")  # before any shard is computed
    if p.metrics_file:
        check_writable((root / p.metrics_file).parent, "evaluate.metrics_file's folder")
    specs = [s for u in units for s in u.shards]
    from pipeline.eval.tasks import scoring_id

    done: dict[str, dict[str, Any]] = {}
    rescored: list[str] = []
    examples_cache: dict[str, Any] = {}
    if p.resume:
        for s in specs:
            stored = read_shard(out, s)
            if stored is not None:
                if stored.get("scoring") != scoring_id(s.scoring):
                    stored = rescore_shard(out, s, stored, examples_cache)
                    rescored.append(s.key)
                done[s.key] = stored
    reused = list(done)
    todo = [s for s in specs if s.key not in done]
    computed: list[str] = []

    def on_result(spec: ShardSpec, result: dict[str, Any]) -> None:
        write_shard(out, spec, result)
        done[spec.key] = result
        computed.append(spec.key)
        if progress:
            c = result["cost"]
            print(
                f"evaluate: {spec.key}: {c['questions']} questions in {c['wall_s']:.1f}s "
                f"({len(done)}/{len(specs)} shards)",
                flush=True,
            )

    if progress:
        print(
            f"evaluate: {len(specs)} shards, {len(reused)} already done ({len(rescored)} re-scored), "
            f"{len(todo)} to compute",
            flush=True,
        )
    if p.workers == 0 or not todo:
        failures = run_local(todo, p, backbone, on_result, worker)
    else:
        from pipeline.eval.ray_runner import run_ray

        failures = run_ray(todo, p, backbone, on_result)
    if failures:
        lines = "\n".join(f"  {k}: {v}" for k, v in failures.items())
        raise EvalError(f"{len(failures)} shard(s) failed after {p.max_retries} retries:\n{lines}")

    combined: dict[str, dict[str, dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for u in units:
        if u.skipped:
            skipped[u.key] = u.skipped
            continue
        results = [done[s.key] for s in u.shards]
        rows = [r for res in results for r in res["rows"]]
        metrics = unit_metrics(u.task, rows, [res["cost"] for res in results], p)
        metrics["scoring"] = u.scoring  # the protocol that produced these numbers (read by the report)
        folder = u.folder(out)
        _atomic_write(folder / PREDICTIONS, _jsonl(rows))
        _atomic_write(folder / METRICS, json.dumps(_json_safe(metrics), indent=2, sort_keys=True) + "\n")
        _remove_stale_shards(folder / SHARDS_DIR, {s.file_stem for s in u.shards})
        combined.setdefault(f"{u.variant}/{u.condition}", {})[u.name] = metrics
    _remove_stale_units(out, units)
    _atomic_write(out / METRICS, json.dumps(_json_safe(combined), indent=2, sort_keys=True) + "\n")
    if p.metrics_file:
        extra = root / p.metrics_file
        extra.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(extra, json.dumps(_json_safe(combined), indent=2, sort_keys=True) + "\n")
    summary = EvalSummary(computed, reused, skipped, combined, time.perf_counter() - t0, rescored)
    if log_mlflow:
        log_to_mlflow(p, units, out, summary)
    return summary


def _remove_stale_shards(folder: Path, keep: set[str]) -> None:
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        stem = f.name.split(".", 1)[0]
        if f.is_file() and stem not in keep:
            f.unlink()


def _remove_stale_units(out: Path, units: Sequence[Unit]) -> None:
    """Delete result folders of (condition, task) pairs no longer planned under the planned variants
    (e.g. a condition dropped from the params), so the variant folders hold exactly this run's units."""
    import shutil

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


def log_to_mlflow(p: EvalParams, units: Sequence[Unit], out: Path, summary: EvalSummary) -> None:
    """A parent run ``evaluate`` (params, headline per unit, the combined metrics) with one nested run per
    unit (its metrics, per-category keys included; predictions and metrics as artifacts)."""
    import mlflow

    from pipeline import tracking

    with tracking.start_run("evaluate", tags={"stage": "evaluate"}):
        tracking.log_params(p.model_dump(mode="json", exclude={"inject_failures"}), prefix="evaluate")
        headline: dict[str, float] = {}
        for u in units:
            if u.skipped:
                continue
            metrics = summary.metrics[f"{u.variant}/{u.condition}"][u.name]
            headline[tracking.metric_key(f"{u.key}/headline")] = metrics.get("headline")
            tags = {"stage": "evaluate", "variant": u.variant, "condition": u.condition, "task": u.task}
            with tracking.start_run(f"eval-{u.variant}-{u.condition}-{u.name}", tags=tags, nested=True):
                tracking.log_params(
                    {
                        "variant": u.variant,
                        "condition": u.condition,
                        "task": u.task,
                        "shards": len(u.shards),
                        "scoring": u.scoring,
                    }
                )
                tracking.log_metrics({tracking.metric_key(k): v for k, v in metrics.items()})
                folder = u.folder(out)
                mlflow.log_artifact(str(folder / PREDICTIONS))
                mlflow.log_artifact(str(folder / METRICS))
        tracking.log_metrics(headline)
        tracking.log_dict(_json_safe(summary.metrics), "metrics.json")
        if summary.skipped_units:
            tracking.log_dict(summary.skipped_units, "skipped_units.json")


__all__ = [
    "CONDITIONS",
    "EvalError",
    "EvalInputError",
    "EvalParams",
    "EvalSummary",
    "EvalWorker",
    "RayParams",
    "ShardSpec",
    "TaskEntry",
    "Unit",
    "plan",
    "run_evaluate",
    "run_local",
]

"""Phase 1 of ``evaluate``: the ``evaluate`` section of params.yaml (:class:`EvalParams`), validated.

What can change a prediction is picked out of it by :meth:`pipeline.eval.plan.PredictionSettings.from_params`
(and per condition, for the shards' config hashes, by :meth:`~pipeline.eval.conditions.Condition.hashed_settings`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.common import check_dtype
from pipeline.eval.conditions import BASE_VARIANT, CONDITIONS, DEFAULT_CONDITIONS
from pipeline.params import register_section


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
        resources: custom Ray resources reserved per worker actor (e.g. ``{node2: 1}`` pins the actors to
            the nodes started with ``--resources '{"node2": N}'``).
        shared_storage: the backbone folder's path is valid on every node of the cluster (shared storage);
            when false (the default) a local backbone folder is sent to the actors through the object
            store (on a cluster the stage did not start itself). Data and adapters are always sent.
    """

    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_mb: int = Field(default=200, ge=80)
    actor_num_cpus: float = Field(default=1.0, gt=0)
    actor_num_gpus: float = Field(default=0.0, ge=0)
    actor_start_timeout_s: float = Field(default=900.0, gt=0)
    resources: dict[str, float] = Field(default_factory=dict)
    shared_storage: bool = False

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, n in v.items() if n < 0 or k in ("CPU", "GPU", "memory")]
        if bad:
            raise ValueError(
                f"resources {bad}: custom resources need a non-negative amount; CPU/GPU are actor_num_cpus/actor_num_gpus"
            )
        return v


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
        return check_dtype(v)

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


register_section("evaluate", EvalParams)

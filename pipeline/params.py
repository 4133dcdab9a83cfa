"""The schema of ``params.yaml``: one :class:`PipelineParams` model, one sub-model per stage's section.

The file has one top-level section per DVC stage, each validated by its model here (and only here):

=========== ============================ ===================================================
section     model                        read by
=========== ============================ ===================================================
prepare     :class:`PrepareParams`       :mod:`pipeline.stages.prepare` → :mod:`pipeline.data.prepare`
backbone    :class:`BackboneParams`      :mod:`pipeline.stages.backbone` → :mod:`pipeline.backbone`
train       :class:`TrainParams`         :mod:`pipeline.stages.train` → :mod:`pipeline.train.run`
evaluate    :class:`EvalParams`          :mod:`pipeline.stages.evaluate` → :mod:`pipeline.eval.runner`
report      :class:`ReportParams`        :mod:`pipeline.stages.report` → :mod:`pipeline.report.build`
=========== ============================ ===================================================

Choices are ``Literal`` types (:data:`ConditionName`, :data:`DecodingMode`, :data:`ScoringName`, …), each
defined once here; the code that implements them (the condition registry, the tasks) takes its names from
here. Rules that span sections are one validator, :meth:`PipelineParams._cross_section` (the training set
and every evaluation set are prepared; evaluated variants are trained; one backbone for training and
evaluation); each applies when the sections it relates are in the file.

Every stage loads its section with :func:`load_section`, which validates the *whole* file
(:func:`load_pipeline`), so a problem anywhere is found before any stage's work. Every problem (missing
file, bad YAML, a missing section, a validation error) raises one :class:`ParamsError` naming the file,
the section and the offending key. Sections this schema does not know are kept as they are (raw values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.common import DtypeName, check_dtype  # the dtype names: pipeline.common.DTYPES
from pipeline.data import DATASETS, known_datasets
from pipeline.data import synthetic as _synthetic
from pipeline.data.tokenize import DEFAULT_READ_LENGTH, DEFAULT_WRITE_LENGTH


class ParamsError(Exception):
    """A params file that cannot be used, with a message naming the file, section and key."""


# ---------------------------------------------------------------------------------------------
# choices (one definition each; pipeline.eval.conditions and pipeline.eval.tasks take them from here)
# ---------------------------------------------------------------------------------------------
BaselineCondition = Literal["base_no_context", "base_full_context", "rag_bm25"]
DeltaMemCondition = Literal["deltamem_only", "deltamem_full_context", "deltamem_shuffled"]
ConditionName = Literal[BaselineCondition, DeltaMemCondition]
CONDITION_NAMES: tuple[str, ...] = get_args(ConditionName)  # the order of the reports
DELTAMEM_CONDITIONS: tuple[str, ...] = get_args(DeltaMemCondition)  # the conditions with an adapter
BASE_VARIANT = "base"  # the variant name of the conditions without an adapter (reserved)

DecodingMode = Literal["greedy", "paper"]
DECODING_MODES: tuple[str, ...] = get_args(DecodingMode)
ScoringName = Literal["official", "delta-mem"]
SCORINGS: tuple[str, ...] = get_args(ScoringName)
ScheduleName = Literal["cosine", "linear", "constant"]


def check_condition(name: Any) -> Any:
    """``name`` when it names a condition, else ``ValueError`` listing them."""
    if name not in CONDITION_NAMES:
        raise ValueError(f"unknown condition {name!r}; known conditions: {', '.join(CONDITION_NAMES)}")
    return name


def check_scoring(scoring: Any) -> Any:
    """``scoring`` when it names a scoring protocol, else ``ValueError`` listing them."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; known: {', '.join(SCORINGS)}")
    return scoring


def _check_schedule(v: Any) -> Any:
    if v not in get_args(ScheduleName):
        raise ValueError(f"schedule {v!r}; allowed: {', '.join(get_args(ScheduleName))}")
    return v


def _check_attn(v: str) -> str:
    from deltamem.backbones import check_attn_implementation

    return check_attn_implementation(v)


# field types: the Literal, with our one-line message for a value outside it
Condition = Annotated[ConditionName, BeforeValidator(check_condition)]
Scoring = Annotated[ScoringName, BeforeValidator(check_scoring)]
Dtype = Annotated[DtypeName, BeforeValidator(check_dtype)]
Schedule = Annotated[ScheduleName, BeforeValidator(_check_schedule)]
AttnImplementation = Annotated[str, BeforeValidator(_check_attn)]  # auto | eager | sdpa | flash_attention_2


def _distinct(values: list[str], what: str) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError(f"a {what} is listed twice")
    return values


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------
class DatasetEntry(BaseModel):
    """One data set to prepare (an item of ``prepare.datasets``).

    Attributes:
        name: reader name (``synthetic``, ``locomo``, ``qasper``, ``hotpotqa``, ``memoryagentbench``,
            ``ifeval``, ``gpqa``).
        out: output folder name under ``out_dir`` (default: ``name``; set it to prepare one reader twice).
        enabled: false skips the entry.
        source: local file or folder (relative to the params file; ``$VARS`` and ``~`` expanded),
            ``hf`` (the data set's usual hub id) or ``hf:<owner>/<name>``. Not used by ``synthetic``.
        splits: splits to write (default: the reader's usual splits; for ``synthetic`` the keys of
            ``synthetic.dialogues``).
        files: explicit ``split → file`` map, relative to a source folder.
        hf_config / revision: hub configuration and revision (pin one for reproducibility).
        limit: keep at most this many examples per split (native order).
        options: reader options (see each reader's ``parse`` docstring).
        synthetic: generator settings (:class:`pipeline.data.synthetic.SyntheticConfig` fields).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    out: str | None = None
    enabled: bool = True
    source: str | None = None
    splits: list[str] | None = None
    files: dict[str, str] | None = None
    hf_config: str | None = None
    revision: str | None = None
    limit: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    synthetic: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; known datasets: {', '.join(known_datasets())}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DatasetEntry:
        if self.name == "synthetic":
            try:
                cfg = _synthetic.config_from_options(self.synthetic or {})
            except (TypeError, ValueError) as err:
                raise ValueError(f"synthetic: {err}") from None
            missing = [s for s in self.splits or [] if s not in cfg.dialogues]
            if missing:
                raise ValueError(f"splits {missing} have no count in synthetic.dialogues")
        elif self.synthetic is not None:
            raise ValueError("'synthetic' settings are only for the synthetic dataset")
        elif self.enabled and not self.source:
            raise ValueError(f"dataset {self.name!r} needs a source (local path, 'hf' or 'hf:<id>')")
        if self.splits is not None and len(set(self.splits)) != len(self.splits):
            raise ValueError("splits are listed twice")
        return self

    @property
    def out_name(self) -> str:
        """The output folder name."""
        return self.out or self.name

    def split_names(self) -> list[str]:
        """The splits to write."""
        if self.splits:
            return list(self.splits)
        if self.name == "synthetic":
            return _synthetic.ordered_splits(_synthetic.config_from_options(self.synthetic or {}).dialogues)
        return list(DATASETS[self.name].default_splits)

    def reader_options(self) -> dict[str, Any]:
        """Options passed to the reader (the synthetic settings for the generator)."""
        return dict(self.synthetic or {}) if self.name == "synthetic" else dict(self.options)


class TokenizerEntry(BaseModel):
    """Optional tokenizer for token-length statistics in the manifest.

    Attributes:
        name_or_path: ``embedded`` (offline SmolLM2-135M) or a local folder / hub id.
        gguf_file: GGUF file name inside ``name_or_path`` when the tokenizer comes from one.
        write_length / read_length: the lengths the statistics report overflow against.
    """

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = "embedded"
    gguf_file: str | None = None
    write_length: int = Field(default=DEFAULT_WRITE_LENGTH, ge=1)
    read_length: int = Field(default=DEFAULT_READ_LENGTH, ge=1)


class PrepareParams(BaseModel):
    """The ``prepare`` section: which data sets to prepare and where to write them."""

    model_config = ConfigDict(extra="forbid")

    out_dir: str = "data/prepared"
    datasets: list[DatasetEntry]
    tokenizer: TokenizerEntry | None = None

    @model_validator(mode="after")
    def _unique_outputs(self) -> PrepareParams:
        names = [d.out_name for d in self.datasets if d.enabled]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two enabled datasets write to the same folder {dup}; set 'out' on one of them")
        if not names:
            raise ValueError("no enabled datasets")
        return self


# ---------------------------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------------------------
class BackboneParams(BaseModel):
    """``backbone``: what to load and where to save it (:func:`pipeline.backbone.prepare_backbone`)."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = "embedded"
    dtype: Dtype = "float32"
    out_dir: str = "models/backbone"
    trust_remote_code: bool = False
    attn_implementation: AttnImplementation = "auto"


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
class OptimParams(BaseModel):
    """``train.optim``: the optimisation settings (the paper's defaults; the embedded preset scales them down).

    :class:`pipeline.train.trainer.TrainConfig` is this model plus the trainer's logging interval.
    The global batch is ``batch_size × grad_accum × ranks`` episodes per optimiser step.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(70, ge=1)
    batch_size: int = Field(1, ge=1)  # episodes per micro-batch
    grad_accum: int = Field(32, ge=1)  # micro-batches per optimiser step
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    beta_sparsity_weight: float = Field(0.01, ge=0)
    beta_sparsity_target: float = Field(0.05, ge=0, le=1)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)  # 0 = only the final adapter
    keep_checkpoints: int = Field(2, ge=1)
    deterministic: bool = True
    gradient_checkpointing: bool = False  # δ-mem-aware: recompute backbone layers in backward (long writes)


class RayTrainParams(BaseModel):
    """``train.ray``: Ray Train's ``ScalingConfig`` for ``launcher: ray`` (``num_workers`` = ``train.nproc``)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None  # None: RAY_ADDRESS, else a local loopback-only Ray started for the stage
    use_gpu: bool | Literal["auto"] = "auto"  # auto: when train.device is not cpu and the cluster has GPUs
    resources_per_worker: dict[str, float] = Field(default_factory=dict)  # e.g. {CPU: 4, GPU: 1}


class TrainParams(BaseModel):
    """``train``: data, lengths, the δ-mem config shared by all variants, per-variant overrides, optimiser.

    Every variant's ``DeltaMemConfig`` (``deltamem`` updated by ``variants[V]``) is validated here, so a
    bad variant is found whichever stage reads the file.
    """

    model_config = ConfigDict(extra="forbid")

    backbone: str = "models/backbone"
    data_dir: str = "data/prepared"
    dataset: str = "synthetic"
    train_split: str = "train"
    validation_split: str = "validation"
    limit_train: int | None = Field(None, ge=1)
    limit_validation: int = Field(64, ge=0)
    write_length: int = Field(8192, ge=1)
    read_length: int = Field(512, ge=1)
    device: str = "auto"
    attn_implementation: AttnImplementation = "auto"
    threads: int | None = Field(None, ge=1)
    resume: Literal["auto", "never"] = "auto"
    # processes / Ray Train workers; "auto": the visible GPUs (CPU: 1) with grad_accum divided among them
    nproc: int | Literal["auto"] = 1
    launcher: Literal["local", "torchrun", "ray"] = "local"
    dtype: Literal["auto", DtypeName] = "auto"  # the frozen backbone; auto: bf16 on CUDA
    storage_path: str = ".deltamem/ray-train"  # launcher ray: checkpoints (a folder, or s3://, gs://, …)
    ray: RayTrainParams = Field(default_factory=lambda: RayTrainParams())
    deltamem: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"TSW": {"write_mode": "TSW"}})
    optim: OptimParams = Field(default_factory=OptimParams)

    @field_validator("nproc", mode="before")
    @classmethod
    def _nproc(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"nproc {v!r}; expected an integer >= 1 or 'auto'")

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if BASE_VARIANT in v:
            raise ValueError(f"'{BASE_VARIANT}' is reserved for the conditions without an adapter")
        return v

    @model_validator(mode="after")
    def _variant_configs(self) -> TrainParams:
        for name in self.variants:
            try:
                self.deltamem_config(name)
            except (TypeError, ValueError) as err:
                raise ValueError(f"variants.{name}: {err}") from None
        return self

    def global_batch(self, nproc: int | None = None) -> int:
        """Episodes per optimiser step: batch_size × grad_accum × nproc; under ``nproc: auto`` grad_accum is
        the single-process value, divided among the processes, so the global batch is batch_size × grad_accum."""
        if self.nproc == "auto":
            return self.optim.batch_size * self.optim.grad_accum
        return self.optim.batch_size * self.optim.grad_accum * (nproc or self.nproc)

    def deltamem_config(self, variant: str):
        from deltamem import DeltaMemConfig

        if variant not in self.variants:
            raise ValueError(f"unknown variant {variant!r}; train.variants has: {', '.join(self.variants)}")
        return DeltaMemConfig.from_dict({**self.deltamem, **self.variants[variant]})


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
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
    conditions: list[Condition] | None = None
    scoring: Scoring = "official"

    @field_validator("conditions")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _distinct(v, "condition")

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

    What can change a prediction is picked out of it by :meth:`pipeline.eval.plan.PredictionSettings.from_params`
    (and per condition, for the shards' config hashes, by :meth:`~pipeline.eval.conditions.Condition.hashed_settings`).

    Attributes:
        backbone: backbone folder (or hub id / ``embedded``), relative to the params file.
        models_dir: adapters are ``<models_dir>/<variant>/adapter``.
        variants: adapter variants to evaluate (each runs every adapter condition); ``all`` in the file
            stands for every key of ``train.variants``.
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
    conditions: list[Condition] = Field(default_factory=lambda: list(CONDITION_NAMES))
    out_dir: str = "results/eval"
    metrics_file: str | None = None
    decoding: DecodingMode = "greedy"
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
    dtype: Dtype = "float32"
    attn_implementation: AttnImplementation = "auto"
    resume: bool = True
    seed: int = 0
    ray: RayParams = Field(default_factory=RayParams)
    inject_failures: dict[str, int] = Field(default_factory=dict)

    @field_validator("conditions")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return _distinct(v, "condition")

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if BASE_VARIANT in v:
            raise ValueError(f"'{BASE_VARIANT}' is reserved for the conditions without an adapter")
        return _distinct(v, "variant")

    @model_validator(mode="after")
    def _unique_tasks(self) -> EvalParams:
        names = [t.out_name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two tasks write to the same folder {dup}; set 'name' on one of them")
        return self

    def adapter_dir(self, root: Path, variant: str) -> Path:
        return root / self.adapters.get(variant, f"{self.models_dir}/{variant}/adapter")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
class ClaimSpec(BaseModel):
    """One claim checked for every δ-mem variant (an item of ``report.claims``).

    Attributes:
        deltamem: the δ-mem condition claimed to score higher (every evaluated variant is checked).
        versus: the condition it is compared with: a baseline (variant ``base``) or a δ-mem condition
            (then the same variant's, e.g. the ``deltamem_shuffled`` control).
        name: a short name for the report (e.g. ``paper ratio``, ``recall``); default ``deltamem > versus``.
        tasks: only these tasks (output names); default every task where both conditions were evaluated.
            A listed task (or a variant) without both conditions is reported as not evaluated.
        separates: the caption line saying what the comparison isolates (default: the report's
            :data:`pipeline.report.build.SEPARATES`).
    """

    model_config = ConfigDict(extra="forbid")

    deltamem: Condition
    versus: Condition
    name: str | None = None
    tasks: list[str] | None = None
    separates: str | None = None

    @model_validator(mode="after")
    def _deltamem(self) -> ClaimSpec:
        if self.deltamem not in DELTAMEM_CONDITIONS:
            raise ValueError(f"deltamem: {self.deltamem!r} is not a δ-mem condition")
        if self.deltamem == self.versus:
            raise ValueError("deltamem and versus are the same condition")
        return self

    @property
    def title(self) -> str:
        return self.name or f"{self.deltamem} > {self.versus}"


class ReportParams(BaseModel):
    """The ``report`` section of params.yaml.

    Attributes:
        eval_dir / train_dir / models_dir: where the evaluate and train stages wrote their results.
        out_dir: the report folder (replaced as a whole on every run).
        reference: the condition ratios are taken against (the frozen backbone without the history).
        baselines: the non-δ-mem conditions; "best baseline" is the highest-scoring of them per task.
        controls: δ-mem controls compared against but never claimed (the shuffled-state condition).
        claims: the claims that head the report (:class:`ClaimSpec`), each checked for every variant.
        claim: used only when ``claims`` is not given: then the claims are ``claim`` > ``reference`` and
            ``claim`` > each control.
        bootstrap / permutations / confidence / seed: the statistics (see :mod:`pipeline.stats`).
        title: the report's title.
    """

    model_config = ConfigDict(extra="forbid")

    eval_dir: str = "results/eval"
    train_dir: str = "results/train"
    models_dir: str = "models"
    out_dir: str = "reports"
    reference: Condition = "base_no_context"
    baselines: list[Condition] = Field(default_factory=lambda: ["base_no_context", "base_full_context", "rag_bm25"])
    controls: list[Condition] = Field(default_factory=lambda: ["deltamem_shuffled"])
    claim: Condition = "deltamem_only"
    claims: list[ClaimSpec] | None = None
    bootstrap: int = Field(default=2000, ge=100)
    permutations: int = Field(default=10000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    seed: int = 0
    title: str = "δ-mem report"

    def claim_specs(self) -> list[ClaimSpec]:
        """``claims``, or the ones derived from ``claim``/``reference``/``controls``."""
        if self.claims is not None:
            return list(self.claims)
        return [ClaimSpec(deltamem=self.claim, versus=v) for v in [self.reference, *self.controls] if v != self.claim]


# ---------------------------------------------------------------------------------------------
# the whole file
# ---------------------------------------------------------------------------------------------
class PipelineParams(BaseModel):
    """The whole ``params.yaml``: each stage's section (absent sections are None; unknown ones are kept).

    Rules between sections (:meth:`_cross_section`), each checked when both sides are in the file:

    * ``evaluate.variants: all`` stands for every key of ``train.variants`` (adding a variant is one line);
    * the training set is prepared: ``train.dataset`` is an enabled ``prepare`` entry with the training
      (and, when validating, the validation) split, when ``train.data_dir`` is ``prepare.out_dir``;
    * every ``evaluate.tasks`` set is prepared (dataset and split), when ``evaluate.data_dir`` is
      ``prepare.out_dir``;
    * every evaluated variant is trained (a key of ``train.variants``) or has an ``evaluate.adapters`` folder;
    * training and evaluation use one backbone (``train.backbone`` = ``evaluate.backbone``): an adapter
      only fits the backbone it was trained on.
    """

    model_config = ConfigDict(extra="allow")

    prepare: PrepareParams | None = None
    backbone: BackboneParams | None = None
    train: TrainParams | None = None
    evaluate: EvalParams | None = None
    report: ReportParams | None = None

    @model_validator(mode="before")
    @classmethod
    def _all_variants(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("evaluate"), dict):
            return data
        if data["evaluate"].get("variants") != "all":
            return data
        trained = data["train"].get("variants") if isinstance(data.get("train"), dict) else None
        if not isinstance(trained, dict) or not trained:
            raise ValueError("evaluate.variants is 'all' but train.variants lists no variant")
        return {**data, "evaluate": {**data["evaluate"], "variants": list(trained)}}

    @model_validator(mode="after")
    def _cross_section(self) -> PipelineParams:
        prepared = self._prepared_splits()
        t, e = self.train, self.evaluate
        if t is not None and prepared is not None and t.data_dir == self.prepare.out_dir:
            if t.dataset not in prepared:
                raise ValueError(
                    f"train.dataset: {t.dataset!r} is not prepared (prepare.datasets writes: {', '.join(prepared)})"
                )
            needed = [t.train_split] + ([t.validation_split] if t.limit_validation else [])
            missing = [s for s in needed if s not in prepared[t.dataset]]
            if missing:
                raise ValueError(
                    f"train: split(s) {missing} of {t.dataset!r} are not prepared "
                    f"(prepare writes: {', '.join(prepared[t.dataset])})"
                )
        if e is not None and prepared is not None and e.data_dir == self.prepare.out_dir:
            for i, task in enumerate(e.tasks):
                if task.split not in prepared.get(task.dataset, []):
                    raise ValueError(
                        f"evaluate.tasks.{i}: {task.dataset}/{task.split} is not prepared (prepare writes: "
                        + ", ".join(f"{d}/{s}" for d, splits in prepared.items() for s in splits)
                        + ")"
                    )
        if e is not None and t is not None:
            untrained = [v for v in e.variants if v not in t.variants and v not in e.adapters]
            if untrained:
                raise ValueError(
                    f"evaluate.variants: {untrained} are not keys of train.variants ({', '.join(t.variants)}) "
                    "and have no evaluate.adapters folder"
                )
            if e.backbone != t.backbone:
                raise ValueError(
                    f"evaluate.backbone {e.backbone!r} is not train.backbone {t.backbone!r}: an adapter only "
                    "fits the backbone it was trained on"
                )
        return self

    def _prepared_splits(self) -> dict[str, list[str]] | None:
        """``out folder → splits`` of the enabled ``prepare`` entries (None without a prepare section)."""
        if self.prepare is None:
            return None
        return {d.out_name: d.split_names() for d in self.prepare.datasets if d.enabled}


SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation.__args__[0]  # type: ignore[union-attr]  (X | None → X)
    for name, field in PipelineParams.model_fields.items()
}


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_params(path: str | Path) -> dict[str, Any]:
    """The whole params file as a dict (raises :class:`ParamsError` for a missing file or bad YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:  # a directory, no permission, a symlink loop: the OS's reason, not a traceback
        raise ParamsError(f"{path}: cannot read the params file: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: invalid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: the problem and where (PyYAML's own text quotes the offending line, which may be huge)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: the problem and where (PyYAML's own text quotes the offending line, which may be huge)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _describe(err: ValidationError) -> str:
    """``section 'S': key.path: message`` per problem (a cross-section rule names its keys itself)."""
    parts = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        if loc and loc[0] in SECTIONS:
            key = ".".join(loc[1:])
            parts.append(f"section '{loc[0]}': {key}: {msg}" if key else f"section '{loc[0]}': {msg}")
        else:
            parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_pipeline(path: str | Path) -> PipelineParams:
    """The whole params file, validated (raises :class:`ParamsError` naming file, section and key)."""
    data = load_params(path)
    try:
        return PipelineParams.model_validate(data)
    except ValidationError as err:
        raise ParamsError(f"{path}: {_describe(err)}") from None


def load_section(path: str | Path, section: str, model: type[BaseModel] | None = None) -> Any:
    """Section ``section`` of the params file: its model instance (the whole file validated first).

    A section this schema does not know comes back as its raw value. ``model``, when given, must be the
    section's model (callers may name it for readability; there is no other schema).
    """
    if model is not None and SECTIONS.get(section) is not model:
        raise TypeError(f"section {section!r} is validated by {SECTIONS.get(section)}, not {model}")
    params = load_pipeline(path)
    value = getattr(params, section, None) if section in SECTIONS else (params.model_extra or {}).get(section)
    if value is None and section not in (params.model_extra or {}):
        sections = [*(s for s in SECTIONS if getattr(params, s) is not None), *(params.model_extra or {})]
        raise ParamsError(f"{path}: no '{section}' section (sections: {', '.join(map(str, sections)) or 'none'})")
    return value

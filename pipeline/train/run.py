"""The ``train`` stage: params, input checks, the launcher, and the one driver every rank runs.

``train --variant V``: δ-mem SFT of variant V (a ``DeltaMemConfig`` = ``train.deltamem`` updated by
``train.variants[V]``) → ``models/V/adapter`` + ``models/V/training_summary.json`` and
``results/train/V/metrics.json`` (final loss, steps, tokens, time, held-out answer loss with the
written state / no memory / another episode's state).

Launchers (``train.launcher``): ``local`` (this process; with ``nproc`` > 1, torchrun on this machine),
``torchrun`` (``nproc`` DeepSpeed ZeRO-2 ranks on this machine) and ``ray`` (``nproc`` Ray Train workers,
:mod:`pipeline.train.ray_train`). Every rank runs :func:`train_variant` → :func:`pipeline.train.trainer.train`
with its :class:`~pipeline.train.trainer.Backend`. The backbone stage's code is :mod:`pipeline.backbone`; the ``train`` section's models
(:class:`~pipeline.params.TrainParams`, :class:`~pipeline.params.OptimParams`,
:class:`~pipeline.params.RayTrainParams`) are in :mod:`pipeline.params`.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.backbone import InputError, check_backbone_folder, resolve_backbone
from pipeline.common import atomic_write_json, pad_token_id, torch_dtype
from pipeline.params import BackboneParams, OptimParams, RayTrainParams, TrainParams


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(p: TrainParams, device: Any) -> str:
    """``train.dtype``, with ``auto`` = bfloat16 on CUDA and float32 elsewhere (the one default)."""
    if p.dtype != "auto":
        return p.dtype
    return "bfloat16" if getattr(device, "type", str(device)) == "cuda" else "float32"


def split_path(p: TrainParams, root: Path, split: str) -> Path:
    return root / p.data_dir / p.dataset / f"{split}.jsonl"


def load_episodes(p: TrainParams, root: Path, tokenizer: Any, split: str, limit: int | None):
    from pipeline.data.schema import read_split
    from pipeline.data.tokenize import Packer

    path = split_path(p, root, split)
    if not path.is_file():
        raise InputError(f"{path}: prepared split not found (run the prepare stage; train.dataset/{split})")
    examples = read_split(path)
    if limit is not None:
        examples = examples[:limit]
    packer = Packer(tokenizer, write_length=p.write_length, read_length=p.read_length, overflow="truncate")
    return [packer.pack(e) for e in examples]


def backbone_name(p: TrainParams, root: Path) -> str:
    """``train.backbone`` resolved (see :func:`pipeline.backbone.resolve_backbone`): the backbone stage's
    ``out_dir`` always counts as a local path."""
    return resolve_backbone(p.backbone, root, "train.backbone", local_names=(BackboneParams().out_dir,))


def check_inputs(params_file: str | os.PathLike, variant: str) -> TrainParams:
    """The train section of ``params_file`` after the checks that need no model: the variant, the prepared
    splits (present and readable), the output folders, the backbone path and its files. Every problem is an :class:`InputError` (one line, exit 2)."""
    from pipeline.params import ParamsError, load_section

    try:
        p = load_section(params_file, "train", TrainParams)
        p.deltamem_config(variant)
    except (ParamsError, ValueError) as err:
        raise InputError(str(err)) from None
    root = Path(params_file).resolve().parent
    backbone = backbone_name(p, root)  # first: a wrong backbone path is the likelier mistake
    splits = [p.train_split] + ([p.validation_split] if p.limit_validation else [])
    from pipeline.data.errors import DataError
    from pipeline.data.schema import read_split

    for split in splits:
        path = split_path(p, root, split)
        if not path.is_file():
            raise InputError(f"{path}: prepared split not found (run the prepare stage; train.dataset/{split})")
        try:  # here, not on every rank / Ray worker, where it would be a traceback per process
            read_split(path)
        except DataError as err:
            raise InputError(str(err)) from None
    for out in (root / "models" / variant, root / "results" / "train" / variant):  # before any step, not after
        _check_output_folder(out)
    if Path(backbone).is_dir():  # its files, last: the cheaper checks above name the likelier mistakes
        check_backbone_folder(Path(backbone), "train.backbone")
    return p


def _check_output_folder(out: Path) -> None:
    """``out`` can be created and written: its nearest existing ancestor is a writable folder."""
    existing = next(a for a in (out, *out.parents) if a.exists() or a.is_symlink())
    if not existing.is_dir():
        raise InputError(f"{out}: cannot write the training output here: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{out}: cannot write the training output here: {existing} is not writable")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(p: TrainParams, available_gpus: int | None = None, cpus: int | None = None) -> TrainParams:
    """``p`` with ``nproc`` a number and ``optim.grad_accum`` per process; logs what ``auto`` chose.

    ``auto``: one process per visible GPU (1 on CPU); ``grad_accum`` (written for one process) is divided
    among them so that the global batch stays batch_size × grad_accum; when it does not divide, the largest
    process count ≤ the GPUs that divides it is used. An explicit ``nproc`` larger than the visible GPUs
    (CUDA) or the CPU cores is an :class:`InputError`. (Ray: the cluster's resources are checked by
    :mod:`pipeline.train.ray_train` once it is connected.)
    """
    device = p.device
    gpus = visible_gpus() if available_gpus is None else available_gpus
    cpus = cpus or os.cpu_count() or 1
    on_gpu = device != "cpu" and not device.startswith("cpu") and gpus > 0
    if p.nproc != "auto":
        if p.launcher != "ray":
            if on_gpu and p.nproc > gpus:
                raise InputError(f"train.nproc={p.nproc} but {gpus} GPU(s) are visible; use nproc: auto or ≤ {gpus}")
            if not on_gpu and p.nproc > cpus:
                raise InputError(f"train.nproc={p.nproc} but this machine has {cpus} CPU core(s); use ≤ {cpus}")
        return p
    want = gpus if on_gpu and p.launcher != "ray" else 1
    accum = p.optim.grad_accum
    n = max(k for k in range(1, want + 1) if accum % k == 0)
    if n < want:
        warnings.warn(
            f"train.nproc auto: {want} GPUs visible but grad_accum {accum} does not divide among them; "
            f"using {n} processes so the global batch stays {p.global_batch()}",
            stacklevel=2,
        )
    _log(
        f"train.nproc auto: {n} process(es) ({gpus} GPU(s) visible); grad_accum {accum} → {accum // n} per "
        f"process; global batch {p.global_batch()} = batch_size {p.optim.batch_size} × {accum // n} × {n}"
    )
    return for_processes(p, n)


def for_processes(p: TrainParams, n: int) -> TrainParams:
    """``p`` for ``n`` processes: under ``nproc: auto`` the single-process grad_accum divided by ``n``."""
    if p.nproc != "auto":
        return p
    accum = p.optim.grad_accum
    if accum % n:
        raise InputError(f"train.nproc auto with {n} processes: train.optim.grad_accum={accum} is not divisible by {n}")
    return p.model_copy(update={"nproc": n, "optim": p.optim.model_copy(update={"grad_accum": accum // n})})


__all__ = ["BackboneParams", "InputError", "OptimParams", "RayTrainParams", "TrainParams"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _checksum(params: list[Any]) -> Any:
    """Two float64 sums per tensor: any change of the frozen backbone shows up, without a copy of its weights."""
    import torch

    sums = [torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]) for p in params]
    return torch.stack(sums).cpu()


def train_variant(
    p: TrainParams,
    variant: str,
    root: Path,
    backend: Any,
    device: Any,
    out_dir: Path,
    on_step: Any = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """One rank's part of the train stage: load, train (the one loop), check the backbone, evaluate.

    Returns the stage metrics on the main rank (``{"stopped_at": N}`` after ``stop_after``), None elsewhere.
    """
    import torch

    from deltamem.backbones import load_backbone
    from pipeline.train.trainer import TrainConfig, evaluate_loss, train

    if p.threads:
        torch.set_num_threads(p.threads)
    config = p.deltamem_config(variant)
    dtype = resolve_dtype(p, device)
    model, tok = load_backbone(
        backbone_name(p, root),
        dtype=torch_dtype(dtype),
        attn_implementation=p.attn_implementation,
        root=root,
        what="train.backbone",
    )
    model.to(device)
    pad_id = pad_token_id(tok)
    train_eps = load_episodes(p, root, tok, p.train_split, p.limit_train)
    val_eps = load_episodes(p, root, tok, p.validation_split, p.limit_validation) if p.limit_validation else []
    frozen = list(model.parameters())  # the backbone's, before δ-mem adds its own
    before = _checksum(frozen)
    cfg = TrainConfig(**p.optim.model_dump())
    t0 = time.time()
    result = train(
        model,
        train_eps,
        pad_id,
        config,
        cfg,
        out_dir,
        resume=p.resume,
        on_step=on_step,
        stop_after=stop_after,
        progress=progress,
        fingerprint={"dtype": dtype},
        backend=backend,
    )
    if not torch.equal(_checksum(frozen), before):  # a failure here is a bug, not a result
        raise RuntimeError("backbone weights changed during training")
    if "stopped_at" in result.summary or not backend.is_main:
        return result.summary if backend.is_main else None
    s = result.summary
    metrics = {k: s[k] for k in ("steps", "final_loss", "tokens", "train_seconds")}
    metrics |= {"wall_seconds": time.time() - t0, "tokens_per_s": s["tokens_per_s"]}
    metrics["trainable_parameters"] = s["trainable_parameters"]
    if backend.world > 1 or backend.name != "local":
        metrics["world_size"] = backend.world
    for memory in ("written", "shuffled", "none"):
        value = evaluate_loss(model, val_eps, pad_id, memory) if val_eps else float("nan")
        if value == value:  # NaN: no validation set, or the control needs two contexts
            metrics[f"val_answer_ce/{memory}"] = value
    return metrics


# --- MLflow ----------------------------------------------------------------------------------------------
def _process_tags() -> dict[str, str]:
    """Who runs this stage (see :func:`pipeline.tracking.process_tags`)."""
    from pipeline import tracking

    return tracking.process_tags()


def close_stale_runs(variant: str, experiment: str | None = None) -> list[str]:
    """Close the RUNNING ``train-<variant>`` runs of this host whose process is gone (a killed stage) as
    KILLED; returns their ids (:func:`pipeline.tracking.close_stale_runs`, which every stage's run start
    calls for all stages)."""
    from pipeline import tracking

    return tracking.close_stale_runs(experiment, stage="train", variant=variant)


class StageRun:
    """The train stage's MLflow run (main rank only; a no-op without tracking): params, per-step metrics,
    final metrics and the adapter as artifacts."""

    def __init__(self, p: TrainParams, variant: str, backbone: str, world: int, enabled: bool) -> None:
        self.enabled, self.p, self.variant, self.backbone, self.world = enabled, p, variant, backbone, world
        self._ctx: Any = None

    def __enter__(self) -> StageRun:
        if not self.enabled:
            return self
        from pipeline import tracking

        tags = {"stage": "train", "variant": self.variant, "backbone": self.backbone, "seed": self.p.optim.seed}
        tags |= {"world_size": self.world, "launcher": self.p.launcher}  # start_run adds the process tags
        self._ctx = tracking.start_run(f"train-{self.variant}", tags=tags)
        self.run = self._ctx.__enter__()
        config = self.p.deltamem_config(self.variant)
        tracking.log_params(
            {"train": self.p.model_dump(mode="json"), "deltamem": config.to_dict(), "variant": self.variant}
        )
        return self

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._ctx.__exit__(*exc)) if self._ctx is not None else False

    def log_step(self, row: dict[str, float]) -> None:
        """One step's metrics; by run id, so that a thread (the Ray launcher's queue reader) may call it."""
        if not self.enabled:
            return
        import math

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from pipeline import tracking

        now, step = int(time.time() * 1000), int(row["step"])
        items = [Metric(k, float(v), now, step) for k, v in row.items() if k != "step" and math.isfinite(float(v))]
        MlflowClient(tracking.tracking_uri()).log_batch(self.run.info.run_id, metrics=items)

    def finish(self, metrics: dict[str, Any], adapter_dir: Path) -> None:
        if self.enabled:
            import mlflow

            from pipeline import tracking

            tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
            mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")


def write_metrics(root: Path, variant: str, metrics: dict[str, Any]) -> Path:
    out = root / "results" / "train" / variant / "metrics.json"
    atomic_write_json(out, metrics, sort_keys=True)
    return out


def train_stage(
    p: TrainParams,
    variant: str,
    root: Path,
    backend: Any,
    device: Any,
    log_mlflow: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """The train stage on one rank of the local or torchrun launcher (outputs written by the main rank)."""
    out_dir = root / "models" / variant
    with StageRun(p, variant, backbone_name(p, root), backend.world, log_mlflow and backend.is_main) as run:
        metrics = train_variant(p, variant, root, backend, device, out_dir, run.log_step, progress, stop_after)
        if metrics is not None and "stopped_at" not in metrics:
            run.finish(metrics, out_dir / "adapter")
            write_metrics(root, variant, metrics)
        backend.barrier()
    return metrics


def run_train(
    p: TrainParams, variant: str, root: Path, log_mlflow: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Train one variant in this process; returns the metrics written to ``results/train/<variant>/metrics.json``."""
    from pipeline.train.trainer import LocalBackend

    metrics = train_stage(p, variant, root, LocalBackend(), resolve_device(p.device), log_mlflow, progress)
    assert metrics is not None
    return metrics

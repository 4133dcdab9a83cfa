"""``train.launcher: ray``: the one training loop on Ray Train workers (``TorchTrainer``, DeepSpeed ZeRO-2).

    train:
      launcher: ray
      nproc: 8                      # Ray Train workers (auto: the cluster's GPUs, 1 on CPU)
      storage_path: s3://bucket/deltamem/ray-train   # default .deltamem/ray-train (a local folder)
      ray: {use_gpu: auto, resources_per_worker: {CPU: 4, GPU: 1}}

The stage process is the driver. It connects to ``train.ray.address`` / ``RAY_ADDRESS`` or starts a local
Ray bound to 127.0.0.1 (no dashboard) for the stage, and runs :func:`_worker` on ``nproc`` workers with
``ScalingConfig(num_workers, use_gpu, resources_per_worker)``; Ray Train makes the torch process group (gloo
on CPU, nccl on GPU) and DeepSpeed joins it (:class:`~pipeline.train.distributed.DeepSpeedBackend`).

What travels, and what must be shared:

* the prepared splits (a few MB of JSONL) go to the workers inside the loop's config (Ray's object store);
* the backbone is opened by each worker: a hub id (downloaded into each node's cache) or a folder that must
  exist on every node (the driver's ``models/backbone`` is fine on one machine; on a cluster without a
  shared filesystem point ``train.backbone`` at a hub id or shared storage);
* checkpoints: each worker writes its part (rank 0: adapter + trainer state; every rank: its ZeRO shard)
  into its own local folder and reports it with ``ray.train.report``; Ray Train merges them into
  ``<storage_path>/<run>/step-NNNNNN`` (any URI pyarrow understands). A new execution with the same
  settings has the same run name, and Ray Train hands the workers the latest checkpoint to resume from;
* the result comes back the same way: rank 0 reports the final adapter, ``training_summary.json`` and the
  metrics as the checkpoint ``final``, which the driver copies to ``models/<V>/`` and
  ``results/train/<V>/`` (the stage's declared outs) before deleting the run's storage folder;
* per-step metrics: rank 0 puts each step's row into a Ray queue; a driver thread logs them to the stage's
  MLflow run while the workers train.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from pipeline.train.distributed import DeepSpeedBackend
from pipeline.train.run import (
    InputError,
    StageRun,
    TrainParams,
    _log,
    backbone_name,
    for_processes,
    split_path,
    write_metrics,
)

FINAL = "final"
REPO_ROOT = Path(__file__).resolve().parents[2]


# --- the local Ray --------------------------------------------------------------------------------------
def _start_local_ray(num_cpus: int) -> Any:
    """A Ray for this stage alone, every server on 127.0.0.1, no dashboard (:mod:`pipeline.ray_local`);
    its workers import this checkout (not whichever one an editable install points at)."""
    from pipeline.ray_local import start_local_ray

    path = os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if x)
    return start_local_ray(num_cpus=num_cpus, runtime_env={"env_vars": {"PYTHONPATH": path}})


def connect(p: TrainParams, workers: int) -> Any:
    """Connect to the configured cluster, or start a local one: returns the :class:`LocalRay` this call
    started (to be shut down by the caller), else None."""
    import ray

    if ray.is_initialized():
        return None
    address = p.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="warning")
        return None
    per_worker = p.ray.resources_per_worker.get("CPU", 1)
    return _start_local_ray(max(os.cpu_count() or 1, int(workers * per_worker)))


def scaling(p: TrainParams) -> tuple[TrainParams, dict[str, Any]]:
    """(``p`` for the chosen worker count, the ``ScalingConfig`` arguments), checked against the cluster."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    use_gpu = p.ray.use_gpu if p.ray.use_gpu != "auto" else (gpus > 0 and not p.device.startswith("cpu"))
    if p.nproc == "auto":
        want = gpus if use_gpu else 1
        accum = p.optim.grad_accum
        n = max(k for k in range(1, max(want, 1) + 1) if accum % k == 0)
        _log(
            f"train.nproc auto: {n} Ray Train worker(s) ({gpus} GPU(s) in the cluster); grad_accum {accum} → {accum // n}"
        )
        p = for_processes(p, n)
    n = int(p.nproc)
    per = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {}), **p.ray.resources_per_worker}
    for name, amount in per.items():
        if n * amount > total.get(name, 0):
            raise InputError(
                f"train.nproc={n} Ray Train workers × {amount:g} {name} each, but the cluster has "
                f"{total.get(name, 0):g} {name} (train.ray.resources_per_worker / train.nproc)"
            )
    return p, {"num_workers": n, "use_gpu": bool(use_gpu), "resources_per_worker": per}


def storage_uri(p: TrainParams, root: Path) -> str:
    """``train.storage_path`` as Ray Train wants it: a URI as is, a relative folder under the repository."""
    if "://" in p.storage_path:
        return p.storage_path
    path = Path(p.storage_path).expanduser()
    return str(path if path.is_absolute() else root.resolve() / path)


def run_name(p: TrainParams, variant: str, payload: dict[str, Any]) -> str:
    """The Ray Train run of these settings and data: the same name resumes, other settings start afresh."""
    keyed = {k: v for k, v in p.model_dump(mode="json").items() if k not in ("ray", "storage_path")}
    blob = json.dumps({"train": keyed, "variant": variant, "data": payload["splits"]}, sort_keys=True)
    return f"train-{variant}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _delete_run(storage: str, name: str) -> None:
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    with contextlib.suppress(FileNotFoundError, OSError):  # already gone
        fs.delete_dir(f"{base.rstrip('/')}/{name}")


# --- the worker -----------------------------------------------------------------------------------------
class RayBackend(DeepSpeedBackend):
    """:class:`~pipeline.train.distributed.DeepSpeedBackend` on a Ray Train worker: every rank has its own
    folder, and each complete checkpoint is reported to Ray Train (which merges the ranks' parts)."""

    def __init__(self, ds_config: Any = None) -> None:
        super().__init__(ds_config, private_dirs=True)

    def on_checkpoint(self, directory: Path, step: int) -> None:
        import ray.train

        ray.train.report(
            {"step": step},
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=directory.name,
            delete_local_checkpoint_after_upload=False,
        )


def _restore(ckpt_dir: Path) -> bool:
    """Copy Ray Train's latest checkpoint (if any) into ``ckpt_dir``; True when it is the final result."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    if ray.train.get_context().get_world_rank() == 0:
        _log(f"Ray Train: restoring the latest checkpoint of this run, {checkpoint.path}")
    with checkpoint.as_directory() as d:
        src = Path(d)
        if (src / FINAL).exists():
            return True
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, ckpt_dir / src.name, dirs_exist_ok=True)
    return False


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: write the shipped splits locally, train (the one loop), report the result."""
    import ray.train
    import ray.train.torch

    from pipeline.train.distributed import join_deepspeed
    from pipeline.train.run import train_variant

    ctx = ray.train.get_context()
    os.environ.update(
        RANK=str(ctx.get_world_rank()), LOCAL_RANK=str(ctx.get_local_rank()), WORLD_SIZE=str(ctx.get_world_size())
    )
    rank, _, device = join_deepspeed(ray.train.torch.get_device())
    p = TrainParams.model_validate(config["params"])
    variant = config["variant"]
    work = Path(tempfile.mkdtemp(prefix=f"deltamem-train-{variant}-r{rank}-"))
    try:
        for rel, text in config["splits"].items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text, encoding="utf-8")
        out_dir = work / "out"
        if _restore(out_dir / "checkpoints"):  # an earlier execution finished; only its copy-back was lost
            ray.train.report({"step": -1})
            return
        queue = config.get("queue")
        backend = RayBackend(config.get("ds_config"))
        metrics = train_variant(
            p,
            variant,
            work,
            backend,
            device,
            out_dir,
            on_step=queue.put if queue is not None else None,
            progress=False,
            stop_after=config.get("stop_after"),
        )
        if metrics is None or "stopped_at" in metrics:  # other ranks, or a test's "kill"
            ray.train.report({"step": -1})
            return
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (out_dir / FINAL).write_text("")
        ray.train.report(
            {"final": 1},
            checkpoint=ray.train.Checkpoint.from_directory(str(out_dir)),
            checkpoint_dir_name=FINAL,
            delete_local_checkpoint_after_upload=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the driver -----------------------------------------------------------------------------------------
def _payload(p: TrainParams, root: Path) -> dict[str, Any]:
    """What the workers get: each split's files (the JSONL and its contexts file) by relative path."""
    from pipeline.data.schema import contexts_path

    texts = {}
    for split in [p.train_split] + ([p.validation_split] if p.limit_validation else []):
        path = split_path(p, root, split)
        for f in (path, contexts_path(path)):
            if f.is_file():
                texts[f"data/{f.relative_to(root / p.data_dir).as_posix()}"] = f.read_text(encoding="utf-8")
    digest = {rel: hashlib.sha256(text.encode()).hexdigest() for rel, text in texts.items()}
    return {"splits": digest, "texts": texts}


def _drain(queue: Any, log_step: Any, stop: threading.Event) -> None:
    from ray.util.queue import Empty

    while not (stop.is_set() and queue.empty()):
        try:
            row = queue.get(timeout=0.5)
        except Empty:
            continue
        try:
            log_step(row)
        except Exception as err:  # tracking trouble must not stop training; say so
            _log(f"MLflow: step {row.get('step')} not logged: {type(err).__name__}: {err}")


def _copy_back(src: Path, root: Path, variant: str) -> dict[str, Any]:
    """The final checkpoint → ``models/<V>/adapter``, ``models/<V>/training_summary.json`` (atomic renames)."""
    from pipeline.common import atomic_dir, atomic_write_json

    out = root / "models" / variant
    with atomic_dir(out / "adapter") as tmp:
        shutil.copytree(src / "adapter", tmp, dirs_exist_ok=True)
    atomic_write_json(out / "training_summary.json", json.loads((src / "training_summary.json").read_text()))
    return json.loads((src / "metrics.json").read_text())


def worker_error(err: Exception) -> Exception:
    """A worker's :class:`CheckpointError` (e.g. a full disk) as itself, one line; anything else unchanged."""
    from pipeline.train.trainer import CheckpointError

    for line in str(err).splitlines():
        if "CheckpointError: " in line:
            return CheckpointError(line.split("CheckpointError: ", 1)[1].strip())
    return err


def run_ray(
    p: TrainParams,
    variant: str,
    root: Path,
    log_mlflow: bool = True,
    stop_after: int | None = None,
    ds_config: Any = None,
) -> dict[str, Any] | None:
    """The train stage under Ray Train; returns the metrics (None after ``stop_after``, a test's kill)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    root = root.resolve()
    payload = _payload(p, root)
    backbone = backbone_name(p, root)
    local = connect(p, p.nproc if p.nproc != "auto" else 1)
    try:
        p, scale = scaling(p)
        name, storage = run_name(p, variant, payload), storage_uri(p, root)
        worker_params = p.model_copy(update={"backbone": backbone, "data_dir": "data"})
        with StageRun(p, variant, backbone, scale["num_workers"], log_mlflow) as stage:
            queue = Queue(actor_options={"num_cpus": 0}) if log_mlflow else None
            stop = threading.Event()
            drain = (
                threading.Thread(target=_drain, args=(queue, stage.log_step, stop), daemon=True)
                if queue is not None
                else None
            )
            if drain is not None:
                drain.start()
            config = {
                "params": worker_params.model_dump(mode="json"),
                "variant": variant,
                "splits": payload["texts"],
                "queue": queue,
                "stop_after": stop_after,
                "ds_config": ds_config,
            }
            trainer = TorchTrainer(
                _worker,
                train_loop_config=config,
                scaling_config=ScalingConfig(**scale),
                run_config=RunConfig(
                    name=name,
                    storage_path=storage,
                    checkpoint_config=CheckpointConfig(num_to_keep=max(2, p.optim.keep_checkpoints + 1)),
                ),
            )
            try:
                result = trainer.fit()
            except Exception as err:
                raise worker_error(err) from None
            finally:
                stop.set()
                if drain is not None:
                    drain.join(timeout=30)
            if stop_after is not None:
                return None
            if result.checkpoint is None:
                raise RuntimeError(f"Ray Train run {name} ended without a final checkpoint")
            with result.checkpoint.as_directory() as d:
                if not (Path(d) / FINAL).exists():
                    raise RuntimeError(f"Ray Train run {name}: the latest checkpoint is not the final result")
                metrics = _copy_back(Path(d), root, variant)
            stage.finish(metrics, root / "models" / variant / "adapter")
            write_metrics(root, variant, metrics)
        _delete_run(storage, name)  # only needed to resume a killed run
        return metrics
    finally:
        if local is not None:
            local.shutdown()

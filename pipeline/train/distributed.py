"""Multi-process data-parallel δ-mem SFT with DeepSpeed ZeRO-2 (CPU ranks: gloo; GPUs: nccl).

    torchrun --nproc_per_node 8 -m pipeline.train.distributed --params params.yaml --variant TSW
    deepspeed --num_gpus 8 --module pipeline.train.distributed --params params.yaml --variant TSW
    torchrun --nproc_per_node 2 -m pipeline.train.distributed --params params.yaml --variant TSW   # 2 CPU ranks

The recipe, parameters (the ``train`` section of params.yaml) and outputs of the ``train`` stage
(:mod:`pipeline.train.run`, :func:`pipeline.train.trainer.train`), data-parallel over the ranks:

* Every rank draws ``batch_size × world_size`` episodes per micro-batch from the same seeded
  :class:`~pipeline.train.trainer.EpisodeSampler` and keeps its own slice, so a run sees the episodes (in
  order) of a single-process run with ``batch_size × world_size``; the global batch is
  ``batch_size × grad_accum × world_size`` episodes.
* The loss is the single-process run's: the mean over episodes of each episode's answer CE + β-sparsity
  term (:func:`~pipeline.train.trainer.episode_forward`). Every rank holds ``batch_size`` episodes, so the
  rank average of the gradients that ZeRO takes is the gradient of the mean over all of them, and
  accumulation averages equal-sized micro-batches: any split of the global batch trains the same objective.
  Losses and the adapter match the single-process run up to float rounding
  (``tests/pipeline/train/test_distributed.py``).
* DeepSpeed ZeRO-2 partitions the δ-mem gradients and AdamW states over the ranks: ``model_parameters`` and
  the plain ``torch.optim.AdamW`` hold δ-mem parameters only; the backbone is frozen, replicated and in
  eval mode. Gradient accumulation and clipping are DeepSpeed's (config ``"auto"`` values are filled from
  ``train.optim``); the LR schedule is the trainer's ``LambdaLR``.
* Rank 0 writes the adapter (``save_adapter`` format: it loads in a single process with ``load_adapter``),
  ``training_summary.json`` and the metrics. A checkpoint ``checkpoints/step-NNNNNN`` holds the adapter and
  the trainer state (rank 0) and DeepSpeed's per-rank ZeRO shards (every rank; frozen weights excluded); the
  directory is renamed into place by rank 0 once all ranks have written. Every rank resumes from the newest
  checkpoint written with the same settings *and world size* (ZeRO shards are per rank).

Precision: fp32 on CPU. On CUDA the frozen backbone is loaded in bf16 (``--dtype auto``) while δ-mem keeps
fp32 master weights and fp32 math (``deltamem.memory`` casts to fp32), so no autocast is needed.
DeepSpeed's ``bf16``/``fp16`` modes are refused: they cast the *trainable* parameters to half precision, and
δ-mem's ``F.linear(x.float(), W)`` then fails on the dtype mismatch.

Gradient checkpointing (``optim.gradient_checkpointing``) uses δ-mem's own state-aware checkpointing
(:meth:`deltamem.attach.DeltaMemController.enable_gradient_checkpointing`), not Hugging Face's.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.train.trainer import Backend, CheckpointError, TrainConfig, batch_tokens, episode_forward

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DS_CONFIG = REPO_ROOT / "cluster" / "deepspeed" / "zero2.json"
AUTO = "auto"
DS_TAG = "state"  # the DeepSpeed checkpoint tag inside checkpoints/step-NNNNNN/deepspeed


# --- the DeepSpeed config ------------------------------------------------------------------------------
def deepspeed_config(template: dict[str, Any] | str | os.PathLike, cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config for ``cfg`` on ``world_size`` ranks, from a JSON file or dict with ``"auto"`` values.

    Filled from ``train.optim``: ``train_micro_batch_size_per_gpu`` = batch_size, ``gradient_accumulation_steps``
    = grad_accum, ``train_batch_size`` = batch_size × grad_accum × world_size, ``gradient_clipping`` =
    max_grad_norm, ``zero_optimization.stage`` = 2. An explicit value that disagrees with params.yaml is an
    error (params.yaml is the single source), as are ``optimizer``/``scheduler`` sections (the trainer passes
    its own), ``bf16``/``fp16`` (see the module docstring) and ZeRO stage 3.
    """
    if isinstance(template, dict):
        ds = copy.deepcopy(template)
    else:
        ds = json.loads(Path(template).read_text())
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(
                f"DeepSpeed config: remove the {key!r} section; the trainer passes its own AdamW and LR "
                "schedule, set in train.optim"
            )
    for key in ("bf16", "fp16"):
        section = ds.get(key) or {}
        if section.get("enabled", False) not in (False, AUTO):
            raise ValueError(
                f"DeepSpeed config: {key}.enabled must be false: it casts the trainable δ-mem parameters to "
                "half precision (δ-mem keeps fp32 master weights and math); load the frozen backbone in bf16 "
                "instead (--dtype bfloat16, the default on CUDA)"
            )
        ds[key] = {**section, "enabled": False}
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in wanted.items():
        given = ds.get(key, AUTO)
        if given != AUTO and given != value:
            raise ValueError(
                f'DeepSpeed config {key}={given!r} but params.yaml (train.optim) gives {value!r}; write "auto"'
            )
        ds[key] = value
    zero = dict(ds.get("zero_optimization") or {})
    stage = zero.get("stage", AUTO)
    stage = 2 if stage == AUTO else stage
    if stage not in (0, 1, 2):
        raise ValueError(
            f"DeepSpeed config zero_optimization.stage={stage!r}; allowed: 0, 1, 2 (ZeRO-3 would partition the "
            "frozen backbone, whose weights δ-mem reads when attaching; the trainable part is tiny anyway)"
        )
    zero["stage"] = stage
    ds["zero_optimization"] = zero
    ds.setdefault("zero_allow_untested_optimizer", True)  # a plain torch AdamW, not DeepSpeed's fused one
    return ds


# --- the loss ------------------------------------------------------------------------------------------
class EpisodeObjective(nn.Module):
    """A micro-batch of episodes → this rank's loss; DeepSpeed's engine wraps this module.

    The whole episode (write the context, read question + answer) runs in ``forward``, which returns
    :func:`~pipeline.train.trainer.episode_forward`'s loss: the mean over this rank's episodes of each
    episode's CE + β-sparsity term. Every rank holds the same number of episodes, so the rank average that
    ZeRO takes of the gradients is the gradient of the mean over all ranks' episodes — the single-process
    objective, with nothing to exchange. ``last`` holds the loss, answer CE and token counts of the call over
    all ranks (one all-reduce of five numbers, for logging; equal on every rank).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.last: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.distributed as dist

        loss, ce, n_answer = episode_forward(self.model, batch, "written", self.cfg)
        episodes = batch["read_ids"].shape[0]
        tokens = batch_tokens(batch)
        stats = torch.tensor(
            [float(loss.detach()) * episodes, float(ce.detach()) * episodes, episodes, n_answer, tokens],
            dtype=torch.float64,
            device=loss.device,
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        loss_all, ce_all, episodes_all, n_all, tokens_all = stats.tolist()
        self.last = {
            "loss": loss_all / episodes_all,
            "answer_ce": ce_all / episodes_all,
            "answer_tokens": n_all,
            "tokens": tokens_all,
        }
        return loss


# --- the backend of the training loop ------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call init_distributed() (torchrun/deepspeed)")
    return dist.get_rank(), dist.get_world_size()


class DeepSpeedBackend(Backend):
    """:class:`~pipeline.train.trainer.Backend` for DeepSpeed ZeRO-2 data parallelism over the process group.

    ``forward`` runs the :class:`EpisodeObjective` inside DeepSpeed's engine; ``backward`` is
    ``engine.backward`` + ``engine.step`` (DeepSpeed steps optimizer and schedule at the accumulation
    boundary only, and clips there); a checkpoint holds every rank's ZeRO shard (frozen weights excluded) and
    the LR schedule, next to the adapter and trainer state that rank 0 writes.
    """

    name = "deepspeed"

    def __init__(self, ds_config: dict[str, Any] | str | os.PathLike | None = None, private_dirs: bool = False) -> None:
        self.rank, self.world = _rank_world()
        self.ds_template = DEFAULT_DS_CONFIG if ds_config is None else ds_config
        self.private_dirs = private_dirs

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def setup(self, model: Any, params: list[nn.Parameter], cfg: TrainConfig) -> None:
        import deepspeed

        super().setup(model, params, cfg)  # the AdamW and LambdaLR that DeepSpeed wraps
        self.device = next(model.parameters()).device  # nccl all-reduces CUDA tensors only
        self.ds = deepspeed_config(self.ds_template, cfg, self.world)
        self.objective = EpisodeObjective(model, cfg)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.objective, model_parameters=params, optimizer=self.opt, lr_scheduler=self.sched, config=self.ds
        )
        self.objective.eval()  # frozen backbone: no dropout; δ-mem has no dropout either

    def describe(self) -> dict[str, Any]:
        return {"launcher": "deepspeed", "world_size": self.world, "zero_stage": self.ds["zero_optimization"]["stage"]}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.engine(batch)
        return loss, dict(self.objective.last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # steps the optimizer and the schedule at the accumulation boundary only

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def step(self) -> None:
        pass  # done by engine.step() at the last micro-batch

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, directory: Path) -> dict[str, Any]:
        self.engine.save_checkpoint(
            str(directory / "deepspeed"), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True
        )
        return {}

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        load_path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag=DS_TAG, load_module_strict=False, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {directory}")


# --- the launcher entry --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group of torchrun / the deepspeed launcher (or make a world of one when run plainly).

    Returns (rank, world size, this rank's device): ``cuda:LOCAL_RANK`` with nccl when CUDA is available and
    ``device`` is not ``cpu``, else the CPU with gloo.
    """
    if "RANK" not in os.environ:  # a plain `python -m pipeline.train.distributed`: one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    return join_deepspeed(torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def join_deepspeed(device: torch.device) -> tuple[int, int, torch.device]:
    """Initialise DeepSpeed's communication for this rank (over the torch process group when one exists:
    Ray Train makes it; else from the torchrun environment): nccl on CUDA, gloo on CPU."""
    import deepspeed

    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    elif os.environ.get("DELTAMEM_DS_SHM_COMM") != "1":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (C++, ~1.5 min on 2 cores, needs g++)
        # that only its tensor-parallel *inference* all-reduce uses; training runs on gloo without it.
        # (importlib: `import deepspeed.comm.torch as m` would bind the `torch` that deepspeed.comm re-exports)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    rank, world = _rank_world()
    return rank, world, device


def main(argv: list[str] | None = None) -> int:
    """The torchrun / deepspeed-launcher entry: every rank runs :func:`pipeline.train.run.train_stage`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params.yaml (its train section); outputs go next to it")
    ap.add_argument("--variant", required=True, help="a key of train.variants")
    ap.add_argument("--deepspeed", default=str(DEFAULT_DS_CONFIG), help="DeepSpeed JSON config with 'auto' values")
    ap.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after N optimizer steps (resume tests)")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step and rank (the stage's)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = ap.parse_args(argv)

    from pipeline.train.run import InputError, check_inputs, for_processes, train_stage

    root = Path(args.params).resolve().parent
    try:
        p = check_inputs(args.params, args.variant)
        deepspeed_config(args.deepspeed, TrainConfig(**p.optim.model_dump()), 1)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: {args.deepspeed}: {err}", file=sys.stderr)
        return 2
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world, device = init_distributed(p.device)
    try:
        if args.grad_accum is not None:  # as the stage resolved it (nproc: auto)
            p = p.model_copy(
                update={"nproc": world, "optim": p.optim.model_copy(update={"grad_accum": args.grad_accum})}
            )
        p = for_processes(p, world)  # nproc: auto (run by hand) → grad_accum per process
        backend = DeepSpeedBackend(args.deepspeed)
        metrics = train_stage(
            p,
            args.variant,
            root,
            backend,
            device,
            log_mlflow=not args.no_tracking,
            progress=not args.no_progress,
            stop_after=args.stop_after,
        )
    except CheckpointError as err:  # e.g. a full disk: one line per rank, no traceback
        print(f"error (rank {rank}): {err}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
* The loss of a micro-batch is that single-process run's loss: answer CE averaged over the answer tokens of
  *all* ranks, plus the β-sparsity term of the mean β over *all* ranks' read tokens. One all-reduce of a few
  numbers per micro-batch gives the global counts and means, and each rank back-propagates a surrogate whose
  rank-averaged gradient (what ZeRO reduces) is the gradient of that global loss. Losses and the adapter
  match the single-process run up to float rounding (``tests/pipeline/train/test_distributed.py``).
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
import contextlib
import copy
import importlib
import json
import logging
import os
import random
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltamem import DeltaMemConfig, attach_delta_mem
from deltamem.adapter import save_adapter
from pipeline.data.tokenize import PackedExample
from pipeline.train.trainer import (
    CKPT_PREFIX,
    EpisodeSampler,
    TrainConfig,
    TrainResult,
    _checkpoints,
    _rng_state,
    _set_rng_state,
    answer_loss,
    collate_episodes,
    episode_logits,
    lr_lambda,
    run_fingerprint,
    training_summary,
)

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
    """A micro-batch of episodes → this rank's surrogate loss; DeepSpeed's engine wraps this module.

    The whole episode (write the context, read question + answer) runs in ``forward``. With global counts
    from one all-reduce (N answer tokens, M read tokens, mean β per layer m_ℓ over all ranks), rank r returns

        W · [ CE_sum_r / N + w_β · Σ_ℓ 2 (m_ℓ − target)/L · (M_r / M) · β̄_{r,ℓ} ]      (m_ℓ detached)

    whose average over the W ranks has the gradient of the global loss CE_sum / N + w_β · mean_ℓ (m_ℓ −
    target)². ``last`` holds the global loss, answer CE and token counts of the call (equal on every rank).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.last: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.distributed as dist

        logits, labels = episode_logits(self.model, batch, "written")
        ce_sum, n_answer = answer_loss(logits, labels, reduction="sum")
        means = self.model.delta_mem.beta_means
        betas = torch.stack([means[i] for i in sorted(means)])  # the read call's mean β per layer
        n_read = int(batch["read_mask"].sum())
        tokens = int(batch["write_mask"].sum()) + n_read
        head = torch.tensor([n_answer, n_read, tokens], dtype=torch.float64, device=ce_sum.device)
        stats = torch.cat([head, ce_sum.detach().double().reshape(1), betas.detach().double() * n_read])
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            world = dist.get_world_size()
        n_all, m_all, tokens_all, ce_all = stats[:4].tolist()
        beta_mean = stats[4:] / max(m_all, 1.0)
        w, target = self.cfg.beta_sparsity_weight, self.cfg.beta_sparsity_target
        surrogate = ce_sum / max(n_all, 1.0)
        if w:
            coef = 2.0 * (beta_mean - target) / len(betas) * (n_read / max(m_all, 1.0))
            surrogate = surrogate + w * (coef.to(betas.dtype) * betas).sum()
        ce = ce_all / max(n_all, 1.0)
        self.last = {
            "loss": ce + w * float(((beta_mean - target) ** 2).mean()),
            "answer_ce": ce,
            "answer_tokens": n_all,
            "tokens": tokens_all,
        }
        return surrogate * world


# --- the training loop ---------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call init_distributed() (torchrun/deepspeed)")
    return dist.get_rank(), dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _save_checkpoint(
    engine: Any, model: nn.Module, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], keep: int, rank: int
) -> Path:
    """All ranks write their ZeRO shard into a temporary directory; rank 0 adds the adapter and the trainer
    state and renames it into place (a crash never leaves a half-written ``step-NNNNNN``)."""
    final = ckpt_dir / f"{CKPT_PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{CKPT_PREFIX}{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / "deepspeed"), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    if rank == 0:
        save_adapter(model, tmp / "adapter")
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def train_distributed(
    model: Any,
    episodes: Sequence[PackedExample],
    pad_id: int,
    config: DeltaMemConfig,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    ds_config: dict[str, Any] | str | os.PathLike | None = None,
    resume: str = "auto",
    on_step: Callable[[dict[str, float]], None] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    fingerprint: dict[str, Any] | None = None,
) -> TrainResult:
    """:func:`pipeline.train.trainer.train`, data-parallel under DeepSpeed; call it on every rank.

    ``model`` (the backbone, on this rank's device; δ-mem is attached here) and ``episodes`` must be the same
    on every rank. Returns the same :class:`TrainResult` on every rank; rank 0 writes the files.
    """
    import deepspeed
    from tqdm.auto import tqdm

    rank, world = _rank_world()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if getattr(model, "delta_mem", None) is None:
        model = attach_delta_mem(model, config)
    if cfg.gradient_checkpointing:
        model.delta_mem.enable_gradient_checkpointing()
    params = model.delta_mem.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ds = deepspeed_config(DEFAULT_DS_CONFIG if ds_config is None else ds_config, cfg, world)
    objective = EpisodeObjective(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=objective, model_parameters=params, optimizer=opt, lr_scheduler=sched, config=ds
    )
    objective.eval()  # frozen backbone: no dropout; δ-mem has no dropout either
    sampler = EpisodeSampler(len(episodes), cfg.seed)
    step, history, tokens_seen, elapsed = 0, [], 0, 0.0

    extra = {"launcher": "deepspeed", "world_size": world, "zero_stage": ds["zero_optimization"]["stage"]}
    fingerprint = run_fingerprint(config, cfg, len(episodes), {**extra, **(fingerprint or {})})
    if resume not in ("auto", "never"):
        raise ValueError(f"resume={resume!r}; allowed: auto, never")
    _barrier()
    existing = _checkpoints(ckpt_dir) if resume == "auto" else []
    state = None
    if existing:
        state = torch.load(existing[-1] / "trainer_state.pt", map_location="cpu", weights_only=True)
        stale = json.loads(state.get("fingerprint", "null")) != fingerprint
        _barrier()  # every rank has read it before rank 0 may remove it
        if stale:
            if rank == 0:
                warnings.warn(f"ignoring checkpoints in {ckpt_dir}: written by a run with other settings", stacklevel=2)
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            state = None
            _barrier()
    if state is not None:
        load_path, _ = engine.load_checkpoint(
            str(existing[-1] / "deepspeed"), tag=DS_TAG, load_module_strict=False, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {existing[-1]}")
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        step, history = int(state["step"]), list(state["history"])
        tokens_seen, elapsed = int(state["tokens_seen"]), float(state["elapsed"])
        if rank == 0:
            print(f"resumed from {existing[-1]} at step {step}", file=sys.stderr, flush=True)

    b = cfg.batch_size
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=f"δ-mem train ×{world}",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = float(engine.get_lr()[0])
        loss_sum = ce_sum = 0.0
        tokens = 0
        for _ in range(cfg.grad_accum):
            mine = sampler.take(b * world)[rank * b : (rank + 1) * b]
            batch = collate_episodes([episodes[i] for i in mine], pad_id)
            loss = engine(batch)
            engine.backward(loss)
            engine.step()  # steps the optimizer and the schedule at the accumulation boundary only
            loss_sum += objective.last["loss"] / cfg.grad_accum
            ce_sum += objective.last["answer_ce"] / cfg.grad_accum
            tokens += int(objective.last["tokens"])
        norm = engine.get_global_grad_norm()
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        tokens_seen += tokens
        row = {
            "step": step,
            "loss": loss_sum,
            "answer_ce": ce_sum,
            "lr": lr,
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "tokens_per_s": tokens / dt,
        }
        history.append(row)
        if on_step is not None and step % cfg.log_every == 0:
            on_step(row)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / dt:.0f}")
        bar.update(1)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            trainer_state = {
                "sampler": sampler.state_dict(),
                "rng": _rng_state(),
                "step": step,
                "history": history,
                "tokens_seen": tokens_seen,
                "elapsed": elapsed,
                "fingerprint": json.dumps(fingerprint),
            }
            _save_checkpoint(engine, model, ckpt_dir, step, trainer_state, cfg.keep_checkpoints, rank)
        if stop_after is not None and step >= stop_after:
            bar.close()
            return TrainResult(out_dir / "adapter", {"stopped_at": step}, history)
    bar.close()
    summary = {
        **training_summary(history, step, tokens_seen, elapsed, step * cfg.grad_accum * b * world, params),
        "world_size": world,
        "global_batch": b * cfg.grad_accum * world,
        "zero_stage": ds["zero_optimization"]["stage"],
    }
    if rank == 0:
        save_adapter(model, out_dir / "adapter")  # run facts: training_summary.json
        (out_dir / "training_summary.json").write_text(json.dumps({**summary, "history": history}, indent=2))
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # only needed to resume a killed run
    _barrier()
    return TrainResult(out_dir / "adapter", summary, history)


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
    import deepspeed

    if "RANK" not in os.environ:  # a plain `python -m pipeline.train.distributed`: one rank
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    elif os.environ.get("DELTAMEM_DS_SHM_COMM") != "1":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (C++, ~1.5 min on 2 cores, needs g++)
        # that only its tensor-parallel *inference* all-reduce uses; training runs on gloo without it.
        # (importlib: `import deepspeed.comm.torch as m` would bind the `torch` that deepspeed.comm re-exports)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False)
    rank, world = _rank_world()
    return rank, world, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def _checksum(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two sums per tensor: any change of the frozen backbone shows up (cheap: no copy of the weights)."""
    sums = [torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]) for p in params]
    return torch.stack(sums).cpu()


def run_train_distributed(
    p: Any,
    variant: str,
    root: Path,
    device: torch.device,
    ds_config: str | os.PathLike | None = None,
    dtype: str = "auto",
    log_mlflow: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """:func:`pipeline.train.run.run_train` on every rank; returns the metrics on rank 0 (``None`` elsewhere)."""
    from deltamem.backbones import load_backbone
    from pipeline.train.run import load_episodes
    from pipeline.train.trainer import evaluate_loss

    rank, world = _rank_world()
    if p.threads:
        torch.set_num_threads(p.threads)
    config = p.deltamem_config(variant)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    backbone = str(root / p.backbone) if (root / p.backbone).exists() else p.backbone
    model, tok = load_backbone(backbone, dtype=getattr(torch, dtype))
    model.to(device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_eps = load_episodes(p, root, tok, p.train_split, p.limit_train)
    val_eps = load_episodes(p, root, tok, p.validation_split, p.limit_validation) if p.limit_validation else []
    frozen = list(model.parameters())  # the backbone's, before δ-mem adds its own
    before = _checksum(frozen)
    cfg = TrainConfig(**p.optim.model_dump())
    out_dir = root / "models" / variant
    track = log_mlflow and rank == 0
    t0 = time.time()
    if track:
        from pipeline import tracking

        tags = {"stage": "train", "variant": variant, "backbone": backbone, "seed": cfg.seed, "world_size": world}
        run_ctx: Any = tracking.start_run(f"train-{variant}", tags=tags)
    else:
        run_ctx = contextlib.nullcontext()
    with run_ctx:
        if track:
            tracking.log_params(
                {"train": p.model_dump(mode="json"), "deltamem": config.to_dict(), "variant": variant, "world": world}
            )

            def on_step(row: dict[str, float]) -> None:
                tracking.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

        result = train_distributed(
            model,
            train_eps,
            pad_id,
            config,
            cfg,
            out_dir,
            ds_config=ds_config,
            resume=p.resume,
            on_step=on_step if track else None,
            stop_after=stop_after,
            progress=progress,
            fingerprint={"dtype": dtype},
        )
        if not torch.equal(_checksum(frozen), before):  # a failure here is a bug, not a result
            raise RuntimeError("backbone weights changed during training")
        if stop_after is not None and "stopped_at" in result.summary:
            return result.summary if rank == 0 else None
        metrics: dict[str, Any] | None = None
        if rank == 0:
            s = result.summary
            metrics = {k: s[k] for k in ("steps", "final_loss", "tokens", "train_seconds", "tokens_per_s")}
            metrics |= {
                "wall_seconds": time.time() - t0,
                "trainable_parameters": s["trainable_parameters"],
                "world_size": world,
            }
            for memory in ("written", "shuffled", "none"):
                value = evaluate_loss(model, val_eps, pad_id, memory) if val_eps else float("nan")
                if value == value:  # NaN: no validation set, or the control needs two contexts
                    metrics[f"val_answer_ce/{memory}"] = value
            if track:
                import mlflow

                tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
                mlflow.log_artifacts(str(result.adapter_dir), artifact_path="adapter")
            out = root / "results" / "train" / variant / "metrics.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
            os.replace(tmp, out)
        _barrier()
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params.yaml (its train section); outputs go next to it")
    ap.add_argument("--variant", required=True, help="a key of train.variants")
    ap.add_argument("--deepspeed", default=str(DEFAULT_DS_CONFIG), help="DeepSpeed JSON config with 'auto' values")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="frozen backbone dtype")
    ap.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after N optimizer steps (resume tests)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args = ap.parse_args(argv)

    from pipeline.params import ParamsError, load_section
    from pipeline.train.run import TrainParams

    try:
        p = load_section(args.params, "train", TrainParams)
        p.deltamem_config(args.variant)
        deepspeed_config(args.deepspeed, TrainConfig(**p.optim.model_dump()), 1)
    except (ParamsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, _, device = init_distributed(p.device)
    try:
        metrics = run_train_distributed(
            p,
            args.variant,
            Path(args.params).resolve().parent,
            device,
            ds_config=args.deepspeed,
            dtype=args.dtype,
            log_mlflow=not args.no_tracking,
            progress=not args.no_progress,
            stop_after=args.stop_after,
        )
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

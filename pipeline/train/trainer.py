"""δ-mem SFT, the reference recipe: write the context into a fresh state, read question + answer from it.

Per episode (SPEC "Training"):

    S = write(context)                       # writes on, gradient through the frozen backbone
    logits = read(system + question + answer, memory=S)   # a separate forward, positions from 0, no KV
    loss = CE(answer tokens) + w_β · mean_layers (mean β over read tokens − target)²

and a step minimises the mean of that loss over the episodes of its global batch (see :func:`episode_forward`).

Only δ-mem parameters train (fp32 master weights); the backbone is frozen and in eval mode (no dropout).
AdamW, cosine or linear schedule with warm-up, gradient clipping and accumulation. Checkpoints are atomic
directories ``checkpoints/step-NNNNNN`` (adapter + optimizer/scheduler/sampler/RNG state), the last K
kept; ``resume="auto"`` continues from the newest one with the same data order, so a killed run finishes
with the adapter an uninterrupted run would have produced (CPU, deterministic algorithms).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from deltamem import DeltaMemConfig, attach_delta_mem, load_adapter
from deltamem.adapter import save_adapter
from pipeline.common import atomic_write_json, ordinary_permissions
from pipeline.data.tokenize import IGNORE_INDEX, PackedExample
from pipeline.params import OptimParams

CKPT_PREFIX = "step-"


class TrainConfig(OptimParams):
    """The trainer's settings: ``train.optim`` (:class:`pipeline.params.OptimParams`, where every
    optimisation field is defined once) plus how often ``on_step`` is called."""

    log_every: int = Field(1, ge=1)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warmup = round(cfg.warmup_ratio * cfg.steps)

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class EpisodeSampler:
    """Seeded shuffling, epoch after epoch; its position is part of a checkpoint."""

    def __init__(self, n: int, seed: int) -> None:
        if n == 0:
            raise ValueError("no training episodes")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def collate_episodes(batch: Sequence[PackedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded write ids/mask/segment ids (the first write chunk) and read ids/mask/labels."""
    writes = [p.write_chunks[0] if p.write_chunks else None for p in batch]
    w_ids = [w.input_ids if w else [pad_id] for w in writes]
    w_seg = [w.segment_ids if w else [-1] for w in writes]
    w_mask = [[1] * len(w.input_ids) if w else [0] for w in writes]
    return {
        "write_ids": _pad(w_ids, pad_id),
        "write_mask": _pad(w_mask, 0),
        "segment_ids": _pad(w_seg, -1),
        "read_ids": _pad([p.read_input_ids for p in batch], pad_id),
        "read_mask": _pad([[1] * len(p.read_input_ids) for p in batch], 0),
        "labels": _pad([p.read_labels for p in batch], IGNORE_INDEX),
    }


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (unpadded) tokens a batch runs through the backbone: its write and read segments."""
    return int(batch["write_mask"].sum() + batch["read_mask"].sum())


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits in fp32 for the CE; fp32 and fp64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """CE over answer tokens (labels shifted by one; mean, or sum for ``reduction="sum"``) and their count."""
    shift_logits, shift_labels = _at_least_fp32(logits[:, :-1]), labels[:, 1:]
    n = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return loss, n


def episode_logits(
    model: Any, batch: dict[str, torch.Tensor], memory: str = "written"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(read logits, labels on the model's device) of a batch; see :func:`episode_forward` for ``memory``.

    With a memory state, ``model.delta_mem.beta_means`` holds the read call's mean β per layer afterwards.
    """
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in batch.items()}
    if memory == "none":
        return model(input_ids=b["read_ids"], attention_mask=b["read_mask"], use_cache=False).logits, b["labels"]
    seg = b["segment_ids"] if model.delta_mem.config.write_mode == "SSW" else None
    state = model.write_memory(b["write_ids"], attention_mask=b["write_mask"], segment_ids=seg)
    if memory == "shuffled":
        B = state.batch_size
        state = state.select([(i + 1) % B for i in range(B)])
    read = model(input_ids=b["read_ids"], attention_mask=b["read_mask"], memory=state, use_cache=False)
    return read.logits, b["labels"]


def episode_answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each episode's mean CE over its own answer tokens ([B]; 0 for an episode without any) and their
    counts ([B])."""
    shift_logits, shift_labels = _at_least_fp32(logits[:, :-1]), labels[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B, T-1], 0 where ignored
    n = (shift_labels != IGNORE_INDEX).sum(1)
    return per_token.sum(1) / n.clamp_min(1), n


def episode_forward(
    model: Any, batch: dict[str, torch.Tensor], memory: str = "written", sparsity: TrainConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss, answer CE, answer tokens) of a batch, each loss the mean over its episodes:

        loss = mean_e [ CE_e + w_β · mean_ℓ (β̄_{e,ℓ} − target)² ]

    with CE_e the mean CE over episode e's answer tokens and β̄_{e,ℓ} its mean β over its read tokens in
    layer ℓ — the paper's per-episode objective (its reference trains on micro-batches of one episode).
    A mean over episodes does not depend on how a global batch is split into micro-batches, accumulation
    steps and ranks (each holds the same number of episodes), so every split trains the same objective.

    memory: ``written`` (write the context, read from the state), ``none`` (the frozen backbone, question
    only) or ``shuffled`` (the state of another episode of the batch: a control for format-only learning).
    """
    logits, labels = episode_logits(model, batch, memory)
    ce_e, n = episode_answer_ce(logits, labels)
    ce = ce_e.mean()
    loss = ce
    if memory != "none" and sparsity is not None and sparsity.beta_sparsity_weight:
        loss = ce + sparsity.beta_sparsity_weight * model.delta_mem.beta_sparsity_loss(sparsity.beta_sparsity_target)
    return loss, ce, int(n.sum())


def _context_key(ep: PackedExample) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(c.input_ids) for c in ep.write_chunks)


def shuffled_episodes(episodes: Sequence[PackedExample]) -> list[PackedExample]:
    """Each episode with the write context of the next episode (cyclically) whose context differs.

    The "shuffled" control must read *another conversation's* state: neighbours in a split are often
    questions about the same conversation, so rotating within a batch is not enough.
    """
    keys = [_context_key(ep) for ep in episodes]
    if len(set(keys)) < 2:
        raise ValueError("the shuffled-state control needs episodes from at least two different contexts")
    out = []
    for i, ep in enumerate(episodes):
        j = next(k % len(episodes) for k in range(i + 1, i + len(episodes)) if keys[k % len(episodes)] != keys[i])
        out.append(replace(ep, write_chunks=episodes[j].write_chunks))
    return out


@torch.no_grad()
def evaluate_loss(
    model: Any, episodes: Sequence[PackedExample], pad_id: int, memory: str, batch_size: int = 4
) -> float:
    """Token-weighted answer CE over ``episodes`` under one memory condition (``written``, ``none``, or
    ``shuffled``: every question read against a different conversation's state; NaN when all episodes
    share one context)."""
    if memory == "shuffled":
        if len({_context_key(ep) for ep in episodes}) < 2:
            warnings.warn("shuffled-state control skipped: the episodes share one context", stacklevel=2)
            return math.nan
        episodes, memory = shuffled_episodes(episodes), "written"
    total, count = 0.0, 0
    for start in range(0, len(episodes), batch_size):
        chunk = episodes[start : start + batch_size]
        ce_sum, n = answer_loss(*episode_logits(model, collate_episodes(chunk, pad_id), memory), reduction="sum")
        total, count = total + float(ce_sum), count + n
    return total / max(count, 1)


@dataclass
class TrainResult:
    adapter_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def run_fingerprint(
    config: DeltaMemConfig, cfg: TrainConfig, n_episodes: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed (JSON-normalised)."""
    return json.loads(
        json.dumps(
            {
                "deltamem": config.to_dict(),
                "train": cfg.model_dump(mode="json"),
                "episodes": n_episodes,
                **(extra or {}),
            }
        )
    )


def training_summary(
    history: Sequence[dict[str, float]],
    step: int,
    tokens: int,
    seconds: float,
    episodes: int,
    params: Sequence[torch.Tensor],
) -> dict[str, Any]:
    """The run summary saved with the adapter (shared by the single-process and distributed trainers)."""
    return {
        "steps": step,
        "final_loss": history[-1]["loss"] if history else None,
        "final_answer_ce": history[-1]["answer_ce"] if history else None,
        "tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "episodes_seen": episodes,
        "trainable_parameters": sum(p.numel() for p in params),
    }


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (its temporary directory has been removed); names path and reason."""


def _write_failure_reason(err: BaseException, where: Path) -> str:
    """Why a write failed, in words: torch's "enforce fail at inline_container.cc" hides ENOSPC."""
    import errno

    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "no space left on device"
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    if free is not None and free < 64 * 2**20:
        return f"no space left on device ({free} bytes free; {text})"
    return text


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


class Backend:
    """What the training loop needs from its execution environment; this base is the single process.

    ``setup`` builds the optimiser and schedule over the δ-mem parameters; per micro-batch the loop calls
    ``forward`` (loss to back-propagate, and the micro-batch's loss / answer CE / tokens as floats, global
    over the ranks) and ``backward``; per optimiser step ``lr`` (before), ``step`` and ``grad_norm``.
    Checkpoints: ``save`` writes this rank's part into a directory and returns what goes into
    ``trainer_state.pt``; ``load`` restores it. Subclasses: :class:`LocalBackend` (= this class) and
    :class:`pipeline.train.distributed.DeepSpeedBackend`.
    """

    name = "local"
    rank = 0
    world = 1
    # Whether every rank has its own output directory (Ray Train workers on different nodes): then each rank
    # creates and renames its own checkpoint directory; otherwise rank 0 does it for all.
    private_dirs = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a collective: every rank must call it)."""
        return flag

    def setup(self, model: Any, params: list[torch.nn.Parameter], cfg: TrainConfig) -> None:
        self.model, self.params, self.cfg = model, params, cfg
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self._norm = float("nan")

    def describe(self) -> dict[str, Any]:
        """What identifies this backend in the run fingerprint and the summary."""
        return {}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, ce, _ = episode_forward(self.model, batch, "written", self.cfg)
        tokens = batch_tokens(batch)
        return loss, {"loss": float(loss.detach()), "answer_ce": float(ce.detach()), "tokens": tokens}

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def step(self) -> None:
        self._norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def grad_norm(self) -> float:
        return self._norm

    def save(self, directory: Path) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        load_adapter(self.model, directory / "adapter")
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def on_checkpoint(self, directory: Path, step: int) -> None:
        """Called on every rank once ``directory`` holds the complete checkpoint of ``step`` (Ray reports it)."""


LocalBackend = Backend


def save_checkpoint(
    backend: Backend, model: Any, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], keep: int
) -> Path:
    """Write ``ckpt_dir/step-NNNNNN`` atomically: every rank writes its part into a temporary sibling that is
    renamed into place once all parts are there. On any failure the temporary directory is removed (a full
    disk stays as free as it was) and :class:`CheckpointError` names the path and the reason."""
    final = ckpt_dir / f"{CKPT_PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{CKPT_PREFIX}{step:06d}"
    owner = backend.is_main or backend.private_dirs
    failed: BaseException | None = None
    if owner:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    try:
        state = backend.save(tmp)
        if backend.is_main:
            save_adapter(model, tmp / "adapter")
            torch.save({**trainer_state, **state}, tmp / "trainer_state.pt")
    except (OSError, RuntimeError) as err:  # torch.save reports ENOSPC as a RuntimeError
        failed = err
    if backend.any_rank(failed is not None):  # every rank stops, none waits at a barrier for the others
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _write_failure_reason(failed, ckpt_dir) if failed is not None else "another rank's write failed"
        raise CheckpointError(f"{tmp}: checkpoint write failed: {reason}") from None
    if owner:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ordinary_permissions(final)
        for old in _checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    backend.on_checkpoint(final, step)
    return final


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train(
    model: Any,
    episodes: Sequence[PackedExample],
    pad_id: int,
    config: DeltaMemConfig,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: str = "auto",
    on_step: Callable[[dict[str, float]], None] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    fingerprint: dict[str, Any] | None = None,
    backend: Backend | None = None,
) -> TrainResult:
    """Train δ-mem on ``model`` (attached here) over ``episodes``; write ``out_dir/adapter`` and checkpoints.

    The one training loop, for one process (``backend=None``: :class:`LocalBackend`) or every rank of a
    data-parallel run (:class:`pipeline.train.distributed.DeepSpeedBackend`; ``model`` and ``episodes`` the
    same on every rank). Rank r of W takes the slice ``[r·b, (r+1)·b)`` of the ``b·W`` episodes the seeded
    sampler yields per micro-batch, so W ranks see the episodes of one process with batch ``b·W``.

    ``stop_after`` ends the run after that many optimizer steps without saving the final adapter (for
    kill-and-resume tests); ``on_step`` receives each step's metrics on the main rank (MLflow logging).
    Checkpoints are only resumed when they were written with the same ``fingerprint`` (config, optimiser,
    data, backend and world size), and are removed once the final adapter is saved.
    """
    from tqdm.auto import tqdm

    backend = backend or LocalBackend()
    if resume not in ("auto", "never"):
        raise ValueError(f"resume={resume!r}; allowed: auto, never")
    rank, world, b = backend.rank, backend.world, cfg.batch_size
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if getattr(model, "delta_mem", None) is None:
        model = attach_delta_mem(model, config)
    model.eval()  # frozen backbone: no dropout; δ-mem has no dropout either
    if cfg.gradient_checkpointing:
        model.delta_mem.enable_gradient_checkpointing()
    params = model.delta_mem.parameters()
    backend.setup(model, params, cfg)
    sampler = EpisodeSampler(len(episodes), cfg.seed)
    step, history, tokens_seen, elapsed = 0, [], 0, 0.0

    extra = {**backend.describe(), **(fingerprint or {})}
    fingerprint = run_fingerprint(config, cfg, len(episodes), extra)
    backend.barrier()
    existing = _checkpoints(ckpt_dir) if resume == "auto" else []
    state = None
    if existing:
        state = torch.load(existing[-1] / "trainer_state.pt", map_location="cpu", weights_only=True)
        stale = json.loads(state.get("fingerprint", "null")) != fingerprint
        backend.barrier()  # every rank has read it before it may be removed
        if stale:
            if backend.is_main or backend.private_dirs:
                warnings.warn(f"ignoring checkpoints in {ckpt_dir}: written by a run with other settings", stacklevel=2)
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            state = None
            backend.barrier()
    if state is not None:
        backend.load(existing[-1], state)
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        step, history = int(state["step"]), list(state["history"])
        tokens_seen, elapsed = int(state["tokens_seen"]), float(state["elapsed"])
        if backend.is_main:
            _log(f"resumed from {existing[-1]} at step {step} of {cfg.steps}")

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="δ-mem train" + (f" ×{world}" if world > 1 else ""),
        disable=not progress or not backend.is_main,
        dynamic_ncols=True,
    )
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = backend.lr()
        loss_sum = ce_sum = 0.0
        tokens = 0
        for _ in range(cfg.grad_accum):
            mine = sampler.take(b * world)[rank * b : (rank + 1) * b]
            batch = collate_episodes([episodes[i] for i in mine], pad_id)
            loss, stats = backend.forward(batch)
            backend.backward(loss)
            loss_sum += stats["loss"] / cfg.grad_accum
            ce_sum += stats["answer_ce"] / cfg.grad_accum
            tokens += int(stats["tokens"])
        backend.step()
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        tokens_seen += tokens
        row = {
            "step": step,
            "loss": loss_sum,
            "answer_ce": ce_sum,
            "lr": lr,
            "grad_norm": backend.grad_norm(),
            "tokens_per_s": tokens / dt,
        }
        history.append(row)
        if on_step is not None and backend.is_main and step % cfg.log_every == 0:
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
            save_checkpoint(backend, model, ckpt_dir, step, trainer_state, cfg.keep_checkpoints)
        if stop_after is not None and step >= stop_after:
            bar.close()
            return TrainResult(out_dir / "adapter", {"stopped_at": step}, history)
    bar.close()
    summary = training_summary(history, step, tokens_seen, elapsed, step * cfg.grad_accum * b * world, params)
    if world > 1 or backend.describe():
        summary |= {"world_size": world, "global_batch": b * cfg.grad_accum * world, **backend.describe()}
    if backend.is_main:
        save_adapter(model, out_dir / "adapter")  # run facts go to training_summary.json, not the adapter
        ordinary_permissions(out_dir / "adapter")
        atomic_write_json(out_dir / "training_summary.json", {**summary, "history": history})
    if backend.is_main or backend.private_dirs:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # only needed to resume a killed run
    backend.barrier()
    return TrainResult(out_dir / "adapter", summary, history)

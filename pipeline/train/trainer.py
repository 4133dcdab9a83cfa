"""δ-mem SFT, the reference recipe: write the context into a fresh state, read question + answer from it.

Per episode (SPEC "Training"):

    S = write(context)                       # writes on, gradient through the frozen backbone
    logits = read(system + question + answer, memory=S)   # a separate forward, positions from 0, no KV
    loss = CE(answer tokens) + w_β · mean_layers (mean β over read tokens − target)²

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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deltamem import DeltaMemConfig, attach_delta_mem, load_adapter
from deltamem.adapter import save_adapter
from pipeline.data.tokenize import IGNORE_INDEX, PackedExample

CKPT_PREFIX = "step-"


@dataclass
class TrainConfig:
    """Optimisation settings (the paper's defaults; the embedded preset scales them down)."""

    steps: int = 70
    batch_size: int = 1  # episodes per micro-batch
    grad_accum: int = 32  # micro-batches per optimizer step (global batch = batch_size × grad_accum × ranks)
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    beta_sparsity_weight: float = 0.01
    beta_sparsity_target: float = 0.05
    seed: int = 0
    checkpoint_every: int = 0  # 0 = only the final adapter
    keep_checkpoints: int = 2
    log_every: int = 1
    deterministic: bool = True
    gradient_checkpointing: bool = False  # recompute the backbone's layers in backward (long writes)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.schedule={self.schedule!r}; allowed: cosine, linear, constant")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)!r}; expected an integer >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio!r}; expected 0 <= value < 1")


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


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """CE over answer tokens (labels shifted by one; mean, or sum for ``reduction="sum"``) and their count."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
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


def episode_forward(
    model: Any, batch: dict[str, torch.Tensor], memory: str = "written", sparsity: TrainConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(total loss, answer CE, answer tokens) of a batch.

    memory: ``written`` (write the context, read from the state), ``none`` (the frozen backbone, question
    only) or ``shuffled`` (the state of another episode of the batch: a control for format-only learning).
    """
    logits, labels = episode_logits(model, batch, memory)
    ce, n = answer_loss(logits, labels)
    loss = ce
    if memory != "none" and sparsity is not None and sparsity.beta_sparsity_weight:
        loss = ce + sparsity.beta_sparsity_weight * model.delta_mem.beta_sparsity_loss(sparsity.beta_sparsity_target)
    return loss, ce, n


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
        _, ce, n = episode_forward(model, collate_episodes(chunk, pad_id), memory)
        total, count = total + float(ce) * n, count + n
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
        json.dumps({"deltamem": config.to_dict(), "train": asdict(cfg), "episodes": n_episodes, **(extra or {})})
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


def _save_checkpoint(model: Any, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    final = ckpt_dir / f"{CKPT_PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp-{CKPT_PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


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
) -> TrainResult:
    """Train δ-mem on ``model`` (attached here) over ``episodes``; write ``out_dir/adapter`` and checkpoints.

    ``stop_after`` ends the run after that many optimizer steps without saving the final adapter (for
    kill-and-resume tests); ``on_step`` receives each step's metrics (MLflow logging). Checkpoints are only
    resumed when they were written with the same ``fingerprint`` (config, optimiser, data), and are removed
    once the final adapter is saved.
    """
    from tqdm.auto import tqdm

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
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    sampler = EpisodeSampler(len(episodes), cfg.seed)
    step, history, tokens_seen, elapsed = 0, [], 0, 0.0

    fingerprint = run_fingerprint(config, cfg, len(episodes), fingerprint)
    existing = _checkpoints(ckpt_dir)
    state = None
    if resume == "auto" and existing:
        state = torch.load(existing[-1] / "trainer_state.pt", map_location="cpu", weights_only=True)
        if json.loads(state.get("fingerprint", "null")) != fingerprint:
            warnings.warn(f"ignoring checkpoints in {ckpt_dir}: written by a run with other settings", stacklevel=2)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            state = None
    if state is not None:
        load_adapter(model, existing[-1] / "adapter")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        step, history = int(state["step"]), list(state["history"])
        tokens_seen, elapsed = int(state["tokens_seen"]), float(state["elapsed"])
    elif resume not in ("auto", "never"):
        raise ValueError(f"resume={resume!r}; allowed: auto, never")

    bar = tqdm(total=cfg.steps, initial=step, desc="δ-mem train", disable=not progress, dynamic_ncols=True)
    while step < cfg.steps:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum = ce_sum = 0.0
        tokens = 0
        for _ in range(cfg.grad_accum):
            batch = collate_episodes([episodes[i] for i in sampler.take(cfg.batch_size)], pad_id)
            loss, ce, _ = episode_forward(model, batch, "written", cfg)
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            ce_sum += float(ce.detach()) / cfg.grad_accum
            tokens += int(batch["write_mask"].sum() + batch["read_mask"].sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        tokens_seen += tokens
        row = {
            "step": step,
            "loss": loss_sum,
            "answer_ce": ce_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / dt,
        }
        history.append(row)
        if on_step is not None and step % cfg.log_every == 0:
            on_step(row)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / dt:.0f}")
        bar.update(1)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            state = {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": _rng_state(),
                "step": step,
                "history": history,
                "tokens_seen": tokens_seen,
                "elapsed": elapsed,
                "fingerprint": json.dumps(fingerprint),
            }
            _save_checkpoint(model, ckpt_dir, step, state, cfg.keep_checkpoints)
        if stop_after is not None and step >= stop_after:
            bar.close()
            return TrainResult(out_dir / "adapter", {"stopped_at": step}, history)
    bar.close()
    summary = training_summary(history, step, tokens_seen, elapsed, step * cfg.grad_accum * cfg.batch_size, params)
    save_adapter(model, out_dir / "adapter")  # run facts go to training_summary.json, not the adapter
    (out_dir / "training_summary.json").write_text(json.dumps({**summary, "history": history}, indent=2))
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # only needed to resume a killed run
    return TrainResult(out_dir / "adapter", summary, history)


def iterate_batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

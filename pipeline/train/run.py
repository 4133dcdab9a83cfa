"""The ``backbone`` and ``train`` stages: params sections, data loading, MLflow logging, outputs.

``backbone``: load the configured backbone once (the offline embedded SmolLM2 GGUF, a hub id or a
folder) and ``save_pretrained`` it with its tokenizer to ``models/backbone``, so every later stage loads
a plain Hugging Face folder.

``train --variant V``: δ-mem SFT of variant V (a ``DeltaMemConfig`` = ``train.deltamem`` updated by
``train.variants[V]``) → ``models/V/adapter`` + ``models/V/training_summary.json`` and
``results/train/V/metrics.json`` (final loss, steps, tokens, time, held-out answer loss with the
written state / no memory / another episode's state).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.params import register_section

DTYPES = ("float32", "bfloat16", "float16")


def _check_attn(value: str) -> str:
    from deltamem.backbones import check_attn_implementation

    return check_attn_implementation(value)


class BackboneParams(BaseModel):
    """``backbone``: what to load and where to save it."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = "embedded"
    dtype: str = "float32"
    out_dir: str = "models/backbone"
    trust_remote_code: bool = False
    attn_implementation: str = "auto"  # auto | eager | sdpa | flash_attention_2 (deltamem.backbones)

    @field_validator("attn_implementation")
    @classmethod
    def _attn(cls, v: str) -> str:
        return _check_attn(v)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r}; allowed: {', '.join(DTYPES)}")
        return v


class OptimParams(BaseModel):
    """``train.optim``: fields of :class:`pipeline.train.trainer.TrainConfig`."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(70, ge=1)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    beta_sparsity_weight: float = Field(0.01, ge=0)
    beta_sparsity_target: float = Field(0.05, ge=0, le=1)
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    deterministic: bool = True
    gradient_checkpointing: bool = False  # δ-mem-aware: recompute backbone layers in backward (long writes)


class TrainParams(BaseModel):
    """``train``: data, lengths, the δ-mem config shared by all variants, per-variant overrides, optimiser."""

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
    attn_implementation: str = "auto"  # auto | eager | sdpa | flash_attention_2 (deltamem.backbones)
    threads: int | None = Field(None, ge=1)
    resume: str = "auto"

    @field_validator("attn_implementation")
    @classmethod
    def _attn(cls, v: str) -> str:
        return _check_attn(v)

    nproc: int = Field(
        1, ge=1
    )  # > 1: stages/train.py runs pipeline.train.distributed under torchrun (DeepSpeed ZeRO-2)
    deltamem: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"TSW": {"write_mode": "TSW"}})
    optim: OptimParams = Field(default_factory=OptimParams)

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        if v not in ("auto", "never"):
            raise ValueError(f"resume {v!r}; allowed: auto, never")
        return v

    def deltamem_config(self, variant: str):
        from deltamem import DeltaMemConfig

        if variant not in self.variants:
            raise ValueError(f"unknown variant {variant!r}; train.variants has: {', '.join(self.variants)}")
        return DeltaMemConfig.from_dict({**self.deltamem, **self.variants[variant]})


register_section("backbone", BackboneParams)
register_section("train", TrainParams)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def prepare_backbone(p: BackboneParams, root: Path) -> Path:
    """Save the backbone + tokenizer as a plain Hugging Face folder (atomically)."""
    import shutil
    import tempfile

    from deltamem.backbones import load_backbone

    model, tok = load_backbone(
        p.name_or_path,
        dtype=_torch_dtype(p.dtype),
        attn_implementation=p.attn_implementation,
        root=root,
        what="backbone.name_or_path",
        trust_remote_code=p.trust_remote_code,
    )
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF is de-quantised on load: plain weights now
        model.hf_quantizer = None
        model.config.quantization_config = None
    out = root / p.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "deltamem_backbone.json").write_text(json.dumps(p.model_dump(), indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_episodes(p: TrainParams, root: Path, tokenizer: Any, split: str, limit: int | None):
    from pipeline.data.schema import read_split
    from pipeline.data.tokenize import Packer

    path = root / p.data_dir / p.dataset / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared split not found (run the prepare stage; train.dataset/{split})")
    examples = read_split(path)
    if limit is not None:
        examples = examples[:limit]
    packer = Packer(tokenizer, write_length=p.write_length, read_length=p.read_length, overflow="truncate")
    return [packer.pack(e) for e in examples]


def run_train(
    p: TrainParams, variant: str, root: Path, log_mlflow: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Train one variant; returns the metrics written to ``results/train/<variant>/metrics.json``."""
    import torch

    from deltamem.backbones import load_backbone
    from pipeline.train.trainer import TrainConfig, evaluate_loss, train

    if p.threads:
        torch.set_num_threads(p.threads)
    config = p.deltamem_config(variant)
    device = resolve_device(p.device)
    backbone = str(root / p.backbone) if (root / p.backbone).exists() else p.backbone
    model, tok = load_backbone(backbone, attn_implementation=p.attn_implementation, root=root, what="train.backbone")
    model.to(device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_eps = load_episodes(p, root, tok, p.train_split, p.limit_train)
    val_eps = load_episodes(p, root, tok, p.validation_split, p.limit_validation) if p.limit_validation else []
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(**p.optim.model_dump())
    out_dir = root / "models" / variant

    def run(on_step=None):
        return train(
            model, train_eps, pad_id, config, cfg, out_dir, resume=p.resume, on_step=on_step, progress=progress
        )

    t0 = time.time()
    if log_mlflow:
        from pipeline import tracking

        tags = {"stage": "train", "variant": variant, "backbone": backbone, "seed": cfg.seed}
        with tracking.start_run(f"train-{variant}", tags=tags):
            tracking.log_params({"train": p.model_dump(mode="json"), "deltamem": config.to_dict(), "variant": variant})
            result = run(
                lambda row: tracking.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
            )
            metrics = _finish(model, val_eps, pad_id, result, before, time.time() - t0, evaluate_loss)
            tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
            import mlflow

            mlflow.log_artifacts(str(result.adapter_dir), artifact_path="adapter")
    else:
        result = run()
        metrics = _finish(model, val_eps, pad_id, result, before, time.time() - t0, evaluate_loss)
    out = root / "results" / "train" / variant / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, out)
    return metrics


def _finish(model, val_eps, pad_id, result, before, wall, evaluate_loss) -> dict[str, Any]:
    import torch

    after = model.state_dict()
    untouched = all(torch.equal(after[k], v) for k, v in before.items())
    if not untouched:  # the backbone must never change; a failure here is a bug, not a result
        raise RuntimeError("backbone weights changed during training")
    metrics: dict[str, Any] = {
        "steps": result.summary["steps"],
        "final_loss": result.summary["final_loss"],
        "tokens": result.summary["tokens"],
        "train_seconds": result.summary["train_seconds"],
        "wall_seconds": wall,
        "tokens_per_s": result.summary["tokens_per_s"],
        "trainable_parameters": result.summary["trainable_parameters"],
    }
    if val_eps:
        for memory in ("written", "shuffled", "none"):
            value = evaluate_loss(model, val_eps, pad_id, memory)
            if value == value:  # NaN: the control cannot be formed (one context only); leave it out
                metrics[f"val_answer_ce/{memory}"] = value
    return metrics

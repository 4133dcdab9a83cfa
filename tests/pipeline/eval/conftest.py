"""Fixtures of the evaluation-runner tests: a tiny random Llama with the real SmolLM2 vocabulary (saved
as a Hugging Face folder with the embedded tokenizer), δ-mem adapters of each write mode, and a small
synthetic test split, built once per session under a temporary root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.data.schema import Example, write_split
from pipeline.data.synthetic import config_from_options, generate_split
from pipeline.eval.runner import EvalParams

VARIANTS = ("TSW", "SSW", "MSW")


def tiny_backbone(tokenizer: Any, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def eval_root(smol_tokenizer, tmp_path_factory) -> Path:
    """``<root>/models/backbone``, ``<root>/models/<variant>/adapter``, ``<root>/data/prepared/synthetic/test.jsonl``
    (4 conversations × 2 questions)."""
    from deltamem import DeltaMemConfig, attach_delta_mem, detach_delta_mem

    root = tmp_path_factory.mktemp("evalroot")
    model = tiny_backbone(smol_tokenizer)
    model.save_pretrained(root / "models" / "backbone")
    smol_tokenizer.save_pretrained(root / "models" / "backbone")
    for i, mode in enumerate(VARIANTS):
        attach_delta_mem(model, DeltaMemConfig(write_mode=mode))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # a strong random adapter, so that the memory visibly changes the answers
            for name, p in model.delta_mem.named_parameters():
                if "delta_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
                elif name.endswith("beta_bias"):
                    p.fill_(0.0)
        model.save_adapter(str(root / "models" / mode / "adapter"))
        detach_delta_mem(model)
    cfg = config_from_options(
        {"seed": 7, "dialogues": {"test": 4}, "sessions": 2, "facts_per_dialogue": 2, "distractor_turns": 1}
    )
    write_split(generate_split(cfg, "test"), root / "data" / "prepared" / "synthetic" / "test.jsonl")
    ifeval = [  # a task without history: no conversation, nothing to write
        Example(f"ifeval-{i}", "ifeval", prompt, [], instruction_ids=["punctuation:no_comma"], kwargs=[{}])
        for i, prompt in enumerate(["Write a haiku about tea.", "Describe a cat without commas.", "Say hello."])
    ]
    write_split(ifeval, root / "data" / "prepared" / "ifeval" / "test.jsonl")
    return root


def make_params(out: Path, **overrides: Any) -> EvalParams:
    """Params for the tiny setup: in-process, small batches, every condition, TSW + SSW."""
    base: dict[str, Any] = {
        "variants": ["TSW", "SSW"],
        "tasks": [{"dataset": "synthetic", "split": "test"}],
        "out_dir": str(out),
        "workers": 0,
        "threads": 1,
        "batch_size": 3,
        "write_batch_size": 2,
        "shard_conversations": 2,
        "bm25_k": 3,
        "bootstrap": 50,
        "max_new_tokens_cap": 6,
        "max_retries": 1,
    }
    base.update(overrides)
    return EvalParams(**base)


@pytest.fixture(scope="session")
def worker(eval_root):
    """One in-process worker (the tiny backbone), shared by the in-process tests."""
    from pipeline.eval.runner import EvalWorker

    return EvalWorker(str(eval_root / "models" / "backbone"), threads=1)

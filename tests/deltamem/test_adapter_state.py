"""Adapter save/load (ours and upstream) and memory-state persistence."""

from __future__ import annotations

import json

import pytest
import torch

from deltamem import DeltaMemConfig, MemoryState, attach_delta_mem, load_adapter
from tests.conftest import tiny_model


def trained_like(model):
    """Give every δ-mem parameter non-trivial values, as training would."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.delta_mem.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_save_load_round_trip(tmp_path):
    cfg = DeltaMemConfig(branches=("q", "k", "o"), write_mode="MSW", num_substates=2, rank=4)
    model = trained_like(attach_delta_mem(tiny_model("qwen3"), cfg))
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        state = model.write_memory(x)
        ref = model(x, memory=state).logits
    model.save_adapter(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.safetensors", "deltamem_adapter.json"]
    assert not list(tmp_path.glob(".ad*"))  # no temp leftovers
    fresh = load_adapter(tiny_model("qwen3"), tmp_path / "ad")
    assert fresh.delta_mem.config == cfg
    with torch.no_grad():
        state2 = fresh.write_memory(x)
        out = fresh(x, memory=state2).logits
    assert state2.equal(state) and torch.equal(out, ref)
    model.save_adapter(tmp_path / "ad")  # overwriting an existing adapter works atomically
    assert load_adapter(tiny_model("qwen3"), tmp_path / "ad")


def test_load_onto_another_backbone_fails(tmp_path):
    attach_delta_mem(tiny_model("llama"), DeltaMemConfig()).save_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match=r"another backbone.*(hidden_size|model_type)"):
        load_adapter(tiny_model("qwen3"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"another backbone.*layer0_q"):
        load_adapter(tiny_model("llama", seed=1), tmp_path / "a")  # same shapes, different weights
    assert load_adapter(tiny_model("llama", seed=1), tmp_path / "a", check_backbone=False)


def test_not_an_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a δ-mem adapter"):
        load_adapter(tiny_model(), tmp_path)


def test_import_upstream_adapter(tmp_path):
    """A hand-built directory in the reference format: delta_mem_config.json + delta_mem_adapter.pt (bf16)."""
    src = trained_like(attach_delta_mem(tiny_model("qwen3"), DeltaMemConfig(branches=("q", "o"))))
    d = tmp_path / "up"
    d.mkdir()
    up_cfg = {
        "rank": 8,
        "alpha": 16.0,
        "delta_heads": ["q", "o"],
        "normalize_qk": True,
        "couple_lambda": True,
        "state_update_mode": "standard",
        "rankwise_gates": True,
        "memory_write_granularity": "token",
        "num_state_heads": 1,
        "target_layers": [],
        "output_init": "base_slice_fixed",
    }
    (d / "delta_mem_config.json").write_text(json.dumps(up_cfg))
    tensors = {}
    for i, layer in src.delta_mem.layers.items():
        prefix = f"model.layers.{i}.self_attn"
        for name, p in layer.named_parameters():
            tensors[f"{prefix}.{name}"] = p.detach().to(torch.bfloat16)
        attn = src.delta_mem.attns[i]
        tensors[f"{prefix}.delta_k_proj"] = torch.zeros(attn.k_proj.out_features, 8, dtype=torch.bfloat16)
        tensors[f"{prefix}.delta_v_proj"] = torch.zeros(attn.v_proj.out_features, 8, dtype=torch.bfloat16)
    torch.save(tensors, d / "delta_mem_adapter.pt")
    with pytest.warns(UserWarning, match="upstream"):
        model = load_adapter(tiny_model("qwen3"), d)
    for name, p in model.delta_mem.named_parameters():
        ref = dict(src.delta_mem.named_parameters())[name].detach().to(torch.bfloat16).float()
        assert torch.equal(p.detach(), ref), name


def test_state_save_load_and_batching(tmp_path):
    model = attach_delta_mem(tiny_model(), DeltaMemConfig())
    with torch.no_grad():
        state = model.write_memory(torch.randint(0, 97, (2, 8)))
    state.save(tmp_path / "s.safetensors")
    back = MemoryState.load(tmp_path / "s.safetensors")
    assert back.equal(state) and back.meta == {"rank": 8, "num_substates": 1}
    assert state.nbytes == 2 * 2 * 8 * 8 * 4  # layers × batch × r² × fp32
    one = state.select(1)
    assert one.batch_size == 1 and one.expand(3).batch_size == 3
    assert MemoryState.stack([state.select(0), one]).equal(state)
    with pytest.raises(FileNotFoundError):
        MemoryState.load(tmp_path / "missing.safetensors")

"""δ-mem-aware gradient checkpointing: the same state, logits and gradients as without it (float64),
with every decoder layer really recomputed in backward."""

from __future__ import annotations

import pytest
import torch

from deltamem import DeltaMemConfig, attach_delta_mem
from tests.conftest import tiny_model


def _model(family: str, mode: str, targets):
    # sdpa: in float64 the eager path of transformers itself gives NaN at left-padded positions
    model = tiny_model(family, attn="sdpa", layers=3, seed=1).double()
    cfg = DeltaMemConfig(
        rank=4, alpha=8, branches=("q", "k", "v", "o"), write_mode=mode, target_layers=targets, scan_backend="naive"
    )
    model = attach_delta_mem(model, cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # random δ-mem weights (incl. gates), so every parameter gets a gradient
        for p in model.delta_mem.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def _episode(model, mode: str):
    gen = torch.Generator().manual_seed(3)
    write = torch.randint(0, 97, (2, 12), generator=gen)
    wmask = torch.ones_like(write)
    wmask[1, :3] = 0  # left padding in the second row
    seg = torch.tensor([[0] * 5 + [1] * 7, [-1] * 3 + [0] * 4 + [1] * 5]) if mode == "SSW" else None
    read = torch.randint(0, 97, (2, 6), generator=gen)
    state = model.write_memory(write, attention_mask=wmask, segment_ids=seg)
    logits = model(input_ids=read, memory=state, use_cache=False).logits
    loss = logits.log_softmax(-1)[..., 5].mean() + model.delta_mem.beta_sparsity_loss()
    return loss, logits, state


def _grads(model, mode: str):
    for p in model.delta_mem.parameters():
        p.grad = None
    loss, logits, state = _episode(model, mode)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.delta_mem.named_parameters()}
    return loss.detach(), logits.detach(), {i: s.detach() for i, s in state.layers.items()}, grads


@pytest.mark.parametrize(
    ("family", "mode", "targets"),
    [("llama", "TSW", None), ("qwen3", "TSW", (0, 2)), ("llama", "SSW", None), ("qwen3", "MSW", None)],
)
def test_checkpointed_training_step_matches(family, mode, targets):
    model = _model(family, mode, targets)
    ref = _grads(model, mode)

    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    handles = [a.register_forward_pre_hook(count) for a in model.delta_mem.attns.values()]
    model.delta_mem.enable_gradient_checkpointing()
    assert model.delta_mem.gradient_checkpointing
    got = _grads(model, mode)
    n_att = len(model.delta_mem.attns)
    assert calls["n"] == 2 * 2 * n_att  # write + read pass, each layer run once more in backward

    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-12)
    for i in ref[2]:
        torch.testing.assert_close(got[2][i], ref[2][i], rtol=0, atol=1e-12)
    for name, g in ref[3].items():
        assert g.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(got[3][name], g, rtol=1e-10, atol=1e-12, msg=name)

    model.delta_mem.disable_gradient_checkpointing()
    calls["n"] = 0
    again = _grads(model, mode)
    assert calls["n"] == 2 * n_att
    torch.testing.assert_close(again[3], ref[3], rtol=0, atol=0)
    for h in handles:
        h.remove()


def test_generation_with_a_cache_is_not_checkpointed_and_unchanged():
    model = _model("llama", "TSW", None)
    state = model.write_memory(torch.randint(0, 97, (1, 10)))
    prompt = torch.randint(0, 97, (1, 5))
    ref = model.generate(prompt, memory=state.clone(), max_new_tokens=4, do_sample=False)
    model.delta_mem.enable_gradient_checkpointing()
    got = model.generate(prompt, memory=state.clone(), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, ref)


def test_refuses_hugging_face_checkpointing():
    model = _model("llama", "TSW", None)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    with pytest.raises(ValueError, match="Hugging Face gradient checkpointing"):
        model.delta_mem.enable_gradient_checkpointing()

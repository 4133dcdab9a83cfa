"""bf16 backbones (fp32 master weights and state, or the opt-in backbone dtype), ``torch.compile`` of the
δ-mem layer (no graph breaks) and of a decode loop, and the in-place (CUDA-graph friendly) state buffer.

The compile tests use the ``aot_eager`` backend (Dynamo capture + AOT autograd, no code generation):
it proves the graphs are whole at a few seconds per test on a 2-core machine; Inductor (the code
generator a GPU run uses) is exercised by one test marked slow.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from deltamem import DeltaMemConfig, attach_delta_mem
from deltamem.attach import cache_kwarg
from tests.conftest import tiny_model
from tests.deltamem.test_lean_path import make_layer


def ids(B=1, T=12, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attach_then_bf16_write_generate(family):
    model = attach_delta_mem(tiny_model(family), DeltaMemConfig(rank=4, branches=("q", "k", "v", "o")))
    before = {n: p.detach().clone() for n, p in model.delta_mem.named_parameters()}
    model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    for n, p in model.delta_mem.named_parameters():  # master weights untouched, bit for bit
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    with torch.no_grad():
        state = model.write_memory(ids())
        assert all(t.dtype == torch.float32 and t.abs().max() > 0 for t in state.layers.values())
        q = ids(T=5, seed=1)
        out = model.generate(q, memory=state, max_new_tokens=4, do_sample=False, pad_token_id=0)
        online = model.generate(
            q, memory=state.clone(), memory_write=True, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        logits = model(q, memory=state).logits
        base = model(q).logits
    assert out.shape == online.shape == (1, 9)
    assert logits.dtype == torch.bfloat16 and not torch.equal(logits, base)
    # the fp32 memory on a bf16 backbone is close to the all-fp32 run
    model.to(torch.float32)
    with torch.no_grad():
        ref = model(q, memory=model.write_memory(ids())).logits
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_memory_in_backbone_dtype_option():
    model = attach_delta_mem(tiny_model("qwen3"), DeltaMemConfig(rank=4, memory_dtype="backbone"))
    model.to(torch.bfloat16)
    layer = model.delta_mem.layers[0]
    assert layer.memory_q_proj.dtype == torch.bfloat16
    with torch.no_grad():
        state = model.write_memory(ids())
        assert all(t.dtype == torch.bfloat16 for t in state.layers.values())
        out = model.generate(ids(T=5, seed=1), memory=state, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("T", [1, 6])
def test_layer_compiles_fullgraph(write, T):
    layer = make_layer(rank=8)
    x = torch.randn(2, T, 12, dtype=torch.float64, requires_grad=True)
    S = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, -1] = False
    assert_compiled_equals_eager(layer, x, S, mask, write)


def assert_compiled_equals_eager(layer, x, S, mask, write) -> None:
    """``torch.compile(layer, fullgraph=True)`` (no graph break allowed) gives the eager outputs and the
    eager gradient of x."""
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # raises on any graph break
    got = compiled(x, S, mask, write, None, True)
    ref = layer(x, S, mask, write, None, True)
    for a, b in zip(got[0], ref[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    if write:
        torch.testing.assert_close(got[1], ref[1], atol=1e-12, rtol=0)
    g1 = torch.autograd.grad(sum(c.sum() for c in got[0]), x)[0]
    g2 = torch.autograd.grad(sum(c.sum() for c in ref[0]), x)[0]
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)


def _decode(fn, model, x, write, inplace=False, ptrs=None, steps=4):
    kw = cache_kwarg(model.delta_mem.decoder)
    with torch.no_grad():
        state = model.new_memory(1)
        if ptrs is not None:
            ptrs.update({i: t.data_ptr() for i, t in state.layers.items()})
        cache = DynamicCache(config=model.config)
        P = x.shape[1] - steps
        with model.delta_mem.use(state, write=write, inplace=inplace):
            outs = [fn(input_ids=x[:, :P], use_cache=True, **{kw: cache}).last_hidden_state]
            for t in range(P, x.shape[1]):
                outs.append(fn(input_ids=x[:, t : t + 1], use_cache=True, **{kw: cache}).last_hidden_state)
    return torch.cat(outs, 1), state


def test_compiled_decode_loop_equals_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = attach_delta_mem(tiny_model("qwen3"), DeltaMemConfig(rank=4, branches=("q", "o")))
    x = ids(T=12, seed=3)
    eager, s_eager = _decode(model.delta_mem.decoder, model, x, write=True)
    compiled = torch.compile(model.delta_mem.decoder, backend="aot_eager")
    got, s_got = _decode(compiled, model, x, write=True)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    assert s_got.equal(s_eager, atol=1e-6)
    assert torch._dynamo.utils.counters["graph_break"] == {}
    # the reads-only decode (a written state, writes off) too
    with model.delta_mem.use(s_eager, write=False):
        kw = cache_kwarg(model.delta_mem.decoder)
        with torch.no_grad():
            a = model.delta_mem.decoder(input_ids=x, **{kw: None}, use_cache=False).last_hidden_state
            b = compiled(input_ids=x, **{kw: None}, use_cache=False).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_inplace_state_buffer_keeps_addresses():
    model = attach_delta_mem(tiny_model("llama"), DeltaMemConfig(rank=4))
    x = ids(T=10, seed=4)
    ref, s_ref = _decode(model.delta_mem.decoder, model, x, write=True)
    ptrs: dict[int, int] = {}
    got, s_got = _decode(model.delta_mem.decoder, model, x, write=True, inplace=True, ptrs=ptrs)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert s_got.equal(s_ref, atol=1e-7)
    assert {i: t.data_ptr() for i, t in s_got.layers.items()} == ptrs  # written in place, never replaced


def test_generate_memory_inplace():
    model = attach_delta_mem(tiny_model("qwen3"), DeltaMemConfig(rank=4))
    q = ids(T=5, seed=6)
    kw = dict(memory_write=True, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a, b = model.new_memory(1), model.new_memory(1)
        ptrs = {i: t.data_ptr() for i, t in b.layers.items()}
        out_a = model.generate(q, memory=a, **kw)
        out_b = model.generate(q, memory=b, memory_inplace=True, **kw)
        assert torch.equal(out_a, out_b) and b.equal(a, atol=1e-7)
        assert {i: t.data_ptr() for i, t in b.layers.items()} == ptrs
        with pytest.raises(ValueError, match="inplace=True"):
            model(ids(B=2, T=3), memory=model.new_memory(1), memory_write=True, memory_inplace=True)


@pytest.mark.slow
def test_layer_decode_step_inductor():
    """The decode step through Inductor (generated C++ here, Triton on a GPU): equal to eager."""
    layer = make_layer(rank=8).float()
    x, S = torch.randn(2, 1, 12), torch.randn(2, 1, 8, 8)
    mask = torch.tensor([[True], [False]])
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    with torch.no_grad():
        got, ref = compiled(x, S, mask, True), layer(x, S, mask, True)
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-6)
    for a, b in zip(got[0], ref[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)

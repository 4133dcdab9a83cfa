"""attach_delta_mem on tiny random Llama/Qwen3 backbones: identity, phases, caching, gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from deltamem import DeltaMemConfig, attach_delta_mem, detach_delta_mem
from deltamem.attach import cache_kwarg
from deltamem.ops.delta_rule import delta_rule_naive
from tests.conftest import tiny_model

FAMILIES = ["llama", "qwen3"]
CACHE_KW = cache_kwarg(tiny_model())
MODES = [("TSW", None), ("SSW", None), ("MSW", 2)]
BRANCH_SETS = [("q",), ("o",), ("q", "o"), ("q", "k", "v", "o")]


def ids(B=2, T=12, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def attached(family="llama", attn="eager", **cfg):
    model = tiny_model(family, attn)
    base = tiny_model(family, attn)
    return attach_delta_mem(model, DeltaMemConfig(**cfg)), base


def write(model, x, mode, **kw):
    seg = (torch.arange(x.shape[1]) // 4).expand(x.shape[0], -1) if mode == "SSW" else None
    return model.write_memory(x, segment_ids=seg, **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_identity_without_state(family, attn):
    for (mode, h), branches, init in itertools.product(MODES, BRANCH_SETS, ["zero", "base_slice_fixed"]):
        model, base = attached(family, attn, write_mode=mode, num_substates=h, branches=branches, output_init=init)
        x = ids()
        ref = base(x).logits
        assert torch.equal(model(x).logits, ref), (mode, branches, init)
        if init == "zero":  # zero corrections: the backbone whatever is written
            state = write(model, ids(seed=1), mode)
            assert max(t.abs().max() for t in state.layers.values()) > 0
            out = model(x, memory=state).logits
            assert (out - ref).abs().max() <= 1e-6, (mode, branches)


def test_backbone_weights_untouched_and_frozen():
    model, base = attached()
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".delta_mem." in n for n in trainable)
    for k, v in ref.items():
        assert torch.equal(model.state_dict()[k], v)
    detach_delta_mem(model)
    assert set(model.state_dict()) == set(ref) and not hasattr(model, "delta_mem")


def test_base_slice_fixed_formula():
    model, _ = attached("qwen3", branches=("q", "k", "v", "o"), rank=8)
    for i, layer in model.delta_mem.layers.items():
        attn = model.delta_mem.attns[i]
        for b in "qkvo":
            W = getattr(attn, f"{b}_proj").weight
            U = getattr(layer, f"delta_{b}_proj")
            w = min(8, W.shape[1])
            expected = 0.05 * W[:, :w] / W[:, :w].norm(dim=0, keepdim=True)
            torch.testing.assert_close(U[:, :w], expected, atol=1e-7, rtol=0)
            assert (U[:, w:] == 0).all()


def test_unsupported_backbone_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*supported: llama.*qwen3.*smollm3"):
        attach_delta_mem(gpt2, DeltaMemConfig())


def test_target_layers():
    model, _ = attached(target_layers=(1,))
    assert list(model.delta_mem.layers) == [1]
    with pytest.raises(ValueError, match="target_layers"):
        attach_delta_mem(tiny_model(), DeltaMemConfig(target_layers=(5,)))


@pytest.mark.parametrize("family", FAMILIES)
def test_split_history_equals_one_pass(family):
    model, _ = attached(family)
    x = ids(B=2, T=20, seed=4)
    with torch.no_grad():
        one = model.write_memory(x, keep_cache=True)
        part = model.write_memory(x[:, :7], keep_cache=True)
        part = model.write_memory(x[:, 7:], state=part, keep_cache=True)
    assert part.equal(one, atol=1e-5)
    assert part.seen_tokens == 20


@pytest.mark.parametrize("family", FAMILIES)
def test_read_phase_decode_equals_full_forward_and_state_unchanged(family):
    model, _ = attached(family)
    with torch.no_grad():
        state = model.write_memory(ids(seed=5))
        before = state.clone()
        x = ids(B=2, T=10, seed=6)
        full = model(x, memory=state).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :6], memory=state, **{CACHE_KW: cache}, use_cache=True).logits]
        for t in range(6, 10):
            steps.append(model(x[:, t : t + 1], memory=state, **{CACHE_KW: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert state.equal(before)
    assert not torch.allclose(full, model(x).logits, atol=1e-4)  # the memory does steer the output


def test_online_writes_during_decode_equal_one_forward():
    """The paper's protocol: writes on during prefill and token-by-token decoding."""
    model, _ = attached()
    x = ids(B=1, T=14, seed=8)
    with torch.no_grad():
        s_full = model.new_memory(1)
        full = model(x, memory=s_full, memory_write=True).logits
        s_inc = model.new_memory(1)
        cache = DynamicCache(config=model.config)
        out = [model(x[:, :9], memory=s_inc, memory_write=True, **{CACHE_KW: cache}, use_cache=True).logits]
        for t in range(9, 14):
            out.append(
                model(x[:, t : t + 1], memory=s_inc, memory_write=True, **{CACHE_KW: cache}, use_cache=True).logits
            )
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)
    assert s_inc.equal(s_full, atol=1e-6)


def test_generate_with_memory_reads_but_does_not_write():
    model, _ = attached()
    with torch.no_grad():
        state = model.write_memory(ids(B=1, seed=9))
        before = state.clone()
        q = ids(B=1, T=5, seed=10)
        a = model.generate(q, memory=state, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = model.generate(q, max_new_tokens=6, do_sample=False, pad_token_id=0)
        w = model.generate(
            q, memory=state.clone(), memory_write=True, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert a.shape == (1, 11) and b.shape == (1, 11) and w.shape == (1, 11)
    assert state.equal(before)


def test_padding_neither_reads_nor_writes():
    model, _ = attached()
    x = ids(B=1, T=9, seed=11)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model.write_memory(x)
        b = model.write_memory(padded, attention_mask=mask)
    assert b.equal(a, atol=1e-5)


def test_state_broadcasts_to_a_batch_of_questions():
    model, _ = attached()
    with torch.no_grad():
        state = model.write_memory(ids(B=1, seed=12))
        qs = ids(B=3, T=6, seed=13)
        batched = model(qs, memory=state).logits
        single = torch.cat([model(qs[i : i + 1], memory=state).logits for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_ssw_writes_segment_means_in_order():
    model, _ = attached(write_mode="SSW", target_layers=(0,))
    layer = model.delta_mem.layers[0]
    x = ids(B=1, T=10, seed=14)
    seg = torch.tensor([[2, 2, 2, -1, 0, 0, 5, 5, 5, 5]])
    captured = {}
    h = model.delta_mem.attns[0].register_forward_pre_hook(
        lambda m, a, k: captured.update(x=k["hidden_states"].detach()), with_kwargs=True
    )
    with torch.no_grad():
        state = model.write_memory(x, segment_ids=seg)
        h.remove()
        hx = captured["x"][0]
        means = torch.stack([hx[4:6].mean(0), hx[0:3].mean(0), hx[6:10].mean(0)]).unsqueeze(0)  # ids 0, 2, 5
        p = layer.project(means)
        _, ref = delta_rule_naive(p["q"], p["k"], p["v"], p["keep"], p["erase"], p["write"])
    torch.testing.assert_close(state.layers[0], ref, atol=1e-6, rtol=0)
    # no usable ids (none, all < 0, or not covering the call's tokens): one write per token, like upstream
    with torch.no_grad():
        p = layer.project(hx.unsqueeze(0))
        _, per_token = delta_rule_naive(p["q"], p["k"], p["v"], p["keep"], p["erase"], p["write"])
        for seg_ids in (None, torch.full((1, 10), -1), seg[:, :4]):
            fallback = model.write_memory(x, segment_ids=seg_ids)
            torch.testing.assert_close(fallback.layers[0], per_token, atol=1e-6, rtol=0)


def test_msw_has_independent_substates():
    model, _ = attached(write_mode="MSW", num_substates=3, rank=4)
    with torch.no_grad():
        state = model.write_memory(ids(B=2, seed=15))
    for t in state.layers.values():
        assert t.shape == (2, 3, 4, 4)
        assert not torch.allclose(t[:, 0], t[:, 1])
    assert model.delta_mem.layers[0].delta_o_proj.shape == (32, 12)


def test_gradients_reach_only_delta_mem_through_the_state():
    model, _ = attached(branches=("q", "o"))
    x_hist, x_q = ids(B=2, T=16, seed=16), ids(B=2, T=8, seed=17)
    state = model.write_memory(x_hist)  # gradients flow through the write path
    logits = model(x_q, memory=state).logits  # read-only phase
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x_q[:, 1:].reshape(-1))
    loss = loss + 0.01 * model.delta_mem.beta_sparsity_loss()
    loss.backward()
    for n, p in model.named_parameters():
        if ".delta_mem." not in n:
            assert p.grad is None, n
    layer = model.delta_mem.layers[0]
    for name in ("delta_q_proj", "delta_o_proj", "memory_k_proj", "memory_v_proj", "memory_q_proj", "beta_proj"):
        g = getattr(layer, name).grad
        assert g is not None and g.abs().sum() > 0, name


def test_generate_memory_kwargs_without_memory_rejected():
    model, _ = attached()
    with pytest.raises(ValueError, match="without memory"):
        model(ids(), memory_write=True)


@pytest.mark.parametrize("mode", ["TSW", "SSW"])
def test_beta_statistics_are_per_episode(mode):
    """beta_means holds each row's mean β over its own unmasked tokens, and beta_sparsity_loss averages the
    rows' terms: a padded batch of two gives what the two episodes give one at a time."""
    model, _ = attached(write_mode=mode)
    hist, q = ids(B=2, T=16, seed=21), ids(B=2, T=10, seed=22)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: row 1 has 6 read tokens
    state = write(model, hist, mode)
    model(q, attention_mask=mask, memory=state)
    batch_means = {i: m.detach().clone() for i, m in model.delta_mem.beta_means.items()}
    batch_loss = float(model.delta_mem.beta_sparsity_loss(0.05).detach())
    singles = []
    for row, length in ((0, 10), (1, 6)):
        s = write(model, hist[row : row + 1], mode)
        model(q[row : row + 1, :length], memory=s)
        for i, m in model.delta_mem.beta_means.items():
            assert m.shape == (1,)
            torch.testing.assert_close(batch_means[i][row], m[0], rtol=1e-5, atol=1e-7)
        singles.append(float(model.delta_mem.beta_sparsity_loss(0.05).detach()))
    assert all(m.shape == (2,) for m in batch_means.values())
    assert batch_loss == pytest.approx(sum(singles) / 2, rel=1e-5)


@pytest.mark.parametrize(("mode", "branches"), [("TSW", ("q", "o")), ("SSW", ("q", "k", "v", "o")), ("MSW", ("o",))])
def test_inference_adds_factored_corrections(mode, branches, monkeypatch):
    """Under no_grad the hooks add each correction as reads · (s·U)ᵀ with one addmm_ (FactoredCorrection);
    prefill (writing and read-only) and decoding give what the materialised corrections give (float64)."""
    from deltamem.memory import FactoredCorrection

    cfg = {"write_mode": mode, "branches": branches, "num_substates": 2 if mode == "MSW" else None}
    model = attach_delta_mem(tiny_model("llama", "eager"), DeltaMemConfig(**cfg, memory_dtype="backbone")).double()
    hist, q = ids(B=2, T=16, seed=31), ids(B=2, T=6, seed=32)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding

    def run():
        state = write(model, hist, mode)
        logits = model(q, attention_mask=mask, memory=state).logits
        step = model(q[:, -1:], memory=state, memory_write=True).logits  # one token: the decode path
        return state, logits, step

    calls = []
    add_to = FactoredCorrection.add_to
    monkeypatch.setattr(FactoredCorrection, "add_to", lambda self, out: calls.append(1) or add_to(self, out))
    with torch.no_grad():
        factored = run()
    # three calls (write, read, one decode token) × layers × branches, SSW's segment write included
    assert len(calls) == 3 * len(model.delta_mem.layers) * len(branches)
    calls.clear()
    with torch.enable_grad():  # autograd on: the corrections are materialised
        plain = run()
    assert not calls
    for i in factored[0].layers:
        torch.testing.assert_close(factored[0].layers[i], plain[0].layers[i].detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(factored[1:], plain[1:], strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)  # NaN: padded rows

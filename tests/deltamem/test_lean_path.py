"""The lean per-layer path (``DeltaMemLayer.forward``) against the plain reference, in float64: values
and the gradients of every parameter, of x and of the state; and its upstream options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltamem import DeltaMemConfig
from deltamem.memory import DeltaMemLayer, inverse_bounded_sigmoid
from deltamem.ops.delta_rule import delta_rule_naive


class Attn(nn.Module):
    def __init__(self, d=12, q=16, kv=8):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, q, bias=False), nn.Linear(d, kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, kv, bias=False), nn.Linear(q, d, bias=False)


def make_layer(seed=0, **cfg) -> DeltaMemLayer:
    torch.manual_seed(seed)
    layer = DeltaMemLayer(DeltaMemConfig(scan_backend="naive", **cfg), Attn(), 12).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():  # every parameter random (gates and corrections included)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    return layer


def reference(layer, x, S, mask, write, seg):
    """The plain path: all projections, einsum reads, the naive scan, one matmul per branch."""
    p = layer.project(x)
    new = None
    cfg = layer.config
    usable = seg is not None and tuple(seg.shape) == tuple(x.shape[:2])
    if usable:
        valid = (seg >= 0) & (mask if mask is not None else True)
        usable = bool(valid.any())
    if not write:
        reads = layer.read_only(S, p, mask)
    elif cfg.write_mode == "SSW" and usable:
        reads, new = layer.write_segments(S, x, p, mask, seg)
    else:
        reads, new = delta_rule_naive(p["q"], p["k"], p["v"], p["keep"], p["erase"], p["write"], S, mask)
    corr = layer.corrections(reads, x.dtype)
    beta = p["beta"]
    w = torch.ones(beta.shape[:2], dtype=beta.dtype) if mask is None else mask.to(beta.dtype)
    per_row = w.sum(1) * beta.shape[2] * beta.shape[3]
    beta_mean = (beta * w[:, :, None, None]).sum((1, 2, 3)) / per_row.clamp_min(1.0)  # each row's mean β
    return [corr[b] for b in cfg.branches], new, beta_mean


CASES = [
    dict(),  # the paper's default: TSW, Q/O, coupled rank-wise gates
    dict(branches=("q", "k", "v", "o"), state_update_mode="lambda_outside", couple_lambda=False),
    dict(write_mode="MSW", num_substates=2, rank=4, rankwise_gates=False, state_update_mode="no_lambda"),
    dict(write_mode="SSW", branches=("o",)),
    dict(branches=("q", "o"), trainable_delta_scale=True, delta_scale_granularity="head", delta_o_rmsnorm=True),
    dict(branches=("k", "o"), trainable_delta_scale=True, normalize_qk=False),
]


def assert_grads_match_reference(layer, x, S, mask, write, seg) -> None:
    """The gradients of a random linear functional of the layer's outputs (corrections, new state, β mean)
    with respect to x, S and every parameter equal the plain reference's (float64)."""

    def loss(res):
        corr, new, bm = res
        gw = torch.Generator().manual_seed(5)
        total = sum((c * torch.randn(c.shape, generator=gw, dtype=c.dtype)).sum() for c in corr)
        total = total + 3 * (bm * torch.randn(bm.shape, generator=gw, dtype=bm.dtype)).sum()
        if new is not None:
            total = total + (new * torch.randn(new.shape, generator=gw, dtype=new.dtype)).sum()
        return total

    params = [x, S, *layer.parameters()]
    g_lean = torch.autograd.grad(loss(layer(x, S, mask, write, seg, stats=True)), params, allow_unused=True)
    g_ref = torch.autograd.grad(loss(reference(layer, x, S, mask, write, seg)), params, allow_unused=True)
    for (name, _), a, b in zip([("x", 0), ("S", 0), *layer.named_parameters()], g_lean, g_ref, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_lean_equals_reference_float64(cfg, T, write, masked):
    layer = make_layer(**cfg)
    B, H, r = 2, layer.num_substates, layer.rank
    g = torch.Generator().manual_seed(T + 10 * write)
    x = torch.randn(B, T, 12, generator=g, dtype=torch.float64, requires_grad=True)
    S = (torch.randn(B, H, r, r, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, 0] = False  # a padded token (the whole row when T = 1)
    seg = torch.tensor([[0, 0, 1, -1, 1, 2, 2][:T], [-1, 3, 3, 3, 4, 4, 4][:T]]) if T == 7 else None
    ref = reference(layer, x, S, mask, write, seg)
    out = layer(x, S, mask, write, seg, stats=True)
    for a, b in zip(out[0], ref[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert (out[1] is None) == (ref[1] is None)
    if write:
        torch.testing.assert_close(out[1], ref[1], atol=1e-12, rtol=0)
        assert (out[1] - S).abs().max() > 1e-3  # it did write
    torch.testing.assert_close(out[2], ref[2], atol=1e-12, rtol=0)
    assert max(c.abs().max() for c in out[0]) > 1e-3  # not vacuous

    assert_grads_match_reference(layer, x, S, mask, write, seg)


def test_read_only_skips_gates_and_stats_unless_asked():
    layer = make_layer()
    x = torch.randn(1, 3, 12, dtype=torch.float64)
    S = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    _, new, beta_mean = layer(x, S)
    assert new is None and beta_mean is None
    assert layer(x, S, stats=True)[2] is not None


def test_trainable_delta_scale_formula():
    """m = m_max·σ(ρ) starts at delta_scale_init; per head, branch h uses ρ[index of h in q, k, v, o]."""
    layer = DeltaMemLayer(
        DeltaMemConfig(trainable_delta_scale=True, delta_scale_init=0.5, delta_scale_max=2.0), Attn(), 12
    )
    assert layer.delta_scale_raw.shape == (1,)
    assert abs(float(torch.sigmoid(layer.delta_scale_raw.detach())) * 2.0 - 0.5) < 1e-7
    assert inverse_bounded_sigmoid(1.0, 2.0) == 0.0
    head = make_layer(branches=("v", "o"), trainable_delta_scale=True, delta_scale_granularity="head")
    assert head.delta_scale_raw.shape == (4,)
    with torch.no_grad():
        head.delta_scale_raw.copy_(torch.tensor([-9.0, -9.0, 0.3, -1.2], dtype=torch.float64))
    reads = torch.randn(1, 2, 1, 8, dtype=torch.float64)
    flat = reads.reshape(1, 2, 8)
    for b, rho in (("v", 0.3), ("o", -1.2)):  # by hand: s·m_max·σ(ρ)·U_h r
        m = 2.0 / (1.0 + torch.exp(torch.tensor(-rho, dtype=torch.float64)))
        expected = (flat @ getattr(head, f"delta_{b}_proj").T) * 2.0 * m
        torch.testing.assert_close(head.corrections(reads)[b], expected, atol=1e-12, rtol=0)


def test_delta_o_rmsnorm_by_hand():
    layer = make_layer(branches=("o",), delta_o_rmsnorm=True, delta_o_rmsnorm_eps=1e-6)
    assert layer.delta_o_rmsnorm_weight.shape == (12,)
    reads = torch.randn(2, 3, 1, 8, dtype=torch.float64)
    raw = (reads.reshape(2, 3, 8) @ layer.delta_o_proj.T) * 2.0
    w = layer.delta_o_rmsnorm_weight
    expected = raw / torch.sqrt(raw.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(layer.corrections(reads)["o"], expected, atol=1e-12, rtol=0)


def test_packed_weight_cache_follows_updates():
    layer = make_layer()
    x = torch.randn(1, 1, 12, dtype=torch.float64)
    S = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a = layer(x, S, write=True)[1]
        layer.memory_v_proj.add_(1.0)  # an optimizer-style in-place update
        b = layer(x, S, write=True)[1]
        ref = reference(layer, x, S, None, True, None)[1]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, ref, atol=1e-12, rtol=0)

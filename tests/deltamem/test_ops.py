"""The chunked scan against the per-token reference: values and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltamem.ops.delta_rule import delta_rule, delta_rule_chunk, delta_rule_naive


def random_inputs(B, T, H, r, dtype, mode="standard", seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    q = F.normalize(torch.tanh(randn(B, T, H, r)), dim=-1)
    k = F.normalize(torch.tanh(randn(B, T, H, r)), dim=-1)
    v = randn(B, T, H, r)
    beta = torch.sigmoid(randn(B, T, H, r))
    lam = torch.sigmoid(randn(B, T, H, r))
    keep, erase = {
        "standard": (1 - beta, beta),
        "lambda_outside": (lam, lam * beta),
        "no_lambda": (torch.ones_like(beta), beta),
    }[mode]
    xs = [t.clone().requires_grad_() for t in (q, k, v, keep, erase, beta)]
    s0 = randn(B, H, r, r).requires_grad_()
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return xs, s0, mask


def grads(fn, xs, s0, mask, seed=1):
    reads, final = fn(*xs, initial_state=s0, mask=mask)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(reads.shape, generator=g, dtype=reads.dtype)
    w2 = torch.randn(final.shape, generator=g, dtype=final.dtype)
    gs = torch.autograd.grad((reads * w1).sum() + (final * w2).sum(), [*xs, s0])
    return reads, final, gs


@pytest.mark.parametrize(
    "B,T,H,r,C,mode",
    [
        (2, 37, 1, 8, 16, "standard"),
        (1, 64, 2, 4, 16, "lambda_outside"),
        (3, 50, 4, 8, 7, "no_lambda"),
        (2, 5, 1, 16, 16, "standard"),  # T < C
        (1, 33, 1, 32, 8, "standard"),
    ],
)
def test_chunk_matches_naive_float64(B, T, H, r, C, mode):
    xs, s0, mask = random_inputs(B, T, H, r, torch.float64, mode, seed=T + r)
    r1, f1, g1 = grads(delta_rule_naive, xs, s0, mask)
    r2, f2, g2 = grads(lambda *a, **k: delta_rule_chunk(*a, chunk_size=C, **k), xs, s0, mask)
    assert f1.abs().max() > 0.1  # the test is not vacuous
    torch.testing.assert_close(r2, r1, atol=1e-10, rtol=0)
    torch.testing.assert_close(f2, f1, atol=1e-10, rtol=0)
    for name, a, b in zip(["q", "k", "v", "keep", "erase", "write", "s0"], g1, g2, strict=True):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0, msg=f"grad {name}")


def test_chunk_matches_naive_float32():
    xs64, s064, mask = random_inputs(2, 100, 2, 8, torch.float64, seed=7)
    xs = [x.detach().float().requires_grad_() for x in xs64]
    s0 = s064.detach().float().requires_grad_()
    r1, f1, g1 = grads(delta_rule_naive, xs, s0, mask)
    r2, f2, g2 = grads(delta_rule_chunk, xs, s0, mask)
    for a, b in [(r1, r2), (f1, f2), *zip(g1, g2, strict=True)]:
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_masked_tokens_neither_read_nor_write():
    xs, s0, _ = random_inputs(1, 12, 1, 8, torch.float64)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, 4:9] = False
    reads, final = delta_rule_chunk(*xs, initial_state=s0, mask=mask, chunk_size=4)
    assert (reads[0, 4:9] == 0).all()
    keep_idx = torch.tensor([0, 1, 2, 3, 9, 10, 11])
    ref_reads, ref_final = delta_rule_naive(*(x[:, keep_idx] for x in xs), initial_state=s0)
    torch.testing.assert_close(final, ref_final, atol=1e-12, rtol=0)
    torch.testing.assert_close(reads[:, keep_idx], ref_reads, atol=1e-12, rtol=0)


def test_split_scan_equals_one_pass():
    xs, s0, mask = random_inputs(2, 40, 2, 8, torch.float64, seed=3)
    full_r, full_s = delta_rule_chunk(*xs, initial_state=s0, mask=mask)
    cut = 17
    r1, s1 = delta_rule_chunk(*(x[:, :cut] for x in xs), initial_state=s0, mask=mask[:, :cut])
    r2, s2 = delta_rule_chunk(*(x[:, cut:] for x in xs), initial_state=s1, mask=mask[:, cut:])
    torch.testing.assert_close(torch.cat([r1, r2], 1), full_r, atol=1e-12, rtol=0)
    torch.testing.assert_close(s2, full_s, atol=1e-12, rtol=0)


def test_dispatch_and_errors():
    xs, s0, mask = random_inputs(1, 9, 1, 4, torch.float64)
    a = delta_rule(*xs, initial_state=s0, mask=mask, backend="naive")
    b = delta_rule(*xs, initial_state=s0, mask=mask, backend="auto")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="backend"):
        delta_rule(*xs, backend="cuda")


def extreme_gates(B, T, H, r, dtype, seed=0):
    """Gates at the ends of their range: keep ≈ 0 (the decay ratios underflow), keep ≈ 1 over long runs,
    erase ≈ 0 and ≈ 1; the chunked form clamps its decay exponents at log(tiny) and must stay exact."""
    xs, s0, mask = random_inputs(B, T, H, r, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(B, T, H, r, generator=g, dtype=dtype)
    keep = torch.where(u < 0.3, 1e-6, torch.where(u < 0.7, 1 - 1e-7, 0.5))  # strong, long, middling
    erase = torch.where(torch.rand(B, T, H, r, generator=g, dtype=dtype) < 0.5, 1 - 1e-6, 1e-6)
    q, k, v, _, _, write = (x.detach() for x in xs)
    xs = [t.clone().requires_grad_() for t in (q, k, v, keep.to(dtype), erase.to(dtype), write)]
    return xs, s0, mask


def test_chunk_matches_naive_extreme_gates_float64():
    xs, s0, mask = extreme_gates(2, 70, 2, 8, torch.float64, seed=11)
    r1, f1, g1 = grads(delta_rule_naive, xs, s0, mask)
    r2, f2, g2 = grads(delta_rule_chunk, xs, s0, mask)
    torch.testing.assert_close(r2, r1, atol=1e-10, rtol=0)
    torch.testing.assert_close(f2, f1, atol=1e-10, rtol=0)
    for name, a, b in zip(["q", "k", "v", "keep", "erase", "write", "s0"], g1, g2, strict=True):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9, msg=f"grad {name}")


def test_chunk_extreme_gates_float32_close_to_float64():
    """fp32 on gates whose decay ratios fall far below the smallest normal float (keep = 1e-6 repeatedly)
    and exact zeros (keep = 0): finite, and within fp32 rounding of the float64 reference."""
    xs64, s064, mask = extreme_gates(2, 100, 2, 8, torch.float64, seed=5)
    keep = xs64[3].detach().clone()
    keep[:, ::7] = 0.0  # exact zeros: log clamps at log(tiny)
    xs64[3] = keep
    ref_r, ref_s = delta_rule_naive(*(x.detach() for x in xs64), initial_state=s064.detach(), mask=mask)
    reads, final = delta_rule_chunk(*(x.detach().float() for x in xs64), initial_state=s064.detach().float(), mask=mask)
    assert torch.isfinite(reads).all() and torch.isfinite(final).all()
    assert (reads.double() - ref_r).abs().max() <= 1e-5 * ref_r.abs().max()
    assert (final.double() - ref_s).abs().max() <= 1e-5 * ref_s.abs().max()

"""Triton kernels of the delta rule against the naive reference: reads, final state, every gradient, decode.

On CPU they run under the Triton interpreter, which has to be chosen before triton is imported:
``triton.jit`` decides at decoration time, and that includes triton's own ``@jit`` helpers in
``triton.language`` (``tl.zeros``, ``tl.sum``...), decorated when triton is first imported. So this module
sets ``TRITON_INTERPRET=1`` when it is collected and imports the fused module lazily in a fixture.

In a full ``pytest`` run, another test module has usually imported triton already, compiled
(``from transformers import LlamaForCausalLM`` does). Then these tests skip here, and
``test_fused_suite_in_fresh_process`` runs this file in a fresh process and fails if anything fails there.
The variable stays set until this module's tests end (it only makes ``fused_available`` true on CPU);
then it is restored and the fused module is dropped.

``DELTAMEM_FUSED_TEST_DEVICE=cuda`` runs the same tests with the compiled kernels on a GPU instead.
The interpreter costs ~2 ms per program and token step: sizes are kept to B·H·T ≲ 120 per case.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from deltamem.ops.delta_rule import delta_rule
from deltamem.ops.delta_rule.naive import delta_rule_naive, delta_rule_step

MODULE = "deltamem.ops.delta_rule.fused"
ON_GPU = os.environ.get("DELTAMEM_FUSED_TEST_DEVICE", "cpu") == "cuda"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
REPO = Path(__file__).resolve().parents[2]
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
_TRITON_IMPORTED_COMPILED = "triton" in sys.modules and _PREVIOUS_INTERPRET != "1"
IN_CHILD = os.environ.get("DELTAMEM_FUSED_TEST_CHILD") == "1"  # run by test_fused_suite_in_fresh_process
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (see the module docstring)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None,
        reason="triton is not installed (pip install 'deltamem[kernels]'); the fused kernels are untested",
    ),
]


@pytest.fixture(scope="module")
def fused() -> Iterator[ModuleType]:
    """The fused module, with interpreted kernels on CPU (compiled ones with DELTAMEM_FUSED_TEST_DEVICE=cuda)."""
    if ON_GPU:
        if not torch.cuda.is_available():
            pytest.skip("DELTAMEM_FUSED_TEST_DEVICE=cuda but no CUDA device")
        yield importlib.import_module(MODULE)
        return
    if _TRITON_IMPORTED_COMPILED:
        pytest.skip(
            "triton was imported (compiled) before this module could set TRITON_INTERPRET=1; "
            "test_fused_suite_in_fresh_process runs these tests in a fresh process"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.import_module(MODULE)
    assert module.interpreted(), f"{MODULE} was imported before TRITON_INTERPRET=1 was set"
    try:
        yield module
    finally:
        if _PREVIOUS_INTERPRET is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET
        sys.modules.pop(MODULE, None)  # the next import decorates the kernels afresh
        parent = sys.modules.get("deltamem.ops.delta_rule")
        if parent is not None and hasattr(parent, "fused"):
            delattr(parent, "fused")


def make_inputs(B: int, T: int, H: int, r: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """q, k: L2-normalised tanh(randn); v: randn; keep/erase/write: sigmoid(randn); initial state: randn."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    q = F.normalize(torch.tanh(randn(B, T, H, r)), dim=-1)
    k = F.normalize(torch.tanh(randn(B, T, H, r)), dim=-1)
    v = randn(B, T, H, r)
    keep, erase, write = (torch.sigmoid(randn(B, T, H, r)) for _ in range(3))
    s0 = randn(B, H, r, r)
    return [x.to(DEVICE) for x in (q, k, v, keep, erase, write, s0)]


def ragged_mask(B: int, T: int, seed: int) -> torch.Tensor:
    """Right padding of random lengths (one row fully padded when B > 2), one left-padded row, random holes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if B > 1:
        mask[1] = torch.arange(T) >= T // 3  # left padding
    if B > 2:
        mask[2] = False
    mask[0] &= torch.rand(T, generator=g) > 0.2
    return mask.to(DEVICE)


def run_both(fn, xs: list[torch.Tensor], mask: torch.Tensor | None, use_init: bool, seed: int):
    """Outputs and gradients (wrt the 6 inputs and the initial state) of ``fn`` and of the naive loop."""
    results = []
    for impl in (fn, delta_rule_naive):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        init = leaves[6] if use_init else None
        reads, final = impl(*leaves[:6], init, mask)
        g = torch.Generator().manual_seed(seed + 1)  # same random cotangents for both
        d_reads = torch.randn(reads.shape, generator=g, dtype=reads.dtype).to(DEVICE)
        d_final = torch.randn(final.shape, generator=g, dtype=final.dtype).to(DEVICE)
        loss = (reads * d_reads).sum() + (final * d_final).sum()
        grads = torch.autograd.grad(loss, leaves if use_init else leaves[:6])
        results.append((reads.detach(), final.detach(), *grads))
    return results


NAMES = ("reads", "final_state", "dq", "dk", "dv", "dkeep", "derase", "dwrite", "dinitial_state")

# (B, T, H, r, chunk_size, replay_size, masked, initial state): T never a multiple of the chunk;
# replay_size < chunk exercises the backward's recompute-from-chunk-start path.
CASES = [
    pytest.param(2, 37, 1, 4, 8, None, True, True, id="r4-H1-C8"),
    pytest.param(2, 29, 2, 8, 8, 2, True, True, id="r8-H2-C8-replay2"),
    pytest.param(3, 19, 1, 8, 5, None, True, False, id="r8-H1-C5-padded-rows-no-init"),
    pytest.param(1, 21, 2, 16, None, None, False, True, id="r16-H2-default-chunk-no-mask"),
    pytest.param(1, 11, 1, 32, 4, 2, True, True, id="r32-rowsplit"),
]


@pytest.mark.parametrize(("B", "T", "H", "r", "chunk", "replay", "masked", "use_init"), CASES)
def test_scan_matches_naive_float64(
    fused: ModuleType, B: int, T: int, H: int, r: int, chunk, replay, masked: bool, use_init: bool
) -> None:
    seed = 1000 * r + T
    xs = make_inputs(B, T, H, r, torch.float64, seed)
    mask = ragged_mask(B, T, seed) if masked else None

    def fn(*args):
        return fused.delta_rule_fused(*args, chunk_size=chunk, replay_size=replay)

    got, want = run_both(fn, xs, mask, use_init, seed)
    assert len(got) == len(want) == (9 if use_init else 8)
    for name, a, b in zip(NAMES, got, want, strict=False):
        assert a.dtype == b.dtype == torch.float64, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    if masked:  # padded tokens read nothing and get no gradient
        pad = ~mask
        assert pad.any()
        for g in (got[0], *got[2:8]):
            assert not g[pad].any()


def test_scan_float32_and_mixed_dtypes(fused: ModuleType) -> None:
    B, T, H, r = 2, 24, 1, 8
    xs = make_inputs(B, T, H, r, torch.float32, seed=7)
    mask = ragged_mask(B, T, 7)
    got, want = run_both(fused.delta_rule_fused, xs, mask, True, 7)
    for name, a, b in zip(NAMES, got, want, strict=True):
        scale = b.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() <= 1e-4 * scale, name
    # bf16 inputs, fp32 state: computed in fp32, reads promoted to fp32, state stays fp32
    low = [x.bfloat16() for x in xs[:6]]
    reads, final = fused.delta_rule_fused(*low, xs[6], mask)
    ref_reads, ref_final = delta_rule_naive(*[x.float() for x in low], xs[6], mask)
    assert reads.dtype == final.dtype == torch.float32
    torch.testing.assert_close(reads, ref_reads, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final, ref_final, rtol=1e-4, atol=1e-5)


def test_scan_detects_a_wrong_rule(fused: ModuleType) -> None:
    """The comparison can fail: decaying before the error term (Gated DeltaNet) gives other numbers."""
    B, T, H, r = 1, 12, 1, 4
    q, k, v, keep, erase, write, s0 = make_inputs(B, T, H, r, torch.float64, seed=3)
    reads, final = fused.delta_rule_fused(q, k, v, keep, erase, write, s0, chunk_size=4)
    state, gdn = s0, []
    for t in range(T):  # S ← diag(a) S − diag(b) (diag(a) S k) kᵀ + diag(c) v kᵀ
        gdn.append(torch.einsum("bhij,bhj->bhi", state, q[:, t]))
        decayed = keep[:, t].unsqueeze(-1) * state
        sk = torch.einsum("bhij,bhj->bhi", decayed, k[:, t])
        state = decayed + (write[:, t] * v[:, t] - erase[:, t] * sk).unsqueeze(-1) * k[:, t].unsqueeze(-2)
    assert (final - state).abs().max() > 1e-3
    assert (reads - torch.stack(gdn, 1)).abs().max() > 1e-3


def test_only_one_output_used(fused: ModuleType) -> None:
    """Gradients when the loss uses only the reads (the final state's cotangent is absent) and vice versa."""
    xs = make_inputs(1, 10, 1, 8, torch.float64, seed=11)
    for pick in (0, 1):
        grads = []
        for impl in (fused.delta_rule_fused, delta_rule_naive):
            leaves = [x.clone().requires_grad_() for x in xs]
            out = impl(*leaves)[pick]
            got = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)  # q: unused by the state
            grads.append([torch.zeros_like(x) if g is None else g for x, g in zip(leaves, got, strict=True)])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        assert grads[0][0].abs().sum() > 0 if pick == 0 else not grads[0][0].any()


@pytest.mark.parametrize("r", [4, 8, 16])
@pytest.mark.parametrize("H", [1, 2])
def test_decode_step_matches_naive(fused: ModuleType, r: int, H: int) -> None:
    B = 3
    q, k, v, keep, erase, write, _ = make_inputs(B, 1, H, r, torch.float64, seed=r + H)
    state = make_inputs(B, 1, H, r, torch.float64, seed=99)[6]
    toks = [x[:, 0] for x in (q, k, v, keep, erase, write)]
    for valid in (None, torch.tensor([True, False, True], device=DEVICE)):
        read, new = fused.delta_rule_step_fused(state, *toks, valid)
        ref_read, ref_new = delta_rule_step(state, *toks, valid)
        torch.testing.assert_close(read, ref_read, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new, ref_new, rtol=1e-12, atol=1e-12)
        assert not torch.equal(new, state) and new.data_ptr() != state.data_ptr()
        if valid is not None:
            assert torch.equal(new[1], state[1]) and not read[1].any()


def test_decode_steps_chain_to_the_scan(fused: ModuleType) -> None:
    B, T, H, r = 2, 6, 2, 8
    q, k, v, keep, erase, write, s0 = make_inputs(B, T, H, r, torch.float64, seed=5)
    mask = torch.tensor([[True] * T, [True, True, False, True, False, True]], device=DEVICE)
    reads, final = fused.delta_rule_fused(q, k, v, keep, erase, write, s0, mask)
    state = s0
    for t in range(T):
        read, state = fused.delta_rule_step_fused(
            state, q[:, t], k[:, t], v[:, t], keep[:, t], erase[:, t], write[:, t], mask[:, t]
        )
        torch.testing.assert_close(read, reads[:, t], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-12)


def test_decode_step_under_autograd_falls_back(fused: ModuleType) -> None:
    xs = make_inputs(2, 1, 1, 4, torch.float64, seed=8)
    state = xs[6].clone().requires_grad_()
    toks = [x[:, 0] for x in xs[:6]]
    read, new = fused.delta_rule_step_fused(state, *toks)
    (g,) = torch.autograd.grad(read.sum() + new.sum(), state)
    ref_state = xs[6].clone().requires_grad_()
    ref_read, ref_new = delta_rule_step(ref_state, *toks)
    (ref_g,) = torch.autograd.grad(ref_read.sum() + ref_new.sum(), ref_state)
    torch.testing.assert_close(g, ref_g)


def test_dispatch_selects_fused(fused: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    xs = make_inputs(1, 9, 1, 8, torch.float64, seed=4)
    calls = []
    real = fused.delta_rule_fused

    def spy(*args, **kwargs):
        calls.append(len(args))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "delta_rule_fused", spy)
    reads, final = delta_rule(*xs, backend="fused")
    assert calls == [8]
    ref_reads, ref_final = delta_rule_naive(*xs)
    torch.testing.assert_close(reads, ref_reads, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(final, ref_final, rtol=1e-9, atol=1e-10)


def test_edge_cases_and_validation(fused: ModuleType) -> None:
    xs = make_inputs(2, 0, 1, 8, torch.float64, seed=1)
    reads, final = fused.delta_rule_fused(*xs)
    assert reads.shape == (2, 0, 1, 8) and torch.equal(final, xs[6])
    one = make_inputs(1, 1, 1, 8, torch.float64, seed=2)  # T = 1 (Triton specialises ints equal to 1)
    got, want = fused.delta_rule_fused(*one), delta_rule_naive(*one)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    bad = make_inputs(1, 4, 1, 6, torch.float64, seed=2)
    with pytest.raises(ValueError, match="power of two"):
        fused.delta_rule_fused(*bad)
    with pytest.raises(ValueError, match="replay_size"):
        fused.delta_rule_fused(*one, replay_size=3)
    with pytest.raises(ValueError, match="mask"):
        fused.delta_rule_fused(*one, mask=torch.ones(1, 2, dtype=torch.bool, device=DEVICE))


def test_fused_suite_in_fresh_process() -> None:
    """When this process cannot interpret the kernels, run this file where it can; fail if anything fails."""
    if ON_GPU or not _TRITON_IMPORTED_COMPILED:
        pytest.skip("not needed: the fused tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DELTAMEM_FUSED_TEST_CHILD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 15 and "failed" not in summary, summary


@pytest.mark.skipif(IN_CHILD, reason="already run by the parent process")
def test_cpu_path_does_not_import_triton() -> None:
    code = """
        import sys, torch
        import deltamem, deltamem.ops.delta_rule as d
        x = torch.rand(1, 3, 1, 4)
        d.delta_rule(x, x, x, x, x, x, backend="chunk"); d.delta_rule(x, x, x, x, x, x, backend="auto")
        assert "triton" not in sys.modules, "importing deltamem or running the CPU scan imported triton"
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


@pytest.mark.skipif(IN_CHILD, reason="already run by the parent process")
def test_kernels_compile_for_h100() -> None:
    """Ahead-of-time compile for sm_90 (no GPU needed): what the interpreter cannot check."""
    code = """
        from deltamem.ops.delta_rule.fused import compile_kernels
        for r in (8, 32):
            kernels = compile_kernels(r, arch=90)
            assert set(kernels) == {"maps", "scan", "reads", "adjoint", "scan_T", "grads", "decode"}
            for name in ("maps", "scan", "reads", "adjoint", "grads"):  # the loop loads are prefetched
                assert "async_copy_global_to_local" in kernels[name].asm["ttgir"], (r, name)
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


def test_memory_module_chunk_vs_fused(fused: ModuleType) -> None:
    """A tiny attached model gives the same logits, states and δ-mem gradients with backend chunk and fused."""
    from deltamem import DeltaMemConfig, attach_delta_mem
    from tests.conftest import tiny_model

    g = torch.Generator().manual_seed(0)
    hist, ques = torch.randint(0, 97, (2, 9), generator=g), torch.randint(0, 97, (2, 5), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    results = []
    for backend in ("chunk", "fused"):
        model = attach_delta_mem(
            tiny_model("llama").to(DEVICE), DeltaMemConfig(scan_backend=backend, branches=("q", "k", "o"))
        )
        state = model.write_memory(hist.to(DEVICE), attention_mask=mask.to(DEVICE))
        logits = model(ques.to(DEVICE), memory=state).logits
        logits.square().mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.delta_mem.named_parameters()}
        results.append((logits.detach(), state.detach(), grads))
    (l1, s1, g1), (l2, s2, g2) = results
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    assert s2.equal(s1, atol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert g1[name].abs().max() > 0, name
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)
